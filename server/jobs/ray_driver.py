"""A job's Ray driver: a process of its own, started by the server for each run of a replicated job
(`python -m chainrule.server.jobs.ray_driver FD`), talking to it over the socket FD.

Why a process of its own: a Ray driver that loses the cluster's head exits once it has not reached
it for a while (Ray ends the process), and the server must outlive its Ray cluster. So the server
keeps the job and its parameters, and the driver holds only what Ray needs: the connection, the
job's replicas (actors, each with its own compiled copy of the graph), the training set in Ray's
object store (put there once per run) and the latest parameters (put once per step, read by every
replica). Each step the server sends the rows of each shard and the parameters its last step
changed; the driver has each replica compute its shard, combines their results (replicas.py) and
sends back one loss, one set of gradients and replica 0's state updates. When the driver goes,
Ray ends its actors with it.

Messages (pickled through multiprocessing's Connection): the server sends an `Opening`, then
("step", step, shards, updates) or ("close",). The driver answers the opening with ("joined",
ClusterSize) once it is in the cluster, then ("ready", pids) once its replicas are (with
("waiting", why) between when they wait long for the cluster's CPUs; a ("close",) then ends the
wait); each step with ("result", loss, gradients, state_updates). Either may instead be ("lost",
counts, message) when a replica or the cluster is gone, or ("error", kind, message, reason,
subject) when the computation itself failed (the error a replica's graph raised).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from chainrule.server.errors import ChainruleError
from chainrule.server.graph import Limits, build_graph
from chainrule.server.jobs.replicas import Reduction, ShardResult, combine, compute_shard, replica_seed
from chainrule.server.ops import Mode
from chainrule.server.plan import Plan
from chainrule.v1 import graph_pb2

Array = np.ndarray
PARENT_POLL_SECONDS = 1.0
"""How often a waiting driver looks whether its server is still there."""
JOIN_PROBE_SECONDS = 3.0
WAITING_SECONDS = 5.0
"""A driver whose replicas wait this long for the cluster's CPUs tells the server, which says so on
the job (its status message) and in its log."""
AUTOSCALING_STATUS = b"__autoscaling_status"
"""Where Ray's autoscaler monitor (v1) reports, in the cluster's key-value store (ray_constants)."""
READONLY_NODE_TYPE = "node_"
"""How the monitor of a cluster with no autoscaler (ray start) names each node's type: after the node."""
STATUS_WAIT_SECONDS = 20.0
"""How long a probe waits for the monitor's first report (a head just started has none yet)."""
CLUSTER_TIMEOUT_SECONDS = 15
"""How long a driver's connection to the head may stay broken before Ray ends the driver (Ray's
default is 60 s); the server then reconnects when the cluster is back."""


@dataclass(frozen=True)
class MappedColumn:
    """A column of the dataset cache, mapped read-only in the driver as the server maps it."""

    path: str
    offset: int
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ClusterSize:
    """The CPUs of the cluster's nodes, and whether an autoscaler may add nodes (then the CPUs are no
    bound on what a job may ask; None: not known)."""

    cpus: float
    autoscaling: bool | None


@dataclass(frozen=True)
class Opening:
    address: str
    job_id: str
    definition: bytes
    limits: Limits
    loss: str
    names: tuple[str, ...]
    reduction: Reduction
    seed: int
    replicas: int
    replica_cpus: float
    columns: dict[str, MappedColumn | Array]
    """Input name -> its column of the training set."""
    parameters: dict[str, Array]
    """Every parameter and state node's value when the run starts."""


class Replica:
    """One replica of a job's graph, on a Ray actor: compiled from the stored definition, with the
    job's training set from the object store and the parameters it was last sent."""

    def __init__(
        self,
        index: int,
        definition: bytes,
        limits: Limits,
        columns: dict[str, Array],
        parameters: dict[str, Array],
        training: tuple[str, tuple[str, ...], Reduction, int],
    ) -> None:
        self.index = index
        self.graph = Plan(build_graph(graph_pb2.Graph.FromString(definition), limits))
        self.columns = columns
        self.parameters = dict(parameters)
        self.loss, self.names, self.reduction, seed = training
        self.seed = replica_seed(seed, index)

    def pid(self) -> int:
        return os.getpid()

    def step(self, step: int, rows: slice | Array, updates: Mapping[str, Array]) -> ShardResult | tuple | None:
        """The shard's result (None for an empty shard), or ("error", ...) for what the graph raised."""
        self.parameters.update(updates)
        feeds = {name: column[rows] for name, column in self.columns.items()}
        if not len(next(iter(feeds.values()))):
            return None
        mode = Mode(training=True, seed=self.seed, step=step)
        try:
            return compute_shard(self.graph, self.parameters, feeds, self.loss, self.names, self.reduction, mode)
        except ChainruleError as error:
            return ("error", type(error).__name__, error.message, error.reason, error.subject)


