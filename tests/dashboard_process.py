"""A real `chainrule dashboard` process beside a real server, and what the dashboard tests show in
it (the README's screenshot of a job page among them: see tests/test_dashboard_browser.py): the
lecture's graph, a digits dataset, training jobs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

import chainrule.client as cr
from tests.server_process import ServerProcess

TOKEN = "dashboard-secret-token-3b9f0c"
TENANT = "lab"
XSS_NAME = "<img src=x onerror=alert(1)>"
URL_LINE = re.compile(r"chainrule dashboard on (http://\S+?)/? ")
METRICS_LINE = re.compile(r"chainrule metrics on port (\d+)")
WAIT_SECONDS = 60.0
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def start_server(folder: Path) -> ServerProcess:
    """A server that requires a bearer token, so the tests see the dashboard keep it to itself, with
    its Prometheus metrics on, so they can count the calls the dashboard makes (`rpc_count`)."""
    tokens = folder / "tokens.txt"
    tokens.write_text(f"{TOKEN} {TENANT}\n")
    return ServerProcess(folder / "chainrule.db", ["--auth-tokens", str(tokens), "--metrics-port", "0"]).start()


def rpc_count(server: ServerProcess, method: str) -> int:
    """How many calls of `method` the server has answered (chainrule_rpcs_total, every status)."""
    port = next(match.group(1) for line in server.log if (match := METRICS_LINE.search(line)))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT_SECONDS) as response:
        text = response.read().decode()
    pattern = re.compile(rf'^chainrule_rpcs_total{{[^}}]*method="{method}"[^}}]*}} (\S+)$', re.MULTILINE)
    return round(sum(float(value) for value in pattern.findall(text)))


class DashboardProcess:
    """`chainrule dashboard --port 0` against `server_address`, given the token through the environment."""

    def __init__(self, server_address: str, extra_args: tuple[str, ...] = ()) -> None:
        self.server_address = server_address
        self.extra_args = extra_args
        self.process: subprocess.Popen[str] | None = None
        self.url = ""
        self.log: list[str] = []

    def start(self) -> DashboardProcess:
        command = [sys.executable, "-m", "chainrule.server.cli", "dashboard", "--address", self.server_address]
        self.process = subprocess.Popen(
            [*command, "--port", "0", *self.extra_args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "CHAINRULE_TOKEN": TOKEN},
        )
        found = threading.Event()

        def read() -> None:
            assert self.process is not None and self.process.stdout is not None
            for line in self.process.stdout:
                self.log.append(line)
                match = URL_LINE.search(line)
                if match and not found.is_set():
                    self.url = match.group(1)
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(WAIT_SECONDS):
            self.stop()
            raise RuntimeError("the dashboard did not start:\n" + "".join(self.log))
        return self

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


class Browserless:
    """What a page's script does, over urllib: GET JSON, and POST with or without the page's CSRF
    token and session cookie."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.cookie = ""
        self.csrf_token = ""
        self.bodies: list[bytes] = []
        """Every answer's body, to check that none carries the server's token."""

    def open_page(self, path: str = "/jobs") -> str:
        with urllib.request.urlopen(self.url + path, timeout=WAIT_SECONDS) as response:
            body = response.read()
            self.bodies.append(body)
            cookie = response.headers.get("set-cookie", "")
        if cookie:
            self.cookie = cookie.split(";", 1)[0]
        match = re.search(r'<meta name="csrf-token" content="([0-9a-f]+)">', body.decode())
        assert match, "the page carries no CSRF token"
        self.csrf_token = match.group(1)
        return body.decode()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        csrf: bool = True,
    ) -> tuple[int, dict[str, str], bytes]:
        sent = dict(headers or {})
        if self.cookie:
            sent["Cookie"] = self.cookie
        if csrf and method == "POST":
            sent["X-CSRF-Token"] = self.csrf_token
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=sent)
        try:
            with urllib.request.urlopen(request, timeout=WAIT_SECONDS) as response:
                answer = (response.status, dict(response.headers.items()), response.read())
        except urllib.error.HTTPError as error:
            answer = (error.code, dict(error.headers.items()), error.read())
        self.bodies.append(answer[2])
        return answer

    def get(self, path: str) -> Any:
        status, _, body = self.request("GET", path)
        assert status == 200, (path, status, body)
        return json.loads(body)

    def post_json(self, path: str, document: object, csrf: bool = True) -> tuple[int, Any]:
        status, headers, body = self.request(
            "POST", path, json.dumps(document).encode(), {"Content-Type": "application/json"}, csrf
        )
        return status, json.loads(body) if headers.get("content-type", "").startswith("application/json") else body


