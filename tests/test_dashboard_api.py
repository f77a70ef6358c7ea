"""The dashboard's JSON endpoints, called as its pages call them, on a real dashboard process in
front of a real server that requires a token."""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import chainrule.client as cr
from chainrule.client.render import GRADIENT_COLOR, VALUE_COLOR
from chainrule.client.training import History
from chainrule.dashboard import data, listing
from chainrule.v1 import job_service_pb2
from tests.dashboard_process import (
    TOKEN,
    WAIT_SECONDS,
    Browserless,
    DashboardProcess,
    digits,
    digits_classifier,
    lecture_graph,
    rpc_count,
    start_job,
    start_server,
    wait_for,
)
from tests.server_process import ServerProcess

LECTURE_FEEDS = {"x": -2, "y": 5, "z": -4}
PAGED_GRAPHS = 23
PAGED_DATASETS = 27


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


def pages(browser: Browserless, path: str) -> list[dict[str, Any]]:
    """Every page of a list from `path` on, following each answer's next_page_token."""
    answers = [browser.get(path)]
    while answers[-1]["next_page_token"]:
        answers.append(browser.get(f"{path}&page_token={answers[-1]['next_page_token']}"))
    return answers


def test_the_graphs_list_pages_through_the_server_s_pages(
    server: ServerProcess, client: cr.Client, browser: Browserless
) -> None:
    made = [client.create_graph(lecture_graph(f"Paging graph {index:02d}")) for index in range(PAGED_GRAPHS)]
    everything = client.list_graphs()
    before = rpc_count(server, "ListGraphs")
    answers = pages(browser, "/api/graphs?page_size=10")
    assert rpc_count(server, "ListGraphs") - before == len(answers), "one ListGraphs call a page, not a read of all"
    assert [graph["graph_id"] for answer in answers for graph in answer["graphs"]] == [
        info.graph_id for info in everything
    ]
    assert [len(answer["graphs"]) for answer in answers[:-1]] == [10] * (len(answers) - 1)
    shown = next(graph for answer in answers for graph in answer["graphs"] if graph["graph_id"] == made[0].graph_id)
    assert shown == {
        "graph_id": made[0].graph_id,
        "name": "Paging graph 00",
        "node_count": 5,
        "parameter_count": 0,
        "step": 0,
        "create_time": shown["create_time"],
    }


def test_a_search_pages_through_the_graphs_whose_name_or_id_matches(client: cr.Client, browser: Browserless) -> None:
    made = [client.create_graph(lecture_graph(f"Searched graph {index:02d}")) for index in range(PAGED_GRAPHS)]
    answers = pages(browser, "/api/graphs?q=searched%20GRAPH&page_size=10")
    assert [[graph["name"] for graph in answer["graphs"]] for answer in answers] == [
        [f"Searched graph {index:02d}" for index in range(start, min(start + 10, PAGED_GRAPHS))]
        for start in (0, 10, 20)
    ]
    by_id = browser.get(f"/api/graphs?q={made[7].graph_id[:12]}")
    assert [graph["graph_id"] for graph in by_id["graphs"]] == [made[7].graph_id] and by_id["next_page_token"] == ""
    assert browser.get("/api/graphs?q=no%20such%20graph")["graphs"] == []
    for query in ("page_size=0", "page_size=ten", "page_size=501", "page_token=not-ours"):
        status, _, body = browser.request("GET", f"/api/graphs?{query}")
        assert status == 400, query
        assert query.split("=")[0] in json.loads(body)["error"]


def test_a_search_reads_at_most_its_scan_limit_and_goes_on_from_where_it_stopped(client: cr.Client) -> None:
    """listing.graph_page itself, with small pages and bound: a search through a dozen graphs that do
    not match answers short when it reaches its bound, and the cursors it gives, followed through
    graphs of which one in three matches, find every match once, in order, including after server
    pages cut in the middle (matches fill a page of two at every residue of five)."""
    for _ in range(12):
        client.create_graph(lecture_graph("chaff"))
    needles = []
    for index in range(14):
        needles.append(client.create_graph(lecture_graph(f"needle {index:02d}")).graph_id)
        client.create_graph(lecture_graph("hay"))
        client.create_graph(lecture_graph("straw"))
    found: list[str] = []
    cursor: listing.Cursor | None = listing.Cursor()
    answers = []
    while cursor is not None:
        page = listing.graph_page(client, "NEEDLE", cursor, 2, scan_limit=9, server_page_size=5)
        assert page.scanned < 9 + 5, "a search stops within a server page of its bound"
        answers.append(page)
        found += [info.graph_id for info in page.graphs]
        cursor = page.next_cursor
    assert found == needles
    assert any(len(page.graphs) < 2 and page.next_cursor is not None for page in answers), "a short answer goes on"
    assert any(page.next_cursor is not None and page.next_cursor.skip > 0 for page in answers), "a cut server page"


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
    listed = {
        item["dataset_id"]: item
        for answer in pages(browser, "/api/datasets?page_size=500")
        for item in answer["datasets"]
    }
    train = listed[digits_data[0].dataset_id]
    assert train["name"] == "digits train"
    assert train["columns"] == [
        {"name": "x", "dtype": "float32", "shape": [64]},
        {"name": "labels", "dtype": "float32", "shape": [10]},
    ]
    assert (train["num_examples"], train["size_bytes"]) == (1500, 1500 * (64 + 10) * 4)
    assert train["sha256"] == digits_data[0].sha256


