"""The dashboard's ASGI app: HTML pages, the JSON endpoints their scripts read, and a live job stream.

Every call to the chainrule server goes through one `chainrule.client.Client`, whose token (if
any) stays in this process: pages and answers never carry it. The client is synchronous, so
handlers run it in Starlette's thread pool; a job's live stream gets a thread of its own that
follows WatchJob and hands events to the response over an asyncio queue.

Pages are templates that lay out empty tables and charts; their scripts fill them from the JSON
endpoints with textContent, so no name a user chose (graph, node, dataset, column, metric) is
ever parsed as markup.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

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

from chainrule.client import ChainruleError, Client, JobEvent
from chainrule.client.jobs import JobState, JobWatch

from . import data
from .data import JSON, BadRequest
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
EVENTS_PER_MESSAGE = 5000
KEEPALIVE_SECONDS = 15.0
COALESCE_SECONDS = 0.05
"""A live stream waits this long after an event for more before sending, so a fast job's steps
travel a few dozen per message instead of one, still far within a second of each step."""
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
    """The state the handlers share: the server's client, the pictures made so far, step rates, graph names."""

    client: Client
    server_address: str
    pictures: Pictures = field(default_factory=Pictures)
    rates: data.StepRates = field(default_factory=data.StepRates)
    graph_names: dict[str, str] = field(default_factory=dict)

    def graph_name(self, graph_id: str) -> str:
        """The name of a job's graph, asked once per graph; a deleted graph has none."""
        if graph_id not in self.graph_names:
            try:
                self.graph_names[graph_id] = self.client.get_graph(graph_id, view="basic").name
            except ChainruleError as error:
                if error.code != grpc.StatusCode.NOT_FOUND:
                    raise
                self.graph_names[graph_id] = ""
        return self.graph_names[graph_id]


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
        try:
            page = _integer(request, "page", 1, 1, 1 << 31)
            page_size = _integer(request, "page_size", DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE)
        except BadRequest as error:
            return _bad_request(str(error))
        graphs = await run_in_threadpool(self.client.list_graphs, 1000)
        self.dashboard.graph_names.update((info.graph_id, info.name) for info in graphs)
        return JSONResponse(data.graph_page(graphs, request.query_params.get("q", ""), page, page_size))

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
        datasets = await run_in_threadpool(self.client.list_datasets, 1000)
        return JSONResponse({"datasets": [data.dataset_summary(info) for info in datasets]})

    async def jobs(self, request: Request) -> Response:
        states = request.query_params.getlist("state")
        unknown = [state for state in states if state not in JOB_STATE_FILTERS]
        if unknown:
            return _bad_request(f"unknown state {unknown[0]!r}; one of {', '.join(JOB_STATE_FILTERS)}")
        graph_id = request.query_params.get("graph_id", "")

        def summaries() -> list[JSON]:
            jobs = self.client.list_jobs(states=cast(list[JobState], states), graph_id=graph_id, page_size=1000)
            return [
                data.job_summary(info, self.dashboard.rates.rate(info), self.dashboard.graph_name(info.graph_id))
                for info in jobs
            ]

        return JSONResponse({"jobs": await run_in_threadpool(summaries)})

    async def job(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]

        def detail() -> JSON:
            info = self.client.get_job(job_id).info()
            return data.job_detail(info, self.dashboard.rates.rate(info), self.dashboard.graph_name(info.graph_id))

        return JSONResponse(await run_in_threadpool(detail))

    async def history(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        history = await run_in_threadpool(lambda: self.client.get_job(job_id).history())
        return JSONResponse(data.history_columns(history))

    async def cancel(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]

        def cancel() -> JSON:
            info = self.client.get_job(job_id).cancel()
            return data.job_summary(info, None, self.dashboard.graph_name(info.graph_id))

        return JSONResponse(await run_in_threadpool(cancel))

    async def events(self, request: Request) -> Response:
        """Server-Sent Events of WatchJob from ?from_step= (history first, then live): `data` messages
        of {"events": [...]}, each event a step or a change of state; `end` when the job has ended
        and every event was sent; `failure` with a message if the watch broke."""
        try:
            from_step = _integer(request, "from_step", 0, 0, 1 << 62)
        except BadRequest as error:
            return _bad_request(str(error))
        job_id = request.path_params["job_id"]
        job = await run_in_threadpool(self.client.get_job, job_id)
        watch = job.watch(from_step)
        return StreamingResponse(
            _event_stream(watch), media_type="text/event-stream", headers={"x-accel-buffering": "no"}
        )


_END = object()


async def _event_stream(watch: JobWatch) -> AsyncIterator[str]:
    """The watch's events as SSE messages; the watch is cancelled when the browser goes away."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()

    def pump() -> None:
        def put(item: object) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop closed: the dashboard is stopping
                watch.cancel()

        try:
            for event in watch:
                put(event)
            put(_END)
        except ChainruleError as error:
            put(error)

    threading.Thread(target=pump, name="watch-job", daemon=True).start()
    try:
        while True:
            try:
                first = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            await asyncio.sleep(COALESCE_SECONDS)
            items = [first]
            while not queue.empty() and len(items) < EVENTS_PER_MESSAGE:
                items.append(queue.get_nowait())
            events = [item for item in items if isinstance(item, JobEvent)]
            if events:
                yield f"data: {data.dumps({'events': [_event(event) for event in events]})}\n\n"
            for item in items:
                if item is _END:
                    yield "event: end\ndata: {}\n\n"
                    return
                if isinstance(item, ChainruleError):
                    yield f"event: failure\ndata: {data.dumps({'error': str(item)})}\n\n"
                    return
    finally:
        watch.cancel()


def _event(event: JobEvent) -> JSON:
    if event.state is not None:
        return {"state": event.state}
    return data.event_json(event.step, event.epoch, event.loss, event.learning_rate, event.metrics)
