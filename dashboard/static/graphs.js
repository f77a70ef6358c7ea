// The graphs list: searched and paged by the dashboard (GET /api/graphs?q=&page=).
"use strict";

(() => {
  const search = document.getElementById("search");
  const body = document.querySelector("#graphs tbody");
  const params = new URLSearchParams(location.search);
  let page = Number(params.get("page")) || 1;
  search.value = params.get("q") || "";

  async function load() {
    const query = new URLSearchParams({ q: search.value, page: String(page) });
    history.replaceState(null, "", `/graphs?${query}`);
    try {
      const answer = await cr.getJSON(`/api/graphs?${query}`);
      page = answer.page;
      body.replaceChildren(
        ...answer.graphs.map((graph) => {
          const row = cr.el("tr");
          const name = cr.el("td");
          name.append(cr.link(`/graphs/${encodeURIComponent(graph.graph_id)}`, graph.name || "(unnamed)", "name"));
          row.append(
            name,
            cr.el("td", graph.graph_id, "id"),
            cr.el("td", graph.node_count, "number"),
            cr.el("td", graph.parameter_count, "number"),
            cr.el("td", graph.step, "number"),
            cr.el("td", cr.time(graph.create_time)),
          );
          return row;
        }),
      );
      document.getElementById("count").textContent = `${answer.total} graph${answer.total === 1 ? "" : "s"}`;
      document.getElementById("page").textContent = `page ${answer.page} of ${answer.pages}`;
      document.getElementById("previous").disabled = answer.page <= 1;
      document.getElementById("next").disabled = answer.page >= answer.pages;
      cr.showError("");
    } catch (error) {
      cr.showError(error.message);
    }
  }

  let typing = null;
  search.addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => { page = 1; load(); }, 200);
  });
  document.getElementById("previous").addEventListener("click", () => { page -= 1; load(); });
  document.getElementById("next").addEventListener("click", () => { page += 1; load(); });
  load();
})();