class Driver:
    def __init__(self, connection: Connection, opening: Opening) -> None:
        import ray

        self.ray = ray
        self.connection = connection
        self.opening = opening
        self.parent = os.getppid()
        self.actors: list[Any] = []
        self.parameters_ref: Any = None

    def open(self) -> tuple:
        ray, opening = self.ray, self.opening
        silent = _silent(opening.address)
        if silent is not None:
            return ("lost", False, silent)
        try:
            ray.init(
                address=opening.address,
                logging_level="ERROR",
                log_to_driver=False,
                configure_logging=True,
                namespace=f"chainrule-{opening.job_id}",
            )
        except Exception as error:  # noqa: BLE001 - whatever Ray raises, the cluster cannot be joined now
            return ("lost", False, f"the Ray cluster at {opening.address} cannot be joined: {_first_line(error)}")
        self.connection.send(("joined", cluster_size(ray)))
        columns = {name: _mapped(column) for name, column in opening.columns.items()}
        data = ray.put(columns)
        del columns
        parameters = ray.put(opening.parameters)
        actor = ray.remote(Replica)
        training = (opening.loss, opening.names, opening.reduction, opening.seed)
        options: dict[str, Any] = {"num_cpus": opening.replica_cpus, "max_restarts": 0, "max_task_retries": 0}
        if opening.replica_cpus > 0:
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            group = placement_group([{"CPU": opening.replica_cpus}] * opening.replicas, strategy="SPREAD")
            if not self._wait(group.ready(), f"{opening.replicas} replicas of {opening.replica_cpus:g} CPUs"):
                return ("lost", False, "the server went away, or stopped the job")
            strategies = [PlacementGroupSchedulingStrategy(group, index) for index in range(opening.replicas)]
        else:
            strategies = [None] * opening.replicas
        for index, strategy in enumerate(strategies):
            placed = {**options, "scheduling_strategy": strategy} if strategy is not None else options
            self.actors.append(
                actor.options(**placed).remote(index, opening.definition, opening.limits, data, parameters, training)
            )
        return self._gather([actor.pid.remote() for actor in self.actors], lambda pids: ("ready", pids))

    def step(self, step: int, shards: list[slice | Array], updates: dict[str, Array]) -> tuple:
        ref = self.ray.put(updates)
        refs = [actor.step.remote(step, rows, ref) for actor, rows in zip(self.actors, shards, strict=True)]
        return self._gather(refs, self._combine)

    def _combine(self, results: list[Any]) -> tuple:
        for result in results:
            if isinstance(result, tuple):
                return result
        loss, gradients, state_updates = combine([r for r in results if r is not None], self.opening.reduction)
        return ("result", loss, gradients, state_updates)

    def _wait(self, ref: Any, what: str) -> bool:
        """Wait for `ref` while the server is there, telling it once when the wait is long; False
        when the server is gone, or says to stop (its ("close",), as the job is cancelled)."""
        started, told = time.monotonic(), False
        while True:
            ready, _ = self.ray.wait([ref], timeout=PARENT_POLL_SECONDS)
            if ready:
                return True
            if os.getppid() != self.parent or self.connection.poll():
                return False
            if not told and time.monotonic() - started > WAITING_SECONDS:
                free = self.ray.available_resources().get("CPU", 0.0)
                total = self.ray.cluster_resources().get("CPU", 0.0)
                self.connection.send(
                    ("waiting", f"{what} wait for the Ray cluster's free CPUs ({free:g} of its {total:g} are free)")
                )
                told = True

    def _gather(self, refs: list[Any], answer: Any) -> tuple:
        ray = self.ray
        try:
            pending = list(refs)
            while pending:
                _, pending = ray.wait(pending, num_returns=len(pending), timeout=PARENT_POLL_SECONDS)
                if pending and (os.getppid() != self.parent or self.connection.poll()):
                    return ("lost", False, "the server went away, or stopped the job")
            return answer(ray.get(refs))
        except ray.exceptions.ActorUnavailableError as error:
            return ("lost", False, f"a replica cannot be reached: {_first_line(error)}")
        except ray.exceptions.RayActorError as error:
            return ("lost", True, f"a replica died: {_first_line(error)}")
        except ray.exceptions.RayError as error:
            return ("lost", False, f"the Ray cluster failed: {_first_line(error)}")

    def serve(self) -> None:
        connection = self.connection
        while True:
            while not connection.poll(PARENT_POLL_SECONDS):
                if os.getppid() != self.parent:
                    return
            message = connection.recv()
            if message[0] == "close":
                return
            answer = self.step(*message[1:])
            connection.send(answer)
            if answer[0] == "lost":
                return


