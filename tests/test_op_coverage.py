"""Every op in the registry is covered by gradient rows, or declared to have no gradient."""

from __future__ import annotations

import importlib
import pkgutil

import tests.op_tables
from chainrule.server.ops import OPS
from tests import test_gradients


def _tables() -> list[object]:
    return [
        importlib.import_module(f"tests.op_tables.{module.name}")
        for module in pkgutil.iter_modules(tests.op_tables.__path__)
    ]


def test_every_op_has_gradient_rows_or_is_declared_without_gradient() -> None:
    """An op added to the registry without gradient rows would otherwise ship unchecked."""
    tabled = {case.op for case in test_gradients.OP_CASES}
    not_differentiable: set[str] = set()
    for table in _tables():
        tabled |= {case.op for case in table.CASES}  # type: ignore[attr-defined]
        not_differentiable |= table.NOT_DIFFERENTIABLE  # type: ignore[attr-defined]
    registered = {name for name, op in OPS.items() if not op.is_source}
    assert registered - tabled - not_differentiable == set()
    assert tabled & not_differentiable == set()
    assert (tabled | not_differentiable) - registered == set()


def test_case_ids_are_unique() -> None:
    ids = [case.id for case in test_gradients.OP_CASES]
    for table in _tables():
        ids += [case.id for case in table.CASES]  # type: ignore[attr-defined]
    assert len(set(ids)) == len(ids)
