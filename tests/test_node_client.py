"""The Node.js client (client/node) end to end: its `npm test` suite against a real server process."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.server_process import ServerProcess

NODE_CLIENT = Path(__file__).resolve().parent.parent / "client" / "node"
INSTALL = "npm ci --prefix client/node"


def test_node_client_suite_passes_against_a_live_server(server: ServerProcess) -> None:
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail(f"npm is not on PATH; install Node.js 20+ and run: {INSTALL}")
    if not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail(f"the Node.js client's dependencies are not installed; run: {INSTALL}")
    try:
        result = subprocess.run(
            [npm, "test"],
            cwd=NODE_CLIENT,
            env={**os.environ, "CHAINRULE_ADDRESS": server.address},
            capture_output=True,
            text=True,
            timeout=180,
        )
    except subprocess.TimeoutExpired as error:
        output = (error.stdout or b"").decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        pytest.fail(f"npm test did not finish within 180 s:\n{output}\nserver log:\n{''.join(server.log)}")
    assert result.returncode == 0, (
        f"npm test failed with exit code {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}\n"
        f"--- server log ---\n{''.join(server.log[-50:])}"
    )
    assert "# fail 0" in result.stdout and "# skipped 0" in result.stdout, result.stdout
