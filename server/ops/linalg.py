"""Matrix products and einsum.

einsum's equation is first made explicit (`_Equation`): ellipses become letters of their own and
an implicit output becomes numpy's (the ellipsis axes, then the letters used once, sorted). The
gradient of each operand is then an einsum of the incoming gradient with the other operands,
broadcast over the letters only that operand has, summed over axes it broadcast from size 1,
and written onto the diagonal where the operand repeats a letter (a trace, `ii->`).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from chainrule.server.ops.elementwise import joint_dtype
from chainrule.server.ops.registry import Array, Attr, defop, unbroadcast
from chainrule.server.shapes import Dim, ShapeError, TensorType, matmul_shape


def _matmul_a(g: Array, ans: Array, a: Array, b: Array) -> Array:
    if a.ndim == b.ndim == 2:
        return g @ b.T
    g2, a2, b2 = _as_matrices(g, a, b)
    return unbroadcast(g2 @ b2.swapaxes(-1, -2), a2.shape).reshape(a.shape)


def _matmul_b(g: Array, ans: Array, a: Array, b: Array) -> Array:
    if a.ndim == b.ndim == 2:
        return a.T @ g
    g2, a2, b2 = _as_matrices(g, a, b)
    return unbroadcast(a2.swapaxes(-1, -2) @ g2, b2.shape).reshape(b.shape)


def _as_matrices(g: Array, a: Array, b: Array) -> tuple[Array, Array, Array]:
    """Restore the axes numpy's matmul drops for 1-D operands, so one formula serves every case."""
    g = np.asarray(g)
    if a.ndim == 1:
        a = a[np.newaxis, :]
        g = np.expand_dims(g, -2) if b.ndim > 1 else g[np.newaxis]
    if b.ndim == 1:
        b = b[:, np.newaxis]
        g = np.expand_dims(g, -1)
    return g, a, b


def _matmul_type(a: TensorType, b: TensorType) -> TensorType:
    return TensorType(joint_dtype(a, b), matmul_shape(a.shape, b.shape))


defop(
    "matmul",
    np.matmul,
    _matmul_a,
    _matmul_b,
    infer=_matmul_type,
    reads=("y", "x"),
    inputs="a, b",
    convention="numpy matmul: 1-D, 2-D and broadcast batches",
)


# ---------------------------------------------------------------- einsum
LETTERS = string.ascii_letters


@dataclass(frozen=True)
class _Equation:
    """An einsum equation with letters only: one term per operand and the output."""

    inputs: tuple[str, ...]
    output: str

    def text(self) -> str:
        return ",".join(self.inputs) + "->" + self.output


def _terms(equation: str, count: int) -> tuple[list[str], str | None]:
    """The operands' terms and the explicit output (None when implicit), checked for their characters."""
    equation = "".join(equation.split())
    if equation.count("->") > 1:
        raise ShapeError(f"einsum equation {equation!r} has more than one '->'")
    left, arrow, right = equation.partition("->")
    terms = left.split(",")
    if len(terms) != count:
        raise ShapeError(f"einsum equation {equation!r} has {len(terms)} operand terms for {count} operands")
    for term in [*terms, right]:
        if term.count("...") > 1 or any(char not in LETTERS for char in term.replace("...", "")):
            raise ShapeError(f"einsum term {term!r} may hold letters and one '...' only")
    if len(set(right.replace("...", ""))) != len(right.replace("...", "")):
        raise ShapeError(f"einsum output {right!r} repeats a letter")
    return terms, right if arrow else None


