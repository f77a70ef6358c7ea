"""Optimizer settings, training results, and how `Client.fit` cuts arrays into batches."""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

import numpy as np
import numpy.typing as npt

from chainrule.v1 import graph_service_pb2 as pb

Batch = Mapping[str, npt.ArrayLike]


@dataclass(frozen=True)
class Sgd:
    """torch.optim.SGD's rule; the server keeps the momentum buffers between streams."""

    learning_rate: float
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def to_proto(self) -> pb.Optimizer:
        return pb.Optimizer(
            sgd=pb.Sgd(
                learning_rate=self.learning_rate,
                momentum=self.momentum,
                nesterov=self.nesterov,
                weight_decay=self.weight_decay,
            )
        )


@dataclass(frozen=True)
class Adam:
    """torch.optim.Adam's rule (bias-corrected moments, L2 weight decay added to the gradient)."""

    learning_rate: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        # The wire reads 0 as "the default" for these three, so a 0 would silently become 0.9,
        # 0.999 or 1e-8 on the server; refuse it here instead.
        for name in ("beta1", "beta2", "epsilon"):
            if getattr(self, name) == 0:
                raise ValueError(f"Adam {name}=0 cannot be sent: the wire format reads 0 as the default")

    def to_proto(self) -> pb.Optimizer:
        return pb.Optimizer(
            adam=pb.Adam(
                learning_rate=self.learning_rate,
                beta1=self.beta1,
                beta2=self.beta2,
                epsilon=self.epsilon,
                weight_decay=self.weight_decay,
            )
        )


Optimizer = Sgd | Adam


class TrainOptions(TypedDict, total=False):
    """The keyword arguments `Client.fit` passes on to `Client.train` unchanged."""

    parameters: Sequence[str]
    stream_gradients: bool
    stream_updates: bool
    checkpoint_every: int
    stop_on_non_finite_loss: bool


