"""The dashboard's JSON endpoints, called as its pages call them, on a real dashboard process in
front of a real server that requires a token."""

from __future__ import annotations

import html
import io
import json
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import chainrule.client as cr
from chainrule.client.render import GRADIENT_COLOR, VALUE_COLOR
from tests.dashboard_process import (
    TOKEN,
    WAIT_SECONDS,
    Browserless,
    DashboardProcess,
    digits,
    digits_classifier,
    lecture_graph,
    start_job,
    start_server,
    wait_for,
)
from tests.server_process import ServerProcess

LECTURE_FEEDS = {"x": -2, "y": 5, "z": -4}
PAGED_GRAPHS = 23


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(tmp_path_factory.mktemp("dashboard-api"))
    yield process
    process.kill()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[cr.Client]:
    with cr.Client(server.address, token=TOKEN, timeout=WAIT_SECONDS) as connected:
        yield connected


@pytest.fixture(scope="module")
def dashboard(server: ServerProcess) -> Iterator[DashboardProcess]:
    process = DashboardProcess(server.address).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def browser(dashboard: DashboardProcess) -> Browserless:
    """One browser session for the module: it keeps every answer, for the test that looks for the token in them."""
    session = Browserless(dashboard.url)
    session.open_page()
    return session


@pytest.fixture(scope="module")
def lecture(client: cr.Client) -> cr.GraphInfo:
    return client.create_graph(lecture_graph())


@pytest.fixture(scope="module")
def digits_data(client: cr.Client) -> tuple[cr.DatasetInfo, cr.DatasetInfo]:
    train, held_out = digits()
    return client.upload_dataset("digits train", train), client.upload_dataset("digits held-out", held_out)


@pytest.fixture(scope="module")
def finished_job(client: cr.Client, digits_data: tuple[cr.DatasetInfo, cr.DatasetInfo]) -> cr.Job:
    graph = client.create_graph(digits_classifier())
    job = start_job(client, graph.graph_id, digits_data[0].dataset_id, digits_data[1].dataset_id, max_steps=240)
    job.wait(progress=False)
    return job


def test_the_graphs_list_is_searched_and_paged(client: cr.Client, browser: Browserless) -> None:
    made = [client.create_graph(lecture_graph(f"Paging graph {index:02d}")) for index in range(PAGED_GRAPHS)]
    first = browser.get("/api/graphs?q=paging%20GRAPH&page_size=10")
    assert (first["total"], first["pages"], first["page"]) == (PAGED_GRAPHS, 3, 1)
    assert [graph["name"] for graph in first["graphs"]] == [f"Paging graph {index:02d}" for index in range(10)]
    assert first["graphs"][0] == {
        "graph_id": made[0].graph_id,
        "name": "Paging graph 00",
        "node_count": 5,
        "parameter_count": 0,
        "step": 0,
        "create_time": first["graphs"][0]["create_time"],
    }
    last = browser.get("/api/graphs?q=paging%20graph&page_size=10&page=3")
    assert [graph["name"] for graph in last["graphs"]] == [f"Paging graph {index:02d}" for index in range(20, 23)]
    beyond = browser.get("/api/graphs?q=paging%20graph&page_size=10&page=9")
    assert beyond["page"] == 3, "a page past the end shows the last one"
    by_id = browser.get(f"/api/graphs?q={made[7].graph_id[:12]}")
    assert [graph["graph_id"] for graph in by_id["graphs"]] == [made[7].graph_id]
    assert browser.get("/api/graphs?q=no%20such%20graph")["total"] == 0
    for query in ("page=0", "page_size=0", "page_size=ten", "page_size=501"):
        status, _, body = browser.request("GET", f"/api/graphs?{query}")
        assert status == 400, query
        assert query.split("=")[0] in json.loads(body)["error"]


def test_a_graph_s_detail_names_its_inputs_and_offers_its_sinks_as_losses_first(
    lecture: cr.GraphInfo, browser: Browserless
) -> None:
    detail = browser.get(f"/api/graphs/{lecture.graph_id}")
    assert detail["name"] == "lecture: f = (x + y) z"
    assert [item["name"] for item in detail["inputs"]] == ["x", "y", "z"]
    assert detail["loss_candidates"] == ["f", "q"]
    status, _, body = browser.request("GET", "/api/graphs/no-such-graph")
    assert status == 404 and "no-such-graph" in json.loads(body)["error"]


