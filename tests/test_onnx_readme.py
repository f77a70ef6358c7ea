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


def test_readme_gives_the_counts_of_onnx_cases_and_models_the_tests_run() -> None:
    """test_onnx_node_cases prints how many node cases it runs, test_onnx_backend_models how many models;
    both must pass for those counts to hold, and the README must give the same."""
    from tests.test_onnx_backend_models import COVERED, EXCLUDED, model_directories
    from tests.test_onnx_node_cases import case_counts

    readme = " ".join(README.read_text(encoding="utf-8").split())
    assert f"({case_counts()['run']} cases run, all passing;" in readme
    every, compared = len(list(model_directories())), len(COVERED) - len(EXCLUDED)
    assert f"against its {every} `pytorch-converted` and `pytorch-operator` models ({compared} run, all passing" in (
        readme
    )


def test_readme_lists_every_covered_onnx_op() -> None:
    assert covered_ops_table() in README.read_text(encoding="utf-8"), (
        "README.md's ONNX table differs from server/onnx/table.py; print the table with "
        "`python -m tests.test_onnx_readme`"
    )


if __name__ == "__main__":
    print(covered_ops_table())
