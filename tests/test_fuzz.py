"""Property-based fuzzing of a real server process (hypothesis), plus a float64 gradient property.

The wire property, checked after every example of every test but the last: the server never
answers INTERNAL or UNKNOWN (nor lets a call run into its 60 s deadline), whatever it is sent; the
process is alive and its grpc.health.v1 service answers SERVING; and after each test, the server
logged no ERROR and no traceback. Any other status is fine for a hostile request; requests built
to be valid must succeed, and their outputs must equal the graph evaluated in-process. Sent:

  (a) random valid graphs: random DAGs of every registered op over inputs, parameters and constants
      of every wire dtype, shapes made compatible, declared fully, partly or not at all; then
      GetGraph, Forward of every node, Backward, sometimes Train;
  (b) mutations of valid graphs: dropped, added and renamed inputs, wrong arity, unknown and swapped
      ops, cycles, bad, absurd and missing attrs, wrong-length data, bad dtypes, negative and absurd
      shapes, chunk flags, bad names...; whatever gets created is then run with hostile feeds;
  (c) bytes: serialized requests of every RPC mutated byte by byte and parsed with `FromString` (what
      does not parse is not sent: gRPC itself answers INTERNAL to a request it cannot deserialize),
      aimed at existing graphs or not; hostile structured Forward, Backward, Train, GetParameters,
      SetParameters and ListGraphs requests around existing graphs;
  (d) NaN and infinities everywhere in the feeds: they are values, computed and never refused;
  (e) in-process, through chainrule.server.plan.Plan (tests/gradcheck.py): on random graphs of smooth
      ops in float64, every gradient of the reverse pass matches central finite differences.

Reproducible in CI: every test is derandomized (hypothesis derives its seed from the test's name)
and uses no example database, so each run draws the same examples. The default budget is 2,400
examples in all (2,160 over the wire), spread over the seven tests by the fixed WEIGHTS. For a
longer soak run, raise the budget and pick a seed of your own, for instance:

    CHAINRULE_FUZZ_EXAMPLES=100000 CHAINRULE_FUZZ_SEED=1 python -m pytest tests/test_fuzz.py -p no:timeout

(CHAINRULE_FUZZ_EXAMPLES is the total over the seven tests; CHAINRULE_FUZZ_SEED replaces the
derandomized seeds with that one; `-p no:timeout` lifts pytest's 300 s limit per test.)
"""

from __future__ import annotations

import base64
import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, event, given, seed, settings
from hypothesis import strategies as st

from chainrule import tensors
from chainrule.client.builder import attr_value
from chainrule.server.ops import INFERENCE, OPS, NodeContext
from chainrule.server.shapes import ShapeError, TensorType
from chainrule.v1 import graph_pb2, graph_service_pb2_grpc, tensor_pb2
from chainrule.v1 import graph_service_pb2 as pb
from tests.gradcheck import check_grads
from tests.server_process import ServerProcess
from tests.test_service import lecture_graph, mlp_graph

TOTAL_EXAMPLES = int(os.environ.get("CHAINRULE_FUZZ_EXAMPLES", "2400"))
SEED = os.environ.get("CHAINRULE_FUZZ_SEED")
WEIGHTS = {
    "valid": 0.20,
    "mutated": 0.25,
    "bytes": 0.18,
    "requests": 0.12,
    "pages": 0.03,
    "nonfinite": 0.12,
    "gradients": 0.10,
}
TIMEOUT = 60.0
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
SERVING = health_pb2.HealthCheckResponse.SERVING


def fuzz(kind: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """hypothesis settings for one test: its share of the example budget, reproducible draws."""

    def decorate(test: Callable[..., None]) -> Callable[..., None]:
        configured = settings(
            max_examples=max(1, round(TOTAL_EXAMPLES * WEIGHTS[kind])),
            deadline=None,
            derandomize=SEED is None,
            database=None,
            print_blob=True,
            phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
            suppress_health_check=[
                HealthCheck.too_slow,
                HealthCheck.data_too_large,
                HealthCheck.filter_too_much,
                HealthCheck.large_base_example,
            ],
        )(test)
        return configured if SEED is None else seed(int(SEED))(configured)

    return decorate


# ---------------------------------------------------------------- the wire
@dataclass
class Wire:
    server: ServerProcess
    stub: graph_service_pb2_grpc.GraphServiceStub
    health: health_pb2_grpc.HealthStub
    graphs: dict[str, graph_pb2.Graph] = field(default_factory=dict)

    def call(self, what: str, invoke: Callable[[], Any]) -> tuple[grpc.StatusCode, Any]:
        """Run one RPC to its end (streams drained); any status is fine except the forbidden ones."""
        try:
            result = invoke()
            if isinstance(result, Iterator):
                result = list(result)
            return grpc.StatusCode.OK, result
        except grpc.RpcError as error:
            code = error.code()  # type: ignore[attr-defined]
            assert code not in FORBIDDEN, f"{what} answered {code.name}: {error.details()}"  # type: ignore[attr-defined]
            return code, error.details()  # type: ignore[attr-defined]

    def ok(self, what: str, invoke: Callable[[], Any]) -> Any:
        code, result = self.call(what, invoke)
        assert code == grpc.StatusCode.OK, f"{what} answered {code.name}: {result}"
        return result

    def assert_serving(self) -> None:
        assert self.server.process is not None and self.server.process.poll() is None, "the server process died"
        answer = self.health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert answer.status == SERVING


@pytest.fixture(scope="module")
def wire(server: ServerProcess) -> Iterator[Wire]:
    channel = grpc.insecure_channel(server.address)
    wire = Wire(server, graph_service_pb2_grpc.GraphServiceStub(channel), health_pb2_grpc.HealthStub(channel))
    for graph in (mlp_graph(), lecture_graph(), mixed_graph()):
        info = wire.ok("CreateGraph", lambda graph=graph: wire.stub.CreateGraph(pb.CreateGraphRequest(graph=graph)))
        wire.graphs[info.graph.graph_id] = graph
    yield wire
    channel.close()


@pytest.fixture(autouse=True)
def server_stays_healthy(wire: Wire) -> Iterator[None]:
    """After every test: the process runs, answers SERVING, and never logged an unexpected exception."""
    start = len(wire.server.log)
    yield
    wire.assert_serving()
    logged = wire.server.log[start:]
    assert not any("Traceback" in line or " ERROR " in line for line in logged), "".join(logged)[-4000:]


def mixed_graph() -> graph_pb2.Graph:
    """Inputs of every dtype, declared fully, partly or not at all, feeding most kinds of op."""
    return graph_pb2.Graph(
        name="mixed",
        nodes=[
            _node("x", "input", dtype="float64", shape=[-1, 3]),
            _node("i", "input", dtype="int32"),
            _node("b", "input", dtype="bool", shape=[2]),
            _node("u", "input"),
            _node("w", "parameter", value=np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2)),
            _node("c", "constant", value=np.array([1, 2], dtype=np.int64)),
            _node("xw", "matmul", "x", "w"),
            _node("s", "sum", "xw", axes=[1]),
            _node("m", "mean", "u"),
            _node("p", "pow", "u", "c"),
            _node("e", "exp", "b"),
            _node("ib", "add", "i", "b"),
            _node("sm", "softmax", "xw"),
            _node("ls", "log_softmax", "xw", axis=0),
            _node("ce", "softmax_cross_entropy", "xw", "sm"),
            _node("r", "reshape", "xw", shape=[-1]),
            _node("t", "transpose", "x"),
            _node("mx", "max", "r"),
            _node("loss", "add", "ce", "mx"),
        ],
    )


