"""Draw a graph the way backpropagation is taught: left to right, each node with its value and gradient.

`to_dot` needs nothing but this package and writes Graphviz DOT; `render_svg` and
`render_png` hand that text to Graphviz's `dot` program, which is a system package rather
than a Python one, so only drawing pictures needs it installed.
"""

from __future__ import annotations

import html
import shutil
import subprocess
from collections import Counter
from collections.abc import Collection, Mapping, Sequence

import numpy as np

from chainrule.v1 import graph_pb2

VALUE_COLOR = "#1e8449"
GRADIENT_COLOR = "#c0392b"
MUTED_COLOR = "#566573"
SMALL_TENSOR = 4
"""Tensors of at most this many elements are drawn as their numbers; larger ones as shape and L2 norm."""

INSTALL_GRAPHVIZ = "Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz"

# Sources are the leaves the gradients flow back to; fills tell them apart from ops and from each other.
_SOURCE_STYLE = {
    "input": 'style="rounded,filled", fillcolor="#eaf2f8"',
    "parameter": 'style="rounded,filled", fillcolor="#fef9e7"',
    "constant": 'style="rounded,dashed"',
}


class RenderError(RuntimeError):
    """Graphviz is missing or refused the DOT text; the message says which and what to do."""


def format_tensor(value: np.ndarray) -> str:
    """The numbers themselves while they fit in a label, else what still tells tensors apart: shape and norm."""
    array = np.asarray(value)
    if array.size <= SMALL_TENSOR:
        return _format_nested(array.tolist())
    norm = float(np.linalg.norm(array.astype(np.float64).ravel()))
    return f"shape {list(array.shape)}, L2 norm {_format_number(norm)}"


def format_attr(value: graph_pb2.AttrValue) -> str:
    kind = value.WhichOneof("value")
    if kind == "ints":
        return _format_nested(list(value.ints.values))
    if kind == "floats":
        return _format_nested(list(value.floats.values))
    if kind == "s":
        return value.s
    if kind is None:
        return ""
    return _format_number(getattr(value, kind))


def format_attrs(node: graph_pb2.Node) -> str:
    """`key=value` pairs sorted by key, since a proto map has no order of its own."""
    return ", ".join(f"{key}={format_attr(node.attrs[key])}" for key in sorted(node.attrs))


def computable_nodes(definition: graph_pb2.Graph, order: Sequence[str], fed: Collection[str]) -> list[str]:
    """The nodes, in `order` (topological), whose value follows from the fed inputs and the graph alone.

    Forward fails as a whole when any fetch needs an unfed input, so a drawing of a partly fed
    graph fetches only these.
    """
    nodes = {node.name: node for node in definition.nodes}
    known: set[str] = set()
    for name in order:
        node = nodes[name]
        if node.op == "input":
            if name in fed:
                known.add(name)
        elif all(argument in known for argument in node.inputs):
            known.add(name)
    return [name for name in order if name in known]


def gradient_nodes(
    definition: graph_pb2.Graph, order: Sequence[str], loss: str, values: Mapping[str, np.ndarray]
) -> list[str]:
    """The loss and every node it depends on, in `order`, except those whose value is not float.

    Nodes off every path to the loss would only show zeros. The loss and nodes without a known
    value always stay in, so that Backward itself reports what is wrong (a loss that is unknown
    or not float, an unfed input) in the server's words.
    """
    nodes = {node.name: node for node in definition.nodes}
    if loss not in nodes:
        return [loss]
    wanted = {loss}
    stack = [loss]
    while stack:
        for argument in nodes[stack.pop()].inputs:
            if argument not in wanted:
                wanted.add(argument)
                stack.append(argument)
    return [name for name in order if name in wanted and (name == loss or _may_be_float(values.get(name)))]


