"""docker-compose.cluster.yml, checked statically (no Docker here): its services, their images and
builds, healthchecks and dependencies, and every command against the real command line it runs:
`chainrule serve` and `chainrule health` through chainrule's own parser, `ray start` and `ray status`
through Ray's."""

from __future__ import annotations

import re
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from chainrule.server.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ("chainrule-a", "chainrule-b")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # what importing Ray's command line says


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.cluster.yml").read_text())
    return loaded


def ray_options(command: str) -> set[str]:
    from ray.scripts import scripts  # slow to import: only when the test runs

    click_command = getattr(scripts, command)
    return {option for parameter in click_command.params for option in parameter.opts}


def ray_arguments(command: list[str]) -> dict[str, str | None]:
    """`ray start ...` as option -> value (None for switches), every option one `ray <command>` takes."""
    assert command[0] == "ray"
    known = ray_options(command[1])
    switches = {"--head", "--block"}
    found: dict[str, str | None] = {}
    rest = command[2:]
    while rest:
        option, rest = rest[0], rest[1:]
        assert option in known, f"ray {command[1]} has no option {option}"
        if option in switches:
            found[option] = None
        else:
            found[option], rest = rest[0], rest[1:]
    return found


def test_the_cluster_compose_file_has_its_parts_each_built_checked_and_started_in_order() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "ray-head", "ray-worker", *SERVERS}
    assert services["postgres"]["image"].startswith("postgres:")
    dockerfile = (ROOT / "Dockerfile.cluster").read_text()
    for name in ("ray-head", "ray-worker", *SERVERS):
        build = services[name]["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile.cluster"
    for copied in re.findall(r"^COPY (\S+)", dockerfile, re.MULTILINE):
        assert (ROOT / copied).exists(), copied
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installed = re.search(r'RUN pip install --no-cache-dir "\.\[(.*?)\]"', dockerfile)
    assert installed and set(installed.group(1).split(",")) == {"postgres", "ray"} <= set(extras)
    for name, service in services.items():
        health = service["healthcheck"]["test"]
        assert health[0] == "CMD", name
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services and condition == {"condition": "service_healthy"}, name
    assert set(services["ray-worker"]["depends_on"]) == {"ray-head"}
    for name in SERVERS:
        assert set(services[name]["depends_on"]) == {"postgres", "ray-head"}


def test_the_servers_run_real_flags_against_the_database_and_the_ray_head_of_the_file() -> None:
    services = compose()["services"]
    postgres = services["postgres"]["environment"]
    head = ray_arguments(services["ray-head"]["command"])
    assert "--head" in head and "--block" in head
    worker = ray_arguments(services["ray-worker"]["command"])
    assert worker["--address"] == f"ray-head:{head['--port']}" and "--block" in worker
    for name in ("ray-head", "ray-worker"):
        ray_arguments(services[name]["healthcheck"]["test"][1:])
        environment = services[name]["environment"]
        assert environment["RAY_AUTH_MODE"] == "token" and environment["RAY_AUTH_TOKEN"].startswith("${")
    assert services["ray-head"]["environment"]["GRPC_ENABLE_FORK_SUPPORT"] == "0"  # it serves the ray:// clients
    ports = set()
    for name in SERVERS:
        service = services[name]
        command = service["command"]
        assert command[:2] == ["chainrule", "serve"]
        args = build_parser().parse_args(command[1:])
        assert args.host == "0.0.0.0" and service["hostname"] == name  # Job.worker names it by its hostname
        assert service["ports"] == [f"127.0.0.1:{args.port}:{args.port}"]
        ports.add(args.port)
        database = urllib.parse.urlsplit(args.db)
        assert database.scheme == "postgresql" and database.hostname == "postgres" and database.password is None
        assert (database.username, database.path) == (postgres["POSTGRES_USER"], f"/{postgres['POSTGRES_DB']}")
        assert service["environment"]["PGPASSWORD"] == postgres["POSTGRES_PASSWORD"]
        assert args.ray_address == f"ray://ray-head:{head['--ray-client-server-port']}"
        assert service["environment"]["RAY_AUTH_TOKEN"] == services["ray-head"]["environment"]["RAY_AUTH_TOKEN"]
        health = service["healthcheck"]["test"]
        assert health[1] == "chainrule" and build_parser().parse_args(health[2:]).address == f"127.0.0.1:{args.port}"
        assert service["stop_signal"] == "SIGTERM"
    assert len(ports) == len(SERVERS), "each server on a port of its own"
