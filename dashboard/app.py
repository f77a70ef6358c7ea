"""The dashboard's ASGI app: HTML pages, the JSON endpoints their scripts read, and a live job stream.

Every call to the chainrule server goes through one `chainrule.client.Client`, whose token (if
any) stays in this process: pages and answers never carry it. The client is synchronous, so
handlers run it in Starlette's thread pool. A job's live stream is one WatchJob per job, whatever
the number of browsers following it (feeds.py); the lists page through the server's pages rather
than reading every graph or job (listing.py).

Pages are templates that lay out empty tables and charts; their scripts fill them from the JSON
endpoints with textContent, so no name a user chose (graph, node, dataset, column, metric) is
ever parsed as markup.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jinja2
import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from chainrule.client import ChainruleError, Client

from . import data, listing
from .data import JSON, BadRequest
from .feeds import JobFeeds
from .listing import Cursor, JobIndex
from .rendering import LayoutError, Pictures
from .security import Protection

PACKAGE = Path(__file__).resolve().parent
VENDOR = {
    "uplot": PACKAGE / "node_modules" / "uplot" / "dist",
    "panzoom": PACKAGE / "node_modules" / "@panzoom" / "panzoom" / "dist",
}
"""The browser libraries, installed by `npm ci --prefix dashboard` from the locked package.json."""
VENDOR_FILES = (
    VENDOR["uplot"] / "uPlot.iife.min.js",
    VENDOR["uplot"] / "uPlot.min.css",
    VENDOR["panzoom"] / "panzoom.min.js",
)
DEFAULT_PAGE_SIZE = 25
MAX_PAGE_SIZE = 500
MAX_FEEDS_BYTES = 64 * 1024 * 1024
JOB_STATE_FILTERS = ("queued", "running", "succeeded", "failed", "cancelled")
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
"""What the browser is told for each status the server answers; any other is the server's fault: 502."""


class MissingAssets(RuntimeError):
    """The browser libraries were not installed next to the package."""


def missing_assets() -> list[Path]:
    return [path for path in VENDOR_FILES if not path.is_file()]


@dataclass
class Dashboard:
    """The state the handlers share: the server's client, the pictures made so far, step rates, the
    jobs index, the jobs' live feeds, and graph and dataset names."""

    client: Client
    server_address: str
    pictures: Pictures = field(default_factory=Pictures)
    rates: data.StepRates = field(default_factory=data.StepRates)
    graph_names: dict[str, str] = field(default_factory=dict)
    dataset_names: dict[str, str] = field(default_factory=dict)
    jobs: JobIndex = field(init=False)
    feeds: JobFeeds = field(init=False)

    def __post_init__(self) -> None:
        self.jobs = JobIndex(self.client)
        self.feeds = JobFeeds(self.client)

    def graph_name(self, graph_id: str) -> str:
        """The name of a job's graph, asked once per graph; a deleted graph has none."""
        if graph_id not in self.graph_names:
            self.graph_names[graph_id] = _name_or_nothing(lambda: self.client.get_graph(graph_id, view="basic").name)
        return self.graph_names[graph_id]

    def dataset_name(self, dataset_id: str) -> str:
        """The name of a job's dataset, asked once per dataset; a deleted dataset has none."""
        if dataset_id not in self.dataset_names:
            self.dataset_names[dataset_id] = _name_or_nothing(lambda: self.client.get_dataset(dataset_id).name)
        return self.dataset_names[dataset_id]


def _name_or_nothing(name: Callable[[], str]) -> str:
    try:
        return name()
    except ChainruleError as error:
        if error.code != grpc.StatusCode.NOT_FOUND:
            raise
        return ""


