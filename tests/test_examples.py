"""The examples in examples/ run against a real server and print the numbers the lecture gives."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.server_process import ServerProcess

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, server: ServerProcess, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--address", server.address, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_lecture_simple_prints_the_lecture_values(server: ServerProcess) -> None:
    lines = set(run_example("lecture_simple.py", server).splitlines())
    assert {"q = 3", "f = -12", "df/dq = -4", "df/dx = -4", "df/dy = -4", "df/dz = 3"} <= lines


def test_lecture_two_layer_matches_the_hand_derived_gradients(server: ServerProcess) -> None:
    output = run_example("lecture_two_layer.py", server)
    verdicts = re.findall(r"matches the lecture: (\w+)", output)
    assert verdicts == ["True"] * 6, output
    assert "dJ/dx = " in output


def test_train_mlp_reaches_the_stated_accuracy(server: ServerProcess) -> None:
    output = run_example("train_mlp.py", server)
    accuracies = [float(value) for value in re.findall(r"held-out accuracy ([\d.]+)%", output)]
    assert len(accuracies) == 2 and accuracies[0] >= 97.0 and accuracies[1] >= 95.0, output
    losses = [float(value) for value in re.findall(r"loss ([\d.]+)", output)]
    seed_losses = losses[:8]
    assert seed_losses == sorted(seed_losses, reverse=True), output


def test_train_job_reaches_the_stated_accuracy_and_plots_its_curves(server: ServerProcess, tmp_path: Path) -> None:
    plot = tmp_path / "job.png"
    output = run_example("train_job.py", server, "--plot", str(plot))
    evaluations = [int(step) for step in re.findall(r"step +(\d+) .*held-out loss", output)]
    assert evaluations == list(range(100, 1000, 100)), output
    (accuracy,) = re.findall(r"succeeded at step 900: held-out accuracy ([\d.]+)%", output)
    assert float(accuracy) >= 95.0, output
    assert plot.read_bytes().startswith(b"\x89PNG")
