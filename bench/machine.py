"""What the numbers were measured on: CPU, cores, library versions and BLAS threads."""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

# (get, set) thread-count functions of the BLAS builds numpy wheels ship with.
_THREAD_FUNCTIONS = (
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
    ("MKL_Get_Max_Threads", "MKL_Set_Num_Threads"),
    ("bli_thread_get_num_threads", "bli_thread_set_num_threads"),
)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
"""Read by BLAS and OpenMP at load time: how child processes (the servers) get a thread limit."""


def load_torch() -> ModuleType | None:
    """PyTorch when installed (the optional `bench` extra), else None and its columns read n/a."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def _all_blas_functions() -> list[tuple[Callable[[], int], Callable[[int], None]]]:
    """The thread-count functions of every loaded BLAS library, found through /proc/self/maps, by path
    (numpy's wheel's before scipy's, which conv products also use: server/ops/conv.py)."""
    libraries = {
        line.split()[-1]
        for line in Path("/proc/self/maps").read_text().splitlines()
        if any(key in line.lower() for key in ("openblas", "mkl_rt", "blis"))
    }
    found = []
    for path in sorted(libraries):
        library = ctypes.CDLL(path)
        for getter, setter in _THREAD_FUNCTIONS:
            if hasattr(library, getter) and hasattr(library, setter):
                found.append((getattr(library, getter), getattr(library, setter)))
                break
    return found


def _blas_functions() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """The thread-count functions of numpy's BLAS."""
    return next(iter(_all_blas_functions()), None)


def blas_threads() -> int | None:
    """How many threads numpy's BLAS uses, asked of the library itself; None when unknown.

    PyTorch is set to the same count, so the training comparisons use the same parallelism.
    """
    functions = _blas_functions()
    return None if functions is None else int(functions[0]())


def limit_threads(count: int) -> None:
    """Cap BLAS and OpenMP threads in this process and in every child started after this.

    On a machine that other work shares, a thread that waits for a busy core stalls every
    parallel op; fewer threads than cores makes runs steadier there, at the price of speed.
    """
    os.environ.update({variable: str(count) for variable in THREAD_VARIABLES})
    for _, setter in _all_blas_functions():
        setter(count)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def describe(torch: ModuleType | None) -> dict[str, Any]:
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": f"{blas.get('name', 'unknown')} {blas.get('version', '')}".strip(),
        "blas_threads": blas_threads(),
        "torch": None if torch is None else torch.__version__,
        "torch_threads": None if torch is None else torch.get_num_threads(),
        "grpcio": metadata.version("grpcio"),
        "chainrule": metadata.version("chainrule"),
    }
