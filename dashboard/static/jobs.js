// The jobs list, refreshed every second; ticked jobs can be compared.
"use strict";

(() => {
  const body = document.querySelector("#jobs tbody");
  const filter = document.getElementById("state-filter");
  const compare = document.getElementById("compare");
  const selected = new Set();

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
    const query = filter.value ? `?state=${encodeURIComponent(filter.value)}` : "";
    try {
      const answer = await cr.getJSON(`/api/jobs${query}`);
      const jobs = answer.jobs.slice().reverse();
      body.replaceChildren(...jobs.map(row));
      if (!jobs.length) {
        const empty = cr.el("tr");
        empty.append(cr.el("td", "No jobs.", "muted"));
        body.append(empty);
      }
      document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
      cr.showError("");
    } catch (error) {
      cr.showError(error.message);
    }
  }

  async function loop() {
    await refresh();
    setTimeout(loop, 1000);
  }

  filter.addEventListener("change", refresh);
  compare.addEventListener("click", () => {
    const query = new URLSearchParams();
    for (const id of selected) query.append("jobs", id);
    location.href = `/compare?${query}`;
  });
  loop();
})();
