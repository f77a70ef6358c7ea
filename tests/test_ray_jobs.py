"""Jobs on a real Ray cluster (tests/ray_cluster.py: one head for the session, 127.0.0.1 only, token
authentication on) through real servers: data-parallel replicas agree with one replica and with the
in-process engine, also through Ray Client (ray://); a replica killed mid-job is replaced and the
job finishes correct; the head lost mid-job and a new one started on its address, the job resumes
(counted once) and ends bit-identical to a run that was never interrupted; replicas beyond the
cluster's CPUs are refused, and a job waiting for free CPUs says so and is cancelled at once; past
--job-max-restarts a job fails naming the flag, and a replicated job left by a Ray server is never
run by a server without Ray; batch_norm keeps replica 0's running statistics; eight jobs on two
servers sharing one PostgreSQL and the cluster all end correct; nothing the cluster or the servers'
drivers open reaches beyond loopback.

What CreateJob refuses about replicas (without Ray, beyond the batch's examples or MAX_REPLICAS,
losses replicas cannot combine) and how shards combine is checked without Ray (no cluster needed),
as is the server's answer to a bogus --ray-address and to --ray-address without the extra.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

import chainrule.client as cr
from chainrule.server import optim
from chainrule.server.errors import InvalidArgument
from chainrule.server.graph import build_graph
from chainrule.server.jobs.planning import MAX_REPLICAS, plan_job
from chainrule.server.jobs.replicas import Reduction, combine, compute_shard, loss_reduction, split_rows
from chainrule.server.ops import Mode
from chainrule.server.plan import Plan
from chainrule.server.store.base import ColumnSpec, StoredDataset
from chainrule.v1 import graph_service_pb2 as gpb
from chainrule.v1 import job_service_pb2 as jpb
from tests.postgres import PostgresServer
from tests.ray_cluster import RayHeadFixture, descendants, tcp_sockets
from tests.server_process import ServerProcess
from tests.test_cluster import raw_job
from tests.test_jobs import Reference, assert_same_bits, wait_for, wait_running

WAIT_SECONDS = 180.0
CLASSES = 3
IGNORED = -100
WORKER_PIDS = re.compile(r"job (\w+): (\d+) replicas on Ray \(worker pids \[([\d, ]+)\]\)")


def classifier(dtype: str = "float64", penalized: bool = False, dropout: float = 0.0) -> cr.GraphBuilder:
    """A small MLP over 4 features into 3 classes, its loss a softmax cross-entropy over class labels
    (some labelled IGNORED, so shards average over different counts of rows); `penalized` adds
    `total`, the loss plus a mean of squared weights beside it (no reduction replicas can combine);
    `dropout` drops hidden units (each replica draws its own masks, keyed by the job's seed)."""
    rng = np.random.default_rng(7)
    g = cr.GraphBuilder("classifier", default_dtype=dtype)
    x = g.input("x", dtype=dtype, shape=[-1, 4])
    y = g.input("y", dtype="int64", shape=[-1])
    w1 = g.parameter("w1", rng.normal(scale=0.5, size=(4, 8)).astype(dtype))
    b1 = g.parameter("b1", np.zeros(8, dtype=dtype))
    w2 = g.parameter("w2", rng.normal(scale=0.5, size=(8, CLASSES)).astype(dtype))
    hidden = cr.tanh(x @ w1 + b1)
    if dropout:
        hidden = cr.dropout(hidden, dropout)
    loss = cr.softmax_cross_entropy(hidden @ w2, y, ignore_index=IGNORED, name="loss")
    if penalized:
        cr.add(loss, cr.mean(w1 * w1), name="total")
    return g


def classes(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, 4))
    y = np.argmax(x[:, :CLASSES] + 0.3 * rng.normal(size=(count, CLASSES)), axis=1).astype(np.int64)
    y[rng.random(count) < 0.2] = IGNORED
    return x, y