def lecture_graph(name: str = "lecture: f = (x + y) z") -> cr.GraphBuilder:
    """f = (x + y) z; at x = -2, y = 5, z = -4: q = 3, f = -12, df/dx = df/dy = -4, df/dz = 3."""
    graph = cr.GraphBuilder(name)
    x, y, z = graph.input("x"), graph.input("y"), graph.input("z")
    q = (x + y).named("q")
    (q * z).named("f")
    return graph


def digits_classifier(hidden: int = 32, seed: int = 0) -> cr.GraphBuilder:
    """Softmax regression through one tanh layer on 8x8 digits, with an accuracy to evaluate."""
    rng = np.random.default_rng(seed)
    graph = cr.GraphBuilder("digits mlp 64-32-10", default_dtype="float32")
    x = graph.input("x", dtype="float32", shape=[-1, 64])
    labels = graph.input("labels", dtype="float32", shape=[-1, 10])
    w1 = graph.parameter("w1", rng.normal(scale=0.125, size=(64, hidden)).astype(np.float32))
    b1 = graph.parameter("b1", np.zeros(hidden, np.float32))
    w2 = graph.parameter("w2", rng.normal(scale=0.2, size=(hidden, 10)).astype(np.float32))
    b2 = graph.parameter("b2", np.zeros(10, np.float32))
    logits = (cr.tanh(x @ w1 + b1) @ w2 + b2).named("logits")
    cr.softmax_cross_entropy(logits, labels, name="loss")
    right = cr.equal(cr.argmax(logits, axis=1), cr.argmax(labels, axis=1))
    cr.mean(cr.cast(right, "float32"), name="accuracy")
    return graph


def digits() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """scikit-learn's 8x8 digits (shipped with the package), scaled to [0, 1]: training and held-out columns."""
    from sklearn.datasets import load_digits

    images, targets = load_digits(return_X_y=True)
    x = (images / 16.0).astype(np.float32)
    labels = np.eye(10, dtype=np.float32)[targets]
    return {"x": x[:1500], "labels": labels[:1500]}, {"x": x[1500:], "labels": labels[1500:]}


def start_job(
    client: cr.Client,
    graph_id: str,
    train_id: str,
    held_out_id: str,
    *,
    learning_rate: float = 0.1,
    max_steps: int = 10**9,
    every_steps: int = 50,
) -> cr.Job:
    """SGD with momentum under a cosine schedule over the run (or over 3,000 steps for a job that
    runs until cancelled), evaluating held-out accuracy every `every_steps` steps."""
    period = max_steps if max_steps <= 100_000 else 3000
    return client.create_job(
        graph_id,
        train_id,
        loss="loss",
        optimizer=cr.Sgd(learning_rate, momentum=0.9),
        feeds={"x": "x", "labels": "labels"},
        batch_size=32,
        max_steps=max_steps,
        evaluation=cr.Evaluation(["accuracy"], dataset_id=held_out_id, every_steps=every_steps),
        schedule=cr.Cosine(period_steps=period, min_learning_rate=learning_rate / 20, warmup_steps=100),
    )


def wait_for(condition: Callable[[], bool], what: str, seconds: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