def _node(name: str, op: str, *inputs: str, value: np.ndarray | None = None, **attrs: Any) -> graph_pb2.Node:
    message = graph_pb2.Node(name=name, op=op, inputs=inputs)
    if value is not None:
        message.value.CopyFrom(tensors.encode(value))
    for key, attr in attrs.items():
        message.attrs[key].CopyFrom(attr_value(attr))
    return message


# ---------------------------------------------------------------- random valid graphs
SMOOTH_OPS = [
    "add", "sub", "mul", "div", "pow", "neg", "exp", "log", "sqrt", "square", "sigmoid", "tanh", "softplus",
    "log_sigmoid", "matmul", "sum", "mean", "logsumexp", "reshape", "transpose", "softmax", "log_softmax",
    "softmax_cross_entropy", "sigmoid_cross_entropy",
    "concat", "slice", "split", "squeeze", "unsqueeze", "expand", "tile", "flatten", "pad", "cumsum", "einsum",
    "reduce_prod", "reduce_sum_square",
    "average_pool", "global_average_pool",
    "erf", "sin", "cos", "reciprocal", "gelu", "silu", "softsign",
]  # fmt: skip
ALL_OPS = sorted(name for name, op in OPS.items() if not op.is_source)
WIRE_DTYPES = ["float64", "float32", "int32", "int64", "bool"]
SPECIALS = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e308, -1e308, 5e-324, 1e-300, 700.0, -750.0])
SHAPES = st.lists(st.sampled_from([1, 2, 3, 1, 2, 3, 0]), max_size=3)
SMOOTH_SHAPES = st.lists(st.sampled_from([1, 2, 3]), max_size=3)
POSITIVE_ARGS = {"log": (0,), "sqrt": (0,), "pow": (0,), "div": (1,), "reciprocal": (0,)}


def random_array(rng: np.random.Generator, dtype: str, shape: tuple[int, ...], special_rate: float) -> np.ndarray:
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if dtype.startswith("int"):
        return rng.integers(-4, 5, size=shape).astype(dtype)
    values = rng.standard_normal(shape)
    if special_rate:
        mask = rng.random(shape) < special_rate
        values = np.where(mask, rng.choice(SPECIALS, size=shape), values)
    with np.errstate(over="ignore"):  # 1e308 in float32 is inf: one more special value
        return np.asarray(values, dtype=dtype)


@dataclass
class Built:
    """A graph message with the feeds it will get and every node's value, computed in-process as it was built."""

    graph: graph_pb2.Graph
    feeds: dict[str, np.ndarray]
    parameters: dict[str, np.ndarray]
    values: dict[str, np.ndarray]
    parents: dict[str, tuple[str, ...]]
    state: dict[str, np.ndarray] = field(default_factory=dict)
    """The `state` nodes' values: stored with the parameters, never trained."""

    def ancestors(self, name: str) -> set[str]:
        seen: set[str] = set()
        stack = [name]
        while stack:
            for parent in self.parents[stack.pop()]:
                if parent not in seen:
                    seen.add(parent)
                    stack.append(parent)
        return seen

    def floats(self) -> list[str]:
        return [name for name, value in self.values.items() if np.issubdtype(value.dtype, np.floating)]


def pick(draw: st.DrawFn, options: Sequence[Any]) -> Any:
    """draw(st.sampled_from(options)) without building a new strategy per call (hot in the graph generator)."""
    return options[draw(st.integers(0, len(options) - 1))] if len(options) > 1 else options[0]


