"""`python -m bench.dashboard [--steps N] [--out PATH]`: how soon a job's step reaches a browser
following the job's page, and how long Graphviz takes to lay large graphs out.

Latency. A job's page draws each step as its Server-Sent Events stream delivers it (on the next
animation frame). The bench starts a `chainrule serve` child and a `chainrule dashboard` child in
front of it, runs a job, and follows it twice at once from this process: through the
dashboard's event stream, as the page does, and with WatchJob straight from the server. A step's
delay is its arrival on the event stream minus its arrival on the direct watch (one clock, one
process): what the dashboard adds to a watch of the server, whose watchers are woken by the step
itself. The job is queued behind another on the same graph until every follower is connected, so
every step it takes arrives live, none from its history. Runs with one follower and with eight
(the dashboard shares one WatchJob among them).

Layout. POST /api/graphs/{id}/render of chains of 2,000 and 4,000 nodes, each laid out once (the
dashboard keeps pictures by content): the wall time of the first render, which is mostly dot's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import chainrule.client as cr
from bench.server import REPO_ROOT, ChainruleServer

RESULTS = Path(__file__).resolve().parent / "results"
URL_LINE = re.compile(r"chainrule dashboard on (http://\S+?)/? ")
FOLLOWER_COUNTS = (1, 8)
LAYOUT_NODES = (2000, 4000)
WAIT_SECONDS = 120.0


class DashboardChild:
    """`chainrule dashboard --port 0` in front of `address`, with a browser session (cookie and CSRF token)."""

    def __init__(self, address: str) -> None:
        command = [sys.executable, "-m", "chainrule.server.cli", "dashboard", "--address", address, "--port", "0"]
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.process.stdout is not None
        for line in self.process.stdout:
            match = URL_LINE.search(line)
            if match:
                self.url = match.group(1)
                break
        else:
            raise RuntimeError("the dashboard did not start")
        threading.Thread(target=lambda: [None for _ in self.process.stdout or ()], daemon=True).start()
        with urllib.request.urlopen(f"{self.url}/jobs", timeout=WAIT_SECONDS) as response:
            self.cookie = response.headers["set-cookie"].split(";", 1)[0]
            token = re.search(r'<meta name="csrf-token" content="([0-9a-f]+)">', response.read().decode())
        assert token is not None
        self.csrf_token = token.group(1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@dataclass
class Arrivals:
    """When each step arrived (time.perf_counter), and whether the stream is connected."""

    times: dict[int, float] = field(default_factory=dict)
    connected: threading.Event = field(default_factory=threading.Event)


def follow_page(dashboard: DashboardChild, job_id: str, arrivals: Arrivals) -> None:
    """Read the job's event stream as the page does, noting each step's arrival."""
    request = urllib.request.Request(
        f"{dashboard.url}/api/jobs/{job_id}/events?from_step=1", headers={"Cookie": dashboard.cookie}
    )
    with urllib.request.urlopen(request, timeout=WAIT_SECONDS) as response:
        for raw in response:
            line = raw.decode()
            if line.startswith("event: end"):
                return
            if line.startswith("data: "):
                now = time.perf_counter()
                arrivals.connected.set()
                for event in json.loads(line[6:]).get("events", []):
                    if "step" in event:
                        arrivals.times[event["step"]] = now


def follow_server(job: cr.Job, arrivals: Arrivals) -> None:
    with job.watch() as events:
        arrivals.connected.set()
        for event in events:
            if event.state is None:
                arrivals.times[event.step] = time.perf_counter()


def classifier() -> cr.GraphBuilder:
    """Softmax regression through one tanh layer on 64 features: about a thousand steps a second."""
    rng = np.random.default_rng(0)
    graph = cr.GraphBuilder("bench dashboard", default_dtype="float32")
    x = graph.input("x", dtype="float32", shape=[-1, 64])
    labels = graph.input("labels", dtype="float32", shape=[-1, 10])
    w1 = graph.parameter("w1", rng.normal(scale=0.125, size=(64, 32)).astype(np.float32))
    w2 = graph.parameter("w2", rng.normal(scale=0.2, size=(32, 10)).astype(np.float32))
    logits = (cr.tanh(x @ w1) @ w2).named("logits")
    cr.softmax_cross_entropy(logits, labels, name="loss")
    right = cr.equal(cr.argmax(logits, axis=1), cr.argmax(labels, axis=1))
    cr.mean(cr.cast(right, "float32"), name="accuracy")
    return graph


def measure_latency(client: cr.Client, dashboard: DashboardChild, followers: int, steps: int) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    columns = {
        "x": rng.random((2048, 64), dtype=np.float32),
        "labels": np.eye(10, dtype=np.float32)[rng.integers(0, 10, 2048)],
    }
    dataset_id = client.upload_dataset("bench dashboard", columns, progress=False).dataset_id
    graph_id = client.create_graph(classifier()).graph_id
    options: dict[str, Any] = {"loss": "loss", "optimizer": cr.Sgd(0.05), "feeds": {"x": "x", "labels": "labels"}}
    blocker = client.create_job(graph_id, dataset_id, batch_size=32, max_steps=10**9, **options)
    job = client.create_job(
        graph_id,
        dataset_id,
        batch_size=32,
        max_steps=steps,
        evaluation=cr.Evaluation(["accuracy"], every_steps=250),
        **options,
    )
    direct, pages = Arrivals(), [Arrivals() for _ in range(followers)]
    threads = [threading.Thread(target=follow_server, args=(job, direct), daemon=True)]
    threads += [threading.Thread(target=follow_page, args=(dashboard, job.job_id, page), daemon=True) for page in pages]
    for thread in threads:
        thread.start()
    for arrivals in (direct, *pages):
        assert arrivals.connected.wait(WAIT_SECONDS), "a follower did not connect"
    blocker.cancel()
    for thread in threads:
        thread.join(WAIT_SECONDS)
    info = job.info()
    assert info.state == "succeeded" and info.step == steps, f"the job ended {info.state}: {info.error}"
    delays = sorted(page.times[step] - direct.times[step] for page in pages for step in range(1, steps + 1))
    assert info.start_time is not None and info.end_time is not None
    return {
        "followers": followers,
        "steps": steps,
        "steps_per_second": steps / (info.end_time - info.start_time).total_seconds(),
        "delay_median_s": statistics.median(delays),
        "delay_p99_s": delays[int(0.99 * (len(delays) - 1))],
        "delay_max_s": delays[-1],
    }


def chain(nodes: int) -> cr.GraphBuilder:
    graph = cr.GraphBuilder(f"chain of {nodes} nodes")
    node = graph.input("x")
    for index in range((nodes - 1) // 2):  # each step adds a constant and a product
        node = (node * 1.01).named(f"n{index}")
    return graph


def measure_layout(client: cr.Client, dashboard: DashboardChild, nodes: int) -> dict[str, Any]:
    graph = client.create_graph(chain(nodes))
    request = urllib.request.Request(
        f"{dashboard.url}/api/graphs/{graph.graph_id}/render",
        data=json.dumps({"feeds": {"x": 1.0}, "loss": None}).encode(),
        headers={"Cookie": dashboard.cookie, "X-CSRF-Token": dashboard.csrf_token, "Content-Type": "application/json"},
        method="POST",
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        svg = response.read()
    return {"nodes": graph.node_count, "seconds": time.perf_counter() - start, "svg_bytes": len(svg)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000, help="steps of each measured job (default: %(default)s)")
    parser.add_argument(
        "--out", type=Path, default=RESULTS / "dashboard.json", help="JSON results (default: %(default)s)"
    )
    arguments = parser.parse_args(argv)
    load_before = os.getloadavg()
    with ChainruleServer().start() as server, cr.Client(server.address, timeout=WAIT_SECONDS) as client:
        dashboard = DashboardChild(server.address)
        try:
            latency = [measure_latency(client, dashboard, count, arguments.steps) for count in FOLLOWER_COUNTS]
            layout = [measure_layout(client, dashboard, nodes) for nodes in LAYOUT_NODES]
        finally:
            dashboard.stop()
    for row in latency:
        print(
            f"{row['followers']} follower(s), {row['steps']} steps at {row['steps_per_second']:,.0f} steps/s: "
            f"a step reaches the page {row['delay_median_s'] * 1000:.0f} ms (median), "
            f"{row['delay_p99_s'] * 1000:.0f} ms (p99), {row['delay_max_s'] * 1000:.0f} ms (max) "
            "after a direct WatchJob"
        )
    for row in layout:
        print(f"layout of {row['nodes']:,} nodes: {row['seconds']:.1f} s ({row['svg_bytes'] / 2**20:.1f} MiB of SVG)")
    load = {"before": load_before, "after": os.getloadavg()}
    print(f"load average {load['before'][0]:.2f} before, {load['after'][0]:.2f} after")
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(json.dumps({"latency": latency, "layout": layout, "load_average": load}, indent=2) + "\n")
    print(f"results: {arguments.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