def build_app(client: Client, server_address: str, allowed_hosts: list[str]) -> Starlette:
    """The app for `client`; `allowed_hosts` are the Host names requests may carry (["*"]: any),
    which keeps a web page from reaching a loopback dashboard through DNS rebinding."""
    missing = missing_assets()
    if missing:
        raise MissingAssets(
            f"the dashboard's browser libraries are missing ({missing[0]}): "
            f"run `npm ci --prefix {PACKAGE}` (or tools/setup-dev.sh in a checkout)"
        )
    dashboard = Dashboard(client, server_address)
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(PACKAGE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    templates = Jinja2Templates(env=environment)

    def page(template: str, title: str, **context: Any) -> Callable[[Request], Awaitable[Response]]:
        async def show(request: Request) -> Response:
            values = {name: request.path_params.get(name, value) for name, value in context.items()}
            return templates.TemplateResponse(
                request,
                template,
                {"title": title, "server": server_address, "csrf_token": request.state.csrf_token, **values},
            )

        return show

    api = Api(dashboard)
    routes = [
        Route("/", lambda request: RedirectResponse("/jobs", status_code=302)),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
        Route("/graphs", page("graphs.html", "Graphs")),
        Route("/graphs/{graph_id}", page("graph.html", "Graph", graph_id="")),
        Route("/datasets", page("datasets.html", "Datasets")),
        Route("/jobs", page("jobs.html", "Jobs")),
        Route("/jobs/{job_id}", page("job.html", "Job", job_id="")),
        Route("/compare", page("compare.html", "Compare jobs")),
        Route("/api/graphs", api.graphs),
        Route("/api/graphs/{graph_id}", api.graph),
        Route("/api/graphs/{graph_id}/render", api.render, methods=["POST"]),
        Route("/api/graphs/{graph_id}/parameters", api.parameters),
        Route("/api/datasets", api.datasets),
        Route("/api/jobs", api.jobs),
        Route("/api/jobs/{job_id}", api.job),
        Route("/api/jobs/{job_id}/history", api.history),
        Route("/api/jobs/{job_id}/events", api.events),
        Route("/api/jobs/{job_id}/cancel", api.cancel, methods=["POST"]),
        Mount("/static", StaticFiles(directory=PACKAGE / "static"), name="static"),
        *(Mount(f"/vendor/{name}", StaticFiles(directory=path), name=name) for name, path in VENDOR.items()),
    ]
    middleware = [
        Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts),
        Middleware(Protection),
        Middleware(GZipMiddleware, minimum_size=1024),
    ]
    return Starlette(routes=routes, middleware=middleware, exception_handlers={ChainruleError: _rpc_failed})


async def _rpc_failed(request: Request, error: Exception) -> Response:
    assert isinstance(error, ChainruleError)
    return JSONResponse({"error": str(error)}, status_code=HTTP_STATUS.get(error.code, 502))


def _bad_request(message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=400)


