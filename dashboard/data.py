"""What the dashboard's JSON endpoints answer: the client library's records turned into plain JSON values.

Nothing here talks to a server; the functions take what `chainrule.client` returned. JSON has
no NaN or infinity (browsers' JSON.parse refuses them), so every float goes through `finite`,
and a diverged loss arrives as null, a gap in its curve.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from chainrule.client import GraphInfo
from chainrule.client.datasets import DatasetInfo
from chainrule.client.jobs import JobInfo
from chainrule.client.training import History
from chainrule.v1 import graph_pb2, graph_service_pb2, job_service_pb2

JSON = dict[str, Any]
HISTOGRAM_BINS = 30
SCHEDULE_POINTS = 500
"""At most this many points of a learning-rate schedule are drawn; the closed form needs no more."""
RATE_WINDOW_SECONDS = 10.0
SOURCE_OPS = ("input", "parameter", "state", "constant")


class BadRequest(ValueError):
    """Something the browser sent that the dashboard cannot use: answered 400 with this message."""


def finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def moment(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def graph_summary(info: GraphInfo) -> JSON:
    return {
        "graph_id": info.graph_id,
        "name": info.name,
        "node_count": info.node_count,
        "parameter_count": len(info.parameters),
        "step": info.step,
        "create_time": moment(info.create_time),
    }


def graph_page(graphs: Sequence[GraphInfo], query: str, page_size: int, next_page_token: str, scanned: int) -> JSON:
    """A page of the graphs list: `next_page_token` is "" after the last page; `scanned` counts the
    graphs a search read to find these."""
    return {
        "graphs": [graph_summary(info) for info in graphs],
        "next_page_token": next_page_token,
        "page_size": page_size,
        "query": query,
        "scanned": scanned,
    }


def graph_detail(info: GraphInfo) -> JSON:
    """The graph with what its render form offers: the inputs to feed (with their declared dtype
    and shape) and the nodes a loss can be, sinks first, since a loss is usually a last node."""
    assert info.definition is not None
    nodes = {node.name: node for node in info.definition.nodes}
    read = {argument for node in info.definition.nodes for argument in node.inputs}
    computed = [name for name in info.topological_order if nodes[name].op not in SOURCE_OPS]
    sinks = [name for name in reversed(computed) if name not in read]
    others = [name for name in reversed(computed) if name in read]
    return {
        **graph_summary(info),
        "inputs": [input_declaration(nodes[name]) for name in info.inputs],
        "state_count": len(info.state),
        "loss_candidates": sinks + others,
    }


def input_declaration(node: graph_pb2.Node) -> JSON:
    dtype = node.attrs["dtype"].s if "dtype" in node.attrs else None
    shape = list(node.attrs["shape"].ints.values) if "shape" in node.attrs else None
    return {"name": node.name, "dtype": dtype, "shape": shape}


def json_feeds(document: object, definition: graph_pb2.Graph) -> dict[str, np.ndarray]:
    """Feeds from a JSON object of numbers or nested lists, each cast to the dtype its input
    declares; an input that declares none gets float64 for whole numbers too, since JSON (and
    JavaScript, which writes -2.0 as -2) does not tell -2 from -2.0, and gradients need floats."""
    if not isinstance(document, dict):
        raise BadRequest("feeds must be a JSON object mapping each input's name to a number or nested list")
    declared = {node.name: node for node in definition.nodes if node.op == "input"}
    feeds: dict[str, np.ndarray] = {}
    for name, value in document.items():
        if name not in declared:
            known = ", ".join(sorted(declared)) or "none"
            raise BadRequest(f"feed '{name}' is not an input of this graph (its inputs: {known})")
        dtype = input_declaration(declared[name])["dtype"]
        try:
            array = np.asarray(value, dtype=dtype)
            if dtype is None and array.dtype.kind in "iu":
                array = array.astype(np.float64)
            feeds[name] = array
        except (TypeError, ValueError) as error:
            raise BadRequest(f"feed '{name}' is not a number or a rectangular nested list: {error}") from None
    return feeds


def npz_feeds(data: bytes) -> dict[str, np.ndarray]:
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise BadRequest(f"the uploaded feeds are not an .npz archive (numpy.savez): {error}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise BadRequest("the uploaded feeds are one array (.npy); upload an .npz archive, one array per input")
    with loaded:
        return {name: loaded[name] for name in loaded.files}


def parameter_summary(name: str, kind: str, value: np.ndarray) -> JSON:
    """Shape, dtype, norm and the distribution of a parameter's values, over its finite entries."""
    array = np.asarray(value)
    flat = array.astype(np.float64, copy=False).ravel()
    finite_values = flat[np.isfinite(flat)]
    summary: JSON = {
        "name": name,
        "kind": kind,
        "dtype": array.dtype.name,
        "shape": list(array.shape),
        "size": int(array.size),
        "non_finite": int(flat.size - finite_values.size),
        "norm": None,
        "min": None,
        "max": None,
        "mean": None,
        "std": None,
        "histogram": {"counts": [], "edges": []},
    }
    if finite_values.size:
        counts, edges = np.histogram(finite_values, bins=HISTOGRAM_BINS)
        summary.update(
            norm=float(np.linalg.norm(finite_values)),
            min=float(finite_values.min()),
            max=float(finite_values.max()),
            mean=float(finite_values.mean()),
            std=float(finite_values.std()),
            histogram={"counts": counts.tolist(), "edges": edges.tolist()},
        )
    return summary


