"""The README's table of covered ONNX ops is the importer's own table (print it with
`python -m tests.test_onnx_readme` after changing server/onnx/table.py)."""

from __future__ import annotations

from pathlib import Path

from chainrule.server.onnx.table import FAMILIES

README = Path(__file__).resolve().parent.parent / "README.md"


def covered_ops_table() -> str:
    lines = ["| family | ONNX op → chainrule op(s) |", "|---|---|"]
    for family, rules in FAMILIES.items():
        mapped = "; ".join(f"`{op}` → {rule.chainrule_ops()}" for op, rule in sorted(rules.items()))
        lines.append(f"| {family} | {mapped} |")
    return "\n".join(lines)


def test_readme_lists_every_covered_onnx_op() -> None:
    assert covered_ops_table() in README.read_text(encoding="utf-8"), (
        "README.md's ONNX table differs from server/onnx/table.py; print the table with "
        "`python -m tests.test_onnx_readme`"
    )


if __name__ == "__main__":
    print(covered_ops_table())
