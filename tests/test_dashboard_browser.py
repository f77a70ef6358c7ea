"""The dashboard in a real browser: Debian's Chromium driven by Playwright, against a real
dashboard process, a real server and real running jobs.

Every page a test opens is watched: a console error (a refused script or style, a failed
request), an uncaught exception or a dialog the test did not expect fails the test. Each test
saves a screenshot in its tmp dir; with CHAINRULE_DASHBOARD_SCREENSHOT set to a path, the job
page's test also writes its screenshot there (that is how docs/dashboard-job.png is made).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Dialog, Page, expect, sync_playwright

import chainrule.client as cr
from chainrule.client.render import GRADIENT_COLOR, VALUE_COLOR
from tests.dashboard_process import (
    CHROMIUM,
    CHROMIUM_ARGS,
    TOKEN,
    WAIT_SECONDS,
    XSS_NAME,
    DashboardProcess,
    digits,
    digits_classifier,
    lecture_graph,
    start_job,
    start_server,
    wait_for,
)
from tests.server_process import ServerProcess

SCREENSHOT_ENV = "CHAINRULE_DASHBOARD_SCREENSHOT"
WAIT_MS = WAIT_SECONDS * 1000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(tmp_path_factory.mktemp("dashboard-browser"))
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
def digits_data(client: cr.Client) -> tuple[str, str]:
    train, held_out = digits()
    return client.upload_dataset("digits train", train).dataset_id, client.upload_dataset(
        "digits held-out", held_out
    ).dataset_id


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


class Watched:
    """A page with what it logged: console errors, uncaught exceptions, and dialogs (each answered
    with `answer_dialogs`: True accepts, False dismisses, None means none was expected)."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.problems: list[str] = []
        self.dialogs: list[str] = []
        self.answer_dialogs: bool | None = None
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.problems.append(f"uncaught: {error}"))
        page.on("dialog", self._dialog)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.problems.append(f"console: {message.text}")

    def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        if self.answer_dialogs is None:
            self.problems.append(f"unexpected {dialog.type} dialog: {dialog.message}")
            dialog.dismiss()
        elif self.answer_dialogs:
            dialog.accept()
        else:
            dialog.dismiss()