def dataset_summary(info: DatasetInfo) -> JSON:
    return {
        "dataset_id": info.dataset_id,
        "name": info.name,
        "columns": [{"name": c.name, "dtype": c.dtype, "shape": list(c.shape)} for c in info.columns],
        "num_examples": info.num_examples,
        "size_bytes": info.size_bytes,
        "sha256": info.sha256,
        "create_time": moment(info.create_time),
    }


def dataset_page(datasets: Sequence[DatasetInfo], page_size: int, next_page_token: str) -> JSON:
    """A page of the datasets list: `next_page_token` is "" after the last page."""
    return {
        "datasets": [dataset_summary(info) for info in datasets],
        "next_page_token": next_page_token,
        "page_size": page_size,
    }


class StepRates:
    """Steps per second of each running job, from the steps the dashboard saw over the last
    RATE_WINDOW_SECONDS; a job seen once gets its average since it started, and an ended job its
    average over its run."""

    def __init__(self) -> None:
        self._seen: dict[str, deque[tuple[float, int]]] = {}

    def rate(self, info: JobInfo) -> float | None:
        if info.ended:
            self._seen.pop(info.job_id, None)
            return _average_rate(info, info.end_time)
        now = time.monotonic()
        samples = self._seen.setdefault(info.job_id, deque())
        samples.append((now, info.step))
        while len(samples) > 2 and now - samples[1][0] > RATE_WINDOW_SECONDS:
            samples.popleft()
        (first_time, first_step), (last_time, last_step) = samples[0], samples[-1]
        if last_time - first_time >= 0.5:
            return (last_step - first_step) / (last_time - first_time)
        return _average_rate(info, None) if info.state == "running" else None


def _average_rate(info: JobInfo, end: datetime | None) -> float | None:
    if info.start_time is None or info.step == 0:
        return None
    stop = end.timestamp() if end is not None else time.time()
    elapsed = stop - info.start_time.timestamp()
    return info.step / elapsed if elapsed > 0 else None


def job_summary(info: JobInfo, steps_per_second: float | None, graph_name: str) -> JSON:
    return {
        "job_id": info.job_id,
        "graph_id": info.graph_id,
        "graph_name": graph_name,
        "dataset_id": info.dataset_id,
        "state": info.state,
        "ended": info.ended,
        "step": info.step,
        "total_steps": info.total_steps,
        "epoch": info.epoch,
        "loss": finite(info.loss) if info.step else None,
        "metrics": {name: finite(value) for name, value in sorted(info.metrics.items())},
        "steps_per_second": steps_per_second,
        "error": info.error,
        "create_time": moment(info.create_time),
        "start_time": moment(info.start_time),
        "end_time": moment(info.end_time),
    }


def job_detail(
    info: JobInfo, steps_per_second: float | None, graph_name: str, dataset_names: Mapping[str, str]
) -> JSON:
    """The job with its spec, its datasets' names (by id, "" for one deleted) and its planned schedule."""
    spec = info.spec
    return {
        **job_summary(info, steps_per_second, graph_name),
        "loss_node": spec.loss,
        "spec": message_json(spec),
        "dataset_names": dict(dataset_names),
        "schedule": schedule_curve(spec, info.total_steps),
    }


def message_json(message: Message) -> JSON:
    """A message as protobuf's JSON mapping gives it (proto field names), but with 64-bit integers as
    numbers where JSON's doubles hold them exactly: the mapping writes every int64 as a string."""
    document = json_format.MessageToDict(message, preserving_proto_field_name=True)
    _int64_as_numbers(message, document)
    return document


INT64_TYPES = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}
EXACT_IN_JSON = 2**53 - 1
"""The largest integer a browser's JSON.parse reads exactly; larger ones stay strings."""