def svg_texts(svg: str) -> list[tuple[str, str]]:
    """(fill colour, text) of every <text> of a Graphviz SVG."""
    found = re.findall(r'<text [^>]*?fill="([^"]+)"[^>]*>([^<]*)</text>', svg)
    return [(colour, html.unescape(text).strip()) for colour, text in found]


def test_render_draws_the_lecture_s_values_and_gradients_from_json_or_npz_feeds(
    lecture: cr.GraphInfo, browser: Browserless
) -> None:
    status, headers, body = browser.request(
        "POST",
        f"/api/graphs/{lecture.graph_id}/render",
        json.dumps({"feeds": LECTURE_FEEDS, "loss": "f"}).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 200 and headers["content-type"] == "image/svg+xml", body
    texts = svg_texts(body.decode())
    assert (VALUE_COLOR, "-12") in texts
    for name, gradient in (("x", "-4"), ("y", "-4"), ("z", "3"), ("q", "-4")):
        assert (GRADIENT_COLOR, f"∂f/∂{name} = {gradient}") in texts

    archive = io.BytesIO()
    np.savez(archive, x=np.float64(-2), y=np.float64(5), z=np.float64(-4))
    status, _, npz_body = browser.request(
        "POST",
        f"/api/graphs/{lecture.graph_id}/render?loss=f",
        archive.getvalue(),
        {"Content-Type": "application/octet-stream"},
    )
    assert status == 200
    assert svg_texts(npz_body.decode()) == texts

    status, _, structure = browser.request(
        "POST", f"/api/graphs/{lecture.graph_id}/render", b"{}", {"Content-Type": "application/json"}
    )
    assert status == 200 and not any(colour == GRADIENT_COLOR for colour, _ in svg_texts(structure.decode()))


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b'{"feeds": {"w": 1}}', "application/json", "feed 'w' is not an input of this graph (its inputs: x, y, z)"),
        (b'{"feeds": [1, 2]}', "application/json", "feeds must be a JSON object"),
        (b'{"feeds": {"x": [[1], [2, 3]]}}', "application/json", "feed 'x' is not a number or a rectangular"),
        (b"{not json", "application/json", "Expecting property name"),
        (b'{"loss": 3}', "application/json", "loss must be a node's name"),
        (b"not an archive", "application/octet-stream", "not an .npz archive"),
        (b"x=1", "application/x-www-form-urlencoded", "send the feeds as application/json"),
        (b'{"feeds": {"x": -2, "y": 5, "z": -4}, "loss": "nope"}', "application/json", "nope"),
    ],
    ids=["unknown input", "not an object", "ragged", "bad json", "loss not a name", "not npz", "form", "unknown loss"],
)
def test_render_refuses_bad_feeds_naming_the_culprit(
    lecture: cr.GraphInfo, browser: Browserless, body: bytes, content_type: str, message: str
) -> None:
    status, _, answer = browser.request(
        "POST", f"/api/graphs/{lecture.graph_id}/render", body, {"Content-Type": content_type}
    )
    assert status in (400, 404)
    assert message in json.loads(answer)["error"]


def test_parameters_come_with_shape_dtype_norm_and_a_histogram(client: cr.Client, browser: Browserless) -> None:
    graph = client.create_graph(digits_classifier(seed=3))
    values = client.get_parameters(graph.graph_id)
    answer = browser.get(f"/api/graphs/{graph.graph_id}/parameters")
    assert answer["step"] == 0
    assert [item["name"] for item in answer["parameters"]] == list(values)
    for item in answer["parameters"]:
        value = values[item["name"]]
        assert (item["kind"], item["dtype"], item["shape"], item["size"]) == (
            "parameter",
            "float32",
            list(value.shape),
            value.size,
        )
        assert item["norm"] == pytest.approx(np.linalg.norm(value.astype(np.float64)))
        assert (item["min"], item["max"]) == (pytest.approx(value.min()), pytest.approx(value.max()))
        counts, edges = np.histogram(value.astype(np.float64), bins=len(item["histogram"]["counts"]))
        assert item["histogram"]["counts"] == counts.tolist()
        assert item["histogram"]["edges"] == pytest.approx(edges.tolist())
        assert sum(item["histogram"]["counts"]) == value.size