@pytest.fixture
def watched(browser: Browser, dashboard: DashboardProcess, tmp_path: Path) -> Iterator[Watched]:
    context = browser.new_context(base_url=dashboard.url, viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(WAIT_MS)
    page = Watched(context.new_page())
    yield page
    page.page.screenshot(path=tmp_path / "page.png", full_page=True)
    context.close()
    assert page.problems == []


@pytest.fixture
def jobs(client: cr.Client) -> Iterator[list[cr.Job]]:
    """Jobs a test started, cancelled when it ends so the next test's jobs need not wait."""
    started: list[cr.Job] = []
    yield started
    for job in started:
        job.cancel()
        wait_for(lambda job=job: job.info().ended, "a cancelled job to end")  # type: ignore[misc]


def points(page: Page, chart: str = "#loss-chart") -> int:
    return int(page.get_attribute(chart, "data-points") or 0)


def poll(page: Page, condition: Callable[[], bool], what: str) -> None:
    """Wait for `condition`, asked from here: Playwright's own wait_for_function evaluates its
    predicate with eval, which the dashboard's Content-Security-Policy rightly refuses."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        page.wait_for_timeout(50)


def test_the_job_page_s_curves_gain_points_while_the_job_runs(
    client: cr.Client, digits_data: tuple[str, str], watched: Watched, jobs: list[cr.Job], tmp_path: Path
) -> None:
    graph = client.create_graph(digits_classifier())
    job = start_job(client, graph.graph_id, *digits_data, max_steps=25_000, every_steps=250)
    jobs.append(job)
    page = watched.page
    page.goto(f"/jobs/{job.job_id}")
    poll(page, lambda: points(page) > 0, "the first points")
    seen = points(page)
    poll(page, lambda: points(page) > seen, "more points")
    poll(page, lambda: points(page, "#metrics-chart") >= 2, "two evaluations")
    assert job.info().state == "running", "the points came while the job ran"
    expect(page.locator("#state")).to_have_text("running")
    expect(page.locator("#spec")).to_contain_text('"every_steps": 250')  # a number, as the spec gave it
    expect(page.locator("#job-facts")).to_contain_text(f"digits train {job.info().dataset_id}")
    assert page.get_attribute("#history-csv", "href") == f"/api/jobs/{job.job_id}/history?format=csv"
    expect(page.locator("#schedule-kind")).to_have_text("cosine, base 0.1")
    # Every point the page drew is a step the server reports, in order and without gaps.
    drawn = page.evaluate("document.querySelector('#points').textContent")
    assert int(drawn.split()[0]) <= job.info().step
    page.check("#log-scale")  # the loss chart is drawn again, on a log scale, with every point so far
    poll(page, lambda: page.locator("#loss-chart .uplot").count() == 1 and points(page) > seen, "the log-scale chart")
    page.uncheck("#log-scale")
    page.wait_for_timeout(1500)  # let the curves grow a little more for the picture
    screenshot = tmp_path / "dashboard-job.png"
    page.screenshot(path=screenshot, full_page=False)
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copyfile(screenshot, os.environ[SCREENSHOT_ENV])


def test_cancel_asks_first_and_then_ends_the_job(
    client: cr.Client, digits_data: tuple[str, str], watched: Watched, jobs: list[cr.Job]
) -> None:
    graph = client.create_graph(digits_classifier())
    job = start_job(client, graph.graph_id, *digits_data)
    jobs.append(job)
    page = watched.page
    page.goto(f"/jobs/{job.job_id}")
    expect(page.locator("#state")).to_have_text("running")
    watched.answer_dialogs = False
    page.click("#cancel")
    assert watched.dialogs == [f"confirm: Cancel job {job.job_id}? A running job stops after its current step."]
    poll(page, lambda: points(page) > 0, "the first points")
    assert job.info().state == "running", "a dismissed confirmation cancels nothing"
    watched.answer_dialogs = True
    page.click("#cancel")
    wait_for(lambda: job.info().ended, "the cancelled job to end")
    assert job.info().state == "cancelled"
    expect(page.locator("#state")).to_have_text("cancelled")
    expect(page.locator("#cancel")).to_be_hidden()


def svg_text(page: Page, text: str) -> str:
    """The fill colour of the picture's text that reads `text` (it must be there)."""
    locator = page.locator("#picture svg text", has_text=text).filter(has_text=text)
    expect(locator.first).to_be_visible()
    return str(locator.first.get_attribute("fill"))


def test_the_graph_page_draws_the_lecture_s_values_and_gradients(
    client: cr.Client, watched: Watched, tmp_path: Path
) -> None:
    graph = client.create_graph(lecture_graph())
    page = watched.page
    page.goto(f"/graphs/{graph.graph_id}")
    expect(page.locator("#graph-name")).to_have_text("lecture: f = (x + y) z")
    expect(page.locator("#render-status")).to_have_text("Structure.")
    page.fill("#feeds", '{"x": -2, "y": 5, "z": -4}')
    page.select_option("#loss", "f")
    page.click("#render")
    expect(page.locator("#render-status")).to_have_text("Values and gradients of f.")
    texts = page.locator("#picture svg text").all_text_contents()
    assert "-12" in texts
    assert svg_text(page, "-12") == VALUE_COLOR
    for name, gradient in (("x", "-4"), ("y", "-4"), ("z", "3")):
        assert f"∂f/∂{name} = {gradient}" in texts
        assert svg_text(page, f"∂f/∂{name} = {gradient}") == GRADIENT_COLOR

    # Pan and zoom move the picture; Fit brings it back.
    before = page.get_attribute("#picture-content", "style")
    page.click("#zoom-in")
    poll(page, lambda: page.get_attribute("#picture-content", "style") != before, "the picture to zoom")
    page.mouse.move(400, 700)
    page.mouse.wheel(0, -300)

    # The same picture from an uploaded .npz archive.
    archive = tmp_path / "feeds.npz"
    np.savez(archive, x=np.float64(-2), y=np.float64(5), z=np.float64(-4))
    page.fill("#feeds", "")
    page.set_input_files("#feeds-file", str(archive))
    page.evaluate("document.querySelector('#picture-content').replaceChildren()")
    page.click("#render")
    expect(page.locator("#picture svg text", has_text="∂f/∂z = 3")).to_be_visible()
    assert page.locator("#picture svg text").all_text_contents() == texts


def test_hostile_names_show_as_text_and_run_nothing(client: cr.Client, watched: Watched) -> None:
    builder = cr.GraphBuilder(XSS_NAME)
    x = builder.input("<script>alert(2)</script>")
    (x * x).named('"><svg onload=alert(3)>')
    graph = client.create_graph(builder)
    dataset = client.upload_dataset(
        "<img src=y onerror=alert(4)>", {"<b onmouseover=alert(5)>x</b>": np.zeros((3, 2), np.float32)}
    )
    page = watched.page

    page.goto("/graphs?q=onerror")
    expect(page.locator("#graphs tbody a.name")).to_have_text(XSS_NAME)
    page.goto(f"/graphs/{graph.graph_id}")
    expect(page.locator("#graph-name")).to_have_text(XSS_NAME)
    expect(page.locator("#picture svg text", has_text="<script>alert(2)</script>")).to_be_visible()
    expect(page.locator("#picture svg text", has_text='"><svg onload=alert(3)>')).to_be_visible()
    page.fill("#feeds", '{"<script>alert(2)</script>": 3}')
    page.select_option("#loss", '"><svg onload=alert(3)>')
    page.click("#render")
    expect(page.locator("#picture svg text", has_text="= 6")).to_be_visible()
    expect(page.locator("#loss option", has_text="onload")).to_have_text('"><svg onload=alert(3)>')

    page.goto("/datasets")
    row = page.locator("#datasets tbody tr", has_text=dataset.dataset_id)
    expect(row.locator("td.name")).to_have_text("<img src=y onerror=alert(4)>")
    expect(row.locator(".chip .name")).to_have_text("<b onmouseover=alert(5)>x</b>")

    for path in ("/graphs?q=onerror", f"/graphs/{graph.graph_id}", "/datasets"):
        page.goto(path)
        page.wait_for_load_state("networkidle")
        assert page.locator("img").count() == 0
        assert page.locator("script:not([src])").count() == 0
        assert page.locator("main svg [onload], main [onerror], main [onmouseover]").count() == 0
    assert watched.dialogs == []


def test_the_jobs_list_refreshes_live_and_compares_runs(
    client: cr.Client, digits_data: tuple[str, str], watched: Watched, jobs: list[cr.Job]
) -> None:
    graph = client.create_graph(digits_classifier())
    finished = start_job(client, graph.graph_id, *digits_data, learning_rate=0.3, max_steps=300, every_steps=100)
    finished.wait(progress=False)
    page = watched.page
    page.goto("/jobs")
    expect(page.locator(f"tr[data-job-id='{finished.job_id}'] .state")).to_have_text("succeeded")

    other = client.create_graph(digits_classifier(seed=1))
    running = start_job(client, other.graph_id, *digits_data, learning_rate=0.05)
    jobs.append(running)
    row = page.locator(f"tr[data-job-id='{running.job_id}']")
    expect(row.locator(".state")).to_have_text("running")  # appeared without a reload
    progress = row.locator(".progress-cell .muted")
    first = progress.text_content()
    poll(page, lambda: progress.text_content() != first, "the running job's row to refresh")

    page.check(f"tr[data-job-id='{finished.job_id}'] input[type=checkbox]")
    page.check(f"tr[data-job-id='{running.job_id}'] input[type=checkbox]")
    page.click("#compare")
    page.wait_for_url("**/compare?**")
    expect(page.locator("#compared li")).to_have_count(2)
    poll(page, lambda: points(page) > 300, "both jobs' curves")
    legend = page.locator("#loss-chart .u-legend .u-series .u-label").all_text_contents()
    assert legend == ["step", finished.job_id[:8], running.job_id[:8]]


def test_the_graphs_list_searches_and_turns_pages_both_ways(client: cr.Client, watched: Watched) -> None:
    for index in range(30):
        client.create_graph(lecture_graph(f"pager {index:02d}"))
    page = watched.page
    page.goto("/graphs")
    page.fill("#search", "PAGER")
    names = page.locator("#graphs tbody a.name")
    expect(names).to_have_count(25)
    expect(names.first).to_have_text("pager 00")
    expect(page.locator("#count")).to_have_text("graphs 1–25 matching “PAGER”")
    page.click("#next")
    expect(names).to_have_count(5)
    expect(names.first).to_have_text("pager 25")
    expect(page.locator("#page")).to_have_text("the last page")
    expect(page.locator("#next")).to_be_disabled()
    page.click("#previous")
    expect(names).to_have_count(25)
    expect(names.first).to_have_text("pager 00")
    expect(page.locator("#previous")).to_be_disabled()


def test_the_datasets_list_shows_a_page_and_turns_to_the_next_and_back(client: cr.Client, watched: Watched) -> None:
    for index in range(30):
        client.upload_dataset(f"dataset pager {index:02d}", {"x": np.full((2, 1), index, np.float32)})
    everything = [info.name for info in client.list_datasets()]
    assert 25 < len(everything) <= 50
    page = watched.page
    page.goto("/datasets")
    names = page.locator("#datasets tbody td.name")
    expect(names).to_have_text(everything[:25])
    expect(page.locator("#count")).to_have_text("datasets 1–25")
    expect(page.locator("#page")).to_have_text("more after these")
    expect(page.locator("#previous")).to_be_disabled()
    page.click("#next")
    expect(names).to_have_text(everything[25:])
    expect(page.locator("#count")).to_have_text(f"datasets 26–{len(everything)}")
    expect(page.locator("#page")).to_have_text("the last page")
    expect(page.locator("#next")).to_be_disabled()
    assert "page_token=" in page.url
    page.click("#previous")
    expect(names).to_have_text(everything[:25])
    expect(page.locator("#previous")).to_be_disabled()


def test_a_large_graph_is_drawn_when_asked_and_can_be_panned(client: cr.Client, watched: Watched) -> None:
    """Past 2,000 nodes the page waits for a click before laying the graph out (Graphviz takes seconds)."""
    builder = cr.GraphBuilder("a long chain")
    node = builder.input("x")
    for index in range(1100):
        node = (node * 1.01).named(f"n{index}")
    graph = client.create_graph(builder)
    assert graph.node_count > 2000
    page = watched.page
    page.goto(f"/graphs/{graph.graph_id}")
    expect(page.locator("#render-status")).to_contain_text(f"{graph.node_count} nodes: press Render")
    page.fill("#feeds", '{"x": 1}')
    page.click("#render")
    expect(page.locator("#render-status")).to_have_text("Values.", timeout=5 * WAIT_MS)
    assert page.locator("#picture svg g.node").count() == graph.node_count
    box = page.locator("#picture").bounding_box()
    assert box is not None
    before = page.get_attribute("#picture-content", "style")
    page.mouse.move(box["x"] + 200, box["y"] + 200)
    page.mouse.down()
    page.mouse.move(box["x"] + 50, box["y"] + 120, steps=5)
    page.mouse.up()
    assert page.get_attribute("#picture-content", "style") != before
