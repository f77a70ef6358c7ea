"""Measurement 15: what a shared database costs a call: `Forward` on a small graph through a server on
PostgreSQL, against the same server on SQLite, timed interleaved in the same run.

On a shared database every call that names a graph first reads the graph's version from the database
(one indexed read; see README's "Scaling out"), so that a server's cached parameters never lag behind
another server's commits. `Forward` and `Backward` read it once per call. A server on SQLite owns its
file and reads nothing. So what separates the two servers is that read, a round trip to PostgreSQL,
which the details also time on their own from this process: through the server's store
(`graph_version`, on a connection its pool lends, checked first with an empty query only when it sat
idle over a second or its socket has news: see PostgresStore._check) and as a bare query on a
connection of its own.

The PostgreSQL is the bench's own: initdb and pg_ctl in a temporary directory, listening on a free port
of 127.0.0.1 only with a password (scram-sha-256, as a deployment would), stopped and removed at the
end. initdb refuses to run as root, so as root the bench runs PostgreSQL as an unprivileged user
(`chainrule-pg`, which tools/setup-dev.sh creates, else `nobody`). When PostgreSQL's programs or
psycopg are not installed, the bench says so and skips the row.

`python -m bench.store_forward [--calls N] [--repeats N]` runs it alone.
"""

from __future__ import annotations

import argparse
import glob
import os
import pwd
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import chainrule.client as cr
from bench import report
from bench.measure import Measurement, Target, interleaved
from bench.server import ChildServer

WIDTH = 16
CALLS = 50
"""Forward calls per sample, of which the sample is the median."""
REPEATS = 20
USER = "bench"
RUN_AS = ("chainrule-pg", "nobody")
TENANT = ""
"""The tenant of a server without --auth-tokens."""


def initdb_directory() -> Path | None:
    """Where PostgreSQL's server programs are: where pg_config says, else the newest of Debian's."""
    try:
        found = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
        if (Path(found) / "initdb").exists():
            return Path(found)
    except (OSError, subprocess.CalledProcessError):
        pass
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda path: int(Path(path).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def postgres_missing() -> str | None:
    """Why the row cannot run here, or None."""
    if initdb_directory() is None:
        return "PostgreSQL is not installed (no initdb; tools/setup-dev.sh installs Debian's postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e '.[postgres]')"
    if os.geteuid() == 0 and not any(_user_exists(name) for name in RUN_AS):
        return f"running as root and none of the users {', '.join(RUN_AS)} exists to run PostgreSQL as"
    return None


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrivatePostgres:
    """A PostgreSQL cluster of the bench's own in a temporary directory, on 127.0.0.1 only."""

    def __init__(self) -> None:
        bindir = initdb_directory()
        assert bindir is not None, "PostgreSQL is not installed"
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="chainrule-bench-pg-"))
        self.password = secrets.token_hex(16)
        self.port = 0
        self.run_as = next(name for name in RUN_AS if _user_exists(name)) if os.geteuid() == 0 else None
        if self.run_as is not None:
            os.chown(self.root, pwd.getpwnam(self.run_as).pw_uid, -1)
        password_file = self.root / "password"
        password_file.write_text(self.password + "\n")
        if self.run_as is not None:
            os.chown(password_file, pwd.getpwnam(self.run_as).pw_uid, -1)
        try:
            self._run(
                "initdb",
                *("-D", str(self.root / "data"), "-U", USER, f"--pwfile={password_file}"),
                *("--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale"),
                *("--no-sync", "--no-instructions"),
            )
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise
        password_file.unlink()

    def _run(self, program: str, *arguments: str) -> None:
        command = [str(self.bindir / program), *arguments]
        if self.run_as is not None:
            command = ["runuser", "-u", self.run_as, "--", *command]
        finished = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if finished.returncode != 0:
            raise RuntimeError(f"{program} failed ({finished.returncode}): {finished.stderr}{finished.stdout}")

    def start(self) -> PrivatePostgres:
        self.port = free_port()
        settings = {"listen_addresses": "127.0.0.1", "port": str(self.port), "unix_socket_directories": str(self.root)}
        options = " ".join(f"-c {key}={value}" for key, value in settings.items())
        data, log = str(self.root / "data"), str(self.root / "server.log")
        self._run("pg_ctl", "-D", data, "-l", log, "-w", "-o", options, "start")
        return self

    @property
    def url(self) -> str:
        """The database's URL without its password, which servers read from PGPASSWORD."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"

    def close(self) -> None:
        try:
            if (self.root / "data" / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def small_graph() -> cr.GraphBuilder:
    """tanh(x @ w + b) on rows of WIDTH float32 values: a call's cost is the call, not the arithmetic."""
    rng = np.random.default_rng(0)
    g = cr.GraphBuilder("small", default_dtype="float32")
    x = g.input("x", dtype="float32", shape=[-1, WIDTH])
    w = g.parameter("w", rng.standard_normal((WIDTH, WIDTH)).astype(np.float32))
    b = g.parameter("b", np.zeros(WIDTH, dtype=np.float32))
    cr.tanh(x @ w + b).named("y")
    return g


