"""Build `chainrule.v1.Graph` messages with numpy-like Python expressions.

A `GraphBuilder` records nodes as they are created; `Node` handles combine with operators
(`+ - * / ** @`, unary `-`, `abs()`) and with the module-level op functions, so a model reads
like the numpy code it replaces:

    g = GraphBuilder("logreg")
    x, y = g.input("x", shape=[-1, 3]), g.input("y", shape=[-1, 1])
    w, b = g.parameter("w", np.zeros((3, 1))), g.parameter("b", 0.0)
    loss = sigmoid_cross_entropy(x @ w + b, y).named("loss")
    graph = g.to_proto()

Nodes index as numpy arrays do (`x[1:3, ::2]`, `x[..., 0]`, `x[None]`, `x[:, [2, 0]]`), through the
slice, squeeze, unsqueeze and gather ops.

Names are plain strings only in `to_proto()`, so a node can be renamed after other nodes
used it. Numbers and arrays met where a node is expected become `constant` nodes.

Dtype rule for constants and parameters: float arrays and Python numbers (ints too, and lists
of them) take the builder's `default_dtype`, so `x ** 2` on a float32 graph stays float32
instead of being promoted by an int64 or float64 constant; integer and bool numpy arrays keep
their dtype. Values are encoded when their node is created, so later changes to the array
passed in do not reach the graph.
"""

from __future__ import annotations

import builtins
import itertools
from collections import Counter
from collections.abc import Sequence
from types import EllipsisType
from typing import NoReturn

import numpy as np
import numpy.typing as npt

from chainrule import tensors
from chainrule.v1 import graph_pb2, tensor_pb2

AttrLike = int | float | str | bool | Sequence[int] | Sequence[float]
Axes = int | Sequence[int] | None
_FLOAT_DTYPES = ("float32", "float64")