def _broadcastable(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    try:
        np.broadcast_shapes(a, b)
    except ValueError:
        return False
    return True


def _matmul_ok(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    if not a or not b:
        return False
    inner_a = a[-1]
    inner_b = b[0] if len(b) == 1 else b[-2]
    return inner_a == inner_b and _broadcastable(a[:-2], b[:-2])


@st.composite
def valid_graphs(
    draw: st.DrawFn,
    *,
    ops: Sequence[str] = ALL_OPS,
    dtypes: Sequence[str] = WIRE_DTYPES,
    special_rate: float | None = None,
    smooth: bool = False,
    max_ops: int = 10,
) -> Built:
    """A random DAG whose every node has been evaluated in-process with the op registry while it was drawn.

    A candidate node is kept only when the op's shape rule accepts its arguments' (fully known) types
    and the op computes a value; `smooth` further keeps values finite and moderate, and gives
    log, sqrt, pow's base and div's denominator arguments away from 0 (for finite differences).
    """
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if special_rate is None:
        special_rate = pick(draw, [0.0, 0.0, 0.05, 0.3])
    fancy_names = draw(st.booleans())
    nodes: list[graph_pb2.Node] = []
    values: dict[str, np.ndarray] = {}
    parents: dict[str, tuple[str, ...]] = {}
    feeds: dict[str, np.ndarray] = {}
    parameters: dict[str, np.ndarray] = {}
    state: dict[str, np.ndarray] = {}

    def fresh(prefix: str) -> str:
        label = draw(st.text(PRINTABLE, min_size=1, max_size=4)) if fancy_names else prefix
        return f"{label}_{len(nodes)}"

    def shape() -> tuple[int, ...]:
        return tuple(draw(SMOOTH_SHAPES if smooth else SHAPES))

    def add(message: graph_pb2.Node, value: np.ndarray) -> None:
        nodes.append(message)
        values[message.name] = np.asarray(value)
        parents[message.name] = tuple(message.inputs)

    for _ in range(draw(st.integers(1, 3))):
        dtype = pick(draw, dtypes)
        value = random_array(rng, dtype, shape(), special_rate)
        name = fresh("x")
        declared: dict[str, Any] = {}
        if draw(st.booleans()):
            declared["dtype"] = dtype
        how = pick(draw, ["full", "partial", "none"])
        if how == "full":
            declared["shape"] = list(value.shape)
        elif how == "partial":
            declared["shape"] = [-1 if draw(st.booleans()) else dim for dim in value.shape]
        add(_node(name, "input", **declared), value)
        feeds[name] = value
    float_dtypes = [d for d in dtypes if d.startswith("float")] or ["float64"]
    for _ in range(draw(st.integers(0, 2))):
        value = random_array(rng, pick(draw, float_dtypes), shape(), special_rate)
        name = fresh("w")
        add(_node(name, "parameter", value=value), value)
        parameters[name] = value
    for _ in range(draw(st.integers(0, 1))):  # running statistics: stored like parameters, never trained
        value = random_array(rng, pick(draw, float_dtypes), shape(), special_rate)
        name = fresh("s")
        add(_node(name, "state", value=value), value)
        state[name] = value
    for _ in range(draw(st.integers(0, 1))):
        value = random_array(rng, pick(draw, dtypes), shape(), special_rate)
        add(_node(fresh("c"), "constant", value=value), value)

    for _ in range(draw(st.integers(1, max_ops))):
        for _attempt in range(4):
            op = pick(draw, list(ops))
            names = list(values)
            first = pick(draw, names)
            a = values[first]
            arguments = [first]
            if OPS[op].variadic and draw(st.booleans()):
                arguments.append(first)  # concat(x, x), einsum("ab,ab->b", x, x)
            elif OPS[op].min_arity == 2 and OPS[op].max_arity == 2:
                if op == "matmul":
                    fits = [n for n in names if _matmul_ok(a.shape, values[n].shape)]
                elif op == "softmax_cross_entropy":
                    fits = [n for n in names if values[n].shape == a.shape and a.ndim]
                else:
                    fits = [n for n in names if _broadcastable(a.shape, values[n].shape)]
                if not fits:
                    continue
                arguments.append(pick(draw, fits))
            elif op == "where":  # a bool condition first, then two operands that broadcast with it
                fits = [n for n in names if _broadcastable(a.shape, values[n].shape)]
                if a.dtype != np.bool_:
                    continue
                arguments += [pick(draw, fits), pick(draw, fits)]
            attrs = _draw_attrs(draw, op, a, len(arguments))
            if attrs is None:
                continue
            args = [values[n] for n in arguments]
            if smooth and not _smooth_arguments(op, args):
                continue
            try:
                OPS[op].infer(*[TensorType(v.dtype, v.shape) for v in args], **attrs)  # type: ignore[misc]
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # "Mean of empty slice" and the like
                    out = _evaluate(op, args, attrs)
            except (ShapeError, ValueError, TypeError, np.exceptions.AxisError):
                continue
            if smooth and not (np.all(np.isfinite(out)) and np.all(np.abs(out) <= 1e3)):
                continue
            add(_node(fresh(op), op, *arguments, **attrs), out)
            break

    order = draw(st.permutations(range(len(nodes))))
    graph = graph_pb2.Graph(name=draw(st.text(PRINTABLE, max_size=12)), nodes=[nodes[i] for i in order])
    return Built(graph, feeds, parameters, values, parents, state)


def _draw_attrs(draw: st.DrawFn, op: str, a: np.ndarray, operands: int = 1) -> dict[str, Any] | None:
    rank = a.ndim
    attrs: dict[str, Any] = {}
    if op in STRUCTURE_OPS:
        return _draw_structure_attrs(draw, op, a, operands)
    if op in REDUCTIONS:
        if draw(st.booleans()):
            axes = draw(st.lists(st.integers(0, max(rank - 1, 0)), max_size=rank, unique=True)) if rank else []
            attrs["axes"] = [axis - rank if draw(st.booleans()) else axis for axis in axes]
        if draw(st.booleans()):
            attrs["keepdims"] = draw(st.booleans())
    elif op == "reshape":
        size = int(np.prod(a.shape))
        choices = [[size], list(reversed(a.shape)), [*a.shape, 1], [1, *a.shape], []]
        if size:
            choices.append([-1])
        target = pick(draw, choices)
        if int(np.prod(target)) != size and target != [-1]:
            return None
        attrs["shape"] = target
    elif op == "transpose":
        if draw(st.booleans()):
            attrs["perm"] = [axis - rank * draw(st.booleans()) for axis in draw(st.permutations(range(rank)))]
    elif op in ("softmax", "log_softmax", "layer_norm"):
        if not rank:
            return None
        if draw(st.booleans()):
            attrs["axis"] = draw(st.integers(-rank, rank - 1))
    elif op == "dropout":
        attrs["ratio"] = pick(draw, [0.0, 0.5, 1.0])
    elif op == "lrn":
        attrs["size"] = draw(st.integers(1, 4))
    elif op == "cast":
        attrs["dtype"] = pick(draw, WIRE_DTYPES)
    elif op == "gelu":
        attrs["approximate"] = pick(draw, ["none", "tanh"])
    elif op == "clip":
        attrs.update({bound: pick(draw, EXACT_FLOATS) for bound in ("min", "max") if draw(st.booleans())})
    elif op == "isinf":
        attrs.update(detect_positive=draw(st.booleans()), detect_negative=draw(st.booleans()))
    elif op in ("max_pool", "average_pool"):
        return _draw_pool_attrs(draw, op, a)
    return attrs


def _draw_pool_attrs(draw: st.DrawFn, op: str, a: np.ndarray) -> dict[str, Any] | None:
    """Windows over `a` as (N, C, spatial...) that fit most of the time (the shape rule refuses the rest)."""
    spatial = a.ndim - 2
    if spatial < 1:
        return None
    attrs: dict[str, Any] = {"kernel_shape": [draw(st.integers(1, 3)) for _ in range(spatial)]}
    if draw(st.booleans()):
        attrs["strides"] = [draw(st.integers(1, 3)) for _ in range(spatial)]
    if draw(st.booleans()):
        attrs["pads"] = [draw(st.integers(0, 1)) for _ in range(2 * spatial)]
    if draw(st.booleans()):
        attrs["ceil_mode"] = True
    if draw(st.integers(0, 3)) == 0:
        attrs["auto_pad"] = pick(draw, ["SAME_UPPER", "SAME_LOWER", "VALID"])
    if op == "average_pool" and draw(st.booleans()):
        attrs["count_include_pad"] = True
    return attrs


def _evaluate(op: str, args: list[np.ndarray], attrs: dict[str, Any]) -> np.ndarray:
    """The op's value as the server computes it in Forward: modal ops in inference mode, residuals dropped."""
    context = {"ctx": NodeContext(INFERENCE, op, [], {})} if OPS[op].modal else {}
    value = OPS[op].forward(*args, **attrs, **context)  # type: ignore[misc]
    return np.asarray(value[0] if OPS[op].saves else value)


REDUCTIONS = {
    "sum", "mean", "max", "logsumexp", "reduce_prod", "reduce_min", "reduce_l1", "reduce_l2", "reduce_sum_square",
}  # fmt: skip
STRUCTURE_OPS = {
    "concat", "slice", "split", "gather", "gather_elements", "squeeze", "unsqueeze", "expand", "tile", "flatten",
    "pad", "shape", "one_hot", "argmax", "argmin", "cumsum", "einsum",
}  # fmt: skip
SLICE_BOUNDS = st.one_of(st.integers(-4, 4), st.sampled_from([-(2**63), 2**63 - 1]))
PAD_MODES = ["constant", "reflect", "edge", "wrap"]
EXACT_FLOATS = [0.0, 1.5, -2.0, 0.25]
"""Float attrs travel as float32: values it holds exactly keep the in-process value equal to the server's."""


def _draw_structure_attrs(draw: st.DrawFn, op: str, a: np.ndarray, operands: int) -> dict[str, Any] | None:
    """Attrs of the structure ops that fit `a` most of the time (the shape rule refuses the rest)."""
    rank = a.ndim
    if not rank and op not in ("unsqueeze", "flatten", "shape", "one_hot", "einsum", "tile", "expand", "pad"):
        return None
    axis = draw(st.integers(-rank, rank - 1)) if rank else 0
    flags = {name: draw(st.booleans()) for name in ("keepdims", "select_last_index", "exclusive", "reverse")}
    if op in ("concat", "gather", "gather_elements"):
        return {"axis": axis}
    if op == "slice":
        axes = list(draw(st.permutations(range(rank))))[: draw(st.integers(1, rank))]
        return {
            "starts": [draw(SLICE_BOUNDS) for _ in axes],
            "ends": [draw(SLICE_BOUNDS) for _ in axes],
            "axes": axes,
            "steps": [pick(draw, [-2, -1, 1, 2, 3]) for _ in axes],
        }
    if op == "split":
        size = a.shape[axis]
        if draw(st.booleans()):
            cuts = sorted(draw(st.lists(st.integers(0, size), max_size=3)))
            splits = [end - start for start, end in zip([0, *cuts], [*cuts, size], strict=True)]
            return {"axis": axis, "splits": splits, "index": draw(st.integers(-len(splits), len(splits) - 1))}
        count = draw(st.integers(1, 3))
        return {"axis": axis, "num_outputs": count, "index": draw(st.integers(-count, count - 1))}
    if op == "squeeze":
        ones = [i for i, dim in enumerate(a.shape) if dim == 1]
        return {"axes": [i - rank * draw(st.booleans()) for i in ones]} if ones and draw(st.booleans()) else {}
    if op == "unsqueeze":
        return {"axes": [draw(st.integers(-rank - 1, rank))]}
    if op == "expand":
        lead = [pick(draw, [1, 2])] if draw(st.booleans()) else []
        return {"shape": lead + [pick(draw, [1, 2]) if dim == 1 else pick(draw, [1, dim]) for dim in a.shape]}
    if op == "tile":
        return {"repeats": [draw(st.integers(0, 2)) for _ in a.shape]}
    if op == "flatten":
        return {"axis": draw(st.integers(-rank, rank))}
    if op == "pad":
        # (no `value` attr: _node takes a keyword of that name for the node's tensor)
        return {"pads": [draw(st.integers(-1, 2)) for _ in range(2 * rank)], "mode": pick(draw, PAD_MODES)}
    if op == "shape":
        return {"start": draw(st.integers(-4, 4))} if draw(st.booleans()) else {}
    if op == "one_hot":
        return {
            "depth": draw(st.integers(1, 4)),
            "axis": draw(st.integers(-rank - 1, rank)),
            "dtype": pick(draw, WIRE_DTYPES),
            "on_value": pick(draw, EXACT_FLOATS),
        }
    if op in ("argmax", "argmin"):
        return {"axis": axis, "keepdims": flags["keepdims"], "select_last_index": flags["select_last_index"]}
    if op == "cumsum":
        return {"axis": axis, "exclusive": flags["exclusive"], "reverse": flags["reverse"]}
    letters = "abcd"[:rank]
    kept = "".join(list(draw(st.permutations(letters)))[: draw(st.integers(0, rank))])
    return {"equation": ",".join([letters] * operands) + "->" + kept}


def _smooth_arguments(op: str, args: list[np.ndarray]) -> bool:
    if not all(np.issubdtype(arg.dtype, np.floating) for arg in args):
        return False
    for index in POSITIVE_ARGS.get(op, ()):
        if not (args[index].size and np.min(args[index]) > 0.05):
            return False
    return not (op == "pow" and np.max(np.abs(args[1]), initial=0) > 3)


def same_values(got: np.ndarray, want: np.ndarray) -> bool:
    return got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want, equal_nan=True)


def encode_feeds(values: dict[str, np.ndarray]) -> dict[str, tensor_pb2.Tensor]:
    return {name: tensors.encode(value, name) for name, value in values.items()}


def run_valid(wire: Wire, built: Built, data: st.DataObject, *, train: bool) -> None:
    """Create, read back, evaluate every node, differentiate, maybe train: each must succeed and agree."""
    stub = wire.stub
    info = wire.ok("CreateGraph", lambda: stub.CreateGraph(pb.CreateGraphRequest(graph=built.graph))).graph
    graph_id = info.graph_id
    assert sorted(info.inputs) == sorted(built.feeds) and sorted(info.parameters) == sorted(built.parameters)
    assert sorted(info.state) == sorted(built.state)
    got = wire.ok("GetGraph", lambda: stub.GetGraph(pb.GetGraphRequest(graph_id=graph_id, include_definition=True)))
    assert got.definition == built.graph
    feeds = encode_feeds(built.feeds)
    fetches = list(built.values)
    outputs = wire.ok(
        "Forward", lambda: stub.Forward(pb.ForwardRequest(graph_id=graph_id, feeds=feeds, fetches=fetches))
    ).outputs
    for output, name in zip(outputs, fetches, strict=True):
        assert output.name == name
        value = tensors.decode(output.tensor)
        assert same_values(value, built.values[name]), (name, value, built.values[name])

    floats = built.floats()
    if floats:
        loss = data.draw(st.sampled_from(floats), label="loss")
        loss_value = built.values[loss]
        least = 0 if built.parameters else 1  # an empty wrt means every parameter, and there must be one
        wrt = data.draw(st.lists(st.sampled_from(floats), unique=True, min_size=least, max_size=4), label="wrt")
        request = pb.BackwardRequest(graph_id=graph_id, feeds=feeds, loss=loss, wrt=wrt)
        if loss_value.shape != () or data.draw(st.booleans(), label="explicit loss_grad"):
            request.loss_grad.CopyFrom(tensors.encode(np.ones(loss_value.shape)))
        responses = wire.ok("Backward", lambda: stub.Backward(request))
        expected = wrt or list(built.parameters)
        assert sorted(r.name for r in responses) == sorted(expected)
        for response in responses:
            gradient = tensors.decode(response.gradient)
            node_value = built.values[response.name]
            assert gradient.dtype == node_value.dtype and gradient.shape == node_value.shape, response.name

    if train and built.parameters:
        losses = [
            name for name in floats if built.values[name].shape == () and built.ancestors(name) & set(built.parameters)
        ]
        if losses:
            loss = data.draw(st.sampled_from(losses), label="train loss")
            optimizer = data.draw(st.sampled_from(TRAIN_OPTIMIZERS), label="optimizer")
            config = pb.TrainConfig(
                graph_id=graph_id,
                loss=loss,
                optimizer=optimizer,
                stream_updates=data.draw(st.booleans(), label="stream updates"),
            )
            requests = [pb.TrainRequest(config=config)] + [pb.TrainRequest(batch=pb.Batch(feeds=feeds))] * 2
            responses = wire.ok("Train", lambda: stub.Train(iter(requests)))
            assert [r.step for r in responses] == [1, 2]
    if data.draw(st.integers(0, 4), label="delete") == 0:  # seldom: every store write is an fsync
        wire.ok("DeleteGraph", lambda: stub.DeleteGraph(pb.DeleteGraphRequest(graph_id=graph_id)))


TRAIN_OPTIMIZERS = [
    pb.Optimizer(sgd=pb.Sgd(learning_rate=0.01)),
    pb.Optimizer(sgd=pb.Sgd(learning_rate=0.01, momentum=0.9, nesterov=True, weight_decay=0.1)),
    pb.Optimizer(adam=pb.Adam(learning_rate=0.01)),
]


# ---------------------------------------------------------------- (a) valid graphs
@fuzz("valid")
@given(built=valid_graphs(), data=st.data())
def test_random_valid_graphs_are_created_evaluated_and_differentiated(wire: Wire, built: Built, data) -> None:  # type: ignore[no-untyped-def]
    run_valid(wire, built, data, train=data.draw(st.integers(0, 2), label="train") == 0)
    wire.assert_serving()


# ---------------------------------------------------------------- (d) NaN and infinities are values
@fuzz("nonfinite")
@given(built=valid_graphs(dtypes=["float64", "float32"], special_rate=0.35), data=st.data())
def test_nan_and_inf_feeds_are_computed_not_refused(wire: Wire, built: Built, data) -> None:  # type: ignore[no-untyped-def]
    run_valid(wire, built, data, train=True)
    wire.assert_serving()


# ---------------------------------------------------------------- (b) mutated graphs
NAMES = st.text(max_size=6)
PRINTABLE = st.characters(exclude_categories=("Cc", "Cs"))
"""Valid names hold no control characters (the server refuses them)."""
ABSURD_SHAPES = st.sampled_from(
    [[-1], [-5, 2], [2**62, 2**62], [0, 2**62, 2**62], [0, 2**63 - 1], [1] * 65, [1] * 70, [2**31], [3, -1, 0]]
)
WILD_INTS = st.one_of(st.integers(-3, 5), st.sampled_from([-(2**63), 2**63 - 1, 2**31, -(2**31) - 1, 2**40]))


@st.composite
def wild_attrs(draw: st.DrawFn) -> graph_pb2.AttrValue:
    kind = draw(st.sampled_from(["i", "f", "s", "b", "ints", "floats", "unset"]))
    if kind == "i":
        return graph_pb2.AttrValue(i=draw(WILD_INTS))
    if kind == "f":
        return graph_pb2.AttrValue(f=draw(st.floats()))
    if kind == "s":
        return graph_pb2.AttrValue(s=draw(st.one_of(st.sampled_from([*WIRE_DTYPES, "float16", "complex64"]), NAMES)))
    if kind == "b":
        return graph_pb2.AttrValue(b=draw(st.booleans()))
    if kind == "ints":
        values = draw(st.one_of(st.lists(WILD_INTS, max_size=5), ABSURD_SHAPES))
        return graph_pb2.AttrValue(ints=graph_pb2.IntList(values=values))
    if kind == "floats":
        return graph_pb2.AttrValue(floats=graph_pb2.FloatList(values=draw(st.lists(st.floats(), max_size=3))))
    return graph_pb2.AttrValue()


@st.composite
def wild_tensors(draw: st.DrawFn) -> tensor_pb2.Tensor:
    """Tensors of every dtype code (and codes that are none), any shape, data of the right length or not."""
    dtype = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 99, -1]))
    shape = draw(st.one_of(st.lists(st.integers(-2, 4), max_size=4), ABSURD_SHAPES))
    itemsize = {1: 4, 2: 8, 3: 4, 4: 8, 5: 1}.get(dtype, 8)
    count = int(np.prod(shape, dtype=object)) if shape else 1
    how = draw(st.sampled_from(["exact", "exact", "short", "long", "random"]))
    if how != "random" and 0 <= count * itemsize <= 4096:
        size = count * itemsize + {"exact": 0, "short": -1, "long": 3}[how]
        if dtype == 5 and how == "exact" and draw(st.booleans()):
            data = bytes(draw(st.lists(st.integers(0, 1), min_size=size, max_size=size)))
        else:
            data = np.random.default_rng(draw(st.integers(0, 1000))).bytes(max(size, 0))
    else:
        data = draw(st.binary(max_size=64))
    tensor = tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)
    if draw(st.integers(0, 9)) == 0:
        tensor.chunk_offset = draw(st.integers(-5, 100))
    if draw(st.integers(0, 9)) == 0:
        tensor.more_chunks = True
    return tensor


