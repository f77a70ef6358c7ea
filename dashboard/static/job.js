// A job's page: its header refreshed every second, its curves fed live by WatchJob (Server-Sent
// Events, history first), its spec, its learning-rate schedule, and a cancel button.
"use strict";

(() => {
  const root = document.getElementById("job-page");
  const jobId = root.dataset.jobId;
  const base = `/api/jobs/${encodeURIComponent(jobId)}`;
  const steps = [];
  const losses = [];
  const smoothed = []; // an exponential moving average of the loss, debiased as TensorBoard's smoothing is
  const SMOOTHING = 0.95;
  let average = 0;
  let weight = 0;
  const rates = [];
  const metrics = new Map(); // name -> {steps: [], values: []}
  let schedule = null;
  let ended = false;
  let lossChart = null;
  let metricsChart = null;
  let metricNames = "";
  let rateChart = null;
  let rateDrawn = 0;

  function header(job) {
    const state = document.getElementById("state");
    state.replaceChildren(cr.stateBadge(job.state));
    ended = job.ended;
    document.getElementById("progress-bar").style.width = `${job.total_steps ? Math.min(100, (100 * job.step) / job.total_steps) : 0}%`;
    document.getElementById("progress-text").textContent = `step ${job.step} of ${job.total_steps}`;
    document.getElementById("cancel").hidden = job.ended;
    const graph = cr.link(`/graphs/${encodeURIComponent(job.graph_id)}`, job.graph_name || job.graph_id, "name");
    const evaluated = job.spec.evaluation && job.spec.evaluation.dataset_id;
    cr.facts(document.getElementById("job-facts"), [
      ["graph", graph],
      ["dataset", dataset(job, job.dataset_id)],
      ...(evaluated && evaluated !== job.dataset_id ? [["evaluated on", dataset(job, evaluated)]] : []),
      ["epoch", String(job.epoch)],
      ["loss", cr.number(job.loss)],
      ["steps/s", job.steps_per_second === null ? "–" : job.steps_per_second.toFixed(1)],
      ["metrics", cr.metricsText(job.metrics) || "–"],
      ["created", cr.time(job.create_time)],
      ["started", cr.time(job.start_time)],
      ["ended", cr.time(job.end_time)],
    ]);
    const error = document.getElementById("job-error");
    error.textContent = job.error;
    error.hidden = !job.error;
  }

  // A dataset's name (user data: text only) beside its id; a deleted dataset shows its id alone.
  function dataset(job, datasetId) {
    const cell = cr.el("span");
    const name = job.dataset_names[datasetId];
    if (name) cell.append(cr.el("span", name, "name"), " ");
    cell.append(cr.el("span", datasetId, "id"));
    return cell;
  }

  async function refresh() {
    try {
      const job = await cr.getJSON(base);
      header(job);
      return job;
    } catch (error) {
      cr.showError(error.message);
      return null;
    }
  }

  function drawLoss() {
    const container = document.getElementById("loss-chart");
    if (!lossChart) {
      const logScale = document.getElementById("log-scale").checked;
      lossChart = cr.lineChart(container, [cr.series("loss", 0, { stroke: "#1f77b455", width: 1 }), cr.series("smoothed", 0, { width: 2 })], {
        yLabel: "loss",
        scales: logScale ? { y: { distr: 3 } } : {},
      });
    }
    lossChart.update([steps, losses, smoothed]);
    container.dataset.points = String(steps.length);
    document.getElementById("points").textContent = `${steps.length} step${steps.length === 1 ? "" : "s"}`;
  }

  function drawMetrics() {
    if (!metrics.size) return;
    const names = [...metrics.keys()].sort();
    const container = document.getElementById("metrics-chart");
    document.getElementById("no-metrics").hidden = true;
    if (names.join("\u0000") !== metricNames) {
      metricNames = names.join("\u0000");
      if (metricsChart) metricsChart.destroy();
      container.replaceChildren();
      metricsChart = cr.lineChart(container, names.map((name, index) => cr.series(name, index + 1, { points: { show: true } })), { yLabel: "value" });
    }
    const table = uPlot.join(names.map((name) => [metrics.get(name).steps, metrics.get(name).values]));
    metricsChart.update(table);
    container.dataset.points = String(table[0].length);
  }

  function drawRates(force) {
    if (!schedule || (!force && performance.now() - rateDrawn < 1000)) return;
    rateDrawn = performance.now();
    const container = document.getElementById("lr-chart");
    if (!rateChart) {
      rateChart = cr.lineChart(container, [cr.series("applied", 3, { width: 3 }), cr.series("planned", 4, { dash: [6, 4] })], { yLabel: "learning rate", height: 200 });
    }
    rateChart.update(uPlot.join([[steps, rates], [schedule.steps, schedule.learning_rates]]));
  }

  function onEvents(events) {
    for (const event of events) {
      if (event.state !== undefined) {
        document.getElementById("state").replaceChildren(cr.stateBadge(event.state));
        continue;
      }
      steps.push(event.step);
      losses.push(event.loss);
      if (event.loss !== null) {
        average = SMOOTHING * average + (1 - SMOOTHING) * event.loss;
        weight = SMOOTHING * weight + (1 - SMOOTHING);
      }
      smoothed.push(weight ? average / weight : null);
      rates.push(event.learning_rate);
      for (const [name, value] of Object.entries(event.metrics)) {
        if (!metrics.has(name)) metrics.set(name, { steps: [], values: [] });
        metrics.get(name).steps.push(event.step);
        metrics.get(name).values.push(value);
      }
    }
    drawLoss();
    drawMetrics();
    drawRates(false);
  }

  async function poll() {
    const job = await refresh();
    if (job && job.ended) return;
    setTimeout(poll, 1000);
  }

  document.getElementById("log-scale").addEventListener("change", () => {
    lossChart.destroy();
    lossChart = null;
    document.getElementById("loss-chart").replaceChildren();
    drawLoss();
  });

  document.getElementById("cancel").addEventListener("click", async () => {
    if (!window.confirm(`Cancel job ${jobId}? A running job stops after its current step.`)) return;
    try {
      await cr.post(`${base}/cancel`);
      cr.showError("");
      await refresh();
    } catch (error) {
      cr.showError(error.message);
    }
  });

  (async () => {
    const job = await refresh();
    if (!job) return;
    schedule = job.schedule;
    document.getElementById("spec").textContent = JSON.stringify(job.spec, null, 2);
    document.getElementById("schedule-kind").textContent = `${schedule.kind}, base ${cr.number(schedule.base_learning_rate)}`;
    drawLoss();
    drawRates(true);
    cr.follow(jobId, onEvents, (failure) => {
      if (failure) cr.showError(failure);
      drawRates(true);
      refresh();
    });
    if (!job.ended) poll();
  })();
})();
