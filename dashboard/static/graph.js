// A graph's page: its picture (SVG laid out by Graphviz on the dashboard, panned and zoomed with
// Panzoom), rendered for the feeds and loss the user gives, and its parameters' statistics.
"use strict";

(() => {
  const root = document.getElementById("graph-page");
  const graphId = root.dataset.graphId;
  const base = `/api/graphs/${encodeURIComponent(graphId)}`;
  const picture = document.getElementById("picture");
  const content = document.getElementById("picture-content");
  const status = document.getElementById("render-status");
  const AUTO_RENDER_NODES = 2000;
  let panzoom = null;

  async function loadGraph() {
    const graph = await cr.getJSON(base);
    document.getElementById("graph-name").textContent = graph.name || "(unnamed)";
    document.title = `${graph.name || graph.graph_id} · chainrule`;
    cr.facts(document.getElementById("graph-facts"), [
      ["id", graph.graph_id],
      ["nodes", String(graph.node_count)],
      ["parameters", String(graph.parameter_count)],
      ["step", String(graph.step)],
      ["created", cr.time(graph.create_time)],
      ["inputs", graph.inputs.map((input) => `${input.name}${input.dtype ? ` ${input.dtype}` : ""}${input.shape ? ` [${input.shape.join(", ")}]` : ""}`).join(", ") || "none"],
    ]);
    const loss = document.getElementById("loss");
    for (const name of graph.loss_candidates) {
      const option = cr.el("option", name);
      option.value = name;
      loss.append(option);
    }
    const example = Object.fromEntries(graph.inputs.map((input) => [input.name, 0]));
    document.getElementById("feeds").placeholder = JSON.stringify(example);
    if (graph.node_count <= AUTO_RENDER_NODES) render();
    else status.textContent = `${graph.node_count} nodes: press Render to lay the picture out (it may take a while).`;
  }

  async function render() {
    const loss = document.getElementById("loss").value;
    const file = document.getElementById("feeds-file").files[0];
    const text = document.getElementById("feeds").value.trim();
    status.textContent = "Rendering…";
    const button = document.getElementById("render");
    button.disabled = true;
    try {
      let svg;
      if (file) {
        svg = await cr.post(`${base}/render?loss=${encodeURIComponent(loss)}`, file, "application/octet-stream");
      } else {
        let feeds = null;
        if (text) {
          try {
            feeds = JSON.parse(text);
          } catch (error) {
            throw new Error(`the feeds are not valid JSON: ${error.message}`);
          }
        }
        svg = await cr.post(`${base}/render`, JSON.stringify({ feeds, loss: loss || null }), "application/json");
      }
      show(svg);
      status.textContent = loss ? `Values and gradients of ${loss}.` : text || file ? "Values." : "Structure.";
      cr.showError("");
    } catch (error) {
      status.textContent = "";
      cr.showError(error.message);
    } finally {
      button.disabled = false;
    }
  }

  // The SVG is parsed as XML and adopted node by node: nothing in it is run (no scripts, no
  // handlers; the page's Content-Security-Policy would refuse them anyway).
  function show(text) {
    const parsed = new DOMParser().parseFromString(text, "image/svg+xml");
    if (parsed.querySelector("parsererror")) throw new Error("the picture could not be read");
    for (const node of parsed.querySelectorAll("script, foreignObject")) node.remove();
    for (const node of parsed.querySelectorAll("*")) {
      for (const attribute of [...node.attributes]) if (attribute.name.toLowerCase().startsWith("on")) node.removeAttribute(attribute.name);
    }
    const svg = document.importNode(parsed.documentElement, true);
    content.replaceChildren(svg);
    if (panzoom) panzoom.destroy();
    panzoom = Panzoom(content, { maxScale: 40, minScale: 0.01, canvas: true, origin: "0 0", step: 0.2 });
    fit();
  }

  function fit() {
    if (!panzoom) return;
    const svg = content.firstElementChild;
    const width = svg.width.baseVal.value || 1;
    const height = svg.height.baseVal.value || 1;
    const scale = Math.min(1, picture.clientWidth / width, picture.clientHeight / height);
    panzoom.zoom(scale, { animate: false });
    panzoom.pan(0, 0, { animate: false });
  }

  picture.addEventListener("wheel", (event) => { if (panzoom) panzoom.zoomWithWheel(event); });
  document.getElementById("zoom-in").addEventListener("click", () => panzoom && panzoom.zoomIn());
  document.getElementById("zoom-out").addEventListener("click", () => panzoom && panzoom.zoomOut());
  document.getElementById("zoom-reset").addEventListener("click", fit);
  document.getElementById("render-form").addEventListener("submit", (event) => {
    event.preventDefault();
    render();
  });

  function sparkline(histogram) {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    const width = 120;
    const height = 28;
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    svg.setAttribute("class", "sparkline");
    const highest = Math.max(1, ...histogram.counts);
    const barWidth = width / Math.max(1, histogram.counts.length);
    histogram.counts.forEach((count, index) => {
      const rect = document.createElementNS(ns, "rect");
      const barHeight = count ? Math.max(1, (height * count) / highest) : 0;
      rect.setAttribute("x", index * barWidth);
      rect.setAttribute("y", height - barHeight);
      rect.setAttribute("width", Math.max(1, barWidth - 1));
      rect.setAttribute("height", barHeight);
      svg.append(rect);
    });
    return svg;
  }

  let histogramChart = null;
  function showHistogram(parameter) {
    const panel = document.getElementById("histogram-panel");
    panel.hidden = false;
    document.getElementById("histogram-name").textContent = parameter.name;
    const edges = parameter.histogram.edges;
    const centers = parameter.histogram.counts.map((_, index) => (edges[index] + edges[index + 1]) / 2);
    const container = document.getElementById("histogram-chart");
    if (histogramChart) histogramChart.destroy();
    container.replaceChildren();
    histogramChart = cr.lineChart(container, [cr.series("count", 0, { paths: uPlot.paths.bars({ size: [0.9, 100] }), fill: "#1f77b455" })], {
      xLabel: "value",
      yLabel: "count",
      height: 220,
      data: [centers, parameter.histogram.counts],
    });
  }

  async function loadParameters() {
    const answer = await cr.getJSON(`${base}/parameters`);
    document.getElementById("parameters-step").textContent = `at step ${answer.step}`;
    const body = document.querySelector("#parameters tbody");
    body.replaceChildren(
      ...answer.parameters.map((parameter) => {
        const row = cr.el("tr", null, "clickable");
        const chart = cr.el("td");
        chart.append(sparkline(parameter.histogram));
        row.append(
          cr.el("td", parameter.name, "name"),
          cr.el("td", parameter.kind),
          cr.el("td", parameter.dtype),
          cr.el("td", `[${parameter.shape.join(", ")}]`),
          cr.el("td", cr.number(parameter.norm), "number"),
          cr.el("td", cr.number(parameter.min), "number"),
          cr.el("td", cr.number(parameter.mean), "number"),
          cr.el("td", cr.number(parameter.max), "number"),
          cr.el("td", cr.number(parameter.std), "number"),
          chart,
        );
        row.title = parameter.non_finite ? `${parameter.non_finite} NaN or infinite values left out` : "Click for the histogram";
        row.addEventListener("click", () => showHistogram(parameter));
        return row;
      }),
    );
    if (!answer.parameters.length) {
      const row = cr.el("tr");
      row.append(cr.el("td", "This graph has no parameters.", "muted"));
      body.append(row);
    }
  }

  loadGraph().catch((error) => cr.showError(error.message));
  loadParameters().catch((error) => cr.showError(error.message));
})();
