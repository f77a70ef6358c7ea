"""The structure, reduction and einsum ops: gradients against finite differences and torch.autograd,
forward values against numpy, torch and onnx's reference evaluator, the shape rules, and the refusals.

The rows are tests/op_tables/structure.py; exact rows here pin the conventions at ties and zeros.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import helper
from onnx.reference import ReferenceEvaluator

from chainrule.server.errors import InvalidArgument
from chainrule.server.graph import build_graph
from chainrule.server.ops import OPS
from chainrule.server.plan import Plan
from tests.gradcheck import (
    Array,
    OpCase,
    check_grads,
    constant,
    declared_inputs,
    input_node,
    make_graph,
    node,
    run_backward,
    run_op,
)
from tests.op_tables.structure import CASES, INT64_MAX, INT64_MIN, ints

torch.set_default_dtype(torch.float64)


def forward(case: OpCase, dtype: Any = np.float64) -> Array:
    [value] = Plan(build_graph(make_graph(case.nodes(dtype)))).forward(case.feeds(dtype), {}, ["out"])
    return np.asarray(value)


def cotangent(case: OpCase) -> Array:
    """A random loss_grad of the output's computed shape (rows with tensor arguments leave it unknown statically)."""
    return np.random.default_rng(len(case.id)).standard_normal(forward(case).shape)


def case_id(case: OpCase) -> str:
    return case.id


# ---------------------------------------------------------------- every row: gradients and dtypes
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradient_matches_finite_differences(case: OpCase) -> None:
    check_grads(case.nodes(), case.feeds(), loss="out", wrt=case.differentiable(), loss_grad=cotangent(case))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_float32_stays_float32(case: OpCase) -> None:
    loss_grad = cotangent(case)
    single = run_op(case, loss_grad, dtype=np.float32)
    double = run_op(case, loss_grad)
    assert single.loss.dtype == np.float32
    np.testing.assert_allclose(single.loss, double.loss, rtol=1e-5, atol=1e-5)
    for name in case.differentiable():
        assert single.grads[name].dtype == np.float32
        np.testing.assert_allclose(single.grads[name], double.grads[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradient_with_released_intermediates(case: OpCase) -> None:
    """Float operands computed, not fed, so the plan releases what the op's `reads` leave out: a VJP
    that reads a released value gives a different gradient from the fed run's."""
    feeds = case.feeds()
    loss_grad = cotangent(case)
    operands = [f"a_{name}" if value.dtype.kind == "f" else name for name, value in feeds.items()]
    nodes = [
        *declared_inputs(feeds),
        constant("zero", np.zeros(())),
        *(node(f"a_{name}", "add", name, "zero") for name, value in feeds.items() if value.dtype.kind == "f"),
        node("out", case.op, *operands, **case.attrs),
        constant("weights", loss_grad),
        node("weighted", "mul", "out", "weights"),
        node("loss", "sum", "weighted"),
    ]
    released = run_backward(nodes, feeds, loss="loss", wrt=case.differentiable())
    direct = run_op(case, loss_grad)
    for name in case.differentiable():
        np.testing.assert_allclose(released.grads[name], direct.grads[name], rtol=1e-12, atol=1e-12, err_msg=name)
