"""Gradient tables of the op families, one module each; `tests.test_op_coverage` checks that
together with `tests.test_gradients` they cover every op in the registry.

A module here defines `CASES: list[OpCase]` (each row is checked against central finite
differences by its own test module) and `NOT_DIFFERENTIABLE: set[str]`: the ops whose results
are int or bool, so they have no gradient rows.
"""
