"""A 10-second run of the load script (tests/load/run_load.py) as CI's check: 16 concurrent clients
mixing Forward, Backward and Train on shared and separate graphs, against a real server on 127.0.0.1.

It asserts that nothing failed and that every health check was answered SERVING. Latencies are
printed (run pytest with -s to see them) but not asserted on: they depend on the machine. For the
real measurement run the script itself, e.g. `python -m tests.load.run_load --seconds 60 --clients 16`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_sixteen_clients_for_ten_seconds_get_no_errors_and_health_stays_serving(tmp_path: Path) -> None:
    report_path = tmp_path / "load.json"
    command = [sys.executable, "-m", "tests.load.run_load", "--seconds", "10", "--clients", "16"]
    command += ["--max-requests", "50000", "--json", str(report_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    print(result.stdout, result.stderr[-4000:], sep="\n")
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    report = json.loads(report_path.read_text())
    assert report["errors"] == 0, report["error_samples"]
    assert report["clients"] == 16
    for method in ("Forward", "Backward", "Train"):
        assert report["methods"][method]["count"] > 0, method
    assert report["requests_served"] == sum(stats["count"] for stats in report["methods"].values())
    health = report["health"]
    assert health["count"] > 0 and health["not_serving"] == 0, health["failure_samples"]
