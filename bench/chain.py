"""Measurement 1, per-node cost: a long chain of tiny float64 ops, differentiated end to end.

With scalar nodes the arithmetic is nothing, so the time per node is what each system pays to
dispatch one op forward and one VJP backward: chainrule's plan interpreter (plus one gRPC round
trip, spread over N nodes), PyTorch's eager autograd, or a bare Python loop over numpy.
The same chain with vector nodes is measurement 5's memory workload.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np

import chainrule.client as cr
from bench.measure import Measurement, Target, interleaved, median, scaled, timed

CYCLE = ("mul", "sigmoid", "add", "tanh")
"""The op of node i is CYCLE[i % 4]; mul and add take the constants below."""
SCALE = 0.9
SHIFT = 0.1
X0 = 0.5
CHECK_LENGTH = 64
"""A chain short enough that its gradient has not underflowed to 0, to check the systems agree."""


def chain_graph(length: int, width: int | None = None) -> cr.GraphBuilder:
    """The chain as a chainrule graph: input `x` (a scalar, or a vector of `width`) to scalar `loss`.

    The two constants are single shared nodes, as PyTorch's Python-number operands are, so the
    graph has `length` op nodes; a vector chain ends in a sum, as a loss must be a scalar.
    """
    g = cr.GraphBuilder(f"chain-{length}" + ("" if width is None else f"x{width}"))
    x = g.input("x", dtype="float64", shape=[] if width is None else [width])
    scale, shift = g.constant(SCALE, name="scale"), g.constant(SHIFT, name="shift")
    h = x
    for index in range(length):
        match CYCLE[index % 4]:
            case "mul":
                h = h * scale
            case "sigmoid":
                h = cr.sigmoid(h)
            case "add":
                h = h + shift
            case "tanh":
                h = cr.tanh(h)
    (h if width is None else cr.sum(h)).named("loss")
    return g


def numpy_chain(x: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The chain by hand: a forward loop keeping what the backward loop needs; returns (loss, d loss/d x)."""
    outputs: list[Any] = [None] * length
    h: Any = x
    for index in range(length):
        match CYCLE[index % 4]:
            case "mul":
                h = h * SCALE
            case "sigmoid":
                h = 1.0 / (1.0 + np.exp(-h))
                outputs[index] = h
            case "add":
                h = h + SHIFT
            case "tanh":
                h = np.tanh(h)
                outputs[index] = h
    grad: Any = np.ones_like(x)
    for index in reversed(range(length)):
        match CYCLE[index % 4]:
            case "mul":
                grad = grad * SCALE
            case "sigmoid":
                grad = grad * outputs[index] * (1.0 - outputs[index])
            case "tanh":
                grad = grad * (1.0 - outputs[index] * outputs[index])
    return np.sum(h), grad


def torch_chain(torch: ModuleType, x: Any, length: int) -> Any:
    """The chain in PyTorch eager mode, from a leaf `x` with requires_grad; returns the scalar loss."""
    h = x
    for index in range(length):
        match CYCLE[index % 4]:
            case "mul":
                h = h * SCALE
            case "sigmoid":
                h = torch.sigmoid(h)
            case "add":
                h = h + SHIFT
            case "tanh":
                h = torch.tanh(h)
    return h if h.dim() == 0 else h.sum()


def torch_chain_gradient(torch: ModuleType, x0: np.ndarray, length: int) -> np.ndarray:
    x = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    torch_chain(torch, x, length).backward()
    return np.asarray(x.grad.numpy())


def _check_agreement(client: cr.Client, torch: ModuleType | None) -> None:
    """Refuse to time anything unless the three implementations compute the same gradient."""
    graph = client.create_graph(chain_graph(CHECK_LENGTH))
    _, gradients = client.gradients(graph.graph_id, {"x": X0}, "loss", ["x"])
    expected = numpy_chain(np.asarray(X0), CHECK_LENGTH)[1]
    others = {"numpy": expected}
    if torch is not None:
        others["pytorch"] = torch_chain_gradient(torch, np.asarray(X0), CHECK_LENGTH)
    for name, gradient in others.items():
        if not np.allclose(gradients["x"], gradient, rtol=1e-9, atol=0):
            raise AssertionError(f"chain gradient: chainrule {gradients['x']} but {name} {gradient}")
    client.delete_graph(graph.graph_id)


def _contenders(
    client: cr.Client, graph_id: str, torch: ModuleType | None, length: int
) -> dict[str, Callable[[], float] | None]:
    """One timed forward-and-backward of the chain per system; PyTorch's is None when it is not installed."""

    def remote() -> float:
        return timed(lambda: client.gradients(graph_id, {"x": X0}, "loss", ["x"]))

    def local_torch() -> float:
        assert torch is not None
        return timed(lambda: torch_chain_gradient(torch, np.asarray(X0), length))

    def local_numpy() -> float:
        return timed(lambda: numpy_chain(np.asarray(X0), length))

    return {"chainrule": remote, "pytorch": local_torch if torch is not None else None, "numpy": local_numpy}


def measure_per_node(client: cr.Client, torch: ModuleType | None, lengths: Sequence[int], repeats: int) -> Measurement:
    """us/node for each chain length; the table row is the longest chain, the sweep goes to the chart."""
    _check_agreement(client, torch)
    sweep: list[dict[str, Any]] = []
    for length in lengths:
        graph = client.create_graph(chain_graph(length))
        runs = _contenders(client, graph.graph_id, torch, length)
        # The first call of each is kept apart: it pays one-time costs (chainrule plans the pass on a
        # graph's first Backward and caches it) that a long-running service does not pay per call.
        first = interleaved(runs, 1)
        samples = interleaved(runs, repeats)
        client.delete_graph(graph.graph_id)
        point: dict[str, Any] = {"length": length}
        for name in runs:
            point[f"{name}_us_per_node"] = scaled(median(samples.get(name)), 1e6 / length)
            point[f"{name}_first_call_us_per_node"] = scaled(median(first.get(name)), 1e6 / length)
        sweep.append(point)
    longest = sweep[-1]
    return Measurement(
        key="per_node",
        title=f"1 per-node cost, scalar chain N={longest['length']:,}",
        unit="us/node",
        chainrule=longest["chainrule_us_per_node"],
        baselines={"pytorch": longest["pytorch_us_per_node"], "numpy": longest["numpy_us_per_node"]},
        ratio_baseline="pytorch",
        target=Target("<=", 1.0),
        details={"repeats": repeats, "cycle": list(CYCLE), "sweep": sweep},
    )