def test_the_datasets_list_pages_through_the_server_s_pages(
    server: ServerProcess, client: cr.Client, browser: Browserless
) -> None:
    for index in range(PAGED_DATASETS):
        client.upload_dataset(f"Paging dataset {index:02d}", {"x": np.full((2, 1), index, np.float32)})
    everything = client.list_datasets()
    first = browser.get("/api/datasets")
    assert len(first["datasets"]) == first["page_size"] == 25 < len(everything), "a bounded page by default"
    assert first["next_page_token"]
    before = rpc_count(server, "ListDatasets")
    answers = pages(browser, "/api/datasets?page_size=10")
    assert rpc_count(server, "ListDatasets") - before == len(answers), "one ListDatasets call a page, not a read of all"
    assert [dataset["dataset_id"] for answer in answers for dataset in answer["datasets"]] == [
        info.dataset_id for info in everything
    ]
    assert [len(answer["datasets"]) for answer in answers[:-1]] == [10] * (len(answers) - 1)
    assert 0 < len(answers[-1]["datasets"]) <= 10
    for query in ("page_size=0", "page_size=ten", "page_size=501", "page_token=not-ours"):
        status, _, body = browser.request("GET", f"/api/datasets?{query}")
        assert status == 400, query
        assert query.split("=")[0] in json.loads(body)["error"]


def test_jobs_list_detail_and_history_match_what_the_client_library_reports(
    client: cr.Client, finished_job: cr.Job, browser: Browserless
) -> None:
    info = finished_job.info()
    listed = {job["job_id"]: job for job in browser.get(f"/api/jobs?graph_id={info.graph_id}")["jobs"]}[
        finished_job.job_id
    ]
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
    assert detail["spec"]["evaluation"] == {
        "dataset_id": info.spec.evaluation.dataset_id,
        "metrics": ["accuracy"],
        "every_steps": 50,
    }
    assert (detail["spec"]["batch_size"], detail["spec"]["max_steps"]) == (32, 240), "64-bit integers as numbers"
    assert detail["dataset_names"] == {
        info.dataset_id: "digits train",
        info.spec.evaluation.dataset_id: "digits held-out",
    }

    expected = finished_job.history()
    history = browser.get(f"/api/jobs/{finished_job.job_id}/history")
    assert history["steps"] == list(range(1, 241))
    assert history["losses"] == expected.losses
    assert history["learning_rates"] == expected.learning_rates
    assert history["metrics"]["accuracy"]["steps"] == [50, 100, 150, 200, 240]
    assert history["metrics"]["accuracy"]["values"] == [value for _, value in expected.metrics["accuracy"]]

    status, headers, body = browser.request("GET", f"/api/jobs/{finished_job.job_id}/history?format=csv")
    assert status == 200 and headers["content-type"].startswith("text/csv")
    assert headers["content-disposition"] == f'attachment; filename="job-{finished_job.job_id}-history.csv"'
    rows = list(csv.reader(io.StringIO(body.decode())))
    assert rows[0] == ["step", "loss", "learning_rate", "accuracy"] and len(rows) == 241
    assert [float(row[1]) for row in rows[1:]] == expected.losses
    assert {int(row[0]): float(row[3]) for row in rows[1:] if row[3]} == dict(expected.metrics["accuracy"])
    assert browser.request("GET", f"/api/jobs/{finished_job.job_id}/history?format=xml")[0] == 400

    # The planned schedule the page draws is the rate the server applied, step by step.
    schedule = detail["schedule"]
    assert schedule["kind"] == "cosine" and schedule["base_learning_rate"] == 0.1
    applied = dict(zip(history["steps"], history["learning_rates"], strict=True))
    for step, rate in zip(schedule["steps"], schedule["learning_rates"], strict=True):
        assert rate == pytest.approx(applied[step], rel=1e-9), step
    assert {1, 100, 240} <= set(schedule["steps"])