def _mutate(draw: st.DrawFn, graph: graph_pb2.Graph) -> str:
    """Apply one random mutation in place; returns its name (for the falsifying example's report)."""
    nodes = graph.nodes
    names = [n.name for n in nodes]
    kind = draw(
        st.sampled_from(
            [
                "drop_input", "add_input", "rename_input", "rename_node", "duplicate_node", "unknown_op",
                "swap_op", "cycle", "bad_attr", "drop_attr", "value_data", "value_dtype", "value_shape",
                "wild_value", "add_value", "drop_value", "int_parameter", "bad_name", "input_attrs",
                "clear_nodes", "graph_name",
            ]
        )
    )  # fmt: skip
    if not nodes:
        nodes.add(name="lonely", op="input")
        return "add_node"
    target = nodes[draw(st.integers(0, len(nodes) - 1))]
    if kind == "drop_input" and target.inputs:
        del target.inputs[draw(st.integers(0, len(target.inputs) - 1))]
    elif kind == "add_input":
        target.inputs.append(draw(st.sampled_from(names)))
    elif kind == "rename_input" and target.inputs:
        target.inputs[draw(st.integers(0, len(target.inputs) - 1))] = draw(st.one_of(NAMES, st.sampled_from(names)))
    elif kind == "rename_node":
        target.name = draw(st.one_of(NAMES, st.sampled_from(names)))
    elif kind == "duplicate_node":
        nodes.append(target)
    elif kind == "unknown_op":
        target.op = draw(st.one_of(NAMES, st.sampled_from(["Add", "conv2d", "input ", "parameter\0"])))
    elif kind == "swap_op":
        target.op = draw(st.sampled_from(sorted(OPS)))
    elif kind == "cycle":
        _make_cycle(draw, graph)
    elif kind == "bad_attr":
        key = draw(st.one_of(st.sampled_from(["axes", "keepdims", "shape", "perm", "axis", "dtype"]), NAMES))
        target.attrs[key].CopyFrom(draw(wild_attrs()))
    elif kind == "drop_attr" and target.attrs:
        del target.attrs[draw(st.sampled_from(sorted(target.attrs)))]
    elif kind == "value_data" and target.HasField("value"):
        data = target.value.data
        target.value.data = data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data + b"\x01\x02\x03"
    elif kind == "value_dtype" and target.HasField("value"):
        target.value.dtype = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 99, -1]))
    elif kind == "value_shape" and target.HasField("value"):
        del target.value.shape[:]
        target.value.shape.extend(draw(st.one_of(ABSURD_SHAPES, st.lists(st.integers(-2, 3), max_size=4))))
    elif kind == "wild_value":
        target.value.CopyFrom(draw(wild_tensors()))
    elif kind == "add_value":
        target.value.CopyFrom(tensors.encode(np.ones(2)))
    elif kind == "drop_value":
        target.ClearField("value")
    elif kind == "int_parameter":
        target.op = "parameter"
        del target.inputs[:]
        target.ClearField("attrs")
        target.value.CopyFrom(tensors.encode(np.ones(3, dtype=draw(st.sampled_from(["int32", "int64", "bool"])))))
    elif kind == "bad_name":
        target.name = draw(st.sampled_from(["", "x" * 257, "\0", " ", "a\nb"]))
    elif kind == "input_attrs":
        target.op = "input"
        del target.inputs[:]
        target.ClearField("value")
        target.attrs["shape"].CopyFrom(graph_pb2.AttrValue(ints=graph_pb2.IntList(values=draw(ABSURD_SHAPES))))
        target.attrs["dtype"].CopyFrom(graph_pb2.AttrValue(s=draw(st.sampled_from([*WIRE_DTYPES, "float16", ""]))))
    elif kind == "clear_nodes":
        del nodes[:]
    elif kind == "graph_name":
        graph.name = draw(st.sampled_from(["", "g" * 257, "\0"]))
    return kind


