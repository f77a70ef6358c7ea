"""What every measurement produces, its target, and the timing helpers they share."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Direction = Literal["<=", ">="]


@dataclass(frozen=True)
class Target:
    """A pass condition on the ratio to the main baseline, or on chainrule's own value.

    Ratios are the default because they hold on a noisy shared machine; `on="value"` is for a
    requirement stated in absolute units (bandwidth).
    """

    direction: Direction
    threshold: float
    on: Literal["ratio", "value"] = "ratio"

    def check(self, value: float | None, ratio: float | None) -> bool | None:
        measured = ratio if self.on == "ratio" else value
        if measured is None:
            return None
        return measured <= self.threshold if self.direction == "<=" else measured >= self.threshold

    def describe(self, unit: str) -> str:
        return f"{self.direction} {self.threshold:g}" + (f" {unit}" if self.on == "value" else "")


@dataclass
class Measurement:
    """One row of the table: chainrule's median, the baselines' medians, and the ratio to one of them."""

    key: str
    title: str
    unit: str
    chainrule: float
    baselines: dict[str, float | None]
    ratio_baseline: str
    target: Target
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        baseline = self.baselines.get(self.ratio_baseline)
        return None if baseline is None or baseline == 0 else self.chainrule / baseline

    @property
    def passed(self) -> bool | None:
        return self.target.check(self.chainrule, self.ratio)

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "unit": self.unit,
            "chainrule": self.chainrule,
            "baselines": self.baselines,
            "ratio": self.ratio,
            "ratio_of": f"chainrule / {self.ratio_baseline}",
            "target": self.target.describe(self.unit),
            "target_on": self.target.on,
            "passed": self.passed,
            "details": self.details,
        }


def timed(run: Callable[[], object]) -> float:
    """Seconds one call of `run` takes, after a collection so garbage of earlier runs is not billed to it."""
    gc.collect()
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def interleaved(runs: Mapping[str, Callable[[], float] | None], repeats: int) -> dict[str, list[float]]:
    """Call each run in turn, `repeats` rounds; each run returns its own measured seconds.

    Rounds alternate the contenders so a burst of load from a neighbour hits them alike instead
    of all of one contender's samples, and every other round runs them in reverse order so none
    always follows the same one (and finds its data warm in the cache). A None run (a missing
    optional baseline) is skipped.
    """
    order = [(name, run) for name, run in runs.items() if run is not None]
    samples: dict[str, list[float]] = {name: [] for name, _ in order}
    for round_number in range(repeats):
        for name, run in order if round_number % 2 == 0 else reversed(order):
            samples[name].append(run())
    return samples


def median(samples: list[float] | None) -> float | None:
    return statistics.median(samples) if samples else None


def scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor
