"""The engine the service calls: stored graphs, their compiled plans, live parameters and training.

Each graph's live state (parameters, optimizer state, step) is swapped as a whole under the
graph's lock, once per optimizer step, so readers that take a reference see one whole step and
two training streams on one graph never interleave half-steps. No gRPC here.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import hashlib
import logging
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np

from chainrule.server import optim
from chainrule.server.errors import (
    AlreadyExists,
    Cancelled,
    ChainruleError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from chainrule.server.graph import Limits, build_graph
from chainrule.server.ops import INFERENCE, Mode
from chainrule.server.plan import Plan, StopFlag
from chainrule.server.store import Checkpoint, OptimizerState, Store, StoredGraph
from chainrule.server.store.base import (
    ClaimLost,
    CreateRequest,
    Fence,
    RequestIdTaken,
    TrainerBusy,
    VersionMoved,
    stream_process,
    stream_trainer,
)
from chainrule.server.work import SharedWork, stopped
from chainrule.v1 import graph_pb2

Array = np.ndarray
DEFAULT_CHECKPOINT_EVERY = 100
DEFAULT_MAX_LIVE_GRAPHS = 256
DEFAULT_MAX_LIVE_MEMORY_MB = 2048
"""What the graphs kept compiled may hold, with their cached schedules and live parameters. A
million-node graph compiles to a few hundred MB and each kind of pass over it plans a few
hundred MB more, so this keeps such a graph warm with a handful of request kinds, or thousands
of small graphs; it is half of what one request may compute by default (--max-request-memory-mb),
as a cache should leave requests most of the memory."""
TRIM_MIN_NODES = 10_000
"""Compiling a graph this large leaves enough freed memory behind to hand it back to the system."""
log = logging.getLogger("chainrule.server.engine")
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
DEFAULT_LEASE_SECONDS = 10.0
"""How long a trainer lease or a job's claim lasts without its server's heartbeat (--job-lease-seconds)."""
SET_PARAMETERS_ATTEMPTS = 3
"""SetParameters reads a graph's parameters and writes them back with its changes; when another server
commits in between, it reads again, this many times at most."""
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass
class LiveGraph:
    stored: StoredGraph
    plan: Plan
    parameters: dict[str, Array]
    optimizer_state: OptimizerState
    step: int
    committed_step: int
    deleted: bool = False
    version: int = 0
    """The stored version these parameters were read at or written as (see Engine.live)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    sessions: int = 0
    """Open training streams; a graph with any stays compiled in memory."""
    last_used: float = field(default_factory=time.monotonic)

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.step, self.parameters, self.optimizer_state)

    parameter_bytes: int = -1
    """Computed once: parameters and state nodes keep their shapes and dtypes for good."""

    @property
    def bytes(self) -> int:
        """What keeping the graph live costs: its compiled plan with cached schedules, its parameters
        and their optimizer state (an estimate; see Plan.bytes)."""
        if self.parameter_bytes < 0:
            self.parameter_bytes = sum(value.nbytes for value in self.parameters.values())
        state = self.optimizer_state
        optimizer_bytes = sum(array.nbytes for _, arrays in state.values() for array in arrays.values()) if state else 0
        return self.plan.bytes + self.parameter_bytes + optimizer_bytes


@dataclass(frozen=True)
class GraphSummary:
    graph_id: str
    name: str
    topological_order: list[str]
    inputs: list[str]
    parameters: list[str]
    step: int
    node_count: int
    created_at: float
    state: list[str] = field(default_factory=list)
    """Names of the graph's `state` nodes (running statistics), stored and shown with the parameters."""
    retried: bool = False
    """Answers a CreateGraph whose request_id created this graph earlier: nothing new was stored."""


@dataclass(frozen=True)
class StepResult:
    step: int
    loss: float
    gradients: dict[str, Array]
    updates: dict[str, Array]


class Engine:
    def __init__(
        self,
        store: Store,
        limits: Limits | None = None,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        max_live_graphs: int = DEFAULT_MAX_LIVE_GRAPHS,
        max_live_bytes: int = DEFAULT_MAX_LIVE_MEMORY_MB << 20,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> None:
        self.store = store
        self.limits = limits or Limits()
        self.checkpoint_every = checkpoint_every
        self.max_live_graphs = max_live_graphs
        self.max_live_bytes = max_live_bytes
        self._live: dict[str, LiveGraph] = {}
        self._compiling: dict[str, SharedWork[LiveGraph]] = {}
        self._live_lock = threading.Lock()
        """Guards `_live` and `_compiling` only, never held while a graph compiles or the store works."""
        self.lease_seconds = lease_seconds
        self.instance = uuid.uuid4().hex
        """This server process, among every process that uses the database now or did before."""
        self.worker = ""
        """This server's gRPC address, once it listens: what other servers' messages name it by."""
        self._streams: dict[str, int] = {}
        """Graph id -> this server's Train streams on it, which share one trainer lease (see `stream_trainer`)."""
        self._lease_lock = threading.Lock()
        """Guards `_streams`, and orders taking and giving up this server's stream leases in the store."""
        self.on_graph_free: Callable[[], None] | None = None
        """Called when a Train stream ends, so that jobs waiting for its graph look again."""

    @property
    def stream_trainer(self) -> str:
        """The trainer lease this server's Train streams hold, and the one SetParameters writes as."""
        return stream_trainer(self.instance, THIS_PROCESS, self.worker)

    # ------------------------------------------------------------ graphs
    def create_graph(
        self, message: graph_pb2.Graph, tenant: str = "", request_id: str = "", stop: StopFlag | None = None
    ) -> GraphSummary:
        """With a `request_id`, a retry answers with the graph the first call created (AIP-155), found
        before the graph is validated and compiled again. `stop` ends the build (Cancelled, nothing stored)."""
        definition = message.SerializeToString(deterministic=True)
        request = None
        if request_id:
            self._check_request_id(request_id)
            request = CreateRequest(request_id, hashlib.sha256(definition).hexdigest())
            earlier = self.store.find_request(tenant, request_id)
            if earlier is not None:
                return self._retried(request, *earlier)
        graph = build_graph(message, self.limits, stop)
        plan = Plan(graph, max_request_bytes=self.limits.max_request_bytes, stop=stop)
        values = graph.graph["nodes"].values
        initial = {name: values[slot] for name, slot in plan.stored.items()}
        del graph, values  # the plan keeps what it needs: free the rest before it is counted
        summary = {
            "topological_order": plan.names,
            "inputs": list(plan.inputs),
            "parameters": list(plan.parameters),
            "state": list(plan.state),
            "node_count": len(plan.names),
        }
        try:
            stored = self.store.insert_graph(
                uuid.uuid4().hex,
                tenant,
                message.name,
                definition,
                summary,
                initial,  # type: ignore[arg-type]
                request,
            )
        except RequestIdTaken as taken:  # a concurrent call with the same request_id stored its graph first
            assert request is not None
            return self._retried(request, taken.graph, taken.fingerprint)
        self._keep(LiveGraph(replace(stored, summary={}), plan, initial, {}, 0, 0))  # type: ignore[arg-type]
        return self._summary(stored, 0)

    def _check_request_id(self, request_id: str) -> None:
        limit = self.limits.max_name_length
        if len(request_id) > limit:
            raise InvalidArgument(
                f"request_id is {len(request_id)} characters long, more than the limit of {limit}",
                reason="BAD_REQUEST_ID",
                subject="request_id",
            )
        control = CONTROL_CHARACTERS.search(request_id)
        if control is not None:
            raise InvalidArgument(
                f"request_id holds the control character U+{ord(control.group()):04X}; use printable characters",
                reason="BAD_REQUEST_ID",
                subject="request_id",
            )

    def _retried(self, request: CreateRequest, earlier: StoredGraph, fingerprint: str) -> GraphSummary:
        """The answer to a CreateGraph whose request_id already created `earlier`: that graph as it is now,
        unless the request carries a different graph, which would be silently dropped."""
        if fingerprint != request.fingerprint:
            raise AlreadyExists(
                f"request_id '{request.request_id}' already created graph '{earlier.graph_id}' from a different "
                "graph; send a new request_id with each new graph",
                reason="REQUEST_ID_REUSED",
                subject="request_id",
            )
        return replace(self._summary(earlier, self._step(earlier)), retried=True)

    def get_graph(self, graph_id: str, tenant: str = "", with_order: bool = True) -> GraphSummary:
        """`with_order` False leaves the summary's topological_order empty, unread from the store."""
        stored = self._stored(graph_id, tenant, with_order)
        return self._summary(stored, self._step(stored))

    def definition(self, graph_id: str, tenant: str = "") -> bytes:
        """The graph as submitted: a serialized chainrule.v1.Graph."""
        self._stored(graph_id, tenant)
        definition = self.store.definition(graph_id)
        if definition is None:
            raise NotFound(f"graph '{graph_id}' not found", reason="GRAPH_NOT_FOUND", subject=graph_id)
        return definition

    def list_graphs(
        self, page_size: int, page_token: str, tenant: str = "", with_order: bool = True
    ) -> tuple[list[GraphSummary], str]:
        if page_size < 0:
            raise InvalidArgument(f"page_size is {page_size}; it must not be negative", subject="page_size")
        limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        rows = self.store.list_graphs(tenant, _decode_page_token(page_token), limit + 1, with_order)
        page = rows[:limit]
        next_token = _encode_page_token(page[-1].seq) if len(rows) > limit else ""
        return [self._summary(stored, self._step(stored)) for stored in page], next_token

    def _step(self, stored: StoredGraph) -> int:
        """The graph's step: the live one, which may be ahead of the stored one by steps not committed yet,
        unless another server has committed since this one read it."""
        live = self._live.get(stored.graph_id)
        return live.step if live is not None and live.version == stored.version else stored.step

    def delete_graph(self, graph_id: str, tenant: str = "") -> None:
        self._stored(graph_id, tenant)
        live = self._live.get(graph_id)
        if live is None:
            self.store.delete_graph(graph_id)
        else:
            # Under the graph's lock no step commits in between; a delete the store refuses changes nothing.
            with live.lock:
                self.store.delete_graph(graph_id)
                live.deleted = True
        with self._live_lock:
            self._live.pop(graph_id, None)
            compiling = self._compiling.pop(graph_id, None)
        if compiling is not None:
            compiling.abandon(_not_found(graph_id))

    def _stored(self, graph_id: str, tenant: str, with_order: bool = True) -> StoredGraph:
        stored = self.store.get_graph(graph_id, tenant, with_order) if graph_id else None
        if stored is None:
            raise NotFound(f"graph '{graph_id}' not found", reason="GRAPH_NOT_FOUND", subject=graph_id)
        return stored

    def _summary(self, stored: StoredGraph, step: int) -> GraphSummary:
        return GraphSummary(
            stored.graph_id,
            stored.name,
            stored.summary.get("topological_order", []),
            stored.summary["inputs"],
            stored.summary["parameters"],
            step,
            stored.summary["node_count"],
            stored.created_at,
            stored.summary.get("state", []),
        )

    @property
    def live_graph_count(self) -> int:
        return len(self._live)

    @property
    def live_bytes(self) -> int:
        """The estimated memory of every live graph, caches and parameters included."""
        with self._live_lock:
            graphs = list(self._live.values())
        return sum(live.bytes for live in graphs)

    @property
    def compiling(self) -> list[str]:
        """The graphs being compiled now."""
        with self._live_lock:
            return list(self._compiling)

    def waiting_for(self, graph_id: str) -> int:
        """How many callers wait for the graph's compilation (0 when it is not compiling)."""
        with self._live_lock:
            work = self._compiling.get(graph_id)
        return 0 if work is None else work.waiters

    def _keep(self, live: LiveGraph) -> None:
        """Make `live` a live graph, within the limits; its plan reports when its caches change."""
        live.plan.max_cache_bytes = self.max_live_bytes // 2  # one graph's kinds of request never crowd out all others
        live.plan.on_cache_change = lambda: self._evict(live)
        with self._live_lock:
            self._live[live.stored.graph_id] = live
        self._evict(live)
        if len(live.plan.names) >= TRIM_MIN_NODES:
            _release_freed_memory()

    def _evict(self, used: LiveGraph) -> None:
        """Beyond max_live_graphs graphs or max_live_bytes, forget the least recently used graphs no
        stream is training, never `used` (the graph in hand, which may alone exceed the budget);
        everything about them is committed, so the next use compiles them again from the store."""
        with self._live_lock:
            graphs = list(self._live.values())
        sizes = {id(live): live.bytes for live in graphs}
        total = sum(sizes.values())
        excess = len(graphs) - self.max_live_graphs
        if excess <= 0 and total <= self.max_live_bytes:
            return
        idle = [live for live in graphs if live.sessions == 0 and live.step == live.committed_step and live is not used]
        with self._live_lock:
            for live in sorted(idle, key=lambda live: live.last_used):
                if excess <= 0 and total <= self.max_live_bytes:
                    break
                if self._live.get(live.stored.graph_id) is live and live.sessions == 0:
                    del self._live[live.stored.graph_id]
                    excess -= 1
                    total -= sizes[id(live)]

    def live(self, graph_id: str, tenant: str = "", stop: StopFlag | None = None) -> LiveGraph:
        """The graph's compiled plan and live state, compiled from the store on first use.

        Concurrent first calls share one compilation, on a thread of its own and under no lock
        other calls need; each caller stops waiting when its `stop` is raised, and the compilation
        stops once no caller waits."""
        live = self._live.get(graph_id)
        if live is not None and live.stored.tenant == tenant:
            if self.store.shared:
                self._catch_up(live, tenant)
            live.last_used = time.monotonic()
            return live
        stored = self._stored(graph_id, tenant, with_order=False)
        if stop is not None and stop.stopped:  # a call already given up starts no compilation
            raise stopped(f"compiling graph '{graph_id}' for this call")
        with self._live_lock:
            live = self._live.get(graph_id)
            if live is None:
                work = self._compiling.get(graph_id)
                if work is None or not work.join():
                    work = SharedWork(lambda flag: self._compile(stored, flag), f"compile-{graph_id}")
                    self._compiling[graph_id] = work
                    work.join()
        if live is None:
            live = work.wait(stop, f"compiling graph '{graph_id}' for this call")
        live.last_used = time.monotonic()
        return live

    def compile(self, graph_id: str, tenant: str = "", stop: StopFlag | None = None) -> None:
        """Make the graph live before a call waits for a compute slot, so no slot is held while it compiles.
        A graph already live is left as it is: the call's own `live` checks it against the store, so a
        call reads the stored version once."""
        live = self._live.get(graph_id)
        if live is None or live.stored.tenant != tenant:
            self.live(graph_id, tenant, stop)

    def _catch_up(self, live: LiveGraph, tenant: str) -> None:
        """On a store other servers share, what this server holds of a graph is a cache: one indexed read
        of the stored version tells whether another server committed since (then the committed
        parameters replace the cached ones) or deleted the graph (NOT_FOUND). While this server trains
        the graph, it holds the graph's trainer lease, so nothing newer than its own steps is stored."""
        graph_id = live.stored.graph_id
        version = self.store.graph_version(graph_id, tenant)
        if version is None:
            self._forget(live)
            raise _not_found(graph_id)
        if live.sessions or (version == live.version and live.step == live.committed_step):
            return  # steps not committed without a session are ones the store refused to keep: drop them
        saved = self.store.load_checkpoint(graph_id)
        if saved is None:
            self._forget(live)
            raise _not_found(graph_id)
        with live.lock:
            if not live.sessions and saved.version >= live.version:
                _restore(live, saved)

    def _forget(self, live: LiveGraph) -> None:
        """The graph is gone from the store (another server deleted it): so it is from memory."""
        live.deleted = True
        with self._live_lock:
            if self._live.get(live.stored.graph_id) is live:
                del self._live[live.stored.graph_id]

    def _compile(self, stored: StoredGraph, stop: StopFlag) -> LiveGraph:
        """Compile a stored graph with its committed checkpoint and make it live (SharedWork's work)."""
        graph_id = stored.graph_id
        started = time.perf_counter()
        try:
            definition = self.store.definition(graph_id)
            if definition is None:
                raise _not_found(graph_id)
            log.info("compiling graph '%s' (%s bytes)", graph_id, f"{len(definition):,}")
            graph = build_graph(graph_pb2.Graph.FromString(definition), self.limits, stop)
            plan = Plan(graph, max_request_bytes=self.limits.max_request_bytes, stop=stop)
            del graph
            saved = self.store.load_checkpoint(graph_id)
            if saved is None:
                raise _not_found(graph_id)
        except Cancelled:
            log.info(
                "stopped compiling graph '%s' after %.1f s: no caller waits for it",
                graph_id,
                time.perf_counter() - started,
            )
            raise
        finally:
            with self._live_lock:
                current = self._compiling.get(graph_id)
                if current is not None and current.stop is stop:
                    del self._compiling[graph_id]
                    compiled = True
                else:
                    compiled = False  # deleted meanwhile: the deletion answers the waiters
        live = LiveGraph(
            stored, plan, saved.parameters, saved.optimizer_state, saved.step, saved.step, version=saved.version
        )
        if compiled:
            self._keep(live)
        log.info(
            "compiled graph '%s' (%s nodes) in %.1f s", graph_id, f"{len(plan.names):,}", time.perf_counter() - started
        )
        return live

    # ------------------------------------------------------------ evaluation
    def forward(
        self,
        graph_id: str,
        feeds: Mapping[str, Array],
        fetches: Sequence[str],
        tenant: str = "",
        stop: StopFlag | None = None,
        training: bool = False,
        seed: int = 0,
    ) -> list[Array]:
        """`training` runs batch statistics and dropout (seeded by `seed` and the graph's step) without
        changing the graph's state; only Train does that."""
        if not fetches:
            raise InvalidArgument("fetches is empty; name at least one node", subject="fetches")
        live = self.live(graph_id, tenant, stop)
        live.plan.check_feeds(feeds)
        parameters, mode = live.parameters, _mode(live, training, seed)
        return live.plan.forward(feeds, parameters, fetches, stop, mode)

    def backward(
        self,
        graph_id: str,
        feeds: Mapping[str, Array],
        loss: str,
        wrt: Sequence[str],
        loss_grad: Array | None = None,
        tenant: str = "",
        stop: StopFlag | None = None,
        training: bool = False,
        seed: int = 0,
    ) -> tuple[Array, Iterator[tuple[str, Array]]]:
        """`training` as for `forward`; an empty `wrt` means every trainable parameter."""
        live = self.live(graph_id, tenant, stop)
        live.plan.check_feeds(feeds)
        targets = list(wrt) or list(live.plan.parameters)
        parameters, mode = live.parameters, _mode(live, training, seed)
        return live.plan.backward(feeds, parameters, loss, targets, loss_grad, stop, mode)

    # ------------------------------------------------------------ parameters
    def get_parameters(self, graph_id: str, names: Sequence[str], tenant: str = "") -> tuple[dict[str, Array], int]:
        live = self.live(graph_id, tenant)
        with live.lock:
            parameters, step = live.parameters, live.step
        for name in names:
            _check_stored(live, name)
        return {name: parameters[name] for name in (names or parameters)}, step

    def set_parameters(self, graph_id: str, values: Mapping[str, Array], tenant: str = "") -> int:
        """Refused (GRAPH_BUSY) while a job or another server's Train stream trains the graph; this
        server's own streams go on from the values set."""
        for _ in range(SET_PARAMETERS_ATTEMPTS):
            live = self.live(graph_id, tenant)
            for name, value in values.items():
                current = live.parameters[_check_stored(live, name)]
                if value.dtype != current.dtype or value.shape != current.shape:
                    raise InvalidArgument(
                        f"parameter '{name}' is {current.dtype}{list(current.shape)}; "
                        f"got {value.dtype}{list(value.shape)}",
                        reason="SHAPE_MISMATCH",
                        subject=name,
                    )
            with live.lock:
                _check_not_deleted(live)
                parameters = {**live.parameters, **values}
                state = {name: kept for name, kept in live.optimizer_state.items() if name not in values}
                try:
                    version = self.store.save_checkpoint(
                        graph_id, Checkpoint(live.step, parameters, state), Fence(self.stream_trainer, live.version)
                    )
                except TrainerBusy as busy:
                    raise self.busy(graph_id, busy.holder) from None
                except VersionMoved:
                    continue  # another server committed since this one read the graph: read it again
                except NotFound:
                    live.deleted = True
                    raise
                live.parameters, live.optimizer_state, live.committed_step = parameters, state, live.step
                live.version = version
                return live.step
        raise Unavailable(
            f"graph '{graph_id}' changed on other servers {SET_PARAMETERS_ATTEMPTS} times while its parameters were "
            "being set; nothing was set: try again",
            reason="GRAPH_CONTENDED",
        )

    # ------------------------------------------------------------ training
    def start_training(
        self,
        graph_id: str,
        loss: str,
        optimizer: optim.Optimizer,
        parameters: Sequence[str] = (),
        checkpoint_every: int = 0,
        stop_on_non_finite_loss: bool = False,
        tenant: str = "",
        keep_updates: bool = True,
        seed: int = 0,
        trainer: str = "",
    ) -> TrainingSession:
        """`keep_updates` False (the updates are not streamed) lets each step build the new
        parameter values in the update's own buffer. `seed` keys dropout's masks (with the step
        and the node's name). `trainer` is the trainer lease the caller holds (a job's, taken with its
        claim); a Train stream passes none, and shares this server's stream lease, taken here unless
        another trainer holds it anywhere (GRAPH_BUSY)."""
        stream = not trainer
        if stream:
            self.live(graph_id, tenant)  # the tenant's graph, before its lease is asked for
            self._take_stream_lease(graph_id)
        try:
            live = self._pin(graph_id, tenant)
        except BaseException:
            if stream:
                self._give_up_stream_lease(graph_id)
            raise
        try:
            session = self._open_session(
                live,
                graph_id,
                loss,
                optimizer,
                parameters,
                checkpoint_every,
                stop_on_non_finite_loss,
                keep_updates,
                seed,
            )
        except BaseException:
            self.unpin(live, stream)
            raise
        session.trainer = self.stream_trainer if stream else trainer
        session.stream = stream
        return session

    def _pin(self, graph_id: str, tenant: str) -> LiveGraph:
        """The live graph, counted as trained so it stays in memory until `unpin`; the caller holds its lease."""
        while True:
            live = self.live(graph_id, tenant)
            with self._live_lock:
                if self._live.get(graph_id) is live:  # not evicted since the lookup
                    live.sessions += 1
                    return live

    def unpin(self, live: LiveGraph, stream: bool = False) -> None:
        """End a session on the graph; a Train stream's gives up its share of this server's stream lease."""
        with self._live_lock:
            live.sessions -= 1
            free = live.sessions == 0
        if stream:
            self._give_up_stream_lease(live.stored.graph_id)
        if free and self.on_graph_free is not None:
            self.on_graph_free()

    def _take_stream_lease(self, graph_id: str) -> None:
        """On a shared store, the lease is the store's; one held by the streams of a server process that is
        gone from this machine (killed) is taken over at once, rather than after it lapses. A store no
        other server uses (SQLite) only tells whether a job holds the graph: the streams' lease is in
        memory (see `claiming`), so that streams train while the store refuses writes."""
        with self._lease_lock:
            held = self._streams.get(graph_id, 0)
            if not held and not self.store.shared:
                holder = self.store.trainer_of(graph_id)
                if holder is None:
                    raise _not_found(graph_id)
                if holder not in ("", self.stream_trainer):
                    raise self.busy(graph_id, holder)
            elif not held:
                lease = self.store.acquire_trainer(graph_id, self.stream_trainer, self.lease_seconds)
                if lease is not None and not lease.granted and _gone(stream_process(lease.holder)):
                    log.info("graph '%s': taking over the lease of a server process that is gone", graph_id)
                    lease = self.store.acquire_trainer(
                        graph_id, self.stream_trainer, self.lease_seconds, replaces=lease.holder
                    )
                if lease is None:
                    raise _not_found(graph_id)
                if not lease.granted:
                    raise self.busy(graph_id, lease.holder)
            self._streams[graph_id] = held + 1

    def _give_up_stream_lease(self, graph_id: str) -> None:
        with self._lease_lock:
            held = self._streams.pop(graph_id) - 1
            if held:
                self._streams[graph_id] = held
                return
            if not self.store.shared:
                return
            try:
                self.store.release_trainer(graph_id, self.stream_trainer)
            except ChainruleError as error:  # it lapses on its own
                log.warning("graph '%s': the Train streams' lease stays until it lapses: %s", graph_id, error.message)

    def renew_stream_leases(self) -> None:
        """Extend the leases of the graphs this server's Train streams train (the heartbeat calls this)."""
        with self._lease_lock:
            graphs = list(self._streams)
        if graphs and self.store.shared:
            lost = set(graphs) - self.store.renew_trainers(self.stream_trainer, graphs, self.lease_seconds)
            for graph_id in lost:
                log.warning("graph '%s': the Train streams' lease lapsed; their next commit will be refused", graph_id)

    @contextmanager
    def claiming(self) -> Iterator[frozenset[str]]:
        """Around a job claim: the graphs whose lease this server's streams hold in memory only (a store no
        other server uses), which the claim passes over; no stream takes a lease until it is done."""
        if self.store.shared:
            yield frozenset()
            return
        with self._lease_lock:
            yield frozenset(self._streams)

    @staticmethod
    def busy(graph_id: str, holder: str) -> FailedPrecondition:
        """GRAPH_BUSY, naming the trainer in the way (see store.base.job_trainer and stream_trainer)."""
        return FailedPrecondition(
            f"graph '{graph_id}' is being trained by {_trainer_name(holder)}; a graph has one trainer at a time: "
            + ("wait for the job to end, or cancel it" if holder.startswith("job/") else "wait for the stream to end"),
            reason="GRAPH_BUSY",
            subject=graph_id,
        )

    def _open_session(
        self,
        live: LiveGraph,
        graph_id: str,
        loss: str,
        optimizer: optim.Optimizer,
        parameters: Sequence[str],
        checkpoint_every: int,
        stop_on_non_finite_loss: bool,
        keep_updates: bool,
        seed: int = 0,
    ) -> TrainingSession:
        live.plan.slot(loss, "loss")
        try:
            optim.validate(optimizer)
        except ValueError as error:
            raise InvalidArgument(f"optimizer: {error}", reason="BAD_OPTIMIZER", subject="optimizer") from None
        names = list(parameters) or list(live.plan.parameters)
        if len(set(names)) != len(names):
            raise InvalidArgument("parameters names a parameter more than once", subject="parameters")
        for name in names:
            _check_parameter(live, name)
        if not names:
            raise InvalidArgument(f"graph '{graph_id}' has no parameters to train", subject="parameters")
        if checkpoint_every < 0:
            raise InvalidArgument(
                f"checkpoint_every is {checkpoint_every}; it must not be negative", subject="checkpoint_every"
            )
        every = checkpoint_every or self.checkpoint_every
        return TrainingSession(self, live, loss, optimizer, names, every, stop_on_non_finite_loss, keep_updates, seed)


class TrainingSession:
    """One Train stream: a step per batch, checkpoints every `checkpoint_every` steps and at the end."""

    def __init__(
        self,
        engine: Engine,
        live: LiveGraph,
        loss: str,
        optimizer: optim.Optimizer,
        names: list[str],
        checkpoint_every: int,
        stop_on_non_finite_loss: bool,
        keep_updates: bool,
        seed: int = 0,
    ) -> None:
        self.engine = engine
        self.live = live
        self.loss = loss
        self.optimizer = optimizer
        self._scheduled = optimizer
        """The optimizer at the rate of the last step that gave one (see _at_rate)."""
        self.kind = type(optimizer).__name__.lower()
        self.names = names
        self.checkpoint_every = checkpoint_every
        self.stop_on_non_finite_loss = stop_on_non_finite_loss
        self.keep_updates = keep_updates
        self.seed = seed
        self.finished = False
        self.stream = False
        """A Train stream's session, which holds a share of its server's stream lease, rather than a job's."""
        self.trainer = ""
        """The trainer lease its commits are fenced by (see store.base.Fence); set by start_training."""

    def step(
        self,
        feeds: Mapping[str, Array],
        stop: StopFlag | None = None,
        learning_rate: float | None = None,
        dropout_step: int | None = None,
    ) -> StepResult:
        """`learning_rate` replaces the optimizer's for this step (a schedule's); `dropout_step`
        replaces the graph's step in dropout's key (a job keys it by its own step)."""
        live = self.live
        live.plan.check_feeds(feeds)
        optimizer = self._at_rate(learning_rate)
        with live.lock:
            _check_not_deleted(live)
            parameters = live.parameters
            # Training mode: batch statistics, dropout keyed by (seed, step before the update, node name),
            # and new running statistics for the `state` nodes, committed with the step's parameters.
            mode = Mode(training=True, seed=self.seed, step=live.step if dropout_step is None else dropout_step)
            state_updates: dict[str, Array] = {}
            loss_value, reverse = live.plan.backward(
                feeds, parameters, self.loss, self.names, None, stop, mode, state_updates
            )
            return self._update(float(loss_value), dict(reverse), state_updates, optimizer)

    def apply(
        self,
        loss: float,
        gradients: dict[str, Array],
        state_updates: dict[str, Array],
        learning_rate: float | None = None,
    ) -> StepResult:
        """One optimizer step from a loss, gradients and state updates computed elsewhere on the
        parameters the live graph holds now (a job's replicas): the same update `step` applies."""
        optimizer = self._at_rate(learning_rate)
        with self.live.lock:
            _check_not_deleted(self.live)
            return self._update(loss, gradients, state_updates, optimizer)

    def _at_rate(self, learning_rate: float | None) -> optim.Optimizer:
        """The optimizer with `learning_rate` (None: its own), made anew only when the rate changes: a
        job gives every step its rate, most often the same as the step before."""
        if learning_rate is None or learning_rate == self.optimizer.learning_rate:
            return self.optimizer
        if self._scheduled.learning_rate != learning_rate:
            self._scheduled = replace(self.optimizer, learning_rate=learning_rate)
        return self._scheduled

    def _update(
        self, loss: float, gradients: dict[str, Array], state_updates: dict[str, Array], optimizer: optim.Optimizer
    ) -> StepResult:
        """Under the graph's lock: apply the step, commit it when a checkpoint is due, publish it."""
        live = self.live
        parameters = live.parameters
        if self.stop_on_non_finite_loss and not math.isfinite(loss):
            raise InvalidArgument(f"loss '{self.loss}' is {loss}; the step was not applied", reason="NON_FINITE_LOSS")
        new_parameters = {**parameters, **state_updates}
        new_state = dict(live.optimizer_state)
        updates = {}
        for name in self.names:
            update, new_state_of_name = optim.step(
                optimizer, parameters[name], gradients[name], self._state_to_continue(name)
            )
            new_parameters[name] = optim.apply(parameters[name], update, keep_update=self.keep_updates)
            new_state[name] = (self.kind, new_state_of_name)
            if self.keep_updates:
                updates[name] = update
        step = live.step + 1
        if step - live.committed_step >= self.checkpoint_every:
            # Commit before publishing: a step whose checkpoint the store refuses is not applied.
            self._save(Checkpoint(step, new_parameters, new_state))
        live.parameters, live.optimizer_state, live.step = new_parameters, new_state, step
        return StepResult(step, loss, gradients, updates)

    def _state_to_continue(self, name: str) -> optim.State:
        """The parameter's saved state if this optimizer can continue it; otherwise a fresh start."""
        kind, state = self.live.optimizer_state.get(name, (self.kind, {}))
        if kind != self.kind or set(state) != set(optim.state_keys(self.optimizer)):
            return {}
        return state

    def roll_back(self) -> int:
        """Forget the steps since the last commit: the live graph goes back to its committed checkpoint,
        read from the store (a job whose replicas were lost redoes those steps). Returns its step."""
        live = self.live
        with live.lock:
            _check_not_deleted(live)
            if live.step != live.committed_step:
                saved = self.engine.store.load_checkpoint(live.stored.graph_id)
                if saved is None:
                    raise _not_found(live.stored.graph_id)
                _restore(live, saved)
            return live.step

    def finish(self, commit: bool = True) -> None:
        """Commit what the stream changed; the stream may report success only after this returns. A job
        that no longer holds its graph passes `commit` False: its steps not committed are dropped (the
        next use of the graph reads it back from the store)."""
        live = self.live
        try:
            with live.lock:
                if commit and not live.deleted and live.step != live.committed_step:
                    self._commit()
        finally:
            if not self.finished:
                self.finished = True
                self.engine.unpin(live, self.stream)

    def _commit(self) -> None:
        self._save(self.live.checkpoint())

    def commit(self, write: Callable[[Checkpoint | None, Fence], int | None]) -> None:
        """Commit through `write`, which stores the checkpoint it is given (None when every step is
        committed already), under the fence it is given, with whatever else must go in the same
        transaction (a job's row and history), and returns the graph's new version (None without a
        checkpoint)."""
        with self.live.lock:
            _check_not_deleted(self.live)
            live = self.live
            self._save(live.checkpoint() if live.step != live.committed_step else None, write)

    def _save(
        self, checkpoint: Checkpoint | None, write: Callable[[Checkpoint | None, Fence], int | None] | None = None
    ) -> None:
        """Write `checkpoint` (under the graph's lock), fenced by this session's trainer lease and the
        version its steps started from. When the store refuses it, every step since the last committed
        checkpoint is rolled back in memory too, so what clients read is what is stored; when another
        trainer has taken the graph over, the live graph becomes what that trainer committed."""
        live = self.live
        version = None
        try:
            if write is not None:
                version = write(checkpoint, Fence(self.trainer, live.version))
            elif checkpoint is not None:
                version = self.engine.store.save_checkpoint(
                    live.stored.graph_id, checkpoint, Fence(self.trainer, live.version)
                )
        except Unavailable as error:
            if checkpoint is None:
                raise  # every step was committed: nothing to roll back
            raise self._roll_back(error, checkpoint.step) from None
        except NotFound:  # deleted by another server
            self.engine._forget(live)
            raise
        except (TrainerBusy, VersionMoved, ClaimLost) as displaced:
            raise self._displaced(displaced, checkpoint) from None
        if checkpoint is not None:
            assert version is not None
            live.committed_step, live.version = checkpoint.step, version

    def _displaced(
        self, displaced: TrainerBusy | VersionMoved | ClaimLost, checkpoint: Checkpoint | None
    ) -> ChainruleError | ClaimLost:
        """Another trainer took the graph over (this one's lease lapsed, or its job was taken over by
        another server): the steps since the last commit are dropped, and the live graph becomes what
        is stored."""
        live = self.live
        graph_id = live.stored.graph_id
        dropped = ""
        if checkpoint is not None:
            first = live.committed_step + 1
            steps = f"step {first} was" if checkpoint.step == first else f"steps {first} to {checkpoint.step} were"
            dropped = f"; {steps} not committed"
            saved = self.engine.store.load_checkpoint(graph_id)
            if saved is None:
                self.engine._forget(live)
                return _not_found(graph_id)
            _restore(live, saved)
        if isinstance(displaced, ClaimLost):
            return displaced
        if isinstance(displaced, TrainerBusy):
            return FailedPrecondition(
                f"graph '{graph_id}' is being trained by {_trainer_name(displaced.holder)} now: this trainer's lease "
                f"lapsed{dropped}",
                reason="GRAPH_BUSY",
                subject=graph_id,
            )
        return FailedPrecondition(
            f"graph '{graph_id}' was changed by another server while this one trained it{dropped}",
            reason="GRAPH_MOVED",
            subject=graph_id,
        )

    def _roll_back(self, error: Unavailable, failed_step: int) -> Unavailable:
        """Put the live graph back to its committed checkpoint, read back from the store (reads go on
        when writes fail); the error says which step is committed."""
        live = self.live
        graph_id = live.stored.graph_id
        first = live.committed_step + 1
        lost = f"step {first} is" if failed_step == first else f"steps {first} to {failed_step} are"
        try:
            saved = self.engine.store.load_checkpoint(graph_id)
        except Unavailable as unreadable:
            return Unavailable(
                f"{error.message}; reading back the committed checkpoint failed too ({unreadable.message}), so "
                f"{lost} kept in memory uncommitted: the stored graph is at step {live.committed_step}",
                reason=error.reason,
            )
        if saved is None:
            return _not_found(graph_id)
        _restore(live, saved)
        return Unavailable(
            f"{error.message}; {lost} not kept either: graph '{graph_id}' is back at step {saved.step}, "
            "its last committed checkpoint",
            reason=error.reason,
        )


def _this_process() -> str:
    """Where this process runs, as `machine.pid`: the machine is the kernel's boot id with the process id
    namespace, which together tell whether another process's id can be looked up from here."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            boot = file.read().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # not Linux: no process here is known to be another's
        return f"-.{os.getpid()}"
    return f"{hashlib.sha256(f'{boot}/{namespace}'.encode()).hexdigest()[:16]}.{os.getpid()}"


THIS_PROCESS = _this_process()


def _gone(process: str) -> bool:
    """Whether `process` (as _this_process gives it) ran on this machine and has exited."""
    machine, _, pid = process.rpartition(".")
    if machine != THIS_PROCESS.rpartition(".")[0] or machine == "-" or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists, owned by someone else
        return False
    return False


def _trainer_name(holder: str) -> str:
    """A trainer lease's holder in words."""
    kind, _, rest = holder.partition("/")
    if kind == "job":
        return f"job '{rest.partition('/')[0]}'"
    server = rest.split("/", 2)[-1] if rest.count("/") >= 2 else ""
    return f"a Train stream on server {server}" if server else "a Train stream on another server"


def _restore(live: LiveGraph, saved: Checkpoint) -> None:
    """Make the live graph its committed checkpoint (under the graph's lock)."""
    live.parameters, live.optimizer_state, live.step = saved.parameters, saved.optimizer_state, saved.step
    live.committed_step, live.version = saved.step, saved.version


def _check_parameter(live: LiveGraph, name: str) -> str:
    if name not in live.plan.parameters:
        if name in live.plan.state:
            why = "is a state node (running statistics), which training updates but never trains"
        else:
            why = "is not a parameter node" if name in live.plan.slot_of else "names no node of the graph"
        raise InvalidArgument(f"parameter '{name}' {why}", reason="UNKNOWN_PARAMETER", subject=name)
    return name


def _check_stored(live: LiveGraph, name: str) -> str:
    """A parameter or state node: what GetParameters reads and SetParameters writes."""
    if name not in live.plan.stored:
        why = "is not a parameter or state node" if name in live.plan.slot_of else "names no node of the graph"
        raise InvalidArgument(f"parameter '{name}' {why}", reason="UNKNOWN_PARAMETER", subject=name)
    return name


def _mode(live: LiveGraph, training: bool, seed: int) -> Mode:
    """How a Forward or Backward runs: inference unless `training`, then seeded like the graph's next step."""
    return Mode(training=True, seed=seed, step=live.step) if training else INFERENCE


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _find_malloc_trim()


def _release_freed_memory() -> None:
    """Hand memory that is free but kept in the allocator's heaps back to the system. A compile
    frees most of what it allocates (the DiGraph, the message), scattered among what it keeps,
    and glibc returns such memory only when asked: at a million nodes that is over half of the
    server's growth. A few milliseconds; glibc only."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _not_found(graph_id: str) -> NotFound:
    return NotFound(f"graph '{graph_id}' not found", reason="GRAPH_NOT_FOUND", subject=graph_id)


def _check_not_deleted(live: LiveGraph) -> None:
    if live.deleted:
        graph_id = live.stored.graph_id
        raise NotFound(f"graph '{graph_id}' was deleted", reason="GRAPH_NOT_FOUND", subject=graph_id)


def _encode_page_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"after:{seq}".encode()).decode()


def _decode_page_token(token: str) -> int:
    if not token:
        return 0
    try:
        prefix, seq = base64.urlsafe_b64decode(token.encode()).decode().split(":")
        if prefix == "after" and seq.isdigit() and int(seq) < 2**63:  # SQLite integers are 64-bit
            return int(seq)
    except (ValueError, UnicodeError):
        pass
    raise InvalidArgument("page_token is not one this server issued", reason="BAD_PAGE_TOKEN", subject="page_token")
