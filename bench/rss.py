"""Peak resident memory of a process (this one or a child) during one call, from /proc.

Linux keeps a process's peak RSS as VmHWM; writing 5 to its clear_refs resets that peak to
the current RSS (Linux 4.0 and later), so the peak of one call can be read without what the
process did before it, such as importing PyTorch or building the graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PeakSample:
    """How far RSS rose above its level just before the call; `peak_reset` False means the peak
    could not be reset, so it may be an earlier, higher one and the growth is overstated."""

    growth_bytes: int
    rss_before_bytes: int
    peak_reset: bool


def status_bytes(process: Path, field: str) -> int:
    """A memory field of /proc/PID/status (VmRSS, VmHWM, ...) in bytes."""
    for line in (process / "status").read_text().splitlines():
        if line.startswith(field + ":"):
            value, unit = line.split()[1:3]
            assert unit == "kB", line
            return int(value) * 1024
    raise KeyError(f"{process}/status has no field {field}")


def peak_growth(process: Path, call: Callable[[], object]) -> PeakSample:
    """Run `call` and measure the peak RSS of `process` (a /proc/PID or /proc/self directory) during it."""
    try:
        (process / "clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    before = status_bytes(process, "VmRSS")
    call()
    return PeakSample(status_bytes(process, "VmHWM") - before, before, reset)