def test_datasets_are_listed_with_their_columns_and_size(
    digits_data: tuple[cr.DatasetInfo, cr.DatasetInfo], browser: Browserless
) -> None:
    listed = {item["dataset_id"]: item for item in browser.get("/api/datasets")["datasets"]}
    train = listed[digits_data[0].dataset_id]
    assert train["name"] == "digits train"
    assert train["columns"] == [
        {"name": "x", "dtype": "float32", "shape": [64]},
        {"name": "labels", "dtype": "float32", "shape": [10]},
    ]
    assert (train["num_examples"], train["size_bytes"]) == (1500, 1500 * (64 + 10) * 4)
    assert train["sha256"] == digits_data[0].sha256


def test_jobs_list_detail_and_history_match_what_the_client_library_reports(
    client: cr.Client, finished_job: cr.Job, browser: Browserless
) -> None:
    info = finished_job.info()
    listed = {job["job_id"]: job for job in browser.get("/api/jobs")["jobs"]}[finished_job.job_id]
    assert (listed["state"], listed["step"], listed["total_steps"]) == ("succeeded", 240, 240)
    assert listed["graph_name"] == "digits mlp 64-32-10"
    assert listed["loss"] == pytest.approx(info.loss)
    assert listed["metrics"] == pytest.approx(info.metrics)
    assert listed["steps_per_second"] > 0
    assert [job["job_id"] for job in browser.get("/api/jobs?state=running")["jobs"]] == []
    status, _, body = browser.request("GET", "/api/jobs?state=sleeping")
    assert status == 400 and "sleeping" in json.loads(body)["error"]

    detail = browser.get(f"/api/jobs/{finished_job.job_id}")
    assert detail["spec"]["optimizer"] == {"sgd": {"learning_rate": 0.1, "momentum": 0.9}}
    assert detail["spec"]["evaluation"]["metrics"] == ["accuracy"]

    expected = finished_job.history()
    history = browser.get(f"/api/jobs/{finished_job.job_id}/history")
    assert history["steps"] == list(range(1, 241))
    assert history["losses"] == expected.losses
    assert history["learning_rates"] == expected.learning_rates
    assert history["metrics"]["accuracy"]["steps"] == [50, 100, 150, 200, 240]
    assert history["metrics"]["accuracy"]["values"] == [value for _, value in expected.metrics["accuracy"]]

    # The planned schedule the page draws is the rate the server applied, step by step.
    schedule = detail["schedule"]
    assert schedule["kind"] == "cosine" and schedule["base_learning_rate"] == 0.1
    applied = dict(zip(history["steps"], history["learning_rates"], strict=True))
    for step, rate in zip(schedule["steps"], schedule["learning_rates"], strict=True):
        assert rate == pytest.approx(applied[step], rel=1e-9), step
    assert {1, 100, 240} <= set(schedule["steps"])


def read_events(url: str, cookie: str) -> tuple[list[dict[str, object]], list[str]]:
    """The events of an SSE stream and the names of its non-data messages, until it ends."""
    request = urllib.request.Request(url, headers={"Cookie": cookie, "Accept": "text/event-stream"})
    events: list[dict[str, object]] = []
    names: list[str] = []
    with urllib.request.urlopen(request, timeout=WAIT_SECONDS) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for message in response.read().decode().split("\n\n"):
            lines = dict(line.split(": ", 1) for line in message.splitlines() if ": " in line)
            if "event" in lines:
                names.append(lines["event"])
            elif "data" in lines:
                events.extend(json.loads(lines["data"])["events"])
    return events, names


def test_a_job_s_event_stream_replays_its_history_then_its_final_state(
    finished_job: cr.Job, browser: Browserless
) -> None:
    url = f"{browser.url}/api/jobs/{finished_job.job_id}/events"
    events, names = read_events(url, browser.cookie)
    steps = [event["step"] for event in events if "step" in event]
    assert steps == list(range(1, 241))
    assert events[-1] == {"state": "succeeded"}
    assert names == ["end"]
    later, _ = read_events(url + "?from_step=231", browser.cookie)
    assert [event["step"] for event in later if "step" in event] == list(range(231, 241))
    evaluated = [event for event in events if "step" in event and event["metrics"]]
    assert [event["step"] for event in evaluated] == [50, 100, 150, 200, 240]


