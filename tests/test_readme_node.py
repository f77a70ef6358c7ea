"""The README's Node.js example, exactly as written there, run with node against a real server."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.server_process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## From Node.js and other languages"
INSTALL = "npm ci --prefix client/node"


def readme_node_example() -> str:
    """The first ```js block of the README's Node.js section."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index(SECTION) :]
    match = re.search(r"```js\n(.*?)```", section, re.DOTALL)
    assert match is not None, f"no ```js block under {SECTION!r} in README.md"
    return match.group(1)


def test_the_readme_node_example_runs_as_written(server: ServerProcess) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail(f"node is not on PATH; install Node.js 20+ and run: {INSTALL}")
    if not (ROOT / "client" / "node" / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail(f"the Node.js client's dependencies are not installed; run: {INSTALL}")
    # Fed on stdin from the repository root, the example resolves require('./client/node') as a
    # file saved there would, and nothing is written into the checkout.
    result = subprocess.run(
        [node, "-"],
        input=readme_node_example(),
        cwd=ROOT,
        env={**os.environ, "CHAINRULE_ADDRESS": server.address},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    assert result.stdout == "-12 -4\n"
