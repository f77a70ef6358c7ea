"""The client subcommands of `chainrule`, run as real processes against a real server, and History files."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import chainrule.client as cr
from chainrule.client.render import GRADIENT_COLOR
from tests.server_process import ServerProcess

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def chainrule(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chainrule.server.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], start: str) -> None:
    assert result.returncode == 1, result
    assert result.stderr.startswith(start), result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def lecture_id(server: ServerProcess) -> str:
    graph = cr.GraphBuilder("lecture")
    x, y, z = graph.input("x"), graph.input("y"), graph.input("z")
    ((x + y).named("q") * z).named("f")
    with cr.Client(server.address) as client:
        return client.create_graph(graph).graph_id


@pytest.fixture(scope="module")
def model_id(server: ServerProcess) -> str:
    graph = cr.GraphBuilder("linear", default_dtype="float32")
    x = graph.input("x", dtype="float32", shape=[-1, 3])
    w, b = graph.parameter("w", np.ones((3, 1))), graph.parameter("b", 0.5)
    cr.mean((x @ w + b) * 2.0, name="loss")
    with cr.Client(server.address) as client:
        return client.create_graph(graph).graph_id


@pytest.fixture
def lecture_feeds(tmp_path: Path) -> Path:
    path = tmp_path / "feeds.npz"
    np.savez(path, x=-2.0, y=5.0, z=-4.0)
    return path


def test_graphs_lists_id_name_nodes_step_and_creation(server: ServerProcess, lecture_id: str, model_id: str) -> None:
    result = chainrule("graphs", "--address", server.address)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["GRAPH_ID", "NAME", "NODES", "STEP", "CREATED"]
    by_id = {row.split()[0]: row.split() for row in rows}
    assert by_id[lecture_id][1:4] == ["lecture", "5", "0"]
    assert by_id[model_id][1:4] == ["linear", "8", "0"]
    assert by_id[lecture_id][4].endswith("Z")


def test_address_comes_from_chainrule_address(server: ServerProcess, lecture_id: str) -> None:
    result = chainrule("graphs", env={"CHAINRULE_ADDRESS": server.address})
    assert result.returncode == 0, result.stderr
    assert lecture_id in result.stdout


def test_show_prints_nodes_parameters_and_step(server: ServerProcess, model_id: str) -> None:
    result = chainrule("show", model_id, "--address", server.address)
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert ["graph", model_id, "linear"] in lines
    assert lines[1][:4] == ["step", "0,", "8", "nodes,"]
    assert ["x", "input", "dtype=float32,", "shape=[-1,", "3]"] in lines
    assert ["matmul_1", "matmul(x,", "w)"] in lines
    assert ["constant_1", "constant", "float32", "[]", "=", "2"] in lines
    assert ["loss", "mean(mul_1)", "keepdims=false"] in lines
    parameters = lines[lines.index(["parameters:"]) + 1 :]
    assert parameters == [["w", "float32", "[3,", "1]", "[[1],", "[1],", "[1]]"], ["b", "float32", "[]", "0.5"]]


def test_render_writes_svg_with_values_and_gradients(
    server: ServerProcess, lecture_id: str, lecture_feeds: Path, tmp_path: Path
) -> None:
    output = tmp_path / "lecture.svg"
    result = chainrule(
        "render", lecture_id, "--feeds", lecture_feeds, "--loss", "f", "-o", output, "--address", server.address
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {output}"
    svg = output.read_text(encoding="utf-8")
    assert "<svg" in svg
    assert f'fill="{GRADIENT_COLOR}">∂f/∂x = &#45;4<' in svg and f'fill="{GRADIENT_COLOR}">∂f/∂z = 3<' in svg


def test_render_picks_png_and_dot_by_suffix(server: ServerProcess, lecture_id: str, tmp_path: Path) -> None:
    for name in ("graph.png", "graph.dot"):
        assert chainrule("render", lecture_id, "-o", tmp_path / name, "--address", server.address).returncode == 0
    assert (tmp_path / "graph.png").read_bytes().startswith(PNG_MAGIC)
    assert (tmp_path / "graph.dot").read_text(encoding="utf-8").startswith('digraph "lecture" {')
    result = chainrule("render", lecture_id, "-o", tmp_path / "graph.jpg", "--address", server.address)
    assert_one_line_error(result, "chainrule: ")
    assert "use one of .svg, .png, .dot" in result.stderr


def test_plot_history_writes_a_png(tmp_path: Path) -> None:
    history = cr.History(steps=[1, 2, 3, 4], losses=[4.0, 2.0, 1.0, 0.5])
    history.save(tmp_path / "history.json")
    result = chainrule("plot-history", tmp_path / "history.json", "-o", tmp_path / "loss.png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "loss.png").read_bytes().startswith(PNG_MAGIC)


def test_unknown_graph_is_one_line_on_stderr_and_exit_1(server: ServerProcess, tmp_path: Path) -> None:
    assert_one_line_error(chainrule("show", "no-such-graph", "--address", server.address), "chainrule: NOT_FOUND: ")
    result = chainrule("render", "no-such-graph", "-o", tmp_path / "x.svg", "--address", server.address)
    assert_one_line_error(result, "chainrule: NOT_FOUND: ")
    assert not (tmp_path / "x.svg").exists()


def test_bad_feeds_and_unreachable_servers_are_one_line_errors(
    server: ServerProcess, lecture_id: str, tmp_path: Path
) -> None:
    missing = chainrule("render", lecture_id, "--feeds", tmp_path / "none.npz", "-o", tmp_path / "x.svg")
    assert_one_line_error(missing, "chainrule: [Errno 2] No such file or directory")
    np.save(tmp_path / "plain.npy", np.zeros(3))
    plain = chainrule("render", lecture_id, "--feeds", tmp_path / "plain.npy", "-o", tmp_path / "x.svg")
    assert_one_line_error(plain, "chainrule: ")
    assert "--feeds takes an .npz archive" in plain.stderr
    unfed = tmp_path / "unfed.npz"
    np.savez(unfed, x=-2.0)
    result = chainrule(
        "render", lecture_id, "--feeds", unfed, "--loss", "f", "-o", tmp_path / "x.svg", "--address", server.address
    )
    assert_one_line_error(result, "chainrule: INVALID_ARGUMENT: ")
    assert_one_line_error(chainrule("graphs", "--address", "127.0.0.1:1"), "chainrule: UNAVAILABLE: ")


# ---------------------------------------------------------------- History files
def test_history_round_trips_through_json_with_non_finite_losses(tmp_path: Path) -> None:
    history = cr.History(steps=[1, 2, 3], losses=[0.5, math.inf, math.nan])
    history.save(tmp_path / "history.json")
    loaded = cr.History.load(tmp_path / "history.json")
    assert loaded.steps == [1, 2, 3] and loaded.losses[:2] == [0.5, math.inf] and math.isnan(loaded.losses[2])
    loaded.plot(tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes().startswith(PNG_MAGIC)


def test_history_load_refuses_other_json(tmp_path: Path) -> None:
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"steps": [1, 2], "losses": [0.1]}))
    with pytest.raises(ValueError, match="same length"):
        cr.History.load(path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="not a saved History"):
        cr.History.load(path)


def test_plotting_an_empty_history_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no steps"):
        cr.History().plot(tmp_path / "loss.png")


def test_plot_without_matplotlib_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for module in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        cr.History(steps=[1], losses=[1.0]).plot(tmp_path / "loss.png")
