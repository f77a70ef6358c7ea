"""chainrule jobs, job, watch and cancel against a real server."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

import chainrule.client as cr
from tests.server_process import ServerProcess
from tests.test_jobs import data, logistic_graph, wait_for, wait_running


def chainrule(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "chainrule.server.cli", *args, "--address", server.address]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_the_job_commands_list_show_follow_and_cancel_jobs(server: ServerProcess) -> None:
    with cr.Client(server.address, timeout=60) as client:
        x, y = data(40)
        graph_id = client.create_graph(logistic_graph()).graph_id
        dataset_id = client.upload_dataset("cli", {"x": x, "y": y}, progress=False).dataset_id
        done = client.create_job(
            graph_id,
            dataset_id,
            loss="loss",
            optimizer=cr.Sgd(0.1),
            feeds={"x": "x", "y": "y"},
            batch_size=8,
            epochs=2,
            evaluation=cr.Evaluation(["accuracy"], every_steps=5),
        )
        done.wait(progress=False)
        other_graph = client.create_graph(logistic_graph()).graph_id
        endless = client.create_job(
            other_graph,
            dataset_id,
            loss="loss",
            optimizer=cr.Sgd(0.01),
            feeds={"x": "x", "y": "y"},
            batch_size=8,
            max_steps=10**9,
        )
        wait_running(endless)

        listed = chainrule(server, "jobs")
        assert listed.returncode == 0, listed.stderr
        lines = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:]}
        assert lines[done.job_id][1:3] == ["succeeded", "10/10"] and lines[endless.job_id][1] == "running"
        only_running = chainrule(server, "jobs", "--state", "running", "--graph", other_graph)
        assert [line.split()[0] for line in only_running.stdout.splitlines()[1:]] == [endless.job_id]

        shown = chainrule(server, "job", done.job_id)
        assert shown.returncode == 0, shown.stderr
        assert f"job {done.job_id}  succeeded" in shown.stdout and "step 10 of 10, epoch 2" in shown.stdout
        assert "accuracy = " in shown.stdout and "evaluation of accuracy every 5 steps and at the end" in shown.stdout
        info = done.info()
        assert info.worker and f"worker {info.worker}, resumes 0" in shown.stdout and info.replicas == 1
        assert "batch_size 8, replicas 1, epochs 2" in shown.stdout and "waiting:" not in shown.stdout

        watched = chainrule(server, "watch", done.job_id, "--from-step", "8")
        assert watched.returncode == 0, watched.stderr
        lines_out = watched.stdout.splitlines()
        assert [line.split()[1] for line in lines_out[:-1]] == ["8", "9", "10"] and lines_out[-1] == "state succeeded"
        assert "accuracy" in lines_out[2] and "accuracy" not in lines_out[0]

        cancelled = chainrule(server, "cancel", endless.job_id)
        assert cancelled.returncode == 0 and f"job {endless.job_id}" in cancelled.stdout, cancelled.stderr
        wait_for(lambda: endless.info().ended, "the cancelled job to end")
        after = chainrule(server, "watch", endless.job_id, "--from-step", str(endless.info().step))
        assert after.returncode == 1 and after.stdout.splitlines()[-1] == "state cancelled"

        missing = chainrule(server, "job", "0" * 32)
        assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    assert np.isfinite(float(lines[done.job_id][4]))