def serve(db: str, cache: Path) -> ChildServer:
    command = ["serve", "--host", "127.0.0.1", "--port", "0", "--db", db, "--dataset-cache", str(cache)]
    return ChildServer([sys.executable, "-m", "chainrule.server.cli", *command]).start(timeout=120)


def _median_seconds(call: Callable[[], object], calls: int) -> Callable[[], float]:
    """A contender of `interleaved`: the median seconds of `calls` calls."""

    def sample() -> float:
        samples = []
        for _ in range(calls):
            start = time.perf_counter()
            call()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    return sample


def measure_store_forward(calls: int = CALLS, repeats: int = REPEATS) -> Measurement:
    """Row 15: the median Forward latency on PostgreSQL against SQLite, one sample per `calls` calls
    each, alternating, `repeats` rounds after a warm-up round; and the version read on its own."""
    import psycopg

    from chainrule.server.store import open_store

    feeds = {"x": np.random.default_rng(1).standard_normal((1, WIDTH)).astype(np.float32)}
    postgres = PrivatePostgres()
    servers: list[ChildServer] = []
    saved = os.environ.get("PGPASSWORD")
    directory = tempfile.TemporaryDirectory(prefix="chainrule-bench-stores-")
    try:
        postgres.start()
        os.environ["PGPASSWORD"] = postgres.password
        root = Path(directory.name)
        servers.append(serve(str(root / "bench.db"), root / "sqlite.cache"))
        servers.append(serve(postgres.url, root / "postgres.cache"))
        clients = [cr.Client(server.address) for server in servers]
        graphs = [client.create_graph(small_graph()).graph_id for client in clients]
        store = open_store(postgres.url)
        bare = psycopg.connect(postgres.url, autocommit=True)
        query = "SELECT version FROM graphs WHERE graph_id = %s AND tenant = %s"
        runs = {
            name: _median_seconds(lambda client=client, graph=graph: client.forward(graph, feeds, ["y"]), calls)
            for name, client, graph in zip(("sqlite", "postgres"), clients, graphs, strict=True)
        }
        runs["store read"] = _median_seconds(lambda: store.graph_version(graphs[1], TENANT), calls)
        runs["bare read"] = _median_seconds(lambda: bare.execute(query, (graphs[1], TENANT)).fetchone(), calls)
        interleaved(runs, 1)
        samples = interleaved(runs, repeats)
        bare.close()
        store.close()
        for client in clients:
            client.close()
    finally:
        for server in servers:
            server.stop()
        if saved is None:
            os.environ.pop("PGPASSWORD", None)
        else:
            os.environ["PGPASSWORD"] = saved
        postgres.close()
        directory.cleanup()
    ms = {name: 1e3 * statistics.median(values) for name, values in samples.items()}
    return Measurement(
        key="store_forward",
        title=f"15 Forward, small graph, server on PostgreSQL vs on SQLite, {calls} x {repeats} calls",
        unit="ms",
        chainrule=ms["postgres"],
        baselines={"sqlite": ms["sqlite"]},
        ratio_baseline="sqlite",
        target=Target("<=", 1.5),
        details={
            "calls": calls,
            "repeats": repeats,
            "version_read_ms": {"through_the_store": ms["store read"], "bare_query": ms["bare read"]},
            "samples_ms": {name: [1e3 * value for value in values] for name, values in samples.items()},
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store_forward", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=CALLS, help="Forward calls per sample (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="rounds (default: %(default)s)")
    arguments = parser.parse_args(argv)
    missing = postgres_missing()
    if missing is not None:
        print(f"row 15 skipped: {missing}")
        return 0
    before = os.getloadavg()
    measurement = measure_store_forward(arguments.calls, arguments.repeats)
    after = os.getloadavg()
    print(report.table([measurement]))
    reads = measurement.details["version_read_ms"]
    print(
        f"the version read alone: {reads['through_the_store']:.3f} ms through the store, "
        f"{reads['bare_query']:.3f} ms as a bare query"
    )
    print(f"load average {before[0]:.2f} before, {after[0]:.2f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
