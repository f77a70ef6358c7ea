"""The job queue of a server started without --job-workers: one job runs at a time, and queued
jobs start in creation order, whatever graph they train; on both backends (a SQLite file, then
PostgreSQL, where the queue is claimed from the database)."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time

import pytest

import chainrule.client as cr
from tests.server_process import ServerProcess
from tests.test_jobs import WAIT_SECONDS, data, logistic_graph, wait_running

pytestmark = pytest.mark.both_backends


def test_serve_help_gives_one_job_worker_by_default() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chainrule.server.cli", "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    described = " ".join(result.stdout.split())
    assert "--job-workers JOB_WORKERS training jobs run at once; the others wait in creation order (default: 1)" in (
        described
    )


def test_by_default_jobs_run_one_at_a_time_in_creation_order(server: ServerProcess) -> None:
    with cr.Client(server.address, timeout=WAIT_SECONDS) as client:
        x, y = data(20)
        dataset_id = client.upload_dataset("queue", {"x": x, "y": y}, progress=False).dataset_id

        def create(max_steps: int) -> cr.Job:
            graph_id = client.create_graph(logistic_graph()).graph_id  # a graph of its own: no job waits for a graph
            return client.create_job(
                graph_id,
                dataset_id,
                loss="loss",
                optimizer=cr.Sgd(0.1),
                feeds={"x": "x", "y": "y"},
                batch_size=4,
                max_steps=max_steps,
            )

        first = create(10**9)
        wait_running(first)
        queued = [create(40) for _ in range(3)]
        time.sleep(0.5)  # time enough for a second worker, if there were one, to take the next job up
        assert [job.info().state for job in queued] == ["queued"] * 3
        assert first.info().state == "running"
        first.cancel()
        for job in queued:
            assert job.wait(progress=False).state == "succeeded"
        infos = [first.info()] + [job.info() for job in queued]
        for earlier, later in itertools.pairwise(infos):
            assert earlier.end_time is not None and later.start_time is not None
            assert later.start_time >= earlier.end_time, (earlier.job_id, later.job_id)
