"""Plan.check_allocation: a request's values are estimated before anything is allocated."""

from __future__ import annotations

import numpy as np
import pytest

from chainrule.server.errors import ResourceExhausted
from chainrule.server.graph import build_graph
from chainrule.server.plan import Plan
from tests.gradcheck import input_node, make_graph, node

VALUE_BYTES = 1000 * 8
"""One float64 vector of 1,000 elements."""


def exp_chain(shape: list[int], dtype: str | None = "float64") -> Plan:
    """x -> e1 -> e2 -> e3, each a float64 vector of 1,000 when x is; room for two of them."""
    nodes = [input_node("x", dtype, shape), node("e1", "exp", "x"), node("e2", "exp", "e1"), node("e3", "exp", "e2")]
    return Plan(build_graph(make_graph(nodes)), max_request_bytes=2 * VALUE_BYTES + 100)


@pytest.mark.parametrize("declared", [[1000], [-1]], ids=["declared-exactly", "batch-dimension"])
def test_the_node_that_crosses_the_limit_is_named(declared: list[int]) -> None:
    plan = exp_chain(declared)
    with pytest.raises(ResourceExhausted) as raised:
        plan.forward({"x": np.zeros(1000)}, {}, ["e3"])
    assert raised.value.subject == "e3"
    assert f"about {3 * VALUE_BYTES:,} bytes" in raised.value.message


def test_a_smaller_feed_for_a_batch_dimension_is_estimated_on_its_own_shape() -> None:
    plan = exp_chain([-1])
    [value] = plan.forward({"x": np.zeros(10)}, {}, ["e3"])
    assert value.shape == (10,)
    with pytest.raises(ResourceExhausted):
        plan.forward({"x": np.zeros(1000)}, {}, ["e3"])


def test_a_feed_of_another_dtype_is_estimated_on_its_own_itemsize() -> None:
    plan = exp_chain([1000], dtype=None)
    [value] = plan.forward({"x": np.zeros(1000, np.float32)}, {}, ["e3"])
    assert value.dtype == np.float32
    with pytest.raises(ResourceExhausted):
        plan.forward({"x": np.zeros(1000, np.float64)}, {}, ["e3"])