def test_cancel_is_refused_without_the_csrf_token_and_done_with_it(
    client: cr.Client, digits_data: tuple[cr.DatasetInfo, cr.DatasetInfo], browser: Browserless
) -> None:
    graph = client.create_graph(digits_classifier())
    job = start_job(client, graph.graph_id, digits_data[0].dataset_id, digits_data[1].dataset_id)
    try:
        path = f"/api/jobs/{job.job_id}/cancel"
        status, answer = browser.post_json(path, {}, csrf=False)
        assert (status, answer) == (403, {"error": "missing CSRF token: reload the page and try again"})
        status, _, body = browser.request("POST", path, b"", {"X-CSRF-Token": "0" * 64}, csrf=False)
        assert status == 403 and "invalid CSRF token" in json.loads(body)["error"]
        status, _, body = browser.request("POST", path, b"", {"Origin": "http://attacker.example"})
        assert status == 403 and "cross-origin" in json.loads(body)["error"]
        stranger = Browserless(browser.url)  # a token is good for its own session only
        stranger.open_page()
        stranger.csrf_token = browser.csrf_token
        assert stranger.post_json(path, {})[0] == 403
        assert not job.info().ended, "a refused cancel left the job alone"

        status, answer = browser.post_json(path, {})
        assert status == 200 and answer["job_id"] == job.job_id
        wait_for(lambda: job.info().ended, "the cancelled job to end")
        assert job.info().state == "cancelled"
        assert browser.get(f"/api/jobs/{job.job_id}")["state"] == "cancelled"
    finally:
        job.cancel()


def test_answers_carry_a_strict_content_security_policy_and_other_hosts_are_refused(
    dashboard: DashboardProcess, browser: Browserless
) -> None:
    status, headers, _ = browser.request("GET", "/graphs")
    assert status == 200
    policy = dict(part.strip().split(" ", 1) for part in headers["content-security-policy"].split(";"))
    assert policy["script-src"] == "'self'" and "unsafe" not in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    assert "SameSite=Strict" in Browserless(browser.url).request("GET", "/jobs")[1]["set-cookie"]
    assert re.match(r"http://127\.0\.0\.1:\d+$", dashboard.url), "the dashboard listens on loopback by default"
    status, _, _ = browser.request("GET", "/api/graphs", headers={"Host": "rebound.attacker.example"})
    assert status == 400


def test_the_server_s_token_is_in_no_page_and_no_answer(
    lecture: cr.GraphInfo, finished_job: cr.Job, browser: Browserless
) -> None:
    for page in ("/graphs", f"/graphs/{lecture.graph_id}", "/datasets", "/jobs", f"/jobs/{finished_job.job_id}"):
        browser.open_page(page)
    for path in ("/api/graphs", "/api/datasets", "/api/jobs", f"/api/jobs/{finished_job.job_id}", "/api/graphs/x"):
        browser.request("GET", path)
    browser.request("GET", "/static/common.js")
    assert len(browser.bodies) > 20
    for body in browser.bodies:
        assert TOKEN.encode() not in body
    assert all(TOKEN not in value for value in browser.request("GET", "/jobs")[1].values())


def test_the_dashboard_without_its_extra_says_what_to_install(server: ServerProcess) -> None:
    blocked = "import sys; sys.modules['starlette'] = None; from chainrule.server.cli import main; sys.exit(main())"
    result = subprocess.run(
        [sys.executable, "-c", blocked, "dashboard", "--address", server.address, "--port", "0"],
        capture_output=True,
        text=True,
        timeout=WAIT_SECONDS,
    )
    assert result.returncode == 1
    assert result.stderr == "chainrule: the dashboard needs starlette: pip install 'chainrule[dashboard]'\n"


def test_a_port_in_use_is_one_line_and_exit_2(dashboard: DashboardProcess, server: ServerProcess) -> None:
    port = dashboard.url.rsplit(":", 1)[1]
    result = subprocess.run(
        [sys.executable, "-m", "chainrule.server.cli", "dashboard", "--address", server.address, "--port", port],
        capture_output=True,
        text=True,
        timeout=WAIT_SECONDS,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("chainrule: ") and result.stderr.count("\n") == 1


def test_the_package_ships_its_templates_scripts_and_browser_libraries() -> None:
    from chainrule.dashboard import app

    assert app.missing_assets() == []
    assert {path.name for path in (Path(app.__file__).parent / "templates").iterdir()} >= {"base.html", "job.html"}
