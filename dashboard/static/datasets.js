// The datasets list, a page at a time (GET /api/datasets?page_token=): one ListDatasets call a
// page, as the graphs list reads the server's pages, so any number of datasets shows at once.
"use strict";

(() => {
  const body = document.querySelector("#datasets tbody");

  function row(dataset) {
    const tr = cr.el("tr");
    const columns = cr.el("td");
    for (const column of dataset.columns) {
      const chip = cr.el("span", null, "chip");
      chip.append(cr.el("span", column.name, "name"), cr.el("span", ` ${column.dtype} [${column.shape.join(", ")}]`, "muted"));
      columns.append(chip);
    }
    tr.append(
      cr.el("td", dataset.name, "name"),
      cr.el("td", dataset.dataset_id, "id"),
      columns,
      cr.el("td", dataset.num_examples, "number"),
      cr.el("td", cr.bytes(dataset.size_bytes), "number"),
      cr.el("td", dataset.sha256.slice(0, 16), "id"),
      cr.el("td", cr.time(dataset.create_time)),
    );
    return tr;
  }

  async function load(token, shownBefore) {
    const query = new URLSearchParams(token ? { page_token: token } : {});
    history.replaceState(null, "", token ? `/datasets?${query}` : "/datasets");
    try {
      const answer = await cr.getJSON(`/api/datasets?${query}`);
      body.replaceChildren(...answer.datasets.map(row));
      if (!answer.datasets.length) {
        const empty = cr.el("tr");
        empty.append(cr.el("td", "No datasets yet: upload one with chainrule upload-dataset NAME FILE.npz.", "muted"));
        body.append(empty);
      }
      const first = shownBefore + (answer.datasets.length ? 1 : 0);
      document.getElementById("count").textContent = `datasets ${first}–${shownBefore + answer.datasets.length}`;
      document.getElementById("page").textContent = answer.next_page_token ? "more after these" : "the last page";
      cr.showError("");
      return { next: answer.next_page_token, shown: answer.datasets.length };
    } catch (error) {
      cr.showError(error.message);
      return null;
    }
  }

  cr.tokenPager(new URLSearchParams(location.search).get("page_token") || "", load).show();
})();