def _make_cycle(draw: st.DrawFn, graph: graph_pb2.Graph) -> None:
    by_name = {n.name: n for n in graph.nodes}
    with_inputs = [n for n in graph.nodes if n.inputs]
    if not with_inputs:
        return
    v = draw(st.sampled_from(with_inputs))
    upstream = [v]
    stack = list(v.inputs)
    while stack:
        parent = by_name.get(stack.pop())
        if parent is not None and parent.inputs and parent not in upstream:
            upstream.append(parent)
            stack.extend(parent.inputs)
    w = draw(st.sampled_from(upstream))
    w.inputs[draw(st.integers(0, len(w.inputs) - 1))] = v.name


def hostile_feeds(draw: st.DrawFn, names: Sequence[str], honest: dict[str, np.ndarray]) -> dict[str, tensor_pb2.Tensor]:
    feeds = encode_feeds(honest) if draw(st.booleans()) else {}
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.one_of(st.sampled_from(list(names) or ["x"]), NAMES))
        feeds[name] = draw(wild_tensors())
    return feeds


@fuzz("mutated")
@given(built=valid_graphs(max_ops=6), data=st.data())
def test_mutated_graphs_are_refused_or_served_never_internal(wire: Wire, built: Built, data) -> None:  # type: ignore[no-untyped-def]
    graph = graph_pb2.Graph()
    graph.CopyFrom(built.graph)
    mutations = [_mutate(data.draw, graph) for _ in range(data.draw(st.integers(1, 3), label="mutations"))]
    data.draw(st.just(mutations), label="applied")
    stub = wire.stub
    code, info = wire.call("CreateGraph", lambda: stub.CreateGraph(pb.CreateGraphRequest(graph=graph)))
    event(f"CreateGraph {code.name}")
    if code == grpc.StatusCode.OK:
        graph_id = info.graph.graph_id
        names = [n.name for n in graph.nodes]
        feeds = hostile_feeds(data.draw, names, built.feeds)
        fetches = data.draw(st.lists(st.one_of(st.sampled_from(names), NAMES), max_size=4), label="fetches")
        wire.call("Forward", lambda: stub.Forward(pb.ForwardRequest(graph_id=graph_id, feeds=feeds, fetches=fetches)))
        request = pb.BackwardRequest(
            graph_id=graph_id,
            feeds=feeds,
            loss=data.draw(st.one_of(st.sampled_from(names), NAMES), label="loss"),
            wrt=data.draw(st.lists(st.one_of(st.sampled_from(names), NAMES), max_size=3), label="wrt"),
        )
        if data.draw(st.booleans(), label="loss_grad"):
            request.loss_grad.CopyFrom(data.draw(wild_tensors(), label="loss_grad tensor"))
        wire.call("Backward", lambda: stub.Backward(request))
        wire.call("DeleteGraph", lambda: stub.DeleteGraph(pb.DeleteGraphRequest(graph_id=graph_id)))
    else:
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), (code, info)
    wire.assert_serving()