def _mapped(column: MappedColumn | Array) -> Array:
    if isinstance(column, MappedColumn):
        return np.asarray(np.memmap(column.path, np.dtype(column.dtype), "r", column.offset, column.shape))
    return column


def cluster_size(ray: Any, status_wait: float = 0.0) -> ClusterSize:
    return ClusterSize(float(ray.cluster_resources().get("CPU", 0.0)), _autoscaling(status_wait))


def _autoscaling(status_wait: float) -> bool | None:
    """Whether an autoscaler may add nodes to the cluster: Ray's v2 autoscaler, or a v1 monitor whose
    node types come from an autoscaling config (`ray up`, KubeRay) rather than from the nodes
    themselves (`ray start`). None when Ray does not say (within `status_wait` seconds): then
    nothing is refused for want of CPUs.

    Both are read from the cluster's key-value store, which a driver joined through Ray Client
    (ray://) reads too; Ray's own ray.autoscaler.v2.utils.is_autoscaler_v2 reads the v2 switch
    through a GCS client, which such a driver has not (it raises there)."""
    try:
        from ray._raylet import GCS_AUTOSCALER_STATE_NAMESPACE, GCS_AUTOSCALER_V2_ENABLED_KEY
        from ray.experimental.internal_kv import _internal_kv_get

        if _internal_kv_get(GCS_AUTOSCALER_V2_ENABLED_KEY, namespace=GCS_AUTOSCALER_STATE_NAMESPACE) == b"1":
            return True
        deadline = time.monotonic() + status_wait
        while (report := _autoscaler_report()) is None and time.monotonic() < deadline:
            time.sleep(0.5)
        if report is None:
            return None
        types = report["node_type_mapping"].values()
        return any(not str(kind).startswith(READONLY_NODE_TYPE) for kind in types)
    except Exception:  # noqa: BLE001 - an internal of Ray's that moved: not known
        return None


def _autoscaler_report() -> dict[str, Any] | None:
    """The monitor's last report on the autoscaler, if any: its first reports, in a head's first
    seconds, carry the load of the nodes but no such report yet."""
    from ray.experimental.internal_kv import _internal_kv_get

    status = _internal_kv_get(AUTOSCALING_STATUS)
    report = json.loads(status).get("autoscaler_report") if status is not None else None
    return report if isinstance(report, dict) else None


def probe(address: str) -> int:
    """`--probe ADDRESS`: join the cluster, print its ClusterSize as JSON, leave."""
    import ray

    silent = _silent(address)
    if silent is not None:
        print(silent, file=sys.stderr)
        return 1
    ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=True)
    try:
        size = cluster_size(ray, STATUS_WAIT_SECONDS)
    finally:
        ray.shutdown()
    print(json.dumps({"cpus": size.cpus, "autoscaling": size.autoscaling}))
    return 0


def _silent(address: str) -> str | None:
    """Why nothing answers at a HOST:PORT address, if nothing does (Ray's own join waits minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return None  # auto: Ray finds the address itself
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=JOIN_PROBE_SECONDS):
            return None
    except OSError as error:
        return f"nothing answers at the Ray cluster's address {address}: {error.strerror or error}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _die_with_parent() -> None:
    """Linux: end this process when the server's process ends, however it ends."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    _die_with_parent()
    if argv[1] == "--probe":
        return probe(argv[2])
    os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", str(CLUSTER_TIMEOUT_SECONDS))
    connection = Connection(int(argv[1]))
    opening: Opening = connection.recv()
    driver = Driver(connection, opening)
    started = time.monotonic()
    answer = driver.open()
    connection.send(answer)
    if answer[0] == "ready":
        print(f"job {opening.job_id}: {opening.replicas} replicas ready in {time.monotonic() - started:.1f} s")
        driver.serve()
    try:
        driver.ray.shutdown()
    except Exception:  # noqa: BLE001 - leaving anyway; Ray ends a gone driver's actors
        pass
    return 0


if __name__ == "__main__":
    # Through the module's own name, so that Ray pickles Replica by reference, not by value.
    from chainrule.server.jobs import ray_driver

    sys.exit(ray_driver.main(sys.argv))