def test_a_spec_shows_64_bit_integers_as_numbers_where_a_browser_reads_them_exactly() -> None:
    spec = job_service_pb2.JobSpec(batch_size=32, max_steps=2**53 - 1, seed=2**53, feeds={"x": "pixels"})
    spec.evaluation.every_steps = 250
    spec.optimizer.sgd.learning_rate = 0.5
    assert data.message_json(spec) == {
        "batch_size": 32,
        "max_steps": 2**53 - 1,
        "seed": str(2**53),  # JSON.parse would read 2**53 + 1 as 2**53: kept a string, exact
        "feeds": {"x": "pixels"},
        "evaluation": {"every_steps": 250},
        "optimizer": {"sgd": {"learning_rate": 0.5}},
    }


def test_history_csv_keeps_a_metric_name_from_being_read_as_a_formula() -> None:
    history = History()
    history.record_event(1, 0.5, 0.1, {'=HYPERLINK("http://x")': 1.0, "accuracy": 0.25})
    history.record_event(2, float("nan"), 0.1, {})
    rows = list(csv.reader(io.StringIO(data.history_csv(history))))
    assert rows == [
        ["step", "loss", "learning_rate", '\'=HYPERLINK("http://x")', "accuracy"],
        ["1", "0.5", "0.1", "1.0", "0.25"],
        ["2", "nan", "0.1", "", ""],
    ]


def test_the_jobs_list_is_paged_newest_first_and_filtered(
    client: cr.Client, digits_data: tuple[cr.DatasetInfo, cr.DatasetInfo], browser: Browserless
) -> None:
    graph = client.create_graph(digits_classifier())
    made = [start_job(client, graph.graph_id, digits_data[0].dataset_id, digits_data[1].dataset_id, max_steps=3)]
    made += [start_job(client, graph.graph_id, digits_data[0].dataset_id, digits_data[1].dataset_id, max_steps=3)]
    made += [start_job(client, graph.graph_id, digits_data[0].dataset_id, digits_data[1].dataset_id, max_steps=3)]
    for job in made:
        job.wait(progress=False)
    newest = [info.job_id for info in reversed(client.list_jobs())]
    of_graph = f"/api/jobs?graph_id={graph.graph_id}&state=succeeded&state=failed"
    wait_for(  # the dashboard reads the jobs again at most once a second
        lambda: [job["job_id"] for job in browser.get(of_graph)["jobs"]] == [job.job_id for job in reversed(made)],
        "the jobs of the graph, newest first, as they ended",
    )
    first = browser.get("/api/jobs?page_size=2")
    assert [job["job_id"] for job in first["jobs"]] == newest[:2]
    assert (first["total"], first["page"], first["pages"]) == (len(newest), 1, math.ceil(len(newest) / 2))
    beyond = browser.get("/api/jobs?page_size=2&page=1000")
    assert (
        beyond["page"] == beyond["pages"]
        and [job["job_id"] for job in beyond["jobs"]] == newest[2 * (beyond["pages"] - 1) :]
    )
    assert browser.get(f"/api/jobs?graph_id={graph.graph_id}&state=running")["jobs"] == []
    for query in ("page=0", "page_size=501", "page=two"):
        status, _, body = browser.request("GET", f"/api/jobs?{query}")
        assert status == 400 and query.split("=")[0] in json.loads(body)["error"], query


def test_the_jobs_index_reads_again_only_the_new_and_the_active_jobs(
    server: ServerProcess, client: cr.Client, digits_data: tuple[cr.DatasetInfo, cr.DatasetInfo]
) -> None:
    """The dashboard's index of jobs (listing.JobIndex) with pages of three: after its first read, a
    read lists from its last full page on and the queued or running jobs, not every job again; a
    job that ends meanwhile shows its end."""
    graph = client.create_graph(digits_classifier())
    for _ in range(9):
        start_job(client, graph.graph_id, digits_data[0].dataset_id, digits_data[1].dataset_id, max_steps=2)
    running = start_job(client, graph.graph_id, digits_data[0].dataset_id, digits_data[1].dataset_id)
    wait_for(lambda: running.info().state == "running", "the last job to run")
    index = listing.JobIndex(client, refresh_seconds=0, server_page_size=3)
    before = rpc_count(server, "ListJobs")
    first = index.jobs()
    everything = client.list_jobs()
    assert [info.job_id for info in first] == [info.job_id for info in reversed(everything)]
    assert first[0].state == "running"
    pages_of_all = rpc_count(server, "ListJobs") - before - 1  # (the last call was client.list_jobs)
    assert pages_of_all >= 5

    running.cancel()
    wait_for(lambda: running.info().ended, "the job to end")
    later = start_job(client, graph.graph_id, digits_data[0].dataset_id, digits_data[1].dataset_id, max_steps=2)
    later.wait(progress=False)
    before = rpc_count(server, "ListJobs")
    second = index.jobs()
    assert rpc_count(server, "ListJobs") - before <= 3, "the last page or two and the active jobs, not all"
    assert [info.job_id for info in second] == [later.job_id] + [info.job_id for info in first]
    assert second[1].state == "cancelled" and second[0].state == "succeeded"


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
