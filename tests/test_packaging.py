"""The distribution itself: committed stubs match the protos, and the wheel installs only `chainrule.*`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "chainrule" / "v1"


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "tools" / "generate_protos.py"), "--out", str(tmp_path)], check=True)
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "chainrule" / "v1").iterdir()}
    committed = {p.name: p.read_bytes() for p in GENERATED.iterdir() if p.is_file() and p.name != "__init__.py"}
    assert sorted(fresh) == sorted(committed), "run: python tools/generate_protos.py"
    for name, content in fresh.items():
        assert committed[name] == content, f"{name} is stale; run: python tools/generate_protos.py"


def test_wheel_holds_only_the_chainrule_namespace(tmp_path: Path) -> None:
    """Built from a copy of the tree, so no stale build/ folder of the checkout can leak into the wheel."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "node_modules", "build", "*.egg-info"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("chainrule-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_levels = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_levels == {"chainrule"}
    for module in (
        "chainrule/server/engine.py",
        "chainrule/client/client.py",
        "chainrule/v1/graph_pb2.py",
        "chainrule/v1/graph_pb2.pyi",
        "chainrule/client/py.typed",
    ):
        assert module in names


def test_client_library_passes_mypy_strict() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "client/"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