def _parse(equation: str, ranks: Sequence[int | None]) -> _Equation | None:
    """The explicit equation for operands of these ranks; None when an ellipsis covers an unknown rank."""
    terms, output = _terms(equation, len(ranks))
    used = set("".join(terms).replace("...", ""))
    if output is not None:
        missing = set(output.replace("...", "")) - used
        if missing:
            raise ShapeError(f"einsum output {output!r} has letters no operand has: {''.join(sorted(missing))}")
    widths: list[int] = []
    for term, rank in zip(terms, ranks, strict=True):
        letters = len(term.replace("...", ""))
        if rank is None:
            if "..." in term:
                return None
            continue
        if "..." not in term and letters != rank:
            raise ShapeError(f"einsum term {term!r} has {letters} letters for an operand of rank {rank}")
        if "..." in term:
            if letters > rank:
                raise ShapeError(f"einsum term {term!r} has {letters} letters for an operand of rank {rank}")
            widths.append(rank - letters)
    width = max(widths, default=0)
    spare = [letter for letter in LETTERS if letter not in used]
    if width > len(spare):
        raise ShapeError(f"einsum equation {equation!r} needs more letters than there are")
    broadcast = "".join(spare[:width])
    inputs = tuple(
        term.replace("...", broadcast[width - (rank - len(term) + 3) :] if rank is not None else "")
        if "..." in term
        else term
        for term, rank in zip(terms, ranks, strict=True)
    )
    if output is None:
        once = sorted(letter for letter in used if "".join(terms).count(letter) == 1)
        return _Equation(inputs, broadcast + "".join(once))
    if "..." not in output and width and any("..." in term for term in terms):
        raise ShapeError(f"einsum output {output!r} needs '...' for the axes the operands' '...' cover")
    return _Equation(inputs, output.replace("...", broadcast))


def einsum(*operands: Array, equation: str) -> Array:
    parsed = _parse(equation, [operand.ndim for operand in operands])
    assert parsed is not None
    return np.einsum(parsed.text(), *operands, optimize=len(operands) > 1)


def _einsum_vjp(g: Array, ans: Array, *operands: Array, equation: str, position: int) -> Array:
    parsed = _parse(equation, [operand.ndim for operand in operands])
    assert parsed is not None
    term, x = parsed.inputs[position], operands[position]
    others = [(parsed.inputs[i], operand) for i, operand in enumerate(operands) if i != position]
    letters = "".join(dict.fromkeys(term))
    size = {letter: x.shape[term.index(letter)] for letter in letters}
    elsewhere = set(parsed.output).union(*(other for other, _ in others))
    linked = "".join(letter for letter in letters if letter in elsewhere)
    sources = ",".join([parsed.output, *(other for other, _ in others)])
    grad = np.einsum(f"{sources}->{linked}", g, *(operand for _, operand in others), optimize=bool(others))
    stretched = tuple(axis for axis, letter in enumerate(linked) if size[letter] == 1 and grad.shape[axis] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    grad = np.expand_dims(grad, tuple(axis for axis, letter in enumerate(letters) if letter not in elsewhere))
    grad = np.broadcast_to(grad, [size[letter] for letter in letters])
    if len(letters) == len(term):
        return grad
    diagonal = np.zeros(x.shape, grad.dtype)
    place = [np.arange(size[letter]).reshape([-1 if other == letter else 1 for other in letters]) for letter in term]
    diagonal[tuple(place)] = grad
    return diagonal


def _merged(known: Dim, dim: Dim, letter: str) -> Dim:
    """One letter's size over two axes, as broadcasting joins them: a 1 yields to the other."""
    if known == 1 or known is None and dim not in (None, 1):
        return dim
    if dim in (None, 1) or dim == known:
        return known
    raise ShapeError(f"einsum letter {letter!r} has axes of sizes {known} and {dim}")


def _einsum_type(*operands: TensorType, equation: str) -> TensorType:
    dtypes = [operand.dtype for operand in operands]
    dtype = None if any(each is None for each in dtypes) else np.result_type(*dtypes)
    parsed = _parse(equation, [None if operand.shape is None else len(operand.shape) for operand in operands])
    if parsed is None:
        return TensorType(dtype, None)
    sizes: dict[str, Dim] = {}
    for term, operand in zip(parsed.inputs, operands, strict=True):
        dims = (None,) * len(term) if operand.shape is None else operand.shape
        own: dict[str, Dim] = {}
        for letter, dim in zip(term, dims, strict=True):
            if letter in own and None not in (own[letter], dim) and own[letter] != dim:
                raise ShapeError(f"einsum term {term!r} repeats {letter!r} over axes of sizes {own[letter]} and {dim}")
            own[letter] = dim if own.get(letter) is None else own[letter]
        for letter, dim in own.items():
            sizes[letter] = _merged(sizes.get(letter, 1), dim, letter)
    return TensorType(dtype, tuple(sizes[letter] for letter in parsed.output))


defop(
    "einsum",
    einsum,
    _einsum_vjp,
    infer=_einsum_type,
    attrs={"equation": Attr("s", required=True)},
    reads=("args",),
    variadic=True,
    min_arity=1,
    inputs="x0, x1, ...",
    convention="numpy einsum (ellipsis, implicit output, repeated letters); each gradient is an einsum too",
)
