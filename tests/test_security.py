"""Bearer tokens, tenant isolation, TLS and mutual TLS, against real server processes.

Tenant isolation runs on both backends (a SQLite file, then PostgreSQL), since the store's queries
are what keep one tenant's graphs from another; tokens, their reload, TLS and the warning about
binds beyond loopback are checked before any call reaches the store, and run on SQLite only."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import chainrule.client as cr
from chainrule.server.app import exposure_warning
from tests.server_process import ServerProcess

ALICE, BOB, MALLORY = "alice-secret-token-1", "bob-secret-token-2", "mallory-token-3"


def lecture() -> cr.GraphBuilder:
    graph = cr.GraphBuilder("lecture")
    x, y, z = graph.input("x"), graph.input("y"), graph.input("z")
    ((x + y) * z).named("f")
    return graph


@pytest.fixture
def secured(new_db: Callable[[], str], tmp_path: Path) -> Iterator[ServerProcess]:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# token tenant\n{ALICE} alice\n{BOB} bob\n")
    process = ServerProcess(new_db(), ["--auth-tokens", str(tokens)]).start()
    yield process
    process.kill()


def test_every_call_but_health_needs_a_known_token(secured: ServerProcess) -> None:
    with cr.Client(secured.address) as anonymous, cr.Client(secured.address, token=MALLORY) as stranger:
        for client in (anonymous, stranger):
            with pytest.raises(cr.ChainruleError) as raised:
                client.list_graphs()
            assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(cr.ChainruleError) as raised:
                list(client.train("any", [{}], loss="f", optimizer=cr.Sgd(0.1)))
            assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(secured.address))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    assert not any(token in line for line in secured.log for token in (ALICE, BOB, MALLORY))


@pytest.mark.both_backends
def test_tenants_see_only_their_own_graphs(secured: ServerProcess) -> None:
    with cr.Client(secured.address, token=ALICE) as alice, cr.Client(secured.address, token=BOB) as bob:
        mine = alice.create_graph(lecture()).graph_id
        theirs = bob.create_graph(lecture()).graph_id
        assert [info.graph_id for info in alice.list_graphs()] == [mine]
        assert [info.graph_id for info in bob.list_graphs()] == [theirs]
        feeds = {"x": 1.0, "y": 2.0, "z": 3.0}
        calls = {
            "get": lambda: bob.get_graph(mine),
            "forward": lambda: bob.forward(mine, feeds, ["f"]),
            "backward": lambda: bob.gradients(mine, feeds, loss="f", wrt=["x"]),
            "delete": lambda: bob.delete_graph(mine),
            "parameters": lambda: bob.get_parameters(mine),
        }
        for name, call in calls.items():
            with pytest.raises(cr.ChainruleError) as raised:
                call()
            assert raised.value.code == grpc.StatusCode.NOT_FOUND, name
            assert raised.value.message == f"graph '{mine}' not found", name
        assert float(alice.forward(mine, feeds, ["f"])["f"]) == 9.0


def test_sighup_rereads_the_token_file(secured: ServerProcess, tmp_path: Path) -> None:
    """The reload is awaited by its log line (the server logs each load of the file), not by retrying calls."""
    secured.wait_for_line("loaded 2 token(s) for 2 tenant(s)")
    (tmp_path / "tokens").write_text(f"{BOB} bob\n{MALLORY} mallory\n{MALLORY}-2 mallory\n")
    secured.signal(signal.SIGHUP)
    secured.wait_for_line("loaded 3 token(s) for 2 tenant(s)")
    with cr.Client(secured.address, token=MALLORY, timeout=30) as mallory:
        assert mallory.list_graphs() == []
    with cr.Client(secured.address, token=ALICE, timeout=30) as alice, pytest.raises(cr.ChainruleError) as raised:
        alice.list_graphs()
    assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl on the fly."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr")  # fmt: skip
        (folder / f"{name}.ext").write_text(extension + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext")  # fmt: skip
    return {name: folder / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def test_tls_and_mutual_tls(tmp_path: Path) -> None:
    files = make_certificates(tmp_path)
    tls_args = ["--tls-cert", str(files["server.pem"]), "--tls-key", str(files["server.key"])]
    server = ServerProcess(tmp_path / "tls.db", tls_args, tls_ca=files["ca.pem"]).start()
    try:
        with cr.Client(server.address, tls_ca=files["ca.pem"], timeout=10) as client:
            graph_id = client.create_graph(lecture()).graph_id
            assert float(client.forward(graph_id, {"x": 1.0, "y": 1.0, "z": 2.0}, ["f"])["f"]) == 4.0
        with cr.Client(server.address, timeout=5) as plaintext, pytest.raises(cr.ChainruleError) as raised:
            plaintext.list_graphs()
        assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.kill()
    mutual_args = [*tls_args, "--tls-client-ca", str(files["ca.pem"])]
    mutual = ServerProcess(tmp_path / "mtls.db", mutual_args, tls_ca=files["ca.pem"],
                           tls_client=(files["client.pem"], files["client.key"])).start()  # fmt: skip
    try:
        with cr.Client(mutual.address, tls_ca=files["ca.pem"], timeout=5) as no_certificate:
            with pytest.raises(cr.ChainruleError) as raised:
                no_certificate.list_graphs()
            assert raised.value.code == grpc.StatusCode.UNAVAILABLE
        with cr.Client(
            mutual.address, tls_ca=files["ca.pem"], tls_cert=files["client.pem"], tls_key=files["client.key"]
        ) as client:
            assert client.list_graphs() == []
    finally:
        mutual.kill()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "192.0.2.7", "chainrule.example"])
def test_without_tokens_a_bind_beyond_loopback_is_warned_about(host: str) -> None:
    """The decision and its words, checked without listening beyond loopback (tests never do)."""
    warning = exposure_warning(host, f"{host}:50051", tokens=False)
    assert warning is not None and f"serving {host}:50051 without --auth-tokens" in warning
    assert "anyone who can reach it" in warning
    assert exposure_warning(host, f"{host}:50051", tokens=True) is None


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "localhost", "::1", "[::1]"])
def test_loopback_binds_are_not_warned_about(host: str) -> None:
    assert exposure_warning(host, f"{host}:50051", tokens=False) is None


def test_a_loopback_server_without_tokens_logs_no_warning(tmp_path: Path) -> None:
    quiet = ServerProcess(tmp_path / "loopback.db").start()
    quiet.stop()
    assert any("listening on" in line for line in quiet.log)
    assert not any("without --auth-tokens" in line for line in quiet.log)