@pytest.fixture(scope="module")
def ray_environment(ray_cluster: RayHeadFixture) -> Iterator[None]:
    """How servers join the session's cluster: its token's file and loopback only, through their environment."""
    saved = {name: os.environ.get(name) for name in ray_cluster.environment}
    os.environ.update(ray_cluster.environment)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def assert_loopback_only(server: ServerProcess, cluster: RayHeadFixture) -> None:
    """Every TCP socket of the server's processes (its jobs' drivers among them) and of the Ray head's
    (its actors and Ray Client servers among them) is on 127.0.0.1 at both ends."""
    assert server.process is not None and cluster.head.process is not None
    sockets = tcp_sockets(descendants([server.process.pid, cluster.head.process.pid]))
    assert {state for state, _, _ in sockets} == {"LISTEN", "ESTABLISHED"}
    for state, local, remote in sockets:
        assert local == "127.0.0.1" and (state == "LISTEN" or remote == "127.0.0.1"), (state, local, remote)


def ray_server(db: Path | str, cluster: RayHeadFixture, *extra: str, address: str = "") -> ServerProcess:
    """A server on the cluster, joining it at its head's GCS address unless given another."""
    # Half a CPU per replica: the session's 2-CPU cluster holds two 2-replica jobs at once.
    arguments = ["--ray-address", address or cluster.address, "--ray-replica-cpus", "0.5", "--checkpoint-every", "5"]
    arguments += extra
    return ServerProcess(db, arguments).start(timeout=60)


@pytest.fixture(scope="module")
def server(
    ray_cluster: RayHeadFixture, ray_environment: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    process = ray_server(tmp_path_factory.mktemp("ray") / "chainrule.db", ray_cluster, "--job-workers", "2")
    yield process
    process.kill()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[cr.Client]:
    with cr.Client(server.address, timeout=WAIT_SECONDS) as connected:
        yield connected


def start_job(
    client: cr.Client, dataset_id: str, replicas: int, steps: int, dropout: float = 0.0
) -> tuple[str, cr.Job]:
    graph_id = client.create_graph(classifier(dropout=dropout)).graph_id
    job = client.create_job(
        graph_id,
        dataset_id,
        loss="loss",
        optimizer=cr.Adam(0.02),
        feeds={"x": "x", "y": "y"},
        batch_size=21,
        max_steps=steps,
        seed=11,
        shuffle=True,
        replicas=replicas,
    )
    return graph_id, job


def until(condition: Callable[[], bool], what: str) -> None:
    """As tests.test_jobs.wait_for, with the time a Ray driver may take to join on a loaded machine."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)


def finished(job: cr.Job) -> None:
    info = job.wait(progress=False)
    assert info.state == "succeeded", info.error


def worker_pids(server: ServerProcess, job_id: str) -> list[list[int]]:
    """The worker processes of each run of the job's replicas, as the server logged them."""
    runs = []
    for line in list(server.log):
        match = WORKER_PIDS.search(line)
        if match and match.group(1) == job_id:
            runs.append([int(pid) for pid in match.group(3).split(",")])
    return runs


def reference(x: np.ndarray, y: np.ndarray, steps: int) -> Reference:
    """The in-process engine stepped over the batches `start_job`'s jobs take (shuffled, seed 11)."""
    engine = Reference(classifier(), optim.Adam(0.02), seed=11)
    batches = []
    for step in range(steps):
        epoch, start = divmod(step, len(x) // 21)
        order = np.random.Generator(np.random.Philox(np.random.SeedSequence([11, epoch]))).permutation(len(x))
        batches.append(order[start * 21 : start * 21 + 21])
    engine.run(lambda rows: {"x": x[rows], "y": y[rows]}, batches, 0.02)
    return engine


def relative_difference(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(got[name] - want[name]) / np.maximum(np.abs(want[name]), 1e-300))) for name in want)


