"""Job steps on a Ray cluster (`chainrule serve --ray-address`): the server's side of a job's Ray
driver (ray_driver.py), a process of its own per run of a job.

Each step the executor splits the batch's rows into the job's shards, has the driver's replicas
compute them, and applies the combined gradients through the job's TrainingSession: the
optimizer step, the schedule's learning rate and the commits stay where an in-process job has
them, and the parameters the step changed go to the replicas with the next step.

When a replica dies, the step fails with ExecutorLost and the runner starts the job again from its
last commit with fresh replicas. When the cluster itself is out of reach (its head lost, or not
started yet), the step or the start fails with RayClusterLost: the job keeps its place and its
commits, and its runner tries again until the cluster answers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import IO

import numpy as np

from chainrule.server import errors
from chainrule.server.engine import StepResult
from chainrule.server.errors import ChainruleError, FailedPrecondition, InvalidArgument
from chainrule.server.graph import Limits
from chainrule.server.jobs.executor import ExecutorContext, ExecutorLost
from chainrule.server.jobs.ray_cluster import RayCluster
from chainrule.server.jobs.ray_driver import ClusterSize, MappedColumn, Opening
from chainrule.server.jobs.replicas import Reduction, loss_reduction, split_rows
from chainrule.server.work import StopFlag

log = logging.getLogger("chainrule.server.jobs.ray")
DEFAULT_REPLICA_CPUS = 1.0
POLL_SECONDS = 0.5
CLOSE_SECONDS = 10.0
"""How long a driver asked to end may take (Ray's shutdown) before it is killed."""
JOIN_SECONDS = 60.0
"""How long a driver may take to join the cluster (Ray's own join waits minutes for an absent head)."""
PROBE_SECONDS = 60.0
"""How long a look at the cluster's size may take (a driver of its own joins and leaves)."""
FITS_WAIT_SECONDS = 5.0
"""How long CreateJob waits for a look at the cluster's size (see RayExecutors.check_fits)."""
CLUSTER_SIZE_SECONDS = 30.0
"""How long the cluster's size as last seen (by a probe, or a job's driver joining) stands for it
before a CreateJob it would refuse looks again: nodes may have joined since."""
LOG_TAIL_BYTES = 2000


class RayClusterLost(ExecutorLost):
    """The Ray cluster is out of reach: the job waits for it, and this does not count as a restart."""

    counts = False


class RayExecutors:
    """The executor factory of a server started with --ray-address, and what it knows of the
    cluster's size."""

    def __init__(self, cluster: RayCluster, limits: Limits, replica_cpus: float = DEFAULT_REPLICA_CPUS) -> None:
        self.cluster = cluster
        self.limits = limits
        self.replica_cpus = replica_cpus
        self._size: tuple[float, ClusterSize] | None = None
        """The cluster's size as last seen, and when (time.monotonic())."""
        self._lock = threading.Lock()
        self._probe: threading.Thread | None = None
        """The look at the cluster under way, if any."""

    def __call__(self, context: ExecutorContext) -> RayExecutor:
        return RayExecutor(context, self)

    @property
    def address(self) -> str:
        return self.cluster.address

    def start(self) -> None:
        """Look at the cluster's size, in the background, so that CreateJob knows it (see check_fits)."""
        self._look()

    def saw(self, size: ClusterSize) -> None:
        """What a probe or a driver saw; a driver does not wait to learn of an autoscaler, whose presence
        a probe saw stands."""
        with self._lock:
            if size.autoscaling is None and self._size is not None:
                size = ClusterSize(size.cpus, self._size[1].autoscaling)
            self._size = (time.monotonic(), size)

    def check_fits(self, replicas: int) -> None:
        """Refuse a job whose replicas ask for more CPUs than the cluster's nodes have together, when no
        autoscaler may add nodes: it would wait forever. What a refusal rests on is looked at again
        when it is older than CLUSTER_SIZE_SECONDS (nodes may have joined), waiting for that look at
        most FITS_WAIT_SECONDS. A cluster whose size or autoscaler is not known refuses nothing: the
        job waits for it, and says so."""
        needed = replicas * self.replica_cpus
        known = self._size
        if known is None or (
            needed > known[1].cpus
            and (known[1].autoscaling is None or time.monotonic() - known[0] > CLUSTER_SIZE_SECONDS)
        ):
            self._look().join(FITS_WAIT_SECONDS)
            known = self._size
        if known is None or known[1].autoscaling is not False or needed <= known[1].cpus:
            return
        raise FailedPrecondition(
            f"spec.replicas is {replicas}: {replicas} replicas of {self.replica_cpus:g} CPUs (--ray-replica-cpus) "
            f"need {needed:g} CPUs, and the Ray cluster at {self.address} has {known[1].cpus:g} on all its nodes, "
            "with no autoscaler to add more",
            reason="RAY_CLUSTER_TOO_SMALL",
            subject="spec.replicas",
        )

    def _look(self) -> threading.Thread:
        """The look at the cluster's size under way, started if none is."""
        with self._lock:
            if self._probe is None or not self._probe.is_alive():
                self._probe = threading.Thread(target=self._see, name="ray-probe", daemon=True)
                self._probe.start()
            return self._probe

    def _see(self) -> None:
        """Look at the cluster's size through a driver of its own (`ray_driver --probe`)."""
        command = [sys.executable, "-m", "chainrule.server.jobs.ray_driver", "--probe", self.address]
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=PROBE_SECONDS,
                env={**os.environ, **self.cluster.environment},
                stdin=subprocess.DEVNULL,
            )
        except (subprocess.TimeoutExpired, OSError) as error:
            log.warning("could not see the size of the Ray cluster at %s: %s", self.address, error)
            return
        lines = done.stdout.strip().splitlines()
        try:
            answer = json.loads(lines[-1]) if done.returncode == 0 else None
        except (ValueError, IndexError):
            answer = None
        if answer is None:
            why = done.stderr.strip().splitlines()
            log.warning(
                "could not see the size of the Ray cluster at %s: %s",
                self.address,
                why[-1] if why else f"exit status {done.returncode}",
            )
            return
        autoscaling = None if answer["autoscaling"] is None else bool(answer["autoscaling"])
        self.saw(ClusterSize(float(answer["cpus"]), autoscaling))
        log.info(
            "the Ray cluster at %s has %g CPUs on its nodes, %s",
            self.address,
            answer["cpus"],
            {True: "and an autoscaler", False: "and no autoscaler", None: "and may have an autoscaler"}[autoscaling],
        )


