"""Graph pictures: DOT from the client library's drawing (`Client.render`), laid out by Graphviz.

Laying out a graph of thousands of nodes takes Graphviz seconds (1.6 s for 2,000 nodes and 7 s
for 4,000 with Graphviz 2.43 on a shared 2-core machine, `python -m bench.dashboard`; the time
grows faster than the node count), so pictures are made off the event loop, a few at a time,
each at most `timeout` seconds, and kept: a picture is a function of its DOT text, which holds
every value drawn, so the same graph at the same step with the same feeds is laid out once.
Browsers get the SVG compressed (the app's GZipMiddleware); its text is a tenth of that.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import threading
from collections import OrderedDict

from chainrule.client.render import INSTALL_GRAPHVIZ

DEFAULT_TIMEOUT_SECONDS = 300.0
CACHE_BYTES = 256 * 1024 * 1024
LAYOUTS_AT_ONCE = 2


class LayoutError(RuntimeError):
    """Graphviz is missing, failed, or took longer than allowed; the message says which."""


class Pictures:
    """SVG text by DOT text, least recently used dropped beyond `cache_bytes`."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT_SECONDS, cache_bytes: int = CACHE_BYTES) -> None:
        self.timeout = timeout
        self._cache_bytes = cache_bytes
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(LAYOUTS_AT_ONCE)
        self._pending: dict[str, threading.Lock] = {}

    def svg(self, dot: str) -> str:
        """The picture of `dot`; two requests for the same picture lay it out once."""
        key = hashlib.sha256(dot.encode("utf-8")).hexdigest()
        with self._lock:
            pending = self._pending.setdefault(key, threading.Lock())
        with pending:
            with self._lock:
                if key in self._cache:
                    self._cache.move_to_end(key)
                    return self._cache[key]
            try:
                with self._slots:
                    svg = self._layout(dot)
                with self._lock:
                    self._keep(key, svg)
            finally:
                with self._lock:
                    self._pending.pop(key, None)
            return svg

    def _keep(self, key: str, svg: str) -> None:
        self._cache[key] = svg
        self._held += len(svg)
        while self._held > self._cache_bytes and len(self._cache) > 1:
            _, dropped = self._cache.popitem(last=False)
            self._held -= len(dropped)

    def _layout(self, dot: str) -> str:
        program = shutil.which("dot")
        if program is None:
            raise LayoutError(
                f"drawing graphs needs Graphviz's `dot` program on the dashboard's PATH ({INSTALL_GRAPHVIZ})"
            )
        try:
            result = subprocess.run(
                [program, "-Tsvg"], input=dot.encode("utf-8"), capture_output=True, timeout=self.timeout
            )
        except subprocess.TimeoutExpired:
            raise LayoutError(f"Graphviz took longer than {self.timeout:g} s to lay this graph out") from None
        if result.returncode != 0:
            message = result.stderr.decode("utf-8", "replace").strip()
            raise LayoutError(f"Graphviz dot exited with status {result.returncode}: {message}")
        return result.stdout.decode("utf-8")
