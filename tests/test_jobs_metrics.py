"""A job's steps reach the server's step counter (chainrule_training_steps_total on --metrics-port):
every step it applied, once, though it tells the counter at most every STEPS_TOLD_SECONDS."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import chainrule.client as cr
from tests.server_process import ServerProcess
from tests.test_jobs import WAIT_SECONDS, data, logistic_graph


def steps_counted(port: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    match = re.search(r"^chainrule_training_steps_total (\S+)$", text, re.MULTILINE)
    assert match, text
    return float(match.group(1))


def test_the_step_counter_counts_each_step_of_each_job_once(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "db", ["--metrics-port", "0"]).start()
    try:
        line = next((line for line in server.log if "metrics on port" in line), "")
        match = re.search(r"metrics on port (\d+)", line)
        assert match, server.log
        port = match.group(1)
        with cr.Client(server.address, timeout=WAIT_SECONDS) as client:
            x, y = data(50)
            dataset_id = client.upload_dataset("counted", {"x": x, "y": y}, progress=False).dataset_id
            for max_steps in (37, 2001):  # the second job outlasts several of the counter's intervals
                graph_id = client.create_graph(logistic_graph()).graph_id
                job = client.create_job(
                    graph_id,
                    dataset_id,
                    loss="loss",
                    optimizer=cr.Sgd(0.1),
                    feeds={"x": "x", "y": "y"},
                    batch_size=8,
                    max_steps=max_steps,
                )
                assert job.wait(progress=False).step == max_steps
        assert steps_counted(port) == 37 + 2001
    finally:
        server.kill()