# ---------------------------------------------------------------- (c) bytes
REQUEST_TYPES: dict[str, type] = {
    "CreateGraph": pb.CreateGraphRequest,
    "GetGraph": pb.GetGraphRequest,
    "ListGraphs": pb.ListGraphsRequest,
    "DeleteGraph": pb.DeleteGraphRequest,
    "Forward": pb.ForwardRequest,
    "Backward": pb.BackwardRequest,
    "GetParameters": pb.GetParametersRequest,
    "SetParameters": pb.SetParametersRequest,
    "Train": pb.TrainRequest,
}


def _seed_requests(wire: Wire) -> dict[str, list[bytes]]:
    """Well-formed requests of every type, serialized: the raw material the byte mutations start from."""
    graph_id, graph = next(iter(wire.graphs.items()))
    x = np.linspace(-1, 1, 6).reshape(2, 3)
    feeds = encode_feeds({"x": x})
    optimizer = pb.Optimizer(adam=pb.Adam(learning_rate=0.01))
    return {
        "CreateGraph": [pb.CreateGraphRequest(graph=g).SerializeToString() for g in wire.graphs.values()],
        "GetGraph": [pb.GetGraphRequest(graph_id=graph_id, include_definition=True).SerializeToString()],
        "ListGraphs": [pb.ListGraphsRequest(page_size=2, page_token="YWZ0ZXI6MQ==").SerializeToString()],
        "DeleteGraph": [pb.DeleteGraphRequest(graph_id="0" * 32).SerializeToString()],
        "Forward": [pb.ForwardRequest(graph_id=graph_id, feeds=feeds, fetches=["loss", "h"]).SerializeToString()],
        "Backward": [
            pb.BackwardRequest(
                graph_id=graph_id, feeds=feeds, loss="out", wrt=["x", "w1"], loss_grad=tensors.encode(np.ones((2, 1)))
            ).SerializeToString()
        ],
        "GetParameters": [pb.GetParametersRequest(graph_id=graph_id, names=["w1"]).SerializeToString()],
        "SetParameters": [
            pb.SetParametersRequest(
                graph_id=graph_id, parameters=tensors.encode_named({"b1": np.zeros(4)})
            ).SerializeToString()
        ],
        "Train": [
            pb.TrainRequest(
                config=pb.TrainConfig(graph_id=graph_id, loss="loss", optimizer=optimizer, checkpoint_every=2)
            ).SerializeToString(),
            pb.TrainRequest(batch=pb.Batch(feeds=feeds)).SerializeToString(),
        ],
    }


