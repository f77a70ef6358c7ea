"""The graphs and jobs lists, paged without reading every graph or job for each request.

Graphs: ListGraphs pages oldest first by opaque tokens, and a page of the list is one ListGraphs
call. A search (graphs whose name or id contains the query) reads on from where its last page
stopped, SCAN_LIMIT graphs at most per request, and says where to go on: a page of 25 matches
among 10,000 graphs costs what the graphs read to find them, never a read of all 10,000 per
keystroke. A cursor is the server's page token and how many graphs of that server page were
already shown.

Jobs: people look at the newest, and ListJobs pages oldest first, so the dashboard keeps an index
of the jobs (their summaries, without specs) that every tab's requests share, refreshed at most
once a second: a refresh reads on from the token after the last full page it read (a page token
resumes after its page, and jobs are never deleted), reads the jobs still queued or running
through ListJobs filtered by state, and GetJob for those that ended since. So each refresh reads
the new and active jobs, not every job; a page of the list, newest first and filtered by state
or graph, is cut from the index.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import grpc

from chainrule.client import ChainruleError, Client, GraphInfo
from chainrule.client.jobs import JobInfo, JobState
from chainrule.v1 import job_service_pb2

from .data import BadRequest

SERVER_PAGE_SIZE = 1000
"""Graphs or jobs asked for per ListGraphs or ListJobs call when scanning (the server's largest page)."""
SCAN_LIMIT = 10_000
"""Graphs a search reads at most per request before answering with what it found and where to go on."""
REFRESH_SECONDS = 1.0
ACTIVE: tuple[JobState, ...] = ("queued", "running")
NO_SPEC = job_service_pb2.JobSpec()


@dataclass(frozen=True)
class Cursor:
    """Where a page of graphs starts: the server's page `token`, then `skip` graphs of that server page."""

    token: str = ""
    skip: int = 0

    def encode(self) -> str:
        text = json.dumps([self.token, self.skip], separators=(",", ":"))
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        if not text:
            return cls()
        try:
            token, skip = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        except (ValueError, TypeError, binascii.Error):
            raise BadRequest("page_token is not one this dashboard gave: start again from the first page") from None
        if not isinstance(token, str) or not isinstance(skip, int) or skip < 0:
            raise BadRequest("page_token is not one this dashboard gave: start again from the first page")
        return cls(token, skip)


@dataclass(frozen=True)
class GraphPage:
    graphs: list[GraphInfo]
    next_cursor: Cursor | None
    scanned: int
    """Graphs read to find this page's (a search reads past those it does not show)."""


def graph_page(
    client: Client,
    query: str,
    cursor: Cursor,
    page_size: int,
    scan_limit: int = SCAN_LIMIT,
    server_page_size: int = SERVER_PAGE_SIZE,
) -> GraphPage:
    """Up to `page_size` graphs from `cursor` on whose name or id contains `query` (any case; every
    graph when it is empty), and the cursor of the next page (None after the last). A search stops
    early, with fewer graphs, once it has read `scan_limit` graphs."""
    needle = query.strip().casefold()
    if not needle:
        graphs, token = client.list_graphs_page(page_size + cursor.skip, cursor.token)
        shown = graphs[cursor.skip :]
        return GraphPage(shown, Cursor(token) if token else None, len(shown))
    found: list[GraphInfo] = []
    scanned = 0
    token, skip = cursor.token, cursor.skip
    while True:
        graphs, next_token = client.list_graphs_page(server_page_size, token)
        for index in range(skip, len(graphs)):
            info = graphs[index]
            scanned += 1
            if needle in info.name.casefold() or needle in info.graph_id.casefold():
                found.append(info)
                if len(found) == page_size:
                    more = index + 1 < len(graphs) or next_token
                    after = Cursor(token, index + 1) if index + 1 < len(graphs) else Cursor(next_token)
                    return GraphPage(found, after if more else None, scanned)
        if not next_token:
            return GraphPage(found, None, scanned)
        token, skip = next_token, 0
        if scanned >= scan_limit:
            return GraphPage(found, Cursor(token), scanned)


class JobIndex:
    """Every job of the dashboard's tenant, oldest first, as last read (see the module's docstring)."""

    def __init__(
        self, client: Client, refresh_seconds: float = REFRESH_SECONDS, server_page_size: int = SERVER_PAGE_SIZE
    ) -> None:
        self.client = client
        self.refresh_seconds = refresh_seconds
        self.server_page_size = server_page_size
        self._jobs: dict[str, JobInfo] = {}
        self._resume_token = ""
        self._active: set[str] = set()
        self._lock = threading.Lock()
        self._refreshed_at = -math.inf

    def jobs(self) -> list[JobInfo]:
        """Every job, newest first, read again when the last read is over a second old."""
        with self._lock:
            if time.monotonic() - self._refreshed_at >= self.refresh_seconds:
                self._read_new()
                self._read_active()
                self._refreshed_at = time.monotonic()
            return list(reversed(self._jobs.values()))

    def _keep(self, info: JobInfo) -> None:
        self._jobs[info.job_id] = replace(info, spec=NO_SPEC)
        if info.ended:
            self._active.discard(info.job_id)
        else:
            self._active.add(info.job_id)

    def _read_new(self) -> None:
        while True:
            page, token = self.client.list_jobs_page(self.server_page_size, self._resume_token)
            for info in page:
                self._keep(info)
            if not token:
                return
            self._resume_token = token

    def _read_active(self) -> None:
        still: set[str] = set()
        token = ""
        while True:
            page, token = self.client.list_jobs_page(self.server_page_size, token, states=ACTIVE)
            for info in page:
                if info.job_id in self._jobs:  # a newer one waits for _read_new, which keeps creation order
                    self._keep(info)
                    still.add(info.job_id)
            if not token:
                break
        for job_id in self._active - still:  # ended since the last read (or between the two listings)
            try:
                self._keep(self.client.get_job(job_id).info())
            except ChainruleError as error:
                if error.code != grpc.StatusCode.NOT_FOUND:
                    raise
                self._jobs.pop(job_id, None)
                self._active.discard(job_id)


def job_page(
    jobs: Sequence[JobInfo], states: Sequence[str], graph_id: str, page: int, page_size: int
) -> tuple[list[JobInfo], int, int, int]:
    """One page of `jobs` in `states` (all when empty) of `graph_id` (any when empty): the page's
    jobs, how many matched, the page shown (the last when `page` is past it) and the page count."""
    matched = [
        info for info in jobs if (not states or info.state in states) and (not graph_id or info.graph_id == graph_id)
    ]
    pages = max(1, math.ceil(len(matched) / page_size))
    page = min(page, pages)
    return matched[(page - 1) * page_size : page * page_size], len(matched), page, pages