# ---------------------------------------------------------------- without Ray
def test_shards_combine_to_the_whole_batch_gradient() -> None:
    """The weighted combination of shards equals the whole batch's loss and gradients, whatever the
    counts of ignored rows in each shard, and a shard that ignores every row counts for nothing."""
    built = build_graph(classifier().to_proto())
    graph = Plan(built)
    values = built.graph["nodes"].values
    parameters = {name: values[slot] for name, slot in graph.parameters.items()}
    x, y = classes(21, seed=3)
    y[14:21] = IGNORED  # the last of three shards averages over no row at all
    names = list(graph.parameters)
    reduction = loss_reduction(graph, "loss")
    assert reduction == Reduction(True, "y", IGNORED)
    mode = Mode(training=True, seed=1, step=0)
    whole = compute_shard(graph, parameters, {"x": x, "y": y}, "loss", names, reduction, mode)
    for replicas in (2, 3, 5):
        shards = [
            compute_shard(graph, parameters, {"x": x[rows], "y": y[rows]}, "loss", names, reduction, mode)
            for rows in split_rows(slice(0, 21), replicas)
        ]
        loss, gradients, _ = combine(shards, reduction)
        assert loss == pytest.approx(whole.loss, rel=1e-13)
        assert relative_difference(gradients, whole.gradients) < 1e-12


def test_split_rows_is_contiguous_and_fixed() -> None:
    assert split_rows(slice(10, 17), 3) == [slice(10, 13), slice(13, 15), slice(15, 17)]
    order = np.array([5, 3, 9, 1, 7])
    shards = split_rows(order, 2)
    assert [shard.tolist() for shard in shards] == [[5, 3, 9], [1, 7]]  # type: ignore[union-attr]
    assert [len(range(100)[shard]) for shard in split_rows(slice(0, 2), 4)] == [1, 1, 0, 0]  # type: ignore[index]


def test_create_job_refuses_what_replicas_cannot_do(fresh_server: ServerProcess) -> None:
    """Without --ray-address, beyond the batch, and with a loss whose reduction replicas cannot
    combine: INVALID_ARGUMENT naming the culprit, nothing queued."""
    with cr.Client(fresh_server.address, timeout=30) as connected:
        x, y = classes(30)
        dataset = connected.upload_dataset("classes", {"x": x, "y": y}, progress=False).dataset_id
        graph_id = connected.create_graph(classifier()).graph_id

        def refusal(graph: str, **options: object) -> str:
            with pytest.raises(cr.ChainruleError) as caught:
                connected.create_job(
                    graph,
                    dataset,
                    loss=str(options.pop("loss", "loss")),
                    optimizer=cr.Sgd(0.1),
                    feeds={"x": "x", "y": "y"},
                    batch_size=int(options.pop("batch_size", 8)),  # type: ignore[call-overload]
                    max_steps=3,
                    **options,  # type: ignore[arg-type]
                )
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
            return caught.value.message

        assert "--ray-address" in refusal(graph_id, replicas=2)
        assert "spec.replicas is 9; it must be from 1 to 8 (batch_size)" in refusal(graph_id, replicas=9)
        assert "spec.replicas is 31; it must be from 1 to 30 (the examples of dataset" in refusal(
            graph_id, replicas=31, batch_size=64
        )
        assert "spec.replicas is -1" in refusal(graph_id, replicas=-1)
        other = connected.create_graph(classifier(penalized=True)).graph_id
        message = refusal(other, replicas=2, loss="total")
        assert "'total' is a add node" in message and "softmax_cross_entropy" in message
        assert connected.list_jobs() == []


def test_replicas_are_capped_by_the_examples_of_a_batch_and_by_max_replicas() -> None:
    """A batch of more examples than the dataset holds gives no more shards than it has examples,
    and no job has more than MAX_REPLICAS, however large its batches."""
    spec = jpb.JobSpec(loss="loss", optimizer=gpb.Optimizer(sgd=gpb.Sgd(learning_rate=0.1)), feeds={"x": "x"})
    spec.batch_size, spec.replicas = 8192, MAX_REPLICAS
    assert plan_job(spec, dataset_of(5000), None, 10).replicas == MAX_REPLICAS
    for replicas, examples, message in [
        (MAX_REPLICAS + 1, 5000, f"must be from 1 to {MAX_REPLICAS} (the most a job may have)"),
        (7, 6, "must be from 1 to 6 (the examples of dataset 'd', its whole batch)"),
    ]:
        spec.replicas = replicas
        with pytest.raises(InvalidArgument, match=re.escape(message)) as refused:
            plan_job(spec, dataset_of(examples), None, 10)
        assert refused.value.subject == "spec.replicas"