BYTE_MUTATIONS = st.sampled_from(["flip"] * 4 + ["set"] * 4 + ["insert", "delete", "truncate", "splice"])


@st.composite
def mutated_bytes(draw: st.DrawFn, base: bytes) -> bytes:
    data = bytearray(base)
    # Positions uniform over the message (hypothesis would favour its first bytes, the framing).
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    for _ in range(draw(st.integers(1, 3))):
        # Mostly in-place edits: most inserted, deleted or truncated bytes break the framing and do not parse.
        kind = draw(BYTE_MUTATIONS)
        at = int(rng.integers(0, len(data) + 1))
        if kind == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and at < len(data):
            data[at] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF, 0x0A, 0x12, 0x1A, 0x22]))
        elif kind == "insert":
            data[at:at] = draw(st.binary(max_size=8))
        elif kind == "delete":
            del data[at : at + int(rng.integers(1, 9))]
        elif kind == "truncate":
            del data[at:]
        elif kind == "splice":
            data[at:at] = base[int(rng.integers(0, len(base) + 1)) :]
    return bytes(data)


@fuzz("bytes")
@given(data=st.data())
def test_mutated_request_bytes_for_every_rpc(wire: Wire, data) -> None:  # type: ignore[no-untyped-def]
    seeds = _seed_requests(wire)
    method = data.draw(st.sampled_from(sorted(REQUEST_TYPES)), label="method")
    message_type = REQUEST_TYPES[method]
    raw_messages = []
    for base in seeds[method] if method == "Train" else [data.draw(st.sampled_from(seeds[method]), label="base")]:
        mutated = mutated_bytes(base)
        raw_messages.append(data.draw(st.one_of(mutated, mutated, mutated, st.binary(max_size=40)), label="bytes"))
    if method == "Train" and data.draw(st.booleans(), label="more batches"):
        raw_messages += [raw_messages[-1]] * data.draw(st.integers(1, 3))
    messages = []
    for raw in raw_messages:
        try:
            messages.append(message_type.FromString(raw))
        except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends: sent raw below
            continue
    event(f"{method}: {len(messages)} of {len(raw_messages)} parsed")
    if len(messages) < len(raw_messages):
        path = f"/chainrule.v1.GraphService/{method}"
        channel = wire.server.channel()
        if method == "Train":
            code, _ = wire.call(method, lambda: channel.stream_stream(path)(iter(raw_messages), timeout=TIMEOUT))
        elif method == "Backward":
            code, _ = wire.call(method, lambda: channel.unary_stream(path)(raw_messages[0], timeout=TIMEOUT))
        else:
            code, _ = wire.call(method, lambda: channel.unary_unary(path)(raw_messages[0], timeout=TIMEOUT))
        channel.close()
        event(f"{method} raw bytes: {code.name}")
    if messages:
        first = messages[0]
        if method != "DeleteGraph" and data.draw(st.booleans(), label="aim at an existing graph"):
            graph_id = data.draw(st.sampled_from(sorted(wire.graphs)), label="graph_id")
            if method == "Train":
                if first.WhichOneof("item") == "config":
                    first.config.graph_id = graph_id
            elif "graph_id" in first.DESCRIPTOR.fields_by_name:
                first.graph_id = graph_id
        rpc = getattr(wire.stub, method)
        if method == "Train":
            wire.call(method, lambda: rpc(iter(messages), timeout=TIMEOUT))
        else:
            code, answer = wire.call(method, lambda: rpc(first, timeout=TIMEOUT))
            event(f"{method} {code.name}")
            if method == "CreateGraph" and code == grpc.StatusCode.OK:
                gid = answer.graph.graph_id
                wire.call("DeleteGraph", lambda: wire.stub.DeleteGraph(pb.DeleteGraphRequest(graph_id=gid)))
    wire.assert_serving()


HOSTILE_METHODS = ["Forward", "Backward", "Train", "GetParameters", "SetParameters", "ListGraphs"]