def to_dot(
    definition: graph_pb2.Graph,
    values: Mapping[str, np.ndarray] | None = None,
    gradients: Mapping[str, np.ndarray] | None = None,
    title: str | None = None,
    loss: str | None = None,
) -> str:
    """Graphviz DOT of `definition`, left to right, each node showing what `values` and `gradients` hold for it.

    Values are drawn in green and gradients in red under them, as in the lecture's figures;
    `loss` names the node the gradients are of, which is outlined and used in the labels
    (∂loss/∂node). `title` defaults to the graph's name. An argument used more than once by
    the same node, as in mul(x, x), is one edge labelled ×2.
    """
    values = values or {}
    gradients = gradients or {}
    heading = definition.name if title is None else title
    lines = [
        f"digraph {_quote(definition.name or 'graph')} {{",
        "  rankdir=LR;",
        f'  graph [fontname="Helvetica", fontsize=16, labelloc=t, label={_quote(heading)}];',
        '  node [fontname="Helvetica", shape=box, style=rounded, margin="0.15,0.05"];',
        f'  edge [fontname="Helvetica", fontsize=11, color="{MUTED_COLOR}", fontcolor="{MUTED_COLOR}"];',
    ]
    for node in definition.nodes:
        style = _SOURCE_STYLE.get(node.op, "")
        emphasis = ", penwidth=2" if node.name == loss else ""
        label = _label(node, values.get(node.name), gradients.get(node.name), loss)
        lines.append(f"  {_quote(node.name)} [{style}{', ' if style else ''}label=<{label}>{emphasis}];")
    inputs = " ".join(_quote(node.name) for node in definition.nodes if node.op == "input")
    if inputs:
        # The lecture's layout: every input in the leftmost column, whatever depth it is consumed at.
        lines.append(f"  {{ rank=min; {inputs} }}")
    for node in definition.nodes:
        for argument, count in Counter(node.inputs).items():
            multiplicity = f' [label="×{count}"]' if count > 1 else ""
            lines.append(f"  {_quote(argument)} -> {_quote(node.name)}{multiplicity};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_svg(dot: str) -> str:
    """SVG text of the DOT, for a file or a notebook (IPython.display.SVG)."""
    return _run_dot(dot, "svg").decode("utf-8")


def render_png(dot: str) -> bytes:
    return _run_dot(dot, "png")


def _run_dot(dot: str, output_format: str) -> bytes:
    program = shutil.which("dot")
    if program is None:
        raise RenderError(
            f"drawing a graph as {output_format.upper()} needs Graphviz's `dot` program, which is not on PATH; "
            f"install Graphviz ({INSTALL_GRAPHVIZ}), or export DOT text instead"
        )
    result = subprocess.run([program, f"-T{output_format}"], input=dot.encode("utf-8"), capture_output=True)
    if result.returncode != 0:
        message = result.stderr.decode("utf-8", "replace").strip()
        raise RenderError(f"Graphviz dot exited with status {result.returncode}: {message}")
    return result.stdout


def _label(node: graph_pb2.Node, value: np.ndarray | None, gradient: np.ndarray | None, loss: str | None) -> str:
    """An HTML-like label, the only kind in which Graphviz colors parts of one label differently."""
    rows = [f'<B>{html.escape(node.name)}</B>  <FONT COLOR="{MUTED_COLOR}">{html.escape(node.op)}</FONT>']
    attrs = format_attrs(node)
    if attrs:
        rows.append(f'<FONT COLOR="{MUTED_COLOR}" POINT-SIZE="10">{html.escape(attrs)}</FONT>')
    if value is not None:
        rows.append(f'<FONT COLOR="{VALUE_COLOR}">{html.escape(format_tensor(value))}</FONT>')
    if gradient is not None:
        prefix = f"∂{loss}/∂{node.name}" if loss else "gradient"
        separator = ": " if np.asarray(gradient).size > SMALL_TENSOR else " = "
        text = html.escape(prefix + separator + format_tensor(gradient))
        rows.append(f'<FONT COLOR="{GRADIENT_COLOR}">{text}</FONT>')
    cells = "".join(f"<TR><TD>{row}</TD></TR>" for row in rows)
    return f'<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="0" CELLPADDING="1">{cells}</TABLE>'


def _may_be_float(value: np.ndarray | None) -> bool:
    return value is None or np.issubdtype(np.asarray(value).dtype, np.floating)


def _format_nested(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_format_nested(item) for item in value) + "]"
    return _format_number(value)


def _format_number(value: object) -> str:
    """Four significant digits and no trailing ".0", so -12.0 reads -12 as in the lecture."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'
