// The datasets list (GET /api/datasets).
"use strict";

(async () => {
  try {
    const answer = await cr.getJSON("/api/datasets");
    const body = document.querySelector("#datasets tbody");
    body.replaceChildren(
      ...answer.datasets.map((dataset) => {
        const row = cr.el("tr");
        const columns = cr.el("td");
        for (const column of dataset.columns) {
          const chip = cr.el("span", null, "chip");
          chip.append(cr.el("span", column.name, "name"), cr.el("span", ` ${column.dtype} [${column.shape.join(", ")}]`, "muted"));
          columns.append(chip);
        }
        row.append(
          cr.el("td", dataset.name, "name"),
          cr.el("td", dataset.dataset_id, "id"),
          columns,
          cr.el("td", dataset.num_examples, "number"),
          cr.el("td", cr.bytes(dataset.size_bytes), "number"),
          cr.el("td", dataset.sha256.slice(0, 16), "id"),
          cr.el("td", cr.time(dataset.create_time)),
        );
        return row;
      }),
    );
    if (!answer.datasets.length) {
      const row = cr.el("tr");
      row.append(cr.el("td", "No datasets yet: upload one with chainrule upload-dataset NAME FILE.npz.", "muted"));
      body.append(row);
    }
  } catch (error) {
    cr.showError(error.message);
  }
})();
