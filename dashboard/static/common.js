// Helpers every page uses. Text a user chose (graph, node, dataset, column, metric names) only
// ever enters the page through textContent or attribute values, never as markup.
"use strict";

const cr = (() => {
  const csrfToken = document.querySelector('meta[name="csrf-token"]').content;
  const palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function link(href, text, className) {
    const anchor = el("a", text, className);
    anchor.href = href;
    return anchor;
  }

  function showError(message) {
    const box = document.getElementById("error");
    box.textContent = message || "";
    box.hidden = !message;
  }

  async function answer(response) {
    const type = response.headers.get("content-type") || "";
    const body = type.startsWith("application/json") ? await response.json() : await response.text();
    if (!response.ok) {
      const message = typeof body === "object" && body.error ? body.error : `${response.status} ${response.statusText}`;
      throw new Error(message);
    }
    return body;
  }

  async function getJSON(url) {
    return answer(await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" }));
  }

  // Every POST carries the page's CSRF token; the dashboard refuses one without it.
  async function post(url, body, contentType) {
    const headers = { "X-CSRF-Token": csrfToken };
    if (contentType) headers["Content-Type"] = contentType;
    return answer(await fetch(url, { method: "POST", headers, body, credentials: "same-origin" }));
  }

  function number(value, digits = 4) {
    if (value === null || value === undefined) return "–";
    if (Number.isInteger(value) && Math.abs(value) < 1e6) return String(value);
    return Number(value.toPrecision(digits)).toString();
  }

  function bytes(size) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let value = size;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return `${unit ? value.toFixed(1) : value} ${units[unit]}`;
  }

  function time(iso) {
    return iso ? new Date(iso).toLocaleString() : "–";
  }

  function stateBadge(state) {
    return el("span", state, `state state-${state}`);
  }

  function progressCell(step, total) {
    const cell = el("div", null, "progress-cell");
    const bar = el("div", null, "progress");
    const fill = el("div", null, "bar");
    fill.style.width = `${total ? Math.min(100, (100 * step) / total) : 0}%`;
    bar.append(fill);
    cell.append(bar, el("span", `${step}/${total}`, "muted"));
    return cell;
  }

  function metricsText(metrics) {
    return Object.entries(metrics).map(([name, value]) => `${name} ${number(value)}`).join("  ");
  }

  function facts(list, pairs) {
    list.replaceChildren();
    for (const [label, value] of pairs) {
      list.append(el("dt", label));
      const dd = el("dd");
      if (value instanceof Node) dd.append(value);
      else dd.textContent = value;
      list.append(dd);
    }
  }

  // Previous and Next (the buttons #previous and #next) over a list the server pages by tokens.
  // `load(token, shownBefore)` shows the page at `token`, which follows `shownBefore` items, and
  // answers { next: its next_page_token, shown: how many items it showed }, or null when it failed.
  // Returns show(), which loads the current page again, and restart(), which goes to the first.
  function tokenPager(firstToken, load) {
    const previousButton = document.getElementById("previous");
    const nextButton = document.getElementById("next");
    let token = firstToken;
    let earlier = []; // { token, shownBefore } of the pages before this one, for Previous
    let shownBefore = 0;
    let shown = 0;
    let next = "";
    async function show() {
      previousButton.disabled = nextButton.disabled = true; // no second turn before this page is in
      const page = await load(token, shownBefore);
      ({ next, shown } = page || { next: "", shown: 0 });
      previousButton.disabled = earlier.length === 0;
      nextButton.disabled = !next;
    }
    function restart() {
      token = "";
      earlier = [];
      shownBefore = 0;
      return show();
    }
    previousButton.addEventListener("click", () => {
      ({ token, shownBefore } = earlier.pop());
      show();
    });
    nextButton.addEventListener("click", () => {
      earlier.push({ token, shownBefore });
      shownBefore += shown;
      token = next;
      show();
    });
    return { show, restart };
  }

  // Follow a job's WatchJob stream (Server-Sent Events) from step `fromStep`, calling onEvents with
  // each batch; after a dropped connection it starts again after the last step it saw, so no step
  // arrives twice. Returns a function that stops following.
  function follow(jobId, onEvents, onEnd, fromStep = 1) {
    let next = fromStep;
    let source = null;
    let stopped = false;
    function open() {
      source = new EventSource(`/api/jobs/${encodeURIComponent(jobId)}/events?from_step=${next}`);
      source.onmessage = (message) => {
        const events = JSON.parse(message.data).events;
        for (const event of events) if (event.state === undefined) next = event.step + 1;
        onEvents(events);
      };
      source.addEventListener("end", () => {
        stop();
        if (onEnd) onEnd(null);
      });
      source.addEventListener("failure", (message) => {
        stop();
        if (onEnd) onEnd(JSON.parse(message.data).error);
      });
      source.onerror = () => {
        if (stopped) return;
        source.close();
        setTimeout(() => { if (!stopped) open(); }, 1000);
      };
    }
    function stop() {
      stopped = true;
      if (source) source.close();
    }
    open();
    return stop;
  }

  // A uPlot line chart filling its container's width, redrawn at most once per animation frame.
  function lineChart(container, seriesList, options = {}) {
    const chart = new uPlot(
      {
        width: Math.max(container.clientWidth, 300),
        height: options.height || 260,
        scales: { x: { time: false }, ...(options.scales || {}) },
        axes: [{ label: options.xLabel || "step" }, { label: options.yLabel || "", size: 70 }, ...(options.extraAxes || [])],
        series: [{ label: options.xLabel || "step" }, ...seriesList],
        legend: { live: true },
        cursor: { drag: { x: true, y: false } },
      },
      options.data || [[], ...seriesList.map(() => [])],
      container,
    );
    let pending = null;
    chart.update = (data) => {
      pending = data;
      requestAnimationFrame(() => {
        if (pending) chart.setData(pending);
        pending = null;
      });
    };
    new ResizeObserver(() => chart.setSize({ width: Math.max(container.clientWidth, 300), height: options.height || 260 })).observe(container);
    return chart;
  }

  function series(label, index, extra = {}) {
    return { label, stroke: palette[index % palette.length], width: 1.5, spanGaps: true, points: { show: false }, ...extra };
  }

  return { el, link, showError, getJSON, post, number, bytes, time, stateBadge, progressCell, metricsText, facts, tokenPager, follow, lineChart, series, palette };
})();