@dataclass(frozen=True)
class TrainStep:
    """The server's answer to one batch.

    `loss` was computed before the update; `step` is the graph's global step after it.
    `gradients` and `updates` are empty unless the stream was asked for them (an update is
    exactly what was added to the parameter: new = old + update).
    """

    step: int
    loss: float
    gradients: dict[str, np.ndarray] = field(default_factory=dict)
    updates: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class History:
    """What `Client.fit` saw: one step number and loss per batch, and the last TrainStep whole.
    A job's history (`Job.history`) also has each step's learning rate and its evaluations' metrics."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    last: TrainStep | None = None
    learning_rates: list[float] = field(default_factory=list)
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """Each metric's (step, value) at every evaluation."""

    def __len__(self) -> int:
        return len(self.steps)

    def record(self, step: TrainStep) -> None:
        self.steps.append(step.step)
        self.losses.append(step.loss)
        self.last = step

    def record_event(self, step: int, loss: float, learning_rate: float, metrics: Mapping[str, float]) -> None:
        """One step of a job."""
        self.steps.append(step)
        self.losses.append(loss)
        self.learning_rates.append(learning_rate)
        for name, value in metrics.items():
            self.metrics.setdefault(name, []).append((step, value))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write steps and losses (and a job's learning rates and metrics) as JSON (`last`, with its
        tensors, is not kept), e.g. for `chainrule plot-history`.

        A diverged run's NaN or infinite losses are written as JSON's NaN/Infinity extension,
        which `load` (Python's json) reads back.
        """
        document: dict[str, object] = {"steps": self.steps, "losses": self.losses}
        if self.learning_rates:
            document["learning_rates"] = self.learning_rates
        if self.metrics:
            document["metrics"] = {name: [list(point) for point in points] for name, points in self.metrics.items()}
        Path(path).write_text(json.dumps(document) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> History:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(document, dict) or not {"steps", "losses"} <= document.keys():
            raise ValueError(f"{path}: not a saved History (a JSON object with 'steps' and 'losses')")
        steps, losses = document["steps"], document["losses"]
        if not isinstance(steps, list) or not isinstance(losses, list) or len(steps) != len(losses):
            raise ValueError(f"{path}: 'steps' and 'losses' must be lists of the same length")
        rates = document.get("learning_rates", [])
        metrics = document.get("metrics", {})
        if not isinstance(rates, list) or not isinstance(metrics, dict):
            raise ValueError(f"{path}: 'learning_rates' must be a list and 'metrics' an object")
        return cls(
            steps=[int(step) for step in steps],
            losses=[float(loss) for loss in losses],
            learning_rates=[float(rate) for rate in rates],
            metrics={
                str(name): [(int(step), float(value)) for step, value in points] for name, points in metrics.items()
            },
        )

    def plot(self, path: str | os.PathLike[str], *, title: str = "training loss") -> None:
        """Save a PNG of loss against step.

        matplotlib is imported here, not with the module, so training needs no plotting
        library; the figure is drawn on its own Agg canvas, leaving pyplot's global backend
        (a notebook's, say) alone. The loss axis is logarithmic when the losses are positive
        and span more than two decades, where a linear axis would flatten all but the start.
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
            from matplotlib.ticker import MaxNLocator
        except ImportError:
            raise ImportError("History.plot needs matplotlib: pip install matplotlib", name="matplotlib") from None
        if not self.steps:
            raise ValueError("the history has no steps to plot")
        figure = Figure(figsize=(6.4, 4.0), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        axes.plot(self.steps, self.losses, color="#c0392b", linewidth=1.2)
        finite = [loss for loss in self.losses if math.isfinite(loss)]
        if finite and min(finite) > 0 and max(finite) > 100 * min(finite):
            axes.set_yscale("log")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
        axes.set_title(title)
        axes.grid(True, alpha=0.3)
        if self.metrics:  # a job's evaluations, on an axis of their own at the right
            right = axes.twinx()
            for name, points in self.metrics.items():
                right.plot([step for step, _ in points], [value for _, value in points], marker="o", label=name)
            right.set_ylabel("metrics")
            right.legend(loc="center right")
        figure.savefig(path, format="png", dpi=120)


def plan_batches(
    data: Iterable[Batch] | Batch,
    batch_size: int | None,
    epochs: int,
    shuffle: bool,
    seed: int,
) -> tuple[Iterable[Batch], int | None]:
    """The batches `fit` streams, and how many there are when that is known (for the progress bar).

    A Mapping is a dict of equal-length arrays, cut along the first axis; anything else is
    already an iterable of batches, repeated for each epoch.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if isinstance(data, Mapping):
        arrays = {name: np.asarray(value) for name, value in data.items()}
        count = _common_length(arrays)
        size = count if batch_size is None else batch_size
        if size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        rng = np.random.default_rng(seed) if shuffle else None
        return array_batches(arrays, size, epochs, rng), math.ceil(count / size) * epochs
    if batch_size is not None:
        raise ValueError("batch_size applies to a dict of arrays; these batches are already cut")
    if epochs > 1 and iter(data) is data:
        raise ValueError("epochs > 1 needs data that can be iterated again (a list of batches, not an iterator)")
    total = len(data) * epochs if isinstance(data, Sized) else None
    return itertools.chain.from_iterable(itertools.repeat(data, epochs)), total


def array_batches(
    arrays: Mapping[str, np.ndarray], batch_size: int, epochs: int, rng: np.random.Generator | None
) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive slices of every array, in a fresh permutation each epoch when `rng` is given.

    The last batch of an epoch is smaller when batch_size does not divide the length; one
    generator serves every epoch so epochs are shuffled differently yet reproducibly.
    """
    count = _common_length(arrays)
    for _ in range(epochs):
        order = None if rng is None else rng.permutation(count)
        for start in range(0, count, batch_size):
            if order is None:
                yield {name: array[start : start + batch_size] for name, array in arrays.items()}
            else:
                rows = order[start : start + batch_size]
                yield {name: array[rows] for name, array in arrays.items()}


def _common_length(arrays: Mapping[str, np.ndarray]) -> int:
    if not arrays:
        raise ValueError("data has no arrays")
    scalars = [name for name, array in arrays.items() if array.ndim == 0]
    if scalars:
        raise ValueError(f"data arrays must have a first (example) axis; {', '.join(scalars)} are scalars")
    lengths = {name: int(array.shape[0]) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{name}: {length}" for name, length in lengths.items())
        raise ValueError(f"data arrays must have the same length along the first axis ({detail})")
    count = next(iter(lengths.values()))
    if count == 0:
        raise ValueError("data arrays are empty")
    return count
