"""The results as a table on stdout, a JSON file, and a chart of per-node cost against chain length."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.measure import Measurement

BASELINE_LABELS = {
    "pytorch": "PyTorch",
    "numpy": "numpy",
    "raw_grpc": "raw gRPC",
    "activations": "activations",
    "networkx": "NetworkX",
    "engine": "engine in-process",
    "unwatched": "no watchers",
    "sqlite": "SQLite",
}
HEADERS = ("measurement", "unit", "chainrule", "baselines", "ratio", "target", "result")


def number(value: float | None) -> str:
    """Three significant digits, as plain decimals: the noise is larger than any further digit."""
    if value is None:
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) >= 0.01 else f"{value:.2e}"


def verdict(measurement: Measurement) -> str:
    passed = measurement.passed
    return "n/a" if passed is None else "PASS" if passed else "FAIL"


def table(measurements: Sequence[Measurement]) -> str:
    rows = [HEADERS]
    for measurement in measurements:
        baselines = ", ".join(
            f"{BASELINE_LABELS.get(name, name)} {number(value)}" for name, value in measurement.baselines.items()
        )
        main = measurement.ratio_baseline
        ratio_label = f"{number(measurement.ratio)} (vs {BASELINE_LABELS.get(main, main)})"
        rows.append(
            (
                measurement.title,
                measurement.unit,
                number(measurement.chainrule),
                baselines,
                ratio_label,
                measurement.target.describe(measurement.unit)
                + ("" if measurement.target.on == "value" else " (ratio)"),
                verdict(measurement),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(HEADERS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def write_json(
    path: Path, mode: str, machine: dict[str, Any], measurements: Sequence[Measurement], run: dict[str, Any]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "mode": mode,
        "machine": machine,
        **run,
        "measurements": {measurement.key: measurement.to_json() for measurement in measurements},
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


def write_chart(path: Path, per_node: Measurement, machine: dict[str, Any]) -> str | None:
    """Per-node time against chain length, one line per system; returns why it was skipped, if it was."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'); no chart was drawn"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = per_node.details["sweep"]
    lengths = [point["length"] for point in sweep]
    figure, axes = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for key, label, style in (
        ("chainrule", "chainrule (Backward over gRPC)", "o-"),
        ("pytorch", "PyTorch eager autograd", "s--"),
        ("numpy", "numpy, hand-written loop", "^:"),
    ):
        values = [point[f"{key}_us_per_node"] for point in sweep]
        if all(value is not None for value in values):
            axes.plot(lengths, values, style, label=label)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xticks(lengths, labels=[f"{length:,}" for length in lengths])
    axes.minorticks_off()
    axes.set_xlabel("chain length N (scalar float64 nodes)")
    axes.set_ylabel("time per node, forward + backward (µs)")
    axes.set_title("Per-node cost: mul, sigmoid, add, tanh, repeated")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    note = f"{machine['cpu']}, {machine['cores']} cores; medians of {per_node.details['repeats']} runs per point"
    figure.text(0.01, 0.005, note, fontsize=7, alpha=0.7)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return None
