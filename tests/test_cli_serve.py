"""`chainrule serve` on the command line: the real `chainrule` program, run as a subprocess.

Flags are validated before anything starts; a server that cannot start says why in one line and
exits 2 rather than printing a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from chainrule.server.cli import build_parser
from chainrule.server.store.migrations import MIGRATIONS, migrate_sqlite
from chainrule.v1 import graph_service_pb2 as pb
from tests.server_process import ServerProcess

CHAINRULE = shutil.which("chainrule") or "chainrule"


def chainrule(*args: str, timeout: float = 60, **options: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CHAINRULE, *args], capture_output=True, text=True, timeout=timeout, **options)  # type: ignore[call-overload]


def assert_one_line_refusal(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Exit code 2 and a single line on stderr holding every fragment; no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 or lines[0].startswith("usage:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, result.stderr)


@pytest.fixture
def listening_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield int(taken.getsockname()[1])


def test_serve_help_lists_the_log_options_and_reads_right() -> None:
    help_text = chainrule("serve", "--help", check=True).stdout
    assert "--log-format" in help_text and "--log-level" in help_text
    for flag in ("--stream-idle-seconds", "--max-concurrent-rpcs-per-tenant", "--max-concurrent-compute"):
        assert flag in help_text, flag
    reflection = re.search(r"--no-reflection\s+(.*?)\n  --", help_text, re.DOTALL)
    assert reflection is not None
    assert "default: True" not in reflection.group(1) and "(default: None)" not in help_text


def test_log_options_work_after_serve_as_before_it(tmp_path: Path) -> None:
    for global_args, serve_args in ((["--log-format", "json"], []), ([], ["--log-format", "json"])):
        server = ServerProcess(tmp_path / "db", serve_args, global_args=global_args).start()
        try:
            server.stub().ListGraphs(pb.ListGraphsRequest(), timeout=10)
        finally:
            server.stop()
        logged = [line for line in server.log if line.startswith("{")]
        assert logged, server.log
        assert all(json.loads(line)["level"] for line in logged)
    quiet = ServerProcess(tmp_path / "db", ["--log-level", "warning"]).start()
    quiet.stop()
    assert not any(" INFO " in line for line in quiet.log), quiet.log


IMPOSSIBLE_VALUES = [
    ("--port", "99999", "from 0 to 65535"),
    ("--port", "-1", "from 0 to 65535"),
    ("--metrics-port", "70000", "from 0 to 65535"),
    ("--max-nodes", "-1", "at least 1"),
    ("--max-nodes", "0", "at least 1"),
    ("--max-nodes", "many", "not a whole number"),
    ("--max-name-length", "0", "at least 1"),
    ("--max-attrs", "-1", "at least 0"),
    ("--max-attr-list-length", "-5", "at least 0"),
    ("--max-tensor-elements", "0", "at least 1"),
    ("--max-request-memory-mb", "0", "at least 1"),
    ("--max-live-graphs", "0", "at least 1"),
    ("--max-message-mb", "4096", "from 1 to 2047"),
    ("--max-concurrent-rpcs", "0", "at least 1"),
    ("--max-concurrent-rpcs-per-tenant", "0", "at least 1"),
    ("--max-concurrent-compute", "0", "at least 1"),
    ("--workers", "0", "at least 1"),
    ("--checkpoint-every", "0", "at least 1"),
    ("--grace-seconds", "-1", "at least 0"),
    ("--grace-seconds", "nan", "at least 0"),
    ("--stream-idle-seconds", "0", "more than 0"),
    ("--stream-idle-seconds", "inf", "more than 0"),
    ("--log-level", "chatty", "invalid choice"),
]


def test_impossible_flag_values_are_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    """Every numeric flag of `serve`, in process: the same parser the program runs."""
    for flag, value, fragment in IMPOSSIBLE_VALUES:
        with pytest.raises(SystemExit) as raised:
            build_parser().parse_args(["serve", f"{flag}={value}"])
        assert raised.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert flag in error and fragment in error, (flag, value, error)
    for action in serve_parser()._actions:
        if action.option_strings and action.type not in (None, str, str.upper):
            with pytest.raises(SystemExit):  # every numeric flag, including ones added later
                build_parser().parse_args(["serve", f"{action.option_strings[0]}=-1"])
            assert action.option_strings[0] in capsys.readouterr().err


def serve_parser() -> argparse.ArgumentParser:
    commands = next(action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction))
    return commands.choices["serve"]


@pytest.mark.parametrize(("flag", "value", "fragment"), [IMPOSSIBLE_VALUES[0], IMPOSSIBLE_VALUES[3]])
def test_the_program_refuses_them_before_anything_starts(flag: str, value: str, fragment: str, tmp_path: Path) -> None:
    result = chainrule("serve", "--db", str(tmp_path / "db"), "--port", "0", flag, value, timeout=30)
    assert_one_line_refusal(result, flag, fragment)
    assert not (tmp_path / "db").exists()


def test_a_port_in_use_says_so_in_one_line(listening_port: int, tmp_path: Path) -> None:
    result = chainrule("serve", "--db", str(tmp_path / "db"), "--port", str(listening_port))
    assert_one_line_refusal(result, f"127.0.0.1:{listening_port}", "in use")


def test_a_port_in_use_says_so_in_one_line_before_a_database_is_upgraded(listening_port: int, tmp_path: Path) -> None:
    """The address is checked before the database is opened, so no line about the schema comes first."""
    older = tmp_path / "older.db"
    with contextlib.closing(sqlite3.connect(older, isolation_level=None)) as db:
        migrate_sqlite(db, str(older), MIGRATIONS[:1])
    result = chainrule("serve", "--db", str(older), "--port", str(listening_port))
    assert_one_line_refusal(result, f"127.0.0.1:{listening_port}", "in use")
    with contextlib.closing(sqlite3.connect(older)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (1,), "the database was upgraded all the same"


def test_a_host_that_is_no_address_says_so_in_one_line(tmp_path: Path) -> None:
    result = chainrule("serve", "--db", str(tmp_path / "db"), "--host", "256.1.1.1", "--port", "0")
    assert_one_line_refusal(result, "cannot listen on 256.1.1.1:0")
    assert not (tmp_path / "db").exists()


def test_signals_sent_as_soon_as_the_address_is_printed_are_handled(tmp_path: Path) -> None:
    """The handlers are installed before the address line, so a SIGTERM sent the moment it is read
    stops the server gracefully (exit 0) instead of killing it (-15); three servers at once, to
    give the signal every chance to arrive early."""
    servers = [
        subprocess.Popen(
            [CHAINRULE, "serve", "--port", "0", "--db", str(tmp_path / f"{index}.db")],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for index in range(3)
    ]
    for server in servers:
        assert server.stdout is not None
        for line in server.stdout:
            if "chainrule serving on" in line:
                server.send_signal(signal.SIGTERM)
                break
    assert [server.wait(timeout=60) for server in servers] == [0, 0, 0]


def test_a_metrics_port_in_use_says_so_in_one_line(listening_port: int, tmp_path: Path) -> None:
    result = chainrule("serve", "--db", str(tmp_path / "db"), "--port", "0", "--metrics-port", str(listening_port))
    assert_one_line_refusal(result, f"metrics on port {listening_port}", "in use")


def test_a_file_that_is_not_sqlite_says_so_in_one_line(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("these are my notes, not a database\n" * 100)
    result = chainrule("serve", "--db", str(notes), "--port", "0")
    assert_one_line_refusal(result, str(notes), "not a SQLite database")
    assert notes.read_text() == "these are my notes, not a database\n" * 100


def test_a_missing_directory_says_so_in_one_line(tmp_path: Path) -> None:
    result = chainrule("serve", "--db", str(tmp_path / "no" / "such" / "dir" / "chainrule.db"), "--port", "0")
    assert_one_line_refusal(result, str(tmp_path / "no" / "such" / "dir"), "does not exist")


def no_file_writes() -> None:
    """In the child: every write to a file fails (EFBIG), as on a read-only or full file system.
    chmod does not stop root and nothing may be mounted, so RLIMIT_FSIZE stands in."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))


def test_a_file_system_refusing_writes_says_so_in_one_line(tmp_path: Path) -> None:
    result = chainrule("serve", "--db", str(tmp_path / "chainrule.db"), "--port", "0", preexec_fn=no_file_writes)
    assert_one_line_refusal(result, str(tmp_path / "chainrule.db"), "refused a write")


def test_metrics_port_zero_prints_the_port_it_bound(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "db", ["--metrics-port", "0"]).start()
    try:
        line = next((line for line in server.log if "metrics on port" in line), "")
        match = re.search(r"metrics on port (\d+)", line)
        assert match and int(match.group(1)) > 0, server.log
        text = urllib.request.urlopen(f"http://127.0.0.1:{match.group(1)}/metrics", timeout=10).read().decode()
        assert "chainrule_graphs" in text
    finally:
        server.kill()
