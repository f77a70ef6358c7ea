"""The ONNX backend node tests shipped in the `onnx` package, for every ONNX op the importer covers.

Each case is imported over ImportOnnx into a real server, run with its inputs over Forward, and
its outputs compared with the case's expected ones within the case's tolerances (dtype and
shape exactly); then exported over ExportOnnx and run in onnxruntime, which must give Forward's
outputs. One test per covered op runs every case whose ops are all covered and whose last
node (the op under test) is that op; cases made of expanded function bodies run together. A
case may be left out only by `EXCLUDED` (with the reason) or because it uses element types
chainrule tensors do not have; those must then fail, so the table never hides a case that works.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime
import pytest
from onnx import TensorProto
from onnx.backend.test.case.node import collect_testcases

import chainrule.client as cr
from chainrule.server.onnx.table import TABLE
from tests.server_process import ServerProcess

WIRE_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT32, TensorProto.INT64, TensorProto.BOOL}
OTHER_TYPES_REASON = (
    "uses element types chainrule tensors do not have (float16, bfloat16, float8, 2- and 4-bit, 8- and 16-bit "
    "and unsigned ints, strings); the importer refuses them by name"
)
EXPANDED = "function bodies (expanded)"
EXPORT_RTOL, EXPORT_ATOL = 1e-4, 1e-5
"""onnxruntime against Forward, for the model ExportOnnx writes."""

EXCLUDED: dict[str, str] = {
    r"test_dropout_default_(ratio|mask|mask_ratio)|test_training_dropout.*": (
        "a ratio fed at run time, or the training-mode mask output: the call's mode decides dropout and masks "
        "come from the training seed, so ONNX's random draws cannot be reproduced"
    ),
    r"test_batchnorm_(example|epsilon)_training_mode": (
        "running mean and variance as outputs: chainrule keeps them in state nodes, updated by Train"
    ),
    r"test_maxpool_with_argmax_.*": "MaxPool's Indices output is not supported",
    r"test_identity_(sequence|opt)": "sequences and optionals are refused",
    r"test_reduce_(max|min)_empty_set(_bool)?": (
        "the max or min of an empty set: PyTorch's amax and amin refuse it, and so does chainrule"
    ),
}


@dataclass
class Outcome:
    name: str
    passed: bool
    detail: str = ""


def _array(value: Any) -> np.ndarray:
    return onnx.numpy_helper.to_array(value) if isinstance(value, TensorProto) else np.asarray(value)


def _model_types(model: onnx.ModelProto) -> Iterator[int]:
    graph = model.graph
    for value in (*graph.input, *graph.output):
        if value.type.WhichOneof("value") == "tensor_type":
            yield value.type.tensor_type.elem_type
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.name == "to" and attribute.type == onnx.AttributeProto.INT:
                yield attribute.i


def exclusion(case: Any) -> str | None:
    """Why a case is left out, or None."""
    for pattern, reason in EXCLUDED.items():
        if re.fullmatch(pattern, case.name):
            return reason
    if any(elem_type not in WIRE_TYPES for elem_type in _model_types(case.model)):
        return OTHER_TYPES_REASON
    return None


def owner(case: Any) -> str:
    return EXPANDED if "_expanded" in case.name else case.model.graph.node[-1].op_type


@functools.cache
def covered_cases() -> dict[str, list[Any]]:
    """The node cases whose ops are all covered, by the op they test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the case generators warn about overflows they provoke on purpose
        cases = collect_testcases()
    grouped: dict[str, list[Any]] = {}
    for case in cases:
        nodes = case.model.graph.node
        if case.kind != "node" or not nodes:
            continue
        if all(node.domain in ("", "ai.onnx") and node.op_type in TABLE for node in nodes):
            grouped.setdefault(owner(case), []).append(case)
    return grouped


def case_counts() -> Counter[str]:
    """How many covered cases run and how many are excluded (the README gives the first)."""
    return Counter(
        "run" if exclusion(case) is None else "excluded" for cases in covered_cases().values() for case in cases
    )