@fuzz("requests")
@given(data=st.data())
def test_hostile_requests_around_existing_graphs(wire: Wire, data) -> None:  # type: ignore[no-untyped-def]
    graph_id = data.draw(st.one_of(st.sampled_from(sorted(wire.graphs)), NAMES), label="graph_id")
    graph = wire.graphs.get(graph_id, mlp_graph())
    names = [n.name for n in graph.nodes]
    inputs = [n.name for n in graph.nodes if n.op == "input"]
    honest = {
        name: random_array(np.random.default_rng(0), "float64", (2, 3) if name == "x" else (2,), 0.2) for name in inputs
    }
    honest.pop("i", None)
    honest.pop("b", None)
    feeds = hostile_feeds(data.draw, inputs + names, honest)
    node_names = st.one_of(st.sampled_from(names), NAMES)
    stub = wire.stub
    method = data.draw(st.sampled_from(HOSTILE_METHODS), label="method")
    if method == "Forward":
        fetches = data.draw(st.lists(node_names, max_size=5), label="fetches")
        wire.call(method, lambda: stub.Forward(pb.ForwardRequest(graph_id=graph_id, feeds=feeds, fetches=fetches)))
    elif method == "Backward":
        request = pb.BackwardRequest(
            graph_id=graph_id,
            feeds=feeds,
            loss=data.draw(node_names, label="loss"),
            wrt=data.draw(st.lists(node_names, max_size=4), label="wrt"),
        )
        if data.draw(st.booleans(), label="loss_grad"):
            request.loss_grad.CopyFrom(data.draw(wild_tensors(), label="loss_grad tensor"))
        wire.call(method, lambda: stub.Backward(request))
    elif method == "Train":
        requests = [pb.TrainRequest(config=data.draw(train_configs(graph_id, node_names), label="config"))]
        for _ in range(data.draw(st.integers(0, 3), label="batches")):
            batch_feeds = feeds if data.draw(st.booleans()) else hostile_feeds(data.draw, inputs, honest)
            requests.append(pb.TrainRequest(batch=pb.Batch(feeds=batch_feeds)))
        if data.draw(st.integers(0, 5), label="shuffle") == 0:
            random.Random(len(requests)).shuffle(requests)
        wire.call(method, lambda: stub.Train(iter(requests), timeout=TIMEOUT))
    elif method == "ListGraphs":
        request = pb.ListGraphsRequest(
            page_size=data.draw(st.one_of(st.integers(0, 2000), st.integers(-(2**31), 2**31 - 1)), label="page_size"),
            page_token=data.draw(page_tokens(), label="page_token"),
        )
        code, _ = wire.call(method, lambda: stub.ListGraphs(request))
        event(f"ListGraphs {code.name} {request.page_token[:12]}")
    elif method == "GetParameters":
        names_wanted = data.draw(st.lists(node_names, max_size=3), label="names")
        wire.call(method, lambda: stub.GetParameters(pb.GetParametersRequest(graph_id=graph_id, names=names_wanted)))
    else:
        parameters = [
            tensor_pb2.NamedTensor(name=data.draw(node_names), tensor=data.draw(wild_tensors()))
            for _ in range(data.draw(st.integers(0, 3)))
        ]
        wire.call(method, lambda: stub.SetParameters(pb.SetParametersRequest(graph_id=graph_id, parameters=parameters)))
    wire.assert_serving()


@st.composite
def page_tokens(draw: st.DrawFn) -> str:
    """Tokens shaped like the server's (base64 of "after:<seq>") with any number or text, and plain text."""
    edges = st.sampled_from([0, 1, 2**31, 2**63 - 1, 2**63, 2**64, 10**30, -1])
    inside = draw(st.one_of(edges.map(str), edges.map(str), st.integers().map(str), st.text(max_size=12)))
    token = f"{draw(st.sampled_from(['after', 'after', 'after', 'before', '']))}:{inside}"
    encoded = base64.urlsafe_b64encode(token.encode()).decode()
    return encoded if draw(st.integers(0, 3)) else draw(st.text(max_size=16))


@fuzz("pages")
@given(page_size=st.one_of(st.integers(0, 2000), st.integers(-(2**31), 2**31 - 1)), page_token=page_tokens())
def test_list_graphs_with_any_page_size_and_token(wire: Wire, page_size: int, page_token: str) -> None:
    request = pb.ListGraphsRequest(page_size=page_size, page_token=page_token)
    code, _ = wire.call("ListGraphs", lambda: wire.stub.ListGraphs(request))
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), code
    wire.assert_serving()


@st.composite
def train_configs(draw: st.DrawFn, graph_id: str, node_names: st.SearchStrategy[str]) -> pb.TrainConfig:
    numbers = st.one_of(st.floats(), st.sampled_from([0.0, 1e-3, 0.1, 1.0, 1e300, -1.0]))
    kind = draw(st.sampled_from(["sgd", "adam", "unset"]))
    if kind == "sgd":
        optimizer = pb.Optimizer(
            sgd=pb.Sgd(
                learning_rate=draw(numbers),
                momentum=draw(numbers),
                nesterov=draw(st.booleans()),
                weight_decay=draw(numbers),
            )
        )
    elif kind == "adam":
        optimizer = pb.Optimizer(
            adam=pb.Adam(
                learning_rate=draw(numbers),
                beta1=draw(numbers),
                beta2=draw(numbers),
                epsilon=draw(numbers),
                weight_decay=draw(numbers),
            )
        )
    else:
        optimizer = pb.Optimizer()
    return pb.TrainConfig(
        graph_id=graph_id,
        loss=draw(st.one_of(st.just("loss"), node_names)),
        optimizer=optimizer,
        parameters=draw(st.lists(node_names, max_size=3)),
        stream_gradients=draw(st.booleans()),
        stream_updates=draw(st.booleans()),
        checkpoint_every=draw(WILD_INTS),
        stop_on_non_finite_loss=draw(st.booleans()),
    )


# ---------------------------------------------------------------- (e) gradients against finite differences
@fuzz("gradients")
@given(built=valid_graphs(ops=SMOOTH_OPS, dtypes=["float64"], special_rate=0.0, smooth=True, max_ops=8), data=st.data())
def test_float64_gradients_match_central_finite_differences(built: Built, data) -> None:  # type: ignore[no-untyped-def]
    computed = [name for name in built.values if built.parents[name]]
    if not computed:
        return
    loss = data.draw(st.sampled_from(computed), label="loss")
    loss_value = built.values[loss]
    cotangent = None
    if loss_value.shape != () or data.draw(st.booleans(), label="explicit loss_grad"):
        cotangent = np.random.default_rng(len(computed)).standard_normal(loss_value.shape)
    intermediates = data.draw(st.lists(st.sampled_from(computed), unique=True, max_size=2), label="intermediates")
    wrt = [*built.feeds, *built.parameters, *built.state, *intermediates]
    scale = 1.0 + max(float(np.max(np.abs(value), initial=0.0)) for value in built.values.values())
    check_grads(
        list(built.graph.nodes),
        built.feeds,
        {**built.parameters, **built.state},
        loss=loss,
        wrt=wrt,
        loss_grad=cotangent,
        rtol=1e-5,
        atol=1e-6 * scale,
    )