def dataset_of(examples: int) -> StoredDataset:
    return StoredDataset(1, "d", "", "d", (ColumnSpec("x", "float64", (4,)),), examples, 32 * examples, "", 0.0)


def test_a_bogus_ray_address_exits_2_with_one_line(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "chainrule.server.cli", "serve", "--port", "0", "--db", str(tmp_path / "c.db")]
    done = subprocess.run([*command, "--ray-address", "bogus"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "chainrule: --ray-address 'bogus' is not auto, local, HOST:PORT of a Ray head or ray://HOST:PORT"
    ]


def test_ray_address_without_the_extra_exits_with_one_line(tmp_path: Path) -> None:
    """A server whose Python has no Ray (a `ray` that fails to import stands in for it) says what to install."""
    shadow = tmp_path / "shadow" / "ray"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    environment = {**os.environ, "PYTHONPATH": f"{shadow.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "chainrule.server.cli", "serve", "--port", "0", "--db", str(tmp_path / "c.db")]
    done = subprocess.run(
        [*command, "--ray-address", "local"], capture_output=True, text=True, env=environment, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "chainrule: --ray-address needs Ray, which is not installed: pip install 'chainrule[ray]'"
    ]


# ---------------------------------------------------------------- on Ray
def test_replicas_agree_with_one_replica_and_with_the_engine(client: cr.Client) -> None:
    """One replica on Ray computes the in-process engine's steps bit for bit; two and three replicas
    (shards of 11+10 and 7+7+7 rows, with different counts of ignored rows) give its parameters
    within 1e-12 relative after 60 float64 Adam steps."""
    x, y = classes(105)
    dataset = client.upload_dataset("classes", {"x": x, "y": y}, progress=False).dataset_id
    steps = 60
    runs = {replicas: start_job(client, dataset, replicas, steps) for replicas in (1, 2, 3)}
    for _, job in runs.values():
        finished(job)
    parameters = {replicas: client.get_parameters(graph_id) for replicas, (graph_id, _) in runs.items()}

    engine = reference(x, y, steps)
    assert_same_bits(parameters[1], engine.parameters[-1])
    assert runs[1][1].history().losses == engine.losses
    for replicas in (2, 3):
        assert relative_difference(parameters[replicas], parameters[1]) < 1e-12, replicas


def test_a_server_joins_through_ray_client(ray_cluster: RayHeadFixture, ray_environment: None, tmp_path: Path) -> None:
    """--ray-address ray://127.0.0.1:PORT, the head's Ray Client server: the server sees the
    cluster's CPUs and that no autoscaler adds more (so refuses replicas beyond them); one replica
    computes the in-process engine's steps bit for bit, two give its parameters within 1e-12
    relative; and while the jobs run, every TCP socket of the server (its drivers among them) and of
    the head (the Ray Client servers it starts for the drivers among them) is on 127.0.0.1."""
    address = ray_cluster.client_address()
    server = ray_server(tmp_path / "chainrule.db", ray_cluster, "--job-workers", "3", address=address)
    try:
        with cr.Client(server.address, timeout=WAIT_SECONDS) as client:
            x, y = classes(105, seed=6)
            dataset = client.upload_dataset("ray-client", {"x": x, "y": y}, progress=False).dataset_id
            server.wait_for_line(
                f"the Ray cluster at {address} has 2 CPUs on its nodes, and no autoscaler", WAIT_SECONDS
            )
            with pytest.raises(cr.ChainruleError) as refused:
                start_job(client, dataset, 5, 10)
            assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION, refused.value.message
            steps = 20
            runs = {replicas: start_job(client, dataset, replicas, steps) for replicas in (1, 2)}
            _, endless = start_job(client, dataset, 1, 10**6)  # the three fill the cluster's 2 CPUs
            try:
                wait_running(endless, past_step=5)
                assert_loopback_only(server, ray_cluster)
                for _, job in runs.values():
                    finished(job)
            finally:
                endless.cancel()
                wait_for(lambda: endless.info().ended, "the job to end")
            parameters = {replicas: client.get_parameters(graph_id) for replicas, (graph_id, _) in runs.items()}
            losses = runs[1][1].history().losses
        engine = reference(x, y, steps)
        assert_same_bits(parameters[1], engine.parameters[-1])
        assert losses == engine.losses
        assert relative_difference(parameters[2], engine.parameters[-1]) < 1e-12
    finally:
        server.kill()


def test_a_killed_replica_is_replaced_and_the_job_finishes_correct(client: cr.Client, server: ServerProcess) -> None:
    """SIGKILL one replica's worker process mid-job: the step fails, the job goes back to its last
    commit with fresh replicas, and ends with the parameters of a run never interrupted (dropout
    included: each replica's masks are keyed by the job's seed, step and replica)."""
    x, y = classes(105, seed=1)
    dataset = client.upload_dataset("classes-1", {"x": x, "y": y}, progress=False).dataset_id
    steps = 400
    clean_graph, clean = start_job(client, dataset, 2, steps, dropout=0.3)
    finished(clean)
    graph_id, job = start_job(client, dataset, 2, steps, dropout=0.3)
    wait_running(job, past_step=20)
    wait_for(lambda: worker_pids(server, job.job_id) != [], "the job's replicas to be logged")
    os.kill(worker_pids(server, job.job_id)[0][1], signal.SIGKILL)
    finished(job)
    assert len(worker_pids(server, job.job_id)) == 2  # a second set of replicas finished it
    assert raw_job(server, job.job_id).resumes == 1
    assert_same_bits(client.get_parameters(graph_id), client.get_parameters(clean_graph))
    assert any("a replica died" in line for line in server.log)


def test_a_job_outlives_the_ray_head(client: cr.Client, server: ServerProcess, ray_cluster: RayHeadFixture) -> None:
    """The head SIGKILLed mid-job takes every actor with it; a new head started on the same address,
    the job resumes from its last commit and ends bit-identical to an uninterrupted run."""
    x, y = classes(105, seed=2)
    dataset = client.upload_dataset("classes-2", {"x": x, "y": y}, progress=False).dataset_id
    steps = 400
    clean_graph, clean = start_job(client, dataset, 2, steps)
    finished(clean)
    graph_id, job = start_job(client, dataset, 2, steps)
    wait_running(job, past_step=30)
    try:
        ray_cluster.lose()
        time.sleep(3)  # the job's replicas are gone, and so is the cluster, for a while
        assert job.info().state == "running"
    finally:
        ray_cluster.restart()
    finished(job)
    assert len(worker_pids(server, job.job_id)) >= 2
    assert raw_job(server, job.job_id).resumes == 1, "one loss, however many attempts to rejoin it took"
    assert_same_bits(client.get_parameters(graph_id), client.get_parameters(clean_graph))


def test_replicas_beyond_the_cluster_are_refused_and_one_waiting_for_cpus_says_so_and_cancels_at_once(
    client: cr.Client, server: ServerProcess, ray_cluster: RayHeadFixture
) -> None:
    """Five replicas of half a CPU ask for more than the 2-CPU cluster has: FAILED_PRECONDITION naming
    spec.replicas. Four fit, but wait while another job holds one CPU: the job says so, and a cancel
    ends the wait (the driver stops when asked, not killed after CLOSE_SECONDS)."""
    x, y = classes(105, seed=7)
    dataset = client.upload_dataset("cpus", {"x": x, "y": y}, progress=False).dataset_id
    server.wait_for_line(f"the Ray cluster at {ray_cluster.address} has 2 CPUs on its nodes", WAIT_SECONDS)
    with pytest.raises(cr.ChainruleError) as refused:
        start_job(client, dataset, 5, 10)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "spec.replicas is 5" in refused.value.message and "has 2 on all its nodes" in refused.value.message
    _, holder = start_job(client, dataset, 2, 10**6)
    try:
        until(lambda: holder.info().step > 0, "the job to run")
        _, waiting = start_job(client, dataset, 4, 10**6)
        until(lambda: "wait for the Ray cluster's free CPUs" in waiting.info().status_message, "the wait to show")
        assert waiting.info().step == 0
        waiting.cancel()
        assert waiting.wait(progress=False, raise_on_failure=False).state == "cancelled"
    finally:
        holder.cancel()
        wait_for(lambda: holder.info().ended, "the job to end")
    assert not [line for line in server.log if f"job {waiting.job_id}: its Ray driver did not end" in line]


def test_past_its_restarts_a_job_fails_naming_the_flag_and_without_ray_replicas_are_never_run(
    ray_cluster: RayHeadFixture, ray_environment: None, tmp_path: Path
) -> None:
    """With --job-max-restarts 0 a killed replica fails the job, naming the flag. A replicated job
    left running by a Ray server restarted without --ray-address is not run as one replica: the
    server says at start that it waits for a server with Ray, GetJob says so too, and a job created
    after it runs and ends while it stays where it was."""
    db = tmp_path / "chainrule.db"
    server = ray_server(db, ray_cluster, "--job-max-restarts", "0")
    try:
        with cr.Client(server.address, timeout=WAIT_SECONDS) as client:
            x, y = classes(105, seed=8)
            dataset = client.upload_dataset("restarts", {"x": x, "y": y}, progress=False).dataset_id
            _, doomed = start_job(client, dataset, 2, 10**6)
            server.wait_for_line(f"job {doomed.job_id}: 2 replicas on Ray", WAIT_SECONDS)
            os.kill(worker_pids(server, doomed.job_id)[0][1], signal.SIGKILL)
            info = doomed.wait(progress=False, raise_on_failure=False)
            assert info.state == "failed" and "a replica died" in info.error, info.error
            assert "given up after 0 restarts (--job-max-restarts)" in info.error
            _, left = start_job(client, dataset, 2, 5000)
            until(lambda: left.info().step > 5, "the job to commit a step")
        assert server.stop() == 0  # the job commits and stays RUNNING, for the next start
    finally:
        server.kill()
    plain = ServerProcess(db).start()
    try:
        plain.wait_for_line(f"job {left.job_id} (RUNNING) has 2 replicas, which run on a Ray cluster")
        with cr.Client(plain.address, timeout=WAIT_SECONDS) as client:
            before = client.get_job(left.job_id).info()
            graph_id = client.create_graph(classifier()).graph_id
            dataset = client.list_datasets()[0].dataset_id
            plain_job = client.create_job(
                graph_id,
                dataset,
                loss="loss",
                optimizer=cr.Sgd(0.1),
                feeds={"x": "x", "y": "y"},
                batch_size=21,
                max_steps=3,
            )
            finished(plain_job)  # claimed after `left` would have been, had this server taken it
            after = client.get_job(left.job_id).info()
        assert (after.state, after.step, after.resumes) == ("running", before.step, before.resumes)
        assert before.step >= 5 and "spec.replicas is 2" in after.status_message
        assert "waits for a server started with --ray-address" in after.status_message
    finally:
        plain.kill()


def test_batch_norm_keeps_the_running_statistics_of_replica_0(client: cr.Client) -> None:
    """batch_norm on the inputs: after a 2-replica job its running mean and variance are those of the
    first shard of each batch (rows 0-10 of 21), as the README says, not of the whole batch."""
    g = cr.GraphBuilder("normed", default_dtype="float64")
    x = g.input("x", dtype="float64", shape=[-1, 4])
    y = g.input("y", dtype="int64", shape=[-1])
    normed = cr.batch_norm(
        x,
        g.parameter("scale", np.ones(4)),
        g.parameter("bias", np.zeros(4)),
        g.state("mean", np.zeros(4)),
        g.state("var", np.ones(4)),
    )
    cr.softmax_cross_entropy(normed @ g.parameter("w", np.full((4, CLASSES), 0.1)), y, name="loss")
    inputs, labels = classes(63, seed=9)
    dataset = client.upload_dataset("normed", {"x": inputs, "y": labels}, progress=False).dataset_id
    graph_id = client.create_graph(g).graph_id
    job = client.create_job(
        graph_id,
        dataset,
        loss="loss",
        optimizer=cr.Sgd(0.1),
        feeds={"x": "x", "y": "y"},
        batch_size=21,
        max_steps=3,
        shuffle=False,
        replicas=2,
    )
    finished(job)
    state = client.get_parameters(graph_id, ["mean", "var"])
    mean, var = np.zeros(4), np.ones(4)
    for step in range(3):
        shard = inputs[21 * step : 21 * step + 11]
        mean = 0.9 * mean + 0.1 * shard.mean(axis=0)
        var = 0.9 * var + 0.1 * shard.var(axis=0, ddof=1)
    np.testing.assert_allclose(state["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(state["var"], var, rtol=1e-12)


def test_replica_errors_fail_the_job_with_the_graph_s_message(client: cr.Client) -> None:
    """What a replica's graph refuses (a label out of range) fails the job, named as in-process."""
    x, y = classes(42)
    y[30] = 7
    dataset = client.upload_dataset("bad-label", {"x": x, "y": y}, progress=False).dataset_id
    _, job = start_job(client, dataset, 2, 4)
    info = job.wait(progress=False, raise_on_failure=False)
    assert info.state == "failed"
    assert "label 7 is out of range for 3 classes" in info.error


def test_eight_jobs_across_two_servers_and_one_ray_cluster_finish_correct(
    postgres: PostgresServer, ray_cluster: RayHeadFixture, ray_environment: None
) -> None:
    """Two servers on one PostgreSQL share the session's Ray cluster: eight 2-replica jobs created on
    both (their replicas waiting for the cluster's CPUs in turn) all end with the parameters the
    in-process engine computes, within 1e-12 relative."""
    url = postgres.database()
    servers = [ray_server(url, ray_cluster, "--job-workers", "2") for _ in range(2)]
    clients = [cr.Client(server.address, timeout=WAIT_SECONDS) for server in servers]
    try:
        x, y = classes(105, seed=4)
        dataset = clients[0].upload_dataset("shared", {"x": x, "y": y}, progress=False).dataset_id
        steps = 25
        jobs = [start_job(clients[index % 2], dataset, 2, steps) for index in range(8)]
        for _, job in jobs:
            finished(job)
        expected = reference(x, y, steps).parameters[-1]
        for index, (graph_id, _) in enumerate(jobs):
            parameters = clients[(index + 1) % 2].get_parameters(graph_id)  # read through the other server
            assert relative_difference(parameters, expected) < 1e-12, index
    finally:
        for client, server in zip(clients, servers, strict=True):
            client.close()
            server.kill()


def test_the_cluster_and_the_drivers_use_loopback_only(
    client: cr.Client, server: ServerProcess, ray_cluster: RayHeadFixture
) -> None:
    """While a replicated job runs, every TCP socket of the Ray head's processes (its actors among
    them) and of the server's (its job's driver among them) is on 127.0.0.1 at both ends."""
    x, y = classes(105, seed=5)
    dataset = client.upload_dataset("loopback", {"x": x, "y": y}, progress=False).dataset_id
    _, job = start_job(client, dataset, 2, 10**6)
    try:
        wait_running(job, past_step=5)
        assert_loopback_only(server, ray_cluster)
    finally:
        job.cancel()
        wait_for(lambda: job.info().ended, "the job to end")