def _integer(request: Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query_params.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(f"{name} must be a whole number, got {text!r}") from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be from {low} to {high}, got {value}")
    return value


class Api:
    """The JSON endpoints, one method each."""

    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard
        self.client = dashboard.client

    async def graphs(self, request: Request) -> Response:
        """A page of the graphs, oldest first, whose name or id contains ?q= (all when empty), from
        ?page_token= (the next_page_token of the page before; empty for the first)."""
        query = request.query_params.get("q", "")
        try:
            page_size = _integer(request, "page_size", DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE)
            cursor = Cursor.decode(request.query_params.get("page_token", ""))
        except BadRequest as error:
            return _bad_request(str(error))
        page = await run_in_threadpool(listing.graph_page, self.client, query, cursor, page_size)
        self.dashboard.graph_names.update((info.graph_id, info.name) for info in page.graphs)
        next_token = "" if page.next_cursor is None else page.next_cursor.encode()
        return JSONResponse(data.graph_page(page.graphs, query, page_size, next_token, page.scanned))

    async def graph(self, request: Request) -> Response:
        graph_id = request.path_params["graph_id"]
        info = await run_in_threadpool(
            lambda: self.client.get_graph(graph_id, include_definition=True, omit_parameter_values=True)
        )
        return JSONResponse(data.graph_detail(info))

    async def render(self, request: Request) -> Response:
        """The graph's SVG: POST a JSON object {"feeds": {...} or null, "loss": name or null}, or an
        .npz archive of feeds (application/octet-stream) with the loss in the query (?loss=)."""
        graph_id = request.path_params["graph_id"]
        body = await request.body()
        if len(body) > MAX_FEEDS_BYTES:
            return JSONResponse({"error": f"feeds over {MAX_FEEDS_BYTES >> 20} MiB"}, status_code=413)
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        arrays: dict[str, np.ndarray] | None = None
        document: object = None
        try:
            if content_type == "application/octet-stream":
                arrays = data.npz_feeds(body) if body else None
                loss = request.query_params.get("loss") or None
            elif content_type == "application/json":
                request_document = json.loads(body or b"{}")
                if not isinstance(request_document, dict):
                    raise BadRequest('the body must be a JSON object: {"feeds": {...}, "loss": "name"}')
                document, loss = request_document.get("feeds"), request_document.get("loss") or None
                if loss is not None and not isinstance(loss, str):
                    raise BadRequest("loss must be a node's name")
            else:
                raise BadRequest("send the feeds as application/json or an .npz archive as application/octet-stream")
        except (BadRequest, ValueError) as error:
            return _bad_request(str(error))

        def draw() -> str:
            feeds = arrays
            if document is not None:
                info = self.client.get_graph(graph_id, include_definition=True, omit_parameter_values=True)
                assert info.definition is not None
                feeds = data.json_feeds(document, info.definition)
            dot = self.client.render(graph_id, feeds, loss, format="dot")
            return self.dashboard.pictures.svg(dot)

        try:
            svg = await run_in_threadpool(draw)
        except ValueError as error:  # BadRequest, or a feed the client library cannot encode
            return _bad_request(str(error))
        except LayoutError as error:
            return JSONResponse({"error": str(error)}, status_code=500)
        return Response(svg, media_type="image/svg+xml")

    async def parameters(self, request: Request) -> Response:
        graph_id = request.path_params["graph_id"]

        def summarize() -> JSON:
            info = self.client.get_graph(graph_id, view="basic")
            values, step = self.client.get_parameters_with_step(graph_id)
            state = set(info.state)
            return {
                "step": step,
                "parameters": [
                    data.parameter_summary(name, "state" if name in state else "parameter", value)
                    for name, value in values.items()
                ],
            }

        return JSONResponse(await run_in_threadpool(summarize))

    async def datasets(self, request: Request) -> Response:
        """A page of the datasets, oldest first, from ?page_token= (the next_page_token of the page
        before; empty for the first): one ListDatasets call, whose token passes through as it is."""
        try:
            page_size = _integer(request, "page_size", DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE)
        except BadRequest as error:
            return _bad_request(str(error))
        token = request.query_params.get("page_token", "")
        datasets, next_token = await run_in_threadpool(self.client.list_datasets_page, page_size, token)
        self.dashboard.dataset_names.update((info.dataset_id, info.name) for info in datasets)
        return JSONResponse(data.dataset_page(datasets, page_size, next_token))

    async def jobs(self, request: Request) -> Response:
        """A page of the jobs, newest first, in any of the ?state= given (all when none), of ?graph_id=
        (any when empty), ?page= (from 1) of ?page_size=."""
        states = request.query_params.getlist("state")
        unknown = [state for state in states if state not in JOB_STATE_FILTERS]
        if unknown:
            return _bad_request(f"unknown state {unknown[0]!r}; one of {', '.join(JOB_STATE_FILTERS)}")
        graph_id = request.query_params.get("graph_id", "")
        try:
            page = _integer(request, "page", 1, 1, 1 << 31)
            page_size = _integer(request, "page_size", DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE)
        except BadRequest as error:
            return _bad_request(str(error))

        def summaries() -> JSON:
            jobs = self.dashboard.jobs.jobs()
            shown, total, page_shown, pages = listing.job_page(jobs, states, graph_id, page, page_size)
            return {
                "jobs": [
                    data.job_summary(info, self.dashboard.rates.rate(info), self.dashboard.graph_name(info.graph_id))
                    for info in shown
                ],
                "total": total,
                "page": page_shown,
                "pages": pages,
                "page_size": page_size,
            }

        return JSONResponse(await run_in_threadpool(summaries))

    async def job(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]

        def detail() -> JSON:
            info = self.client.get_job(job_id).info()
            spec = info.spec
            datasets = {spec.dataset_id} | ({spec.evaluation.dataset_id} if spec.evaluation.dataset_id else set())
            return data.job_detail(
                info,
                self.dashboard.rates.rate(info),
                self.dashboard.graph_name(info.graph_id),
                {dataset_id: self.dashboard.dataset_name(dataset_id) for dataset_id in sorted(datasets)},
            )

        return JSONResponse(await run_in_threadpool(detail))

    async def history(self, request: Request) -> Response:
        """Every step of the job so far, to download: ?format=csv (a row a step) or json (a column a series)."""
        job_id = request.path_params["job_id"]
        kind = request.query_params.get("format", "json")
        if kind not in ("csv", "json"):
            return _bad_request(f"format must be csv or json, got {kind!r}")
        history = await run_in_threadpool(lambda: self.client.get_job(job_id).history())
        filename = f"job-{re.sub(r'[^0-9A-Za-z_-]', '_', job_id)}-history.{kind}"
        attachment = {"content-disposition": f'attachment; filename="{filename}"'}
        if kind == "csv":
            return Response(data.history_csv(history), media_type="text/csv; charset=utf-8", headers=attachment)
        return JSONResponse(data.history_columns(history), headers=attachment)

    async def cancel(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]

        def cancel() -> JSON:
            info = self.client.get_job(job_id).cancel()
            return data.job_summary(info, None, self.dashboard.graph_name(info.graph_id))

        return JSONResponse(await run_in_threadpool(cancel))

    async def events(self, request: Request) -> Response:
        """Server-Sent Events of the job's WatchJob from ?from_step= (history first, then live), one
        stream per job shared by every browser (feeds.py)."""
        try:
            from_step = _integer(request, "from_step", 0, 0, 1 << 62)
        except BadRequest as error:
            return _bad_request(str(error))
        job_id = request.path_params["job_id"]
        await run_in_threadpool(self.client.get_job, job_id)  # NOT_FOUND as a 404, before the stream starts
        return StreamingResponse(
            self.dashboard.feeds.follow(job_id, from_step),
            media_type="text/event-stream",
            headers={"x-accel-buffering": "no"},
        )
