"""The benchmark suite runs end to end in quick mode and reports every measurement.

Times and ratios are never asserted: they depend on the machine and on whatever else runs on
it. This only guards against the bench itself breaking as the server and client change.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
MEASUREMENTS = (
    "per_node",
    "train_throughput",
    "engine_step",
    "large_gradient",
    "memory",
    "lenet_step",
    "resnet_forward",
    "job_throughput",
    "job_vs_pytorch",
    "job_watchers",
)


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.timeout(360)  # longer than the subprocess's own timeout, so that one reports
def test_quick_bench_reports_every_measurement(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    chart = tmp_path / "per_node.png"
    command = [sys.executable, "-m", "bench", "--quick", "--out", str(out), "--chart", str(chart)]
    finished = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert out.exists(), finished.stdout
    results = json.loads(out.read_text())
    assert results["mode"] == "quick"
    assert results["machine"]["cpu"] and results["machine"]["numpy"]
    for key in MEASUREMENTS:
        measurement = results["measurements"][key]
        assert is_number(measurement["chainrule"]), (key, measurement)
        for name, value in measurement["baselines"].items():
            # PyTorch is an optional extra: without it its baselines are null, never missing.
            assert value is None or is_number(value), (key, name, value)
        assert measurement["ratio"] is None or is_number(measurement["ratio"]), (key, measurement)
    # Row 12's floor: the same watches of a bare gRPC server, measured beside it.
    floor = results["measurements"]["job_watchers"]["details"]
    for key in ("raw_grpc_server_cpu_us_per_event", "raw_grpc_client_cpu_us_per_event", "raw_grpc_watchers_cores"):
        assert is_number(floor[key]) and floor[key] >= 0, (key, floor)
    # The chart needs matplotlib (the `bench` extra); without it the bench says so and goes on.
    assert chart.exists() == (importlib.util.find_spec("matplotlib") is not None), finished.stdout