class RayExecutor:
    """One run of a job on Ray: its driver process, its replicas, the parameters they hold."""

    def __init__(self, context: ExecutorContext, factory: RayExecutors) -> None:
        session, plan = context.session, context.plan
        live = session.live
        self.session = session
        self.address = factory.cluster.address
        self.computing = context.computing
        self.replicas = plan.replicas
        self.flag = StopFlag()
        self.sent = [*session.names, *live.plan.state]
        """What a step changes, so what each next step sends the replicas."""
        reduction = loss_reduction(live.plan, plan.loss) if plan.replicas > 1 else Reduction(False)
        columns = {name: _column(context.train.columns[column]) for name, column in plan.feeds.items()}
        opening = Opening(
            address=factory.cluster.address,
            job_id=context.job_id,
            definition=session.engine.definition(live.stored.graph_id, live.stored.tenant),
            limits=factory.limits,
            loss=plan.loss,
            names=tuple(session.names),
            reduction=reduction,
            seed=plan.seed,
            replicas=plan.replicas,
            replica_cpus=factory.replica_cpus,
            columns=columns,
            parameters=dict(live.parameters),
        )
        self.job_id = context.job_id
        self.updates: dict[str, np.ndarray] = {}
        self.output: IO[bytes] = tempfile.TemporaryFile(prefix="chainrule-ray-driver-")
        ours, theirs = socket.socketpair()
        with ours, theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "chainrule.server.jobs.ray_driver", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=self.output,
                stderr=subprocess.STDOUT,
                env={**os.environ, **factory.cluster.environment},
            )
            self.connection = Connection(ours.detach())
        try:
            self.connection.send(opening)
            answer = self._receive(context.stopping, time.monotonic() + JOIN_SECONDS)
            if answer[0] == "joined":  # then the replicas, which may wait for the cluster's CPUs
                factory.saw(answer[1])
                answer = self._receive(context.stopping)
            while answer[0] == "waiting":
                log.warning("job %s: %s", context.job_id, answer[1])
                context.waiting(answer[1])
                answer = self._receive(context.stopping)
            if answer[0] != "ready":
                raise self._failure(answer)
        except BaseException:
            self.close()
            raise
        log.info("job %s: %d replicas on Ray (worker pids %s)", context.job_id, self.replicas, answer[1])

    def step(self, rows: slice | np.ndarray, step: int, learning_rate: float) -> StepResult:
        self._send(("step", step, split_rows(rows, self.replicas), self.updates))
        answer = self._receive()
        if answer[0] != "result":
            raise self._failure(answer)
        _, loss, gradients, state_updates = answer
        with self.computing(self.flag):
            result = self.session.apply(loss, gradients, state_updates, learning_rate)
        parameters = self.session.live.parameters
        self.updates = {name: parameters[name] for name in self.sent}
        return result

    def close(self) -> None:
        """End the driver (and so its replicas): asked first, then killed."""
        try:
            self.connection.send(("close",))
        except OSError:
            pass
        try:
            self.process.wait(CLOSE_SECONDS)
        except subprocess.TimeoutExpired:
            log.warning("job %s: its Ray driver did not end within %g s; killed", self.job_id, CLOSE_SECONDS)
            self.process.kill()
            self.process.wait()
        self.connection.close()
        self.output.close()

    def _send(self, message: tuple) -> None:
        try:
            self.connection.send(message)
        except OSError:
            raise RayClusterLost(
                f"the job's Ray driver ended: {self._output_tail()}", reason="RAY_UNAVAILABLE"
            ) from None

    def _receive(self, stopping: Callable[[], bool] | None = None, deadline: float = math.inf) -> tuple:
        """The driver's next answer; RayClusterLost when the driver ends first, when `stopping`
        says to give up (a job waiting for the cluster is cancelled, or the server stops), or at
        `deadline`."""
        while True:
            try:
                if self.connection.poll(POLL_SECONDS):
                    return self.connection.recv()  # type: ignore[no-any-return]
            except (EOFError, OSError):
                raise RayClusterLost(
                    f"the job's Ray driver ended: {self._output_tail()}", reason="RAY_UNAVAILABLE"
                ) from None
            if self.process.poll() is not None:
                raise self._driver_ended()
            if stopping is not None and stopping():
                raise RayClusterLost("stopped while waiting for the Ray cluster", reason="RAY_UNAVAILABLE")
            if time.monotonic() > deadline:
                raise RayClusterLost(
                    f"the Ray cluster at {self.address} did not take the job's driver within {JOIN_SECONDS:.0f} s",
                    reason="RAY_UNAVAILABLE",
                )

    def _driver_ended(self) -> RayClusterLost:
        return RayClusterLost(f"the job's Ray driver ended: {self._output_tail()}", reason="RAY_UNAVAILABLE")

    def _failure(self, answer: tuple) -> ChainruleError:
        if answer[0] == "lost":
            _, counts, message = answer
            kind = ExecutorLost if counts else RayClusterLost
            return kind(message, reason="REPLICA_LOST" if counts else "RAY_UNAVAILABLE")
        _, name, message, reason, subject = answer
        kind = getattr(errors, name, None)
        if not (isinstance(kind, type) and issubclass(kind, ChainruleError)):
            kind = InvalidArgument
        while kind.__init__ is not ChainruleError.__init__:  # a subclass with its own arguments: its base
            kind = kind.__bases__[0]
        return kind(message, reason=reason, subject=subject)

    def _output_tail(self) -> str:
        try:
            self.output.seek(max(0, self.output.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
            lines = self.output.read().decode(errors="replace").strip().splitlines()
        except (OSError, ValueError):
            lines = []
        return lines[-1] if lines else f"exit status {self.process.poll()}"


def _column(column: np.ndarray) -> MappedColumn | np.ndarray:
    """A mapped column as where it is mapped from (the driver maps it too); others (empty) as they are."""
    if isinstance(column, np.memmap) and column.filename is not None:
        return MappedColumn(str(column.filename), int(column.offset), column.dtype.str, tuple(column.shape))
    return np.asarray(column)
