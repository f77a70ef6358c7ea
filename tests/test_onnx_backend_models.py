"""The `pytorch-converted` and `pytorch-operator` model tests shipped in the `onnx` package.

Old models (IR version 3, opset 6 to 9) exported by an early PyTorch, with their initializers
listed among the graph inputs: every model whose ops the importer covers is imported over
ImportOnnx (onnx's version converter brings it to opset 21), run over Forward with each of its
data sets, and compared with the expected outputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest

import chainrule.client as cr
from chainrule.server.onnx.table import TABLE
from tests.server_process import ServerProcess

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
KINDS = ("pytorch-converted", "pytorch-operator")
RTOL, ATOL = 1e-3, 1e-7
"""onnx's own backend runner's defaults for these models."""

EXCLUDED: dict[str, str] = {}
"""Model directory -> why it is expected to fail (none is now)."""


def model_directories() -> Iterator[Path]:
    for kind in KINDS:
        yield from sorted(path for path in (DATA / kind).iterdir() if (path / "model.onnx").is_file())


def covered(directory: Path) -> bool:
    model = onnx.load(directory / "model.onnx", load_external_data=False)
    return all(node.domain in ("", "ai.onnx") and node.op_type in TABLE for node in model.graph.node)


COVERED = [path for path in model_directories() if covered(path)]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[cr.Client]:
    with cr.Client(server.address, timeout=120) as connected:
        yield connected


def data_sets(directory: Path) -> Iterator[tuple[list[np.ndarray], list[np.ndarray]]]:
    for folder in sorted(directory.glob("test_data_set_*")):

        def tensors(prefix: str, folder: Path = folder) -> list[np.ndarray]:
            files = sorted(folder.glob(f"{prefix}_*.pb"), key=lambda path: int(path.stem.split("_")[1]))
            return [onnx.numpy_helper.to_array(onnx.load_tensor(str(path))) for path in files]

        yield tensors("input"), tensors("output")


@pytest.mark.parametrize("directory", COVERED, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_backend_model(directory: Path, client: cr.Client) -> None:
    model = onnx.load(directory / "model.onnx")
    initializers = {tensor.name for tensor in model.graph.initializer}
    fed = [value.name for value in model.graph.input if value.name not in initializers]
    reason = EXCLUDED.get(directory.name)
    try:
        imported = client.import_onnx(directory / "model.onnx", name=directory.name)
        assert list(imported.graph.inputs) == fed, "an input with an initializer is that initializer (IR 3)"
        for inputs, expected in data_sets(directory):
            feeds = dict(zip(fed, inputs, strict=False))
            got = client.forward(imported.graph_id, feeds, imported.outputs)
            for name, want in zip(imported.outputs, expected, strict=True):
                assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
                np.testing.assert_allclose(got[name], want, rtol=RTOL, atol=ATOL, err_msg=name)
    except (cr.ChainruleError, AssertionError):
        if reason is None:
            raise
        return
    assert reason is None, f"{directory.name} passes now; take it out of EXCLUDED ({reason})"


def test_backend_model_counts(capsys: pytest.CaptureFixture[str]) -> None:
    every = list(model_directories())
    with capsys.disabled():
        print(
            f"\n  ONNX pytorch-converted and pytorch-operator models: {len(COVERED)} of {len(every)} covered and "
            f"run ({len(COVERED) - len(EXCLUDED)} compared, {len(EXCLUDED)} excluded); not covered: "
            + (", ".join(path.name for path in every if path not in COVERED) or "none")
        )
    assert len(COVERED) > 100
