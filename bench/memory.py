"""Measurement 5: the peak memory of one Backward over a long chain of float64 vectors.

A reverse pass must keep what its VJPs read until it gets there, so the peak is bounded below
by the activations it saves; how close a system stays to that bound is what this compares.
chainrule is measured in a fresh server process per sample, PyTorch in a fresh subprocess per
sample: only a process's first large pass shows its peak cleanly, because memory an allocator
keeps after a pass makes later passes look free. What is reported is the RSS growth during
the call, over the process's RSS just before it (graph built, libraries loaded).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

import chainrule.client as cr
from bench.chain import X0, chain_graph
from bench.measure import Measurement, Target, median
from bench.rss import PeakSample, peak_growth
from bench.server import REPO_ROOT, ChainruleServer

MB = 1e6


def chainrule_peak(length: int, width: int) -> PeakSample:
    """The server's peak RSS growth during one Backward, in a fresh server holding only this graph."""
    with ChainruleServer().start() as server, cr.Client(server.address) as client:
        graph = client.create_graph(chain_graph(length, width))
        feeds = {"x": np.full(width, X0)}
        return peak_growth(Path(f"/proc/{server.pid}"), lambda: client.gradients(graph.graph_id, feeds, "loss", ["x"]))


def torch_peak(length: int, width: int, threads: int) -> PeakSample:
    command = [sys.executable, "-m", "bench.torch_memory", str(length), str(width), str(threads)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    if finished.returncode != 0:
        raise RuntimeError(f"{' '.join(command[1:])} failed:\n{finished.stderr}")
    return PeakSample(**json.loads(finished.stdout))


def measure_memory(length: int, width: int, repeats: int, torch_available: bool, threads: int) -> Measurement:
    """Median over `repeats` fresh processes of each system, alternating between them."""
    samples: dict[str, list[PeakSample]] = {"chainrule": [], "pytorch": []}
    for _ in range(repeats):
        samples["chainrule"].append(chainrule_peak(length, width))
        if torch_available:
            samples["pytorch"].append(torch_peak(length, width, threads))
    growth = {name: median([sample.growth_bytes / MB for sample in taken]) for name, taken in samples.items()}
    activations = length * width * np.dtype(np.float64).itemsize
    return Measurement(
        key="memory",
        title=f"5 peak RSS growth, chain {length:,} x float64[{width:,}]",
        unit="MB",
        chainrule=growth["chainrule"],  # type: ignore[arg-type]
        baselines={"pytorch": growth["pytorch"], "activations": activations / MB},
        ratio_baseline="pytorch",
        target=Target("<=", 1.25),
        details={
            "length": length,
            "width": width,
            "repeats": repeats,
            "activation_bytes": activations,
            "samples": {name: [asdict(sample) for sample in taken] for name, taken in samples.items()},
        },
    )
