"""PyTorch's side of measurement 5, in a process of its own so no other allocation muddies its peak.

Run as `python -m bench.torch_memory LENGTH WIDTH THREADS`; prints a PeakSample as JSON.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from bench.chain import X0, torch_chain
from bench.rss import PeakSample, peak_growth


def main(length: int, width: int, threads: int) -> PeakSample:
    import torch

    torch.set_num_threads(threads)
    x = torch.tensor(np.full(width, X0), dtype=torch.float64, requires_grad=True)
    torch_chain(torch, x, 4).backward()  # first-call setup (autograd engine threads) is not the chain's
    x.grad = None
    return peak_growth(Path("/proc/self"), lambda: torch_chain(torch, x, length).backward())


if __name__ == "__main__":
    print(json.dumps(asdict(main(*(int(argument) for argument in sys.argv[1:4])))))
