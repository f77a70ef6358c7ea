"""The dashboard follows each job with one WatchJob stream, however many browsers follow it: its
event streams (Server-Sent Events) share that one, counted on the server's own metrics."""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

import chainrule.client as cr
from tests.dashboard_process import (
    TOKEN,
    WAIT_SECONDS,
    Browserless,
    DashboardProcess,
    digits,
    digits_classifier,
    rpc_count,
    start_job,
    start_server,
    wait_for,
)
from tests.server_process import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(tmp_path_factory.mktemp("dashboard-feeds"))
    yield process
    process.kill()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[cr.Client]:
    with cr.Client(server.address, token=TOKEN, timeout=WAIT_SECONDS) as connected:
        yield connected


@pytest.fixture(scope="module")
def browser(server: ServerProcess) -> Iterator[Browserless]:
    dashboard = DashboardProcess(server.address).start()
    session = Browserless(dashboard.url)
    session.open_page()
    yield session
    dashboard.stop()


@dataclass
class Follower:
    """One browser's event stream of a job, read in a thread of its own until it ends, or until it
    has `leave_after` steps (then it closes the connection, as a closed tab does)."""

    url: str
    cookie: str
    leave_after: int | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    thread: threading.Thread | None = None

    def start(self) -> Follower:
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        request = urllib.request.Request(self.url, headers={"Cookie": self.cookie, "Accept": "text/event-stream"})
        with urllib.request.urlopen(request, timeout=WAIT_SECONDS) as response:
            for raw in response:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    self.messages.append(line.removeprefix("event: "))
                elif line.startswith("data: ") and self.messages[-1:] != ["end"]:
                    self.events.extend(json.loads(line.removeprefix("data: ")).get("events", []))
                if self.leave_after is not None and len(self.steps) >= self.leave_after:
                    return

    @property
    def steps(self) -> list[int]:
        return [event["step"] for event in self.events if "step" in event]

    def join(self) -> None:
        assert self.thread is not None
        self.thread.join(WAIT_SECONDS)
        assert not self.thread.is_alive(), "the stream did not end"


def test_every_browser_following_a_job_shares_one_watch_job(
    server: ServerProcess, client: cr.Client, browser: Browserless
) -> None:
    train_columns, held_out_columns = digits()
    train = client.upload_dataset("train", train_columns).dataset_id
    held_out = client.upload_dataset("held out", held_out_columns).dataset_id
    graph = client.create_graph(digits_classifier())
    before = rpc_count(server, "WatchJob")
    job = start_job(client, graph.graph_id, train, held_out, every_steps=20)
    url = f"{browser.url}/api/jobs/{job.job_id}/events"
    first, second = Follower(f"{url}?from_step=1", browser.cookie).start(), Follower(url, browser.cookie).start()
    leaving = Follower(f"{url}?from_step=1", browser.cookie, leave_after=10).start()
    wait_for(lambda: len(first.steps) > 50 and len(second.steps) > 50, "the first followers' steps")
    leaving.join()
    late = Follower(f"{url}?from_step=30", browser.cookie).start()
    wait_for(lambda: len(late.steps) > 50, "the late follower's steps")
    job.cancel()
    for follower in (first, second, late):
        follower.join()
    last = job.info().step
    assert job.info().state == "cancelled" and last > 50
    for follower, start in ((first, 1), (second, 1), (late, 30)):
        assert follower.steps == list(range(start, last + 1)), "every step once, in order"
        assert "state" in follower.events[0] and follower.events[-1] == {"state": "cancelled"}
        assert follower.messages == ["end"]
        evaluated = [event["step"] for event in follower.events if event.get("metrics")]
        assert evaluated == [step for step in range(start, last + 1) if step % 20 == 0]
    assert len(leaving.steps) >= 10 and leaving.steps == list(range(1, len(leaving.steps) + 1))
    wait_for(lambda: rpc_count(server, "WatchJob") > before, "the watch to be counted as it ends")
    assert rpc_count(server, "WatchJob") - before == 1, "one WatchJob for four browsers"
