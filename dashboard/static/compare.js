// Several jobs' curves on the same axes, each followed live as on its own page.
"use strict";

(() => {
  const ids = [...new Set(new URLSearchParams(location.search).getAll("jobs"))];
  const runs = ids.map((id) => ({ id, label: id.slice(0, 8), steps: [], losses: [], metrics: new Map() }));
  const list = document.getElementById("compared");
  let lossChart = null;
  let metricsChart = null;
  let metricKeys = "";

  document.getElementById("add-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = document.getElementById("add-job").value.trim();
    if (!id) return;
    const query = new URLSearchParams();
    for (const existing of [...ids, id]) query.append("jobs", existing);
    location.href = `/compare?${query}`;
  });

  function draw() {
    if (!runs.length) return;
    const lossBox = document.getElementById("loss-chart");
    if (!lossChart) lossChart = cr.lineChart(lossBox, runs.map((run, index) => cr.series(run.label, index)), { yLabel: "loss", height: 320 });
    lossChart.update(uPlot.join(runs.map((run) => [run.steps, run.losses])));
    lossBox.dataset.points = String(runs.reduce((total, run) => total + run.steps.length, 0));

    const keys = [];
    runs.forEach((run, index) => {
      for (const name of [...run.metrics.keys()].sort()) keys.push({ run, index, name });
    });
    if (!keys.length) return;
    const metricsBox = document.getElementById("metrics-chart");
    const signature = keys.map((key) => `${key.run.id}\u0000${key.name}`).join("\u0001");
    if (signature !== metricKeys) {
      metricKeys = signature;
      if (metricsChart) metricsChart.destroy();
      metricsBox.replaceChildren();
      metricsChart = cr.lineChart(
        metricsBox,
        keys.map((key) => cr.series(`${key.run.label} ${key.name}`, key.index, { points: { show: true } })),
        { yLabel: "value", height: 320 },
      );
    }
    metricsChart.update(uPlot.join(keys.map((key) => [key.run.metrics.get(key.name).steps, key.run.metrics.get(key.name).values])));
  }

  runs.forEach(async (run, index) => {
    const item = cr.el("li");
    const swatch = cr.el("span", null, "swatch");
    swatch.style.background = cr.palette[index % cr.palette.length];
    const name = cr.link(`/jobs/${encodeURIComponent(run.id)}`, run.id, "id");
    const detail = cr.el("span", "", "muted");
    item.append(swatch, name, detail);
    list.append(item);
    try {
      const job = await cr.getJSON(`/api/jobs/${encodeURIComponent(run.id)}`);
      detail.textContent = ` ${job.graph_name || job.graph_id} · ${job.state} · lr ${cr.number(job.schedule.base_learning_rate)} · batch ${job.spec.batch_size || "?"}`;
    } catch (error) {
      detail.textContent = ` ${error.message}`;
      return;
    }
    cr.follow(run.id, (events) => {
      for (const event of events) {
        if (event.state !== undefined) continue;
        run.steps.push(event.step);
        run.losses.push(event.loss);
        for (const [metric, value] of Object.entries(event.metrics)) {
          if (!run.metrics.has(metric)) run.metrics.set(metric, { steps: [], values: [] });
          run.metrics.get(metric).steps.push(event.step);
          run.metrics.get(metric).values.push(value);
        }
      }
      draw();
    });
  });
})();