def run_case(client: cr.Client, case: Any) -> Outcome:
    """Import, Forward against the case's outputs, then ExportOnnx: onnxruntime gives Forward's outputs."""
    try:
        imported = client.import_onnx(case.model.SerializeToString(), name=case.name)
        names = [value.name for value in case.model.graph.input]
        for inputs, expected in case.data_sets:
            feeds = {name: _array(value) for name, value in zip(names, inputs, strict=False)}
            got = client.forward(imported.graph_id, feeds, imported.outputs)
            for output, want in zip(imported.outputs, expected, strict=True):
                _compare(output, got[output], _array(want), case.rtol, case.atol)
            _check_export(client, imported, feeds, got)
        client.delete_graph(imported.graph_id)
    except (cr.ChainruleError, AssertionError) as error:
        return Outcome(case.name, False, str(error).splitlines()[0][:300])
    return Outcome(case.name, True)


def _check_export(
    client: cr.Client, imported: cr.ImportedModel, feeds: dict[str, np.ndarray], got: dict[str, np.ndarray]
) -> None:
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    try:
        session = onnxruntime.InferenceSession(client.export_onnx(imported.graph_id, outputs=imported.outputs), options)
        needed = {value.name for value in session.get_inputs()}
        ran = session.run(list(imported.outputs), {name: value for name, value in feeds.items() if name in needed})
    except Exception as error:  # onnxruntime's own exception types
        raise AssertionError(f"the exported model does not run in onnxruntime: {error}") from None
    for output, value in zip(imported.outputs, ran, strict=True):
        _compare(f"{output}, exported", np.asarray(value), got[output], EXPORT_RTOL, EXPORT_ATOL)


def _compare(name: str, got: np.ndarray, want: np.ndarray, rtol: float, atol: float) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (
        f"output '{name}': got {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}"
    )
    if want.dtype.kind in "fc":
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=f"output '{name}'")
    else:
        np.testing.assert_array_equal(got, want, err_msg=f"output '{name}'")


RESULTS: dict[str, list[tuple[Outcome, str | None]]] = {}


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[cr.Client]:
    with cr.Client(server.address, timeout=120) as connected:
        yield connected


@pytest.mark.parametrize("op", [*sorted(TABLE), EXPANDED])
def test_node_cases_of_each_covered_op(op: str, client: cr.Client, capsys: pytest.CaptureFixture[str]) -> None:
    results = [(run_case(client, case), exclusion(case)) for case in covered_cases().get(op, [])]
    RESULTS[op] = results
    ran = [outcome for outcome, excluded in results if excluded is None]
    with capsys.disabled():
        print(
            f"\n  ONNX node cases of {op}: {len(ran)} run, {sum(o.passed for o in ran)} passed, "
            f"{len(results) - len(ran)} excluded"
        )
    failed = [f"{o.name}: {o.detail}" for o in ran if not o.passed]
    assert not failed, f"{len(failed)} of {len(ran)} {op} cases fail:\n" + "\n".join(failed)
    working = [o.name for o, excluded in results if excluded is not None and o.passed]
    assert not working, f"excluded cases pass now; take them out of the exclusions: {working}"


def test_node_case_totals(capsys: pytest.CaptureFixture[str]) -> None:
    """The counts over every op above (the module's tests run in order, so they have all run)."""
    totals = Counter[str]()
    reasons = Counter[str]()
    for results in RESULTS.values():
        for outcome, excluded in results:
            if excluded is None:
                totals["run"] += 1
                totals["passed"] += outcome.passed
            else:
                totals["excluded"] += 1
                reasons[excluded] += 1
    with capsys.disabled():
        print(
            f"\n  ONNX backend node cases: {totals['run']} run, {totals['passed']} passed, "
            f"{totals['excluded']} excluded, over {len(RESULTS)} covered ops"
        )
        for reason, count in reasons.most_common():
            print(f"    excluded {count}: {reason}")
    assert totals["run"] == totals["passed"]
    assert totals["run"] == case_counts()["run"], "the count the README gives (see tests/test_onnx_readme.py)"