def _int64_as_numbers(message: Message, document: JSON) -> None:
    def number(text: str) -> int | str:
        value = int(text)
        return value if abs(value) <= EXACT_IN_JSON else text

    for field in message.DESCRIPTOR.fields:
        if field.name not in document:
            continue
        value, entries = document[field.name], getattr(message, field.name)
        kind = field.message_type
        if kind is not None and kind.GetOptions().map_entry:
            value_field = kind.fields_by_name["value"]
            string_keys = kind.fields_by_name["key"].type == FieldDescriptor.TYPE_STRING
            for key in value:
                if value_field.message_type is not None:  # JSON map keys are strings, whatever the map's key type
                    _int64_as_numbers(entries[key if string_keys else int(key)], value[key])
                elif value_field.type in INT64_TYPES:
                    value[key] = number(value[key])
        elif kind is not None and kind.full_name.startswith("google.protobuf."):
            continue  # well-known types have JSON forms of their own (a Timestamp is a string)
        elif kind is not None:
            if field.is_repeated:
                for entry, item in zip(entries, value, strict=True):
                    _int64_as_numbers(entry, item)
            else:
                _int64_as_numbers(entries, value)
        elif field.type in INT64_TYPES:
            document[field.name] = [number(item) for item in value] if field.is_repeated else number(value)


def base_learning_rate(optimizer: graph_service_pb2.Optimizer) -> float:
    kind = optimizer.WhichOneof("kind")
    return float(getattr(optimizer, kind).learning_rate) if kind else 0.0


def learning_rate(schedule: graph_service_pb2.LearningRateSchedule | None, base: float, step: int) -> float:
    """The rate of the job's 0-based step `step`, by the closed forms of chainrule.v1.LearningRateSchedule."""
    if schedule is None:
        return base
    warmup = schedule.warmup_steps
    if step < warmup:
        return base * (step + 1) / warmup
    elapsed = step - warmup
    kind = schedule.WhichOneof("kind")
    if kind == "step_decay" and schedule.step_decay.step_size > 0:
        return base * schedule.step_decay.gamma ** (elapsed // schedule.step_decay.step_size)
    if kind == "cosine" and schedule.cosine.period_steps > 0:
        period, low = schedule.cosine.period_steps, schedule.cosine.min_learning_rate
        return low + (base - low) * (1 + math.cos(math.pi * min(elapsed, period) / period)) / 2
    return base


def schedule_curve(spec: job_service_pb2.JobSpec, total_steps: int) -> JSON:
    """The planned learning rate against the job's step count (1 for the first step, as WatchJob
    numbers steps), at up to SCHEDULE_POINTS steps spread over the run."""
    schedule = spec.schedule if spec.HasField("schedule") else None
    base = base_learning_rate(spec.optimizer)
    count = max(total_steps, 1)
    points = sorted({int(round(i)) for i in np.linspace(0, count - 1, min(count, SCHEDULE_POINTS))})
    if schedule is not None and schedule.warmup_steps:
        points = sorted(set(points) | {min(schedule.warmup_steps, count) - 1})
    return {
        "kind": "constant" if schedule is None else (schedule.WhichOneof("kind") or "warmup"),
        "base_learning_rate": base,
        "steps": [step + 1 for step in points],
        "learning_rates": [learning_rate(schedule, base, step) for step in points],
    }


def history_csv(history: History) -> str:
    """A job's history as CSV: step, loss, learning rate, then one column per metric, empty on the
    steps it was not evaluated. Metric names are user data: one a spreadsheet would read as a
    formula (=, +, -, @) is written after an apostrophe, which spreadsheets show as text."""
    names = sorted(history.metrics)
    values = {name: dict(points) for name, points in history.metrics.items()}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", "loss", "learning_rate", *(_as_text(name) for name in names)])
    for step, loss, rate in zip(history.steps, history.losses, history.learning_rates, strict=True):
        writer.writerow(
            [
                step,
                repr(loss),
                repr(rate),
                *(repr(values[name][step]) if step in values[name] else "" for name in names),
            ]
        )
    return out.getvalue()


def _as_text(cell: str) -> str:
    return "'" + cell if cell[:1] in ("=", "+", "-", "@", "\t", "\r") else cell


def history_columns(history: History) -> JSON:
    """A job's history as columns, the shape the charts take: one array per series."""
    metrics: dict[str, JSON] = {}
    for name, points in sorted(history.metrics.items()):
        metrics[name] = {"steps": [step for step, _ in points], "values": [finite(value) for _, value in points]}
    return {
        "steps": history.steps,
        "losses": [finite(loss) for loss in history.losses],
        "learning_rates": [finite(rate) for rate in history.learning_rates],
        "metrics": metrics,
    }


def event_json(step: int, epoch: int, loss: float, rate: float, metrics: Mapping[str, float]) -> JSON:
    return {
        "step": step,
        "epoch": epoch,
        "loss": finite(loss),
        "learning_rate": finite(rate),
        "metrics": {name: finite(value) for name, value in metrics.items()},
    }


def dumps(document: object) -> str:
    """JSON for a page; allow_nan=False makes a NaN that slipped through fail here, not in the browser."""
    return json.dumps(document, allow_nan=False, separators=(",", ":"))