class Node:
    """A handle on one node of a `GraphBuilder`; combine handles to create new nodes."""

    # Without this, `np.ones(3) + node` would broadcast numpy's add over the Node as an object
    # and return an object array; None makes numpy defer to Node.__radd__ and friends.
    __array_ufunc__ = None

    def __init__(
        self,
        builder: GraphBuilder,
        name: str,
        op: str,
        inputs: tuple[Node, ...],
        attrs: dict[str, graph_pb2.AttrValue],
        value: tensor_pb2.Tensor | None,
    ) -> None:
        self.builder = builder
        self._name = name
        self.op = op
        self.inputs = inputs
        self.attrs = attrs
        self.value = value

    @property
    def name(self) -> str:
        return self._name

    def named(self, name: str) -> Node:
        """Rename this node and return it, so naming fits at the end of an expression."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a node name must be a non-empty string, got {name!r}")
        self.builder._rename(self, name)
        return self

    def __repr__(self) -> str:
        return f"Node({self._name!r}, op={self.op!r})"

    # Arithmetic: each operator has a reflected twin so `2.0 - x` is sub(constant, x).
    def __add__(self, other: Node | npt.ArrayLike) -> Node:
        return self.builder.op("add", self, other)

    def __radd__(self, other: npt.ArrayLike) -> Node:
        return self.builder.op("add", other, self)

    def __sub__(self, other: Node | npt.ArrayLike) -> Node:
        return self.builder.op("sub", self, other)

    def __rsub__(self, other: npt.ArrayLike) -> Node:
        return self.builder.op("sub", other, self)

    def __mul__(self, other: Node | npt.ArrayLike) -> Node:
        return self.builder.op("mul", self, other)

    def __rmul__(self, other: npt.ArrayLike) -> Node:
        return self.builder.op("mul", other, self)

    def __truediv__(self, other: Node | npt.ArrayLike) -> Node:
        return self.builder.op("div", self, other)

    def __rtruediv__(self, other: npt.ArrayLike) -> Node:
        return self.builder.op("div", other, self)

    def __pow__(self, other: Node | npt.ArrayLike) -> Node:
        return self.builder.op("pow", self, other)

    def __rpow__(self, other: npt.ArrayLike) -> Node:
        return self.builder.op("pow", other, self)

    def __matmul__(self, other: Node | npt.ArrayLike) -> Node:
        return self.builder.op("matmul", self, other)

    def __rmatmul__(self, other: npt.ArrayLike) -> Node:
        return self.builder.op("matmul", other, self)

    def __neg__(self) -> Node:
        return self.builder.op("neg", self)

    def __abs__(self) -> Node:
        return self.builder.op("abs", self)

    # Comparisons give bool nodes, as numpy's do; so a Node cannot be tested for truth, and hashes by identity.
    def __eq__(self, other: Node | npt.ArrayLike) -> Node:  # type: ignore[override]
        return self.builder.op("equal", self, other)

    def __ne__(self, other: Node | npt.ArrayLike) -> Node:  # type: ignore[override]
        return self.builder.op("not_equal", self, other)

    def __lt__(self, other: Node | npt.ArrayLike) -> Node:
        return self.builder.op("less", self, other)

    def __le__(self, other: Node | npt.ArrayLike) -> Node:
        return self.builder.op("less_equal", self, other)

    def __gt__(self, other: Node | npt.ArrayLike) -> Node:
        return self.builder.op("greater", self, other)

    def __ge__(self, other: Node | npt.ArrayLike) -> Node:
        return self.builder.op("greater_equal", self, other)

    def __hash__(self) -> int:
        return id(self)

    def __bool__(self) -> bool:
        raise TypeError(
            f"the truth value of node {self._name!r} is known only when the graph runs; "
            "use cr.where(condition, x, y) to choose, and & | ^ ~ to combine conditions"
        )

    # Logic on bool nodes, as numpy's operators on bool arrays (the server refuses other dtypes).
    def __invert__(self) -> Node:
        return self.builder.op("logical_not", self)

    def __and__(self, other: Node | npt.ArrayLike) -> Node:
        return self.builder.op("logical_and", self, other)

    def __rand__(self, other: npt.ArrayLike) -> Node:
        return self.builder.op("logical_and", other, self)

    def __or__(self, other: Node | npt.ArrayLike) -> Node:
        return self.builder.op("logical_or", self, other)

    def __ror__(self, other: npt.ArrayLike) -> Node:
        return self.builder.op("logical_or", other, self)

    def __xor__(self, other: Node | npt.ArrayLike) -> Node:
        return self.builder.op("logical_xor", self, other)

    def __rxor__(self, other: npt.ArrayLike) -> Node:
        return self.builder.op("logical_xor", other, self)

    def astype(self, dtype: npt.DTypeLike) -> Node:
        return cast(self, dtype)

    def clip(self, min: Node | npt.ArrayLike | None = None, max: Node | npt.ArrayLike | None = None) -> Node:
        return clip(self, min, max)

    @property
    def T(self) -> Node:
        return self.builder.op("transpose", self)

    # Reductions take numpy's `axis` (an int or a sequence); `axes`, the op's attr name, is accepted too.
    def sum(self, axis: Axes = None, keepdims: bool = False, *, axes: Axes = None) -> Node:
        return sum(self, axes if axes is not None else axis, keepdims)

    def mean(self, axis: Axes = None, keepdims: bool = False, *, axes: Axes = None) -> Node:
        return mean(self, axes if axes is not None else axis, keepdims)

    def max(self, axis: Axes = None, keepdims: bool = False, *, axes: Axes = None) -> Node:
        return max(self, axes if axes is not None else axis, keepdims)

    def min(self, axis: Axes = None, keepdims: bool = False, *, axes: Axes = None) -> Node:
        return min(self, axes if axes is not None else axis, keepdims)

    def prod(self, axis: Axes = None, keepdims: bool = False, *, axes: Axes = None) -> Node:
        return prod(self, axes if axes is not None else axis, keepdims)

    def argmax(self, axis: int = 0, keepdims: bool = False) -> Node:
        return argmax(self, axis, keepdims)

    def argmin(self, axis: int = 0, keepdims: bool = False) -> Node:
        return argmin(self, axis, keepdims)

    def cumsum(self, axis: int = 0) -> Node:
        return cumsum(self, axis)

    def reshape(self, *shape: int | Sequence[int]) -> Node:
        """x.reshape(2, -1) or x.reshape((2, -1)), as numpy."""
        return reshape(self, _shape_arguments(shape))

    def transpose(self, *perm: int | Sequence[int]) -> Node:
        """x.transpose(1, 0) or x.transpose((1, 0)); no arguments reverses the axes, as numpy."""
        return transpose(self, _shape_arguments(perm) if perm else None)

    def flatten(self) -> Node:
        """A 1-D copy, as numpy's flatten (cr.flatten(x, axis) is ONNX's, to 2-D)."""
        return reshape(self, [-1])

    def squeeze(self, axis: Axes = None) -> Node:
        return squeeze(self, axis)

    # Indexing as numpy's basic indexing: ints, slices (negative steps too), None and one `...`, plus one
    # index array (a list, an int array or an int Node) among slices, which becomes a gather.
    def __getitem__(self, index: Index | tuple[Index, ...]) -> Node:
        return _getitem(self, index if isinstance(index, tuple) else (index,))

    def __iter__(self) -> NoReturn:
        # Without this, Python would iterate a Node through __getitem__ with 0, 1, 2, ... for ever.
        raise TypeError(f"node {self._name!r} cannot be iterated; index it (x[0]) or use cr.split")


Index = int | builtins.slice | EllipsisType | None | Sequence[int] | npt.NDArray[np.integer] | Node


class GraphBuilder:
    """Collects nodes in creation order (which is already a topological order) for one Graph."""

    def __init__(self, name: str = "", default_dtype: str = "float64") -> None:
        if np.dtype(default_dtype).name not in _FLOAT_DTYPES:
            raise ValueError(f"default_dtype must be one of {', '.join(_FLOAT_DTYPES)}, got {default_dtype!r}")
        self.name = name
        self.default_dtype = np.dtype(default_dtype)
        self._nodes: list[Node] = []
        # How many nodes currently hold each name, so generated names avoid taken ones cheaply.
        self._taken: Counter[str] = Counter()
        self._counters: dict[str, itertools.count[int]] = {}

    # ------------------------------------------------------------ sources
    def input(self, name: str, dtype: npt.DTypeLike | None = None, shape: Sequence[int | None] | None = None) -> Node:
        """A value fed with each request; `dtype` and `shape` (None or -1 for any size) are checked by the server.

        Without `dtype` the input accepts any dtype: declaring default_dtype here would make the
        server refuse a float64 feed on a float32 graph instead of computing with it.
        """
        attrs: dict[str, graph_pb2.AttrValue] = {}
        if dtype is not None:
            dtype_name = np.dtype(dtype).name
            if dtype_name not in tensors.DTYPE_NAMES:
                raise ValueError(f"input {name!r}: dtype {dtype_name} is not one of {', '.join(tensors.DTYPE_NAMES)}")
            attrs["dtype"] = attr_value(dtype_name)
        if shape is not None:
            attrs["shape"] = graph_pb2.AttrValue(ints=graph_pb2.IntList(values=[-1 if d is None else d for d in shape]))
        return self._add("input", (), attrs, None, name)

    def parameter(self, name: str, value: npt.ArrayLike) -> Node:
        """A trainable tensor; `value` is its initial value (see the module's dtype rule)."""
        return self._add("parameter", (), {}, self._encode(value, name), name)

    def state(self, name: str, value: npt.ArrayLike) -> Node:
        """A float tensor that training updates but never trains: batch_norm's running mean and variance.
        `value` is its initial value (see the module's dtype rule); the server stores it with the parameters."""
        return self._add("state", (), {}, self._encode(value, name), name)

    def constant(self, value: npt.ArrayLike, name: str | None = None) -> Node:
        return self._add("constant", (), {}, self._encode(value, name or "constant"), name)

    # ------------------------------------------------------------ operations
    def op(self, op_name: str, *inputs: Node | npt.ArrayLike, name: str | None = None, **attrs: AttrLike) -> Node:
        """A node of any op; non-Node inputs become constants and attrs are converted by Python type.

        Ops and attrs are checked by the server, so ops it learns later need no client change.
        """
        nodes = tuple(self._as_node(value) for value in inputs)
        return self._add(op_name, nodes, {key: attr_value(value) for key, value in attrs.items()}, None, name)

    def to_proto(self) -> graph_pb2.Graph:
        duplicates = sorted(name for name, count in self._taken.items() if count > 1)
        if duplicates:
            raise ValueError(f"graph {self.name!r} has more than one node named {', '.join(map(repr, duplicates))}")
        return graph_pb2.Graph(
            name=self.name,
            nodes=[
                graph_pb2.Node(
                    name=node.name,
                    op=node.op,
                    inputs=[argument.name for argument in node.inputs],
                    attrs=node.attrs,
                    value=node.value,
                )
                for node in self._nodes
            ],
        )

    # ------------------------------------------------------------ internals
    def _add(
        self,
        op: str,
        inputs: tuple[Node, ...],
        attrs: dict[str, graph_pb2.AttrValue],
        value: tensor_pb2.Tensor | None,
        name: str | None,
    ) -> Node:
        if name is None:
            name = self._fresh_name(op)
        elif not isinstance(name, str) or not name:
            raise ValueError(f"a node name must be a non-empty string, got {name!r}")
        node = Node(self, name, op, inputs, attrs, value)
        self._nodes.append(node)
        self._taken[name] += 1
        return node

    def _fresh_name(self, op: str) -> str:
        counter = self._counters.setdefault(op, itertools.count(1))
        while True:
            name = f"{op}_{next(counter)}"
            if not self._taken[name]:
                return name

    def _rename(self, node: Node, name: str) -> None:
        self._taken[node.name] -= 1
        self._taken[name] += 1
        node._name = name

    def _as_node(self, value: Node | npt.ArrayLike) -> Node:
        if isinstance(value, Node):
            if value.builder is not self:
                raise ValueError(
                    f"node {value.name!r} belongs to GraphBuilder {value.builder.name!r}, not {self.name!r}; "
                    "nodes of different builders cannot be combined"
                )
            return value
        return self.constant(value)

    def _encode(self, value: npt.ArrayLike, name: str) -> tensor_pb2.Tensor:
        array = np.asarray(value)
        from_python = not isinstance(value, np.ndarray | np.generic)
        if array.dtype.kind == "f" or (from_python and array.dtype.kind in "iu"):
            array = array.astype(self.default_dtype, copy=False)
        return tensors.encode(array, name)


def attr_value(value: AttrLike) -> graph_pb2.AttrValue:
    """The AttrValue of a Python value; bool is tested before int because bool is an int subclass."""
    if isinstance(value, bool | np.bool_):
        return graph_pb2.AttrValue(b=bool(value))
    if isinstance(value, int | np.integer):
        return graph_pb2.AttrValue(i=int(value))
    if isinstance(value, float | np.floating):
        return graph_pb2.AttrValue(f=float(value))
    if isinstance(value, str):
        return graph_pb2.AttrValue(s=value)
    if isinstance(value, list | tuple | np.ndarray):
        items = list(value)
        if any(isinstance(item, bool | np.bool_) or not isinstance(item, int | float | np.number) for item in items):
            raise TypeError(f"an attr list must hold only ints or only floats, got {value!r}")
        if all(isinstance(item, int | np.integer) for item in items):
            return graph_pb2.AttrValue(ints=graph_pb2.IntList(values=[int(item) for item in items]))
        return graph_pb2.AttrValue(floats=graph_pb2.FloatList(values=[float(item) for item in items]))
    raise TypeError(f"cannot convert {type(value).__name__} {value!r} to an attr (int, float, str, bool or a list)")


def _builder_of(*operands: Node | npt.ArrayLike) -> GraphBuilder:
    for operand in operands:
        if isinstance(operand, Node):
            return operand.builder
    raise TypeError("at least one argument must be a Node, to know which GraphBuilder the new node belongs to")


def _apply(op: str, *operands: Node | npt.ArrayLike, name: str | None, **attrs: AttrLike | None) -> Node:
    """Create `op` in the operands' builder, leaving out attrs that are None (the server's default)."""
    given = {key: value for key, value in attrs.items() if value is not None}
    return _builder_of(*operands).op(op, *operands, name=name, **given)


def _axes(axes: int | Sequence[int] | None) -> Sequence[int] | None:
    return [axes] if isinstance(axes, int) else axes


# ---------------------------------------------------------------- elementwise binary
def add(x: Node | npt.ArrayLike, y: Node | npt.ArrayLike, *, name: str | None = None) -> Node:
    return _apply("add", x, y, name=name)


def sub(x: Node | npt.ArrayLike, y: Node | npt.ArrayLike, *, name: str | None = None) -> Node:
    return _apply("sub", x, y, name=name)


def mul(x: Node | npt.ArrayLike, y: Node | npt.ArrayLike, *, name: str | None = None) -> Node:
    return _apply("mul", x, y, name=name)


def div(x: Node | npt.ArrayLike, y: Node | npt.ArrayLike, *, name: str | None = None) -> Node:
    return _apply("div", x, y, name=name)


def pow(x: Node | npt.ArrayLike, y: Node | npt.ArrayLike, *, name: str | None = None) -> Node:
    return _apply("pow", x, y, name=name)


def maximum(x: Node | npt.ArrayLike, y: Node | npt.ArrayLike, *, name: str | None = None) -> Node:
    return _apply("maximum", x, y, name=name)


def minimum(x: Node | npt.ArrayLike, y: Node | npt.ArrayLike, *, name: str | None = None) -> Node:
    return _apply("minimum", x, y, name=name)


def matmul(a: Node | npt.ArrayLike, b: Node | npt.ArrayLike, *, name: str | None = None) -> Node:
    return _apply("matmul", a, b, name=name)


# ---------------------------------------------------------------- elementwise unary
def neg(x: Node, *, name: str | None = None) -> Node:
    return _apply("neg", x, name=name)


def exp(x: Node, *, name: str | None = None) -> Node:
    return _apply("exp", x, name=name)


def log(x: Node, *, name: str | None = None) -> Node:
    return _apply("log", x, name=name)


def sqrt(x: Node, *, name: str | None = None) -> Node:
    return _apply("sqrt", x, name=name)


def abs(x: Node, *, name: str | None = None) -> Node:
    return _apply("abs", x, name=name)


def square(x: Node, *, name: str | None = None) -> Node:
    return _apply("square", x, name=name)


def sigmoid(x: Node, *, name: str | None = None) -> Node:
    return _apply("sigmoid", x, name=name)


def tanh(x: Node, *, name: str | None = None) -> Node:
    return _apply("tanh", x, name=name)


def relu(x: Node, *, name: str | None = None) -> Node:
    return _apply("relu", x, name=name)


def softplus(x: Node, *, name: str | None = None) -> Node:
    return _apply("softplus", x, name=name)


def log_sigmoid(x: Node, *, name: str | None = None) -> Node:
    return _apply("log_sigmoid", x, name=name)


def erf(x: Node, *, name: str | None = None) -> Node:
    return _apply("erf", x, name=name)


def sin(x: Node, *, name: str | None = None) -> Node:
    return _apply("sin", x, name=name)


def cos(x: Node, *, name: str | None = None) -> Node:
    return _apply("cos", x, name=name)


def reciprocal(x: Node, *, name: str | None = None) -> Node:
    return _apply("reciprocal", x, name=name)


def floor(x: Node, *, name: str | None = None) -> Node:
    return _apply("floor", x, name=name)


def ceil(x: Node, *, name: str | None = None) -> Node:
    return _apply("ceil", x, name=name)


def round(x: Node, *, name: str | None = None) -> Node:
    """Halves to even, as numpy and PyTorch round."""
    return _apply("round", x, name=name)


def sign(x: Node, *, name: str | None = None) -> Node:
    """-1, 0 or 1; 0 at NaN, as torch.sign."""
    return _apply("sign", x, name=name)


def silu(x: Node, *, name: str | None = None) -> Node:
    return _apply("silu", x, name=name)


def softsign(x: Node, *, name: str | None = None) -> Node:
    return _apply("softsign", x, name=name)


def _float(value: float | None) -> float | None:
    """A float attr from any real number: an int would become an int attr, which the server refuses."""
    return None if value is None else float(value)


def leaky_relu(x: Node, alpha: float | None = None, *, name: str | None = None) -> Node:
    """x where x > 0, else alpha * x (alpha 0.01 when not given)."""
    return _apply("leaky_relu", x, name=name, alpha=_float(alpha))


def elu(x: Node, alpha: float | None = None, *, name: str | None = None) -> Node:
    return _apply("elu", x, name=name, alpha=_float(alpha))


def selu(x: Node, alpha: float | None = None, gamma: float | None = None, *, name: str | None = None) -> Node:
    return _apply("selu", x, name=name, alpha=_float(alpha), gamma=_float(gamma))


def gelu(x: Node, approximate: str = "none", *, name: str | None = None) -> Node:
    """x * Phi(x); approximate="tanh" is PyTorch's tanh approximation."""
    return _apply("gelu", x, name=name, approximate=approximate)


def hard_sigmoid(x: Node, alpha: float | None = None, beta: float | None = None, *, name: str | None = None) -> Node:
    """max(0, min(1, alpha * x + beta)) as ONNX (alpha 0.2, beta 0.5); torch's hardsigmoid is alpha=1/6."""
    return _apply("hard_sigmoid", x, name=name, alpha=_float(alpha), beta=_float(beta))


def prelu(x: Node | npt.ArrayLike, slope: Node | npt.ArrayLike, *, name: str | None = None) -> Node:
    """x where x > 0, else slope * x; slope broadcasts against x as in numpy."""
    return _apply("prelu", x, slope, name=name)


def clip(
    x: Node,
    min: Node | npt.ArrayLike | None = None,
    max: Node | npt.ArrayLike | None = None,
    *,
    name: str | None = None,
) -> Node:
    """Like np.clip and torch.clamp (max wins where min > max); None leaves a side unbounded. Numbers become
    attrs; nodes and arrays are tensor arguments, broadcast against x."""
    if max is not None and _is_tensor(max):
        return _apply("clip", x, -np.inf if min is None else min, max, name=name)
    if min is not None and _is_tensor(min):
        return _apply("clip", x, min, name=name, max=_scalar(max))
    return _apply("clip", x, name=name, min=_scalar(min), max=_scalar(max))


def _is_tensor(value: Node | npt.ArrayLike) -> bool:
    return isinstance(value, Node) or np.ndim(value) > 0


def _scalar(value: Node | npt.ArrayLike | None) -> float | None:
    return None if value is None else float(np.asarray(value))


def isnan(x: Node, *, name: str | None = None) -> Node:
    return _apply("isnan", x, name=name)


def isinf(x: Node, detect_positive: bool = True, detect_negative: bool = True, *, name: str | None = None) -> Node:
    return _apply("isinf", x, name=name, detect_positive=detect_positive, detect_negative=detect_negative)


# ---------------------------------------------------------------- comparisons, logic, where, cast
def equal(x: Node | npt.ArrayLike, y: Node | npt.ArrayLike, *, name: str | None = None) -> Node:
    return _apply("equal", x, y, name=name)


def not_equal(x: Node | npt.ArrayLike, y: Node | npt.ArrayLike, *, name: str | None = None) -> Node:
    return _apply("not_equal", x, y, name=name)


def less(x: Node | npt.ArrayLike, y: Node | npt.ArrayLike, *, name: str | None = None) -> Node:
    return _apply("less", x, y, name=name)


def less_equal(x: Node | npt.ArrayLike, y: Node | npt.ArrayLike, *, name: str | None = None) -> Node:
    return _apply("less_equal", x, y, name=name)


def greater(x: Node | npt.ArrayLike, y: Node | npt.ArrayLike, *, name: str | None = None) -> Node:
    return _apply("greater", x, y, name=name)


def greater_equal(x: Node | npt.ArrayLike, y: Node | npt.ArrayLike, *, name: str | None = None) -> Node:
    return _apply("greater_equal", x, y, name=name)


def logical_and(x: Node | npt.ArrayLike, y: Node | npt.ArrayLike, *, name: str | None = None) -> Node:
    return _apply("logical_and", x, y, name=name)


def logical_or(x: Node | npt.ArrayLike, y: Node | npt.ArrayLike, *, name: str | None = None) -> Node:
    return _apply("logical_or", x, y, name=name)


def logical_xor(x: Node | npt.ArrayLike, y: Node | npt.ArrayLike, *, name: str | None = None) -> Node:
    return _apply("logical_xor", x, y, name=name)


def logical_not(x: Node, *, name: str | None = None) -> Node:
    return _apply("logical_not", x, name=name)


def where(
    condition: Node | npt.ArrayLike, x: Node | npt.ArrayLike, y: Node | npt.ArrayLike, *, name: str | None = None
) -> Node:
    """x where the bool condition holds, else y, all three broadcast together (np.where)."""
    return _apply("where", condition, x, y, name=name)


def cast(x: Node, dtype: npt.DTypeLike, *, name: str | None = None) -> Node:
    """x in `dtype` (float32, float64, int32, int64 or bool), as ndarray.astype."""
    dtype_name = np.dtype(dtype).name
    if dtype_name not in tensors.DTYPE_NAMES:
        raise ValueError(f"cast: dtype {dtype_name} is not one of {', '.join(tensors.DTYPE_NAMES)}")
    return _apply("cast", x, name=name, dtype=dtype_name)


# ---------------------------------------------------------------- reductions (axes=None reduces every axis)
def sum(x: Node, axes: int | Sequence[int] | None = None, keepdims: bool = False, *, name: str | None = None) -> Node:
    return _apply("sum", x, name=name, axes=_axes(axes), keepdims=keepdims)


def mean(x: Node, axes: int | Sequence[int] | None = None, keepdims: bool = False, *, name: str | None = None) -> Node:
    return _apply("mean", x, name=name, axes=_axes(axes), keepdims=keepdims)


def max(x: Node, axes: int | Sequence[int] | None = None, keepdims: bool = False, *, name: str | None = None) -> Node:
    return _apply("max", x, name=name, axes=_axes(axes), keepdims=keepdims)


def logsumexp(
    x: Node, axes: int | Sequence[int] | None = None, keepdims: bool = False, *, name: str | None = None
) -> Node:
    return _apply("logsumexp", x, name=name, axes=_axes(axes), keepdims=keepdims)


def min(x: Node, axes: Axes = None, keepdims: bool = False, *, name: str | None = None) -> Node:
    """Ties share the gradient equally, as torch.amin."""
    return _apply("reduce_min", x, name=name, axes=_axes(axes), keepdims=keepdims)


def prod(x: Node, axes: Axes = None, keepdims: bool = False, *, name: str | None = None) -> Node:
    return _apply("reduce_prod", x, name=name, axes=_axes(axes), keepdims=keepdims)


def reduce_l1(x: Node, axes: Axes = None, keepdims: bool = False, *, name: str | None = None) -> Node:
    """The sum of absolute values."""
    return _apply("reduce_l1", x, name=name, axes=_axes(axes), keepdims=keepdims)


def reduce_l2(x: Node, axes: Axes = None, keepdims: bool = False, *, name: str | None = None) -> Node:
    """The Euclidean norm: the square root of the sum of squares."""
    return _apply("reduce_l2", x, name=name, axes=_axes(axes), keepdims=keepdims)


def reduce_sum_square(x: Node, axes: Axes = None, keepdims: bool = False, *, name: str | None = None) -> Node:
    return _apply("reduce_sum_square", x, name=name, axes=_axes(axes), keepdims=keepdims)


# ---------------------------------------------------------------- shapes
def reshape(x: Node, shape: Sequence[int], *, name: str | None = None) -> Node:
    """`shape` may hold one -1, as in numpy."""
    return _apply("reshape", x, name=name, shape=list(shape))


def transpose(x: Node, perm: Sequence[int] | None = None, *, name: str | None = None) -> Node:
    """Without `perm`, reverses the axes, as numpy does."""
    return _apply("transpose", x, name=name, perm=None if perm is None else list(perm))


def _shape_arguments(values: tuple[int | Sequence[int], ...]) -> list[int]:
    """numpy's two spellings: f(2, 3) and f((2, 3))."""
    if len(values) == 1 and not isinstance(values[0], int | np.integer):
        return [int(value) for value in values[0]]
    return [int(value) for value in values]  # type: ignore[arg-type]


def _int_array(value: Node | npt.ArrayLike, what: str) -> Node | npt.NDArray[np.int64]:
    """Indices given as Python ints or int arrays stay ints (other constants become floats)."""
    if isinstance(value, Node):
        return value
    array = np.asarray(value)
    if array.dtype.kind not in "iu" and array.size:
        raise TypeError(f"{what} must be integers, got {array.dtype}")
    return array.astype(np.int64)


def concat(xs: Sequence[Node | npt.ArrayLike], axis: int = 0, *, name: str | None = None) -> Node:
    """numpy's concatenate: every argument has the same shape but along `axis`."""
    return _apply("concat", *xs, name=name, axis=axis)


def split(x: Node, sizes: int | Sequence[int], axis: int = 0, *, name: str | None = None) -> list[Node]:
    """One node per piece: `sizes` lists their sizes along `axis`, or an int asks for that many equal
    parts (the last smaller when the axis does not divide evenly, as ONNX's Split). `name` names the
    pieces name_0, name_1, ..."""
    count = sizes if isinstance(sizes, int) else len(sizes)
    given = {"num_outputs": sizes} if isinstance(sizes, int) else {"splits": list(sizes)}
    return [
        _apply("split", x, name=None if name is None else f"{name}_{i}", axis=axis, index=i, **given)
        for i in range(count)
    ]


def slice(
    x: Node,
    starts: Sequence[int],
    ends: Sequence[int],
    axes: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    *,
    name: str | None = None,
) -> Node:
    """ONNX's Slice (positions clamped like Python's slices); x[a:b:c] writes the same thing."""
    return _apply(
        "slice",
        x,
        name=name,
        starts=list(starts),
        ends=list(ends),
        axes=None if axes is None else list(axes),
        steps=None if steps is None else list(steps),
    )


def gather(x: Node, indices: Node | npt.ArrayLike, axis: int = 0, *, name: str | None = None) -> Node:
    """numpy's take: the entries of `indices` (negative ones count from the end) along `axis`."""
    return _apply("gather", x, _int_array(indices, "gather's indices"), name=name, axis=axis)


def gather_elements(x: Node, indices: Node | npt.ArrayLike, axis: int = 0, *, name: str | None = None) -> Node:
    """torch.gather: out[i][j] = x[indices[i][j]][j] for axis 0, and so on."""
    return _apply("gather_elements", x, _int_array(indices, "gather_elements' indices"), name=name, axis=axis)


def squeeze(x: Node, axes: Axes = None, *, name: str | None = None) -> Node:
    """Without `axes`, removes every axis of size 1."""
    return _apply("squeeze", x, name=name, axes=_axes(axes))


def unsqueeze(x: Node, axes: int | Sequence[int], *, name: str | None = None) -> Node:
    """numpy's expand_dims: `axes` index the result."""
    return _apply("unsqueeze", x, name=name, axes=_axes(axes))


def expand(x: Node, shape: Sequence[int], *, name: str | None = None) -> Node:
    """x broadcast against `shape` (ONNX's Expand: both ways, so a 1 in `shape` keeps x's size)."""
    return _apply("expand", x, name=name, shape=list(shape))


def tile(x: Node, repeats: Sequence[int], *, name: str | None = None) -> Node:
    """numpy's tile with one repeat per axis."""
    return _apply("tile", x, name=name, repeats=list(repeats))


def flatten(x: Node, axis: int = 1, *, name: str | None = None) -> Node:
    """ONNX's Flatten: a matrix of the axes before `axis` by the rest (x.flatten() is numpy's, 1-D)."""
    return _apply("flatten", x, name=name, axis=axis)


def pad(
    x: Node,
    pads: Sequence[int] | Sequence[tuple[int, int]],
    mode: str = "constant",
    value: float = 0.0,
    *,
    name: str | None = None,
) -> Node:
    """numpy's pad_width [(before, after), ...] per axis, or ONNX's flat pads (all begins, then all ends);
    negative pads crop. `mode`: constant (with `value`), reflect, edge or wrap, as numpy's pad."""
    if all(isinstance(width, int | np.integer) for width in pads):
        flat = [int(width) for width in pads]  # type: ignore[arg-type]
    else:
        pairs = [tuple(pair) for pair in pads]  # type: ignore[arg-type]
        flat = [int(pair[0]) for pair in pairs] + [int(pair[1]) for pair in pairs]
    return _apply("pad", x, name=name, pads=flat, mode=mode, value=float(value))


def shape(x: Node, start: int | None = None, end: int | None = None, *, name: str | None = None) -> Node:
    """The int64 vector of x's sizes (from `start` to `end`, as ONNX's Shape)."""
    return _apply("shape", x, name=name, start=start, end=end)


def one_hot(
    indices: Node | npt.ArrayLike,
    depth: int,
    axis: int = -1,
    dtype: npt.DTypeLike = "int64",
    on_value: float | None = None,
    off_value: float | None = None,
    *,
    name: str | None = None,
) -> Node:
    """A new axis of size `depth` (at `axis`) holding on_value (1) at each index and off_value (0) elsewhere;
    negative indices count from depth, out-of-range ones give all off_value (ONNX). No gradient."""
    dtype_name = np.dtype(dtype).name
    return _apply(
        "one_hot",
        _int_array(indices, "one_hot's indices"),
        name=name,
        depth=depth,
        axis=axis,
        dtype=dtype_name,
        on_value=_float(on_value),
        off_value=_float(off_value),
    )


def argmax(
    x: Node, axis: int = 0, keepdims: bool = False, select_last_index: bool = False, *, name: str | None = None
) -> Node:
    """int64 positions of the largest entries along `axis`; ties give the first (or the last)."""
    return _apply("argmax", x, name=name, axis=axis, keepdims=keepdims, select_last_index=select_last_index)


def argmin(
    x: Node, axis: int = 0, keepdims: bool = False, select_last_index: bool = False, *, name: str | None = None
) -> Node:
    return _apply("argmin", x, name=name, axis=axis, keepdims=keepdims, select_last_index=select_last_index)


def cumsum(x: Node, axis: int = 0, exclusive: bool = False, reverse: bool = False, *, name: str | None = None) -> Node:
    """Running sums along `axis`; `exclusive` leaves each entry out of its own sum, `reverse` runs from the end."""
    return _apply("cumsum", x, name=name, axis=axis, exclusive=exclusive, reverse=reverse)


def einsum(equation: str, *operands: Node | npt.ArrayLike, name: str | None = None) -> Node:
    """numpy's einsum: cr.einsum("ij,jk->ik", a, b), with `...`, repeated letters and implicit outputs."""
    return _apply("einsum", *operands, name=name, equation=equation)


INT64_MAX = (1 << 63) - 1
INT64_MIN = -(1 << 63)


def _getitem(x: Node, index: tuple[Index, ...]) -> Node:
    """numpy indexing as slice, gather, squeeze and unsqueeze nodes. Axes are counted from the front
    before `...` and from the back after it, so no rank needs to be known."""
    if builtins.sum(item is Ellipsis for item in index) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    arrays = [item for item in index if _is_index_array(item)]
    if len(arrays) > 1 or arrays and builtins.any(item is None or _is_int(item) for item in index):
        raise IndexError("one index array (or int Node) combines only with slices and '...'")
    # Found by identity: `in` would compare with ==, which on a Node builds an `equal` node.
    cut = next((i for i, item in enumerate(index) if item is Ellipsis), len(index))
    slices: list[tuple[int, int, int, int]] = []
    removed: list[int] = []
    inserted: list[int] = []
    gathered: tuple[int, Index] | None = None
    for front, items in ((True, index[:cut]), (False, index[cut + 1 :][::-1])):
        axis, position, step = (0, 0, 1) if front else (-1, -1, -1)
        for item in items:
            if item is None:
                inserted.append(position)
                position += step
                continue
            if isinstance(item, builtins.slice):
                if item != builtins.slice(None):
                    slices.append((axis, *_slice_bounds(item)))
                position += step
            elif _is_int(item):
                start = int(item)  # type: ignore[arg-type]
                slices.append((axis, start, INT64_MAX if start == -1 else start + 1, 1))
                removed.append(axis)
            elif _is_index_array(item):
                gathered = (axis, item)
                position += step
            else:
                raise TypeError(f"cannot index a node with {type(item).__name__} {item!r}")
            axis += step
    out = x
    if slices:
        axes, starts, ends, steps = (list(column) for column in zip(*slices, strict=True))
        out = slice(out, starts, ends, axes, steps if builtins.any(s != 1 for s in steps) else None)
    if gathered is not None:
        out = gather(out, gathered[1], axis=gathered[0])  # type: ignore[arg-type]
    if removed:
        out = squeeze(out, removed)
    if inserted:
        out = unsqueeze(out, inserted)
    return out if out is not x else _identity(x)


def _identity(x: Node) -> Node:
    """x[...] and x[:]: a node of its own (numpy gives a view), so naming it leaves x's name alone."""
    return _apply("slice", x, name=None, starts=[], ends=[])


def _slice_bounds(item: builtins.slice) -> tuple[int, int, int]:
    for part in (item.start, item.stop, item.step):
        if part is not None and not _is_int(part):
            raise TypeError(f"slice bounds must be ints, got {part!r}")
    step = 1 if item.step is None else int(item.step)
    if step == 0:
        raise ValueError("slice step cannot be zero")
    start = item.start if item.start is not None else 0 if step > 0 else INT64_MAX
    stop = item.stop if item.stop is not None else INT64_MAX if step > 0 else INT64_MIN
    return int(start), int(stop), step


def _is_int(item: object) -> bool:
    return isinstance(item, int | np.integer) and not isinstance(item, bool | np.bool_)


def _is_index_array(item: object) -> bool:
    if isinstance(item, Node):
        return True
    if isinstance(item, list | np.ndarray):
        if np.asarray(item).dtype.kind == "b":
            raise IndexError("boolean masks cannot index a node; use cr.where to choose entries")
        return True
    return False


# ---------------------------------------------------------------- softmax family and losses
def softmax(x: Node, axis: int = -1, *, name: str | None = None) -> Node:
    return _apply("softmax", x, name=name, axis=axis)


def log_softmax(x: Node, axis: int = -1, *, name: str | None = None) -> Node:
    return _apply("log_softmax", x, name=name, axis=axis)


def softmax_cross_entropy(
    logits: Node, labels: Node | npt.ArrayLike, *, ignore_index: int | None = None, name: str | None = None
) -> Node:
    """Float labels are probabilities (e.g. one-hot): the mean over rows of -sum(labels * log_softmax(logits)).
    Integer labels are class indices, one per row (shape logits.shape[:-1]): the mean over rows not labelled
    `ignore_index` (default -100) of -log_softmax(logits)[label], as torch's cross_entropy. Python ints
    stay integers here, unlike other constants."""
    if not isinstance(labels, Node) and np.asarray(labels).dtype.kind in "iu":
        labels = np.asarray(labels, dtype=np.int64)
    return _apply("softmax_cross_entropy", logits, labels, name=name, ignore_index=ignore_index)


def sigmoid_cross_entropy(logits: Node, targets: Node | npt.ArrayLike, *, name: str | None = None) -> Node:
    """Mean binary cross-entropy of sigmoid(logits) against targets, computed stably from the logits."""
    return _apply("sigmoid_cross_entropy", logits, targets, name=name)


# ---------------------------------------------------------------- convolution and pooling (N, C, spatial... layout)
# Per-axis attrs list one entry per spatial axis; pads list every axis's begin, then every axis's end (ONNX).
# Absent attrs take the server's defaults: strides and dilations 1, pads 0, group 1, auto_pad NOTSET.
def _list(values: Sequence[int] | None) -> list[int] | None:
    return None if values is None else list(values)


def conv(
    x: Node,
    w: Node | npt.ArrayLike,
    b: Node | npt.ArrayLike | None = None,
    *,
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    group: int | None = None,
    auto_pad: str | None = None,
    name: str | None = None,
) -> Node:
    """torch.nn.functional.conv1d/2d/3d: w is (out channels, in channels / group, kernel...), b one per out channel.

    auto_pad SAME_UPPER or SAME_LOWER pads to ceil(size / stride) outputs, VALID pads nothing (ONNX)."""
    operands = (x, w) if b is None else (x, w, b)
    return _apply(
        "conv", *operands, name=name, strides=_list(strides), pads=_list(pads), dilations=_list(dilations),
        group=group, auto_pad=auto_pad,
    )  # fmt: skip


def conv_transpose(
    x: Node,
    w: Node | npt.ArrayLike,
    b: Node | npt.ArrayLike | None = None,
    *,
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    group: int | None = None,
    output_padding: Sequence[int] | None = None,
    output_shape: Sequence[int] | None = None,
    auto_pad: str | None = None,
    name: str | None = None,
) -> Node:
    """torch.nn.functional.conv_transpose1d/2d/3d: w is (in channels, out channels / group, kernel...).

    `output_shape` (spatial sizes) derives the pads as ONNX ConvTranspose does, overriding `pads`."""
    operands = (x, w) if b is None else (x, w, b)
    return _apply(
        "conv_transpose", *operands, name=name, strides=_list(strides), pads=_list(pads),
        dilations=_list(dilations), group=group, output_padding=_list(output_padding),
        output_shape=_list(output_shape), auto_pad=auto_pad,
    )  # fmt: skip


def max_pool(
    x: Node,
    kernel_shape: Sequence[int],
    *,
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    ceil_mode: bool | None = None,
    auto_pad: str | None = None,
    name: str | None = None,
) -> Node:
    """torch.nn.functional.max_pool1d/2d/3d (strides default to 1, not to the kernel as in PyTorch);
    the gradient goes to the first maximum of each window."""
    return _apply(
        "max_pool", x, name=name, kernel_shape=list(kernel_shape), strides=_list(strides), pads=_list(pads),
        dilations=_list(dilations), ceil_mode=ceil_mode, auto_pad=auto_pad,
    )  # fmt: skip


def average_pool(
    x: Node,
    kernel_shape: Sequence[int],
    *,
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    ceil_mode: bool | None = None,
    count_include_pad: bool | None = None,
    auto_pad: str | None = None,
    name: str | None = None,
) -> Node:
    """torch.nn.functional.avg_pool1d/2d/3d (strides default to 1; count_include_pad to False, as ONNX)."""
    return _apply(
        "average_pool", x, name=name, kernel_shape=list(kernel_shape), strides=_list(strides), pads=_list(pads),
        dilations=_list(dilations), ceil_mode=ceil_mode, count_include_pad=count_include_pad, auto_pad=auto_pad,
    )  # fmt: skip


def global_average_pool(x: Node, *, name: str | None = None) -> Node:
    """The mean over every spatial axis, kept as size 1: (N, C, 1, ...)."""
    return _apply("global_average_pool", x, name=name)


def global_max_pool(x: Node, *, name: str | None = None) -> Node:
    """The maximum over every spatial axis, kept as size 1: (N, C, 1, ...)."""
    return _apply("global_max_pool", x, name=name)


# ---------------------------------------------------------------- normalization and dropout (N, C, ... layout)
def batch_norm(
    x: Node,
    scale: Node | npt.ArrayLike,
    bias: Node | npt.ArrayLike,
    mean: Node | npt.ArrayLike,
    var: Node | npt.ArrayLike,
    *,
    epsilon: float | None = None,
    momentum: float | None = None,
    name: str | None = None,
) -> Node:
    """torch.nn.BatchNorm over axis 1. Make `mean` and `var` `GraphBuilder.state` nodes so that Train
    updates them (momentum in PyTorch's convention, default 0.1); other calls normalize with them unless
    run with `training=True`."""
    return _apply("batch_norm", x, scale, bias, mean, var, name=name, epsilon=epsilon, momentum=momentum)


def layer_norm(
    x: Node,
    scale: Node | npt.ArrayLike | None = None,
    bias: Node | npt.ArrayLike | None = None,
    *,
    axis: int = -1,
    epsilon: float | None = None,
    name: str | None = None,
) -> Node:
    """Normalizes over the axes [axis, rank); scale and bias broadcast against those axes."""
    if bias is not None and scale is None:
        raise ValueError("layer_norm takes a bias only with a scale (pass scale=1.0 for none)")
    affine = [argument for argument in (scale, bias) if argument is not None]
    return _apply("layer_norm", x, *affine, name=name, axis=axis, epsilon=epsilon)


def instance_norm(
    x: Node,
    scale: Node | npt.ArrayLike,
    bias: Node | npt.ArrayLike,
    *,
    epsilon: float | None = None,
    name: str | None = None,
) -> Node:
    return _apply("instance_norm", x, scale, bias, name=name, epsilon=epsilon)


def group_norm(
    x: Node,
    scale: Node | npt.ArrayLike,
    bias: Node | npt.ArrayLike,
    num_groups: int,
    *,
    epsilon: float | None = None,
    name: str | None = None,
) -> Node:
    """torch.nn.GroupNorm: scale and bias hold one value per channel."""
    return _apply("group_norm", x, scale, bias, name=name, num_groups=num_groups, epsilon=epsilon)


def lrn(
    x: Node,
    size: int,
    *,
    alpha: float | None = None,
    beta: float | None = None,
    bias: float | None = None,
    name: str | None = None,
) -> Node:
    """torch.nn.LocalResponseNorm (bias is its k)."""
    return _apply("lrn", x, name=name, size=size, alpha=alpha, beta=beta, bias=bias)


def dropout(x: Node, ratio: float = 0.5, *, name: str | None = None) -> Node:
    """Zeroes each element with probability `ratio` and scales the rest by 1 / (1 - ratio) when training;
    the identity otherwise."""
    return _apply("dropout", x, name=name, ratio=ratio)
