// The jobs list, newest first, a page at a time (GET /api/jobs?state=&page=), refreshed every
// second; ticked jobs can be compared.
"use strict";

(() => {
  const body = document.querySelector("#jobs tbody");
  const filter = document.getElementById("state-filter");
  const compare = document.getElementById("compare");
  const selected = new Set();
  let page = Number(new URLSearchParams(location.search).get("page")) || 1;

  function row(job) {
    const tr = cr.el("tr");
    tr.dataset.jobId = job.job_id;
    const tick = cr.el("td");
    const box = cr.el("input");
    box.type = "checkbox";
    box.checked = selected.has(job.job_id);
    box.setAttribute("aria-label", `compare job ${job.job_id}`);
    box.addEventListener("change", () => {
      if (box.checked) selected.add(job.job_id);
      else selected.delete(job.job_id);
      compare.disabled = selected.size === 0;
    });
    tick.append(box);
    const id = cr.el("td");
    id.append(cr.link(`/jobs/${encodeURIComponent(job.job_id)}`, job.job_id, "id"));
    const graph = cr.el("td");
    graph.append(cr.link(`/graphs/${encodeURIComponent(job.graph_id)}`, job.graph_name || job.graph_id, "name"));
    const state = cr.el("td");
    state.append(cr.stateBadge(job.state));
    if (job.error) state.title = job.error;
    const progress = cr.el("td");
    progress.append(cr.progressCell(job.step, job.total_steps));
    tr.append(
      tick,
      id,
      graph,
      state,
      progress,
      cr.el("td", job.epoch, "number"),
      cr.el("td", job.steps_per_second === null ? "–" : job.steps_per_second.toFixed(1), "number"),
      cr.el("td", cr.number(job.loss), "number"),
      cr.el("td", cr.metricsText(job.metrics)),
      cr.el("td", cr.time(job.create_time)),
    );
    return tr;
  }

  async function refresh() {
    const query = new URLSearchParams({ page: String(page) });
    if (filter.value) query.set("state", filter.value);
    try {
      const answer = await cr.getJSON(`/api/jobs?${query}`);
      page = answer.page;
      body.replaceChildren(...answer.jobs.map(row));
      if (!answer.jobs.length) {
        const empty = cr.el("tr");
        empty.append(cr.el("td", "No jobs.", "muted"));
        body.append(empty);
      }
      document.getElementById("page").textContent = `page ${answer.page} of ${answer.pages} (${answer.total} job${answer.total === 1 ? "" : "s"})`;
      document.getElementById("previous").disabled = answer.page <= 1;
      document.getElementById("next").disabled = answer.page >= answer.pages;
      document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
      cr.showError("");
    } catch (error) {
      cr.showError(error.message);
    }
  }

  function turn(to) {
    page = to;
    history.replaceState(null, "", page > 1 ? `/jobs?page=${page}` : "/jobs");
    refresh();
  }

  async function loop() {
    if (!document.hidden) await refresh(); // a tab in the background asks for nothing
    setTimeout(loop, 1000);
  }

  filter.addEventListener("change", () => turn(1));
  document.getElementById("previous").addEventListener("click", () => turn(page - 1));
  document.getElementById("next").addEventListener("click", () => turn(page + 1));
  compare.addEventListener("click", () => {
    const query = new URLSearchParams();
    for (const id of selected) query.append("jobs", id);
    location.href = `/compare?${query}`;
  });
  loop();
})();
