// The graphs list, a page at a time (GET /api/graphs?q=&page_token=): the dashboard reads the
// server's pages as they are asked for, and a search reads on only until a page is found.
"use strict";

(() => {
  const search = document.getElementById("search");
  const body = document.querySelector("#graphs tbody");
  const params = new URLSearchParams(location.search);
  search.value = params.get("q") || "";

  function row(graph) {
    const tr = cr.el("tr");
    const name = cr.el("td");
    name.append(cr.link(`/graphs/${encodeURIComponent(graph.graph_id)}`, graph.name || "(unnamed)", "name"));
    tr.append(
      name,
      cr.el("td", graph.graph_id, "id"),
      cr.el("td", graph.node_count, "number"),
      cr.el("td", graph.parameter_count, "number"),
      cr.el("td", graph.step, "number"),
      cr.el("td", cr.time(graph.create_time)),
    );
    return tr;
  }

  async function load(token, shownBefore) {
    const query = new URLSearchParams({ q: search.value });
    if (token) query.set("page_token", token);
    history.replaceState(null, "", `/graphs?${query}`);
    try {
      const answer = await cr.getJSON(`/api/graphs?${query}`);
      body.replaceChildren(...answer.graphs.map(row));
      if (!answer.graphs.length) {
        const empty = cr.el("tr");
        empty.append(cr.el("td", answer.query ? "No graph matches on this page." : "No graphs.", "muted"));
        body.append(empty);
      }
      const next = answer.next_page_token;
      const first = shownBefore + (answer.graphs.length ? 1 : 0);
      const range = `graphs ${first}–${shownBefore + answer.graphs.length}`;
      document.getElementById("count").textContent = answer.query ? `${range} matching “${answer.query}”` : range;
      let where = next ? "more after these" : "the last page";
      if (answer.query && next && answer.graphs.length < answer.page_size) {
        where = `${answer.scanned} graphs searched so far: Next searches on`;
      }
      document.getElementById("page").textContent = where;
      cr.showError("");
      return { next, shown: answer.graphs.length };
    } catch (error) {
      cr.showError(error.message);
      return null;
    }
  }

  const pager = cr.tokenPager(params.get("page_token") || "", load);
  let typing = null;
  search.addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(pager.restart, 300);
  });
  pager.show();
})();
