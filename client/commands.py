"""The `chainrule` subcommands that talk to a running server, and `plot-history`, which reads a saved History.

They are registered on the server's command line by `add_client_commands`, so one `chainrule`
program does both jobs. A failure prints one line, `chainrule: CODE: message` for an RPC and
`chainrule: message` otherwise, and exits 1: people at a terminal and scripts alike want the
reason, not a traceback.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chainrule import tensors

from .channel import DEFAULT_MAX_MESSAGE_MB, MAX_MESSAGE_MB, open_channel
from .client import Client
from .datasets import DatasetColumn
from .errors import ChainruleError
from .jobs import ENDED, JobEvent
from .render import RenderError, format_attrs, format_tensor, render_png, render_svg
from .training import History

DEFAULT_ADDRESS = "127.0.0.1:50051"
RENDER_SUFFIXES = (".svg", ".png", ".dot")
JOB_STATES = ("queued", "running", *ENDED)
DASHBOARD_LIBRARIES = ("starlette", "uvicorn", "jinja2")

Command = Callable[[argparse.Namespace], int]


def default_address() -> str:
    return os.environ.get("CHAINRULE_ADDRESS", DEFAULT_ADDRESS)


def connect(args: argparse.Namespace) -> Client:
    """The client of a command's connection options: the one place a channel is made, so new options go here."""
    return Client(
        args.address,
        timeout=args.timeout,
        token=args.token,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        max_message_mb=args.max_message_mb,
    )


def connection_options() -> argparse.ArgumentParser:
    """The options of every command that talks to a server, the client side of `chainrule serve`'s."""
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--address", default=default_address(), help="server HOST:PORT (default: $CHAINRULE_ADDRESS or 127.0.0.1:50051)"
    )
    connection.add_argument(
        "--timeout", type=float, default=60.0, help="seconds each call may take (default: %(default)s)"
    )
    connection.add_argument(
        "--token",
        default=os.environ.get("CHAINRULE_TOKEN"),
        help="bearer token for servers started with --auth-tokens (default: $CHAINRULE_TOKEN)",
    )
    connection.add_argument("--tls-ca", metavar="PEM", help="use TLS, verifying the server with this CA certificate")
    connection.add_argument("--tls-cert", metavar="PEM", help="use TLS with this client certificate (mutual TLS)")
    connection.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    connection.add_argument(
        "--max-message-mb",
        type=_message_mb,
        default=DEFAULT_MAX_MESSAGE_MB,
        metavar="MB",
        help="largest answer accepted, MiB (default: %(default)s, the server's own default limit; "
        "raise it to match a server started with a larger --max-message-mb)",
    )
    return connection


def _message_mb(text: str) -> int:
    if not text.strip().isdigit() or not 0 < int(text) < MAX_MESSAGE_MB:
        raise argparse.ArgumentTypeError(f"must be a whole number of MiB from 1 to {MAX_MESSAGE_MB - 1}, got {text!r}")
    return int(text)


def check_health(args: argparse.Namespace) -> int:
    """Exit 0 when the server answers SERVING: for container health checks and scripts."""
    with open_channel(
        args.address, token=args.token, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key
    ) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as error:
            print(f"chainrule: {args.address}: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    print(f"{args.address}: {status}")
    return 0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1


def add_client_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add health, graphs, show, render, import-onnx, export-onnx, datasets, upload-dataset and plot-history
    (and the job commands, and dashboard) to the `chainrule` parser's subcommands."""
    connection = connection_options()
    health = subparsers.add_parser(
        "health", parents=[connection], help="ask a server's grpc.health.v1 service whether it is serving"
    )
    health.add_argument("--service", default="", help="service name to ask about (default: the whole server)")
    health.set_defaults(run=check_health)

    graphs = subparsers.add_parser("graphs", parents=[connection], help="list the server's graphs, oldest first")
    graphs.set_defaults(run=_reported(list_graphs))

    show = subparsers.add_parser(
        "show", parents=[connection], help="print a graph's nodes, parameters and optimizer step"
    )
    show.add_argument("graph_id")
    show.set_defaults(run=_reported(show_graph))

    render = subparsers.add_parser(
        "render",
        parents=[connection],
        help="draw a graph left to right, with values and gradients when fed",
        description="Draw a graph as SVG, PNG (both need Graphviz's dot) or DOT, picked by the output's suffix.",
    )
    render.add_argument("graph_id")
    render.add_argument("--feeds", type=Path, help="an .npz archive (numpy.savez) of one array per input to feed")
    render.add_argument("--loss", help="also draw every node's gradient of this scalar node")
    render.add_argument("-o", "--output", type=Path, required=True, help="the file to write: .svg, .png or .dot")
    render.set_defaults(run=_reported(render_graph))

    import_onnx = subparsers.add_parser(
        "import-onnx", parents=[connection], help="store an ONNX model as a graph and print its id and outputs"
    )
    import_onnx.add_argument("model", type=Path, help="the .onnx file (self-contained, no external data)")
    import_onnx.add_argument("--name", default="", help="the graph's name (default: the ONNX graph's)")
    import_onnx.add_argument(
        "--frozen", nargs="+", default=[], metavar="INITIALIZER", help="float initializers to keep fixed"
    )
    import_onnx.set_defaults(run=_reported(import_onnx_model))

    export_onnx = subparsers.add_parser(
        "export-onnx", parents=[connection], help="write a graph with its current parameters as an ONNX model"
    )
    export_onnx.add_argument("graph_id")
    export_onnx.add_argument("-o", "--output", type=Path, required=True, help="the .onnx file to write")
    export_onnx.add_argument(
        "--outputs", nargs="+", default=[], metavar="NODE", help="the model's outputs (default: every unread node)"
    )
    export_onnx.set_defaults(run=_reported(export_onnx_model))

    datasets = subparsers.add_parser("datasets", parents=[connection], help="list the server's datasets, oldest first")
    datasets.set_defaults(run=_reported(list_datasets))

    upload = subparsers.add_parser(
        "upload-dataset",
        parents=[connection],
        help="store the arrays of an .npz archive on the server as a dataset, one column per array",
    )
    upload.add_argument("name", help="the dataset's name")
    upload.add_argument(
        "file", type=Path, help="an .npz archive (numpy.savez); every array's first axis indexes examples"
    )
    upload.set_defaults(run=_reported(upload_dataset))

    jobs = subparsers.add_parser("jobs", parents=[connection], help="list the server's training jobs, oldest first")
    jobs.add_argument(
        "--state", nargs="+", default=[], choices=JOB_STATES, metavar="STATE", help=f"only: {', '.join(JOB_STATES)}"
    )
    jobs.add_argument("--graph", default="", metavar="GRAPH_ID", help="only the jobs of this graph")
    jobs.set_defaults(run=_reported(list_jobs))

    job = subparsers.add_parser("job", parents=[connection], help="print a job's spec, progress and outcome")
    job.add_argument("job_id")
    job.set_defaults(run=_reported(show_job))

    watch = subparsers.add_parser(
        "watch",
        parents=[connection],
        help="follow a job to its end; exit 0 if it succeeded",
        description="Follow a job: a progress bar on a terminal, else one line per step and change of state.",
    )
    watch.add_argument("job_id")
    watch.add_argument("--from-step", type=int, default=0, help="the first step to print (default: 1)")
    watch.set_defaults(run=_reported(watch_job))

    cancel = subparsers.add_parser("cancel", parents=[connection], help="cancel a queued or running job")
    cancel.add_argument("job_id")
    cancel.set_defaults(run=_reported(cancel_job))

    dashboard = subparsers.add_parser(
        "dashboard",
        parents=[connection],
        help="serve a web dashboard of the server's graphs, datasets and jobs",
        description="A web app, a client of the server like any other; needs pip install 'chainrule[dashboard]'.",
    )
    dashboard.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    dashboard.add_argument(
        "--port", type=int, default=8080, help="port to listen on; 0 picks a free one (default: %(default)s)"
    )
    dashboard.set_defaults(run=run_dashboard)

    plot = subparsers.add_parser("plot-history", help="plot a History saved with History.save as a PNG")
    plot.add_argument("history", type=Path, help="the History's JSON file")
    plot.add_argument("-o", "--output", type=Path, required=True, help="the PNG file to write")
    plot.add_argument("--title", default="training loss", help="the plot's title (default: %(default)s)")
    plot.set_defaults(run=_reported(plot_history))


def list_graphs(args: argparse.Namespace) -> int:
    with connect(args) as client:
        graphs = client.list_graphs()
    rows = [["GRAPH_ID", "NAME", "NODES", "STEP", "CREATED"]]
    rows += [
        [info.graph_id, info.name or "-", str(info.node_count), str(info.step), _timestamp(info.create_time)]
        for info in graphs
    ]
    print(_table(rows))
    return 0


def show_graph(args: argparse.Namespace) -> int:
    with connect(args) as client:
        info = client.get_graph(args.graph_id, include_definition=True, omit_parameter_values=True)
        parameters, step = client.get_parameters_with_step(args.graph_id)
    assert info.definition is not None  # include_definition=True always sets it
    nodes = {node.name: node for node in info.definition.nodes}
    print(f"graph {info.graph_id}  {info.name or '-'}")
    print(f"step {step}, {info.node_count} nodes, created {_timestamp(info.create_time)}")
    print("\nnodes (topological order):")
    rows = []
    for name in info.topological_order:
        node = nodes[name]
        call = f"{node.op}({', '.join(node.inputs)})" if node.inputs else node.op
        if node.op == "constant":
            value = tensors.decode(node.value, name)
            detail = f"{tensors.dtype_name(value.dtype)} {list(value.shape)} = {format_tensor(value)}"
        else:
            detail = format_attrs(node)
        rows.append([name, call, detail])
    print(_table(rows, indent=2))
    print("\nparameters:")
    rows = [
        [name, tensors.dtype_name(value.dtype), str(list(value.shape)), format_tensor(value)]
        for name, value in parameters.items()
    ]
    print(_table(rows, indent=2) if rows else "  (none)")
    return 0


def render_graph(args: argparse.Namespace) -> int:
    output: Path = args.output
    suffix = output.suffix.lower()
    if suffix not in RENDER_SUFFIXES:
        raise ValueError(f"{output}: the output's suffix picks the format; use one of {', '.join(RENDER_SUFFIXES)}")
    feeds = None if args.feeds is None else _load_feeds(args.feeds)
    with connect(args) as client:
        dot = client.render(args.graph_id, feeds, args.loss, format="dot")
    if suffix == ".dot":
        output.write_text(dot, encoding="utf-8")
    elif suffix == ".svg":
        output.write_text(render_svg(dot), encoding="utf-8")
    else:
        output.write_bytes(render_png(dot))
    print(f"wrote {output}")
    return 0


def import_onnx_model(args: argparse.Namespace) -> int:
    with connect(args) as client:
        imported = client.import_onnx(args.model, name=args.name, frozen=args.frozen)
    graph = imported.graph
    print(f"graph {graph.graph_id}  {graph.name or '-'}")
    print(f"{graph.node_count} nodes; inputs: {', '.join(graph.inputs) or '-'}")
    print(f"{len(graph.parameters)} parameters, {len(graph.state)} state")
    print(f"outputs: {', '.join(imported.outputs)}")
    return 0


def export_onnx_model(args: argparse.Namespace) -> int:
    with connect(args) as client:
        model = client.export_onnx(args.graph_id, args.output, outputs=args.outputs)
    print(f"wrote {args.output} ({len(model):,} bytes)")
    return 0


def list_jobs(args: argparse.Namespace) -> int:
    with connect(args) as client:
        jobs = client.list_jobs(states=args.state, graph_id=args.graph)
    rows = [["JOB_ID", "STATE", "STEP", "EPOCH", "LOSS", "GRAPH_ID", "CREATED"]]
    rows += [
        [
            info.job_id,
            info.state,
            f"{info.step}/{info.total_steps}",
            str(info.epoch),
            f"{info.loss:.4g}" if info.step else "-",
            info.graph_id,
            _timestamp(info.create_time),
        ]
        for info in jobs
    ]
    print(_table(rows))
    return 0


def show_job(args: argparse.Namespace) -> int:
    with connect(args) as client:
        info = client.get_job(args.job_id).info()
    spec = info.spec
    print(f"job {info.job_id}  {info.state}")
    progress = f"step {info.step} of {info.total_steps}, epoch {info.epoch}"
    print(progress + (f", loss {info.loss:.6g}" if info.step else ""))
    for name, value in info.metrics.items():
        print(f"  {name} = {value:.6g}")
    if info.error:
        print(f"error: {info.error}")
    if info.status_message:
        print(f"waiting: {info.status_message}")
    times = [("created", info.create_time), ("started", info.start_time), ("ended", info.end_time)]
    print(", ".join(f"{label} {_timestamp(moment)}" for label, moment in times if moment is not None))
    print(f"worker {info.worker or '-'}, resumes {info.resumes}")
    print(f"\ngraph {spec.graph_id}, loss '{spec.loss}', optimizer {spec.optimizer.WhichOneof('kind') or '-'}")
    feeds = ", ".join(f"{name} <- {column}" for name, column in sorted(spec.feeds.items()))
    print(f"dataset {spec.dataset_id}: {feeds}")
    settings = [f"batch_size {spec.batch_size}", f"replicas {info.replicas}"]
    settings += [f"{field} {getattr(spec, field)}" for field in ("epochs", "max_steps") if getattr(spec, field)]
    settings += [f"seed {spec.seed}", "shuffled" if spec.shuffle else "in order"]
    settings += ["drop_last"] if spec.drop_last else []
    print(", ".join(settings))
    if spec.HasField("evaluation"):
        evaluation = spec.evaluation
        every = f"every {evaluation.every_steps} steps and " if evaluation.every_steps else ""
        print(f"evaluation of {', '.join(evaluation.metrics)} {every}at the end")
    return 0


def watch_job(args: argparse.Namespace) -> int:
    with connect(args) as client:
        job = client.get_job(args.job_id)
        if sys.stderr.isatty():
            info = job.wait(progress=True, raise_on_failure=False)
        else:
            with job.watch(args.from_step) as events:
                for event in events:
                    print(_event_line(event), flush=True)
            info = job.info()
    if info.error:
        print(f"chainrule: job {info.job_id} {info.state}: {info.error}", file=sys.stderr)
    return 0 if info.state == "succeeded" else 1


def _event_line(event: JobEvent) -> str:
    if event.state is not None:
        return f"state {event.state}"
    metrics = "".join(f"  {name} {value:.6g}" for name, value in event.metrics.items())
    return f"step {event.step}  epoch {event.epoch}  loss {event.loss:.6g}  lr {event.learning_rate:.6g}{metrics}"


def cancel_job(args: argparse.Namespace) -> int:
    with connect(args) as client:
        info = client.get_job(args.job_id).cancel()
    print(f"job {info.job_id} {info.state} at step {info.step}" + ("" if info.ended else " (stops after its step)"))
    return 0


def list_datasets(args: argparse.Namespace) -> int:
    with connect(args) as client:
        datasets = client.list_datasets()
    rows = [["DATASET_ID", "NAME", "EXAMPLES", "BYTES", "COLUMNS", "CREATED"]]
    rows += [
        [
            info.dataset_id,
            info.name,
            str(info.num_examples),
            str(info.size_bytes),
            " ".join(_column(column) for column in info.columns),
            _timestamp(info.create_time),
        ]
        for info in datasets
    ]
    print(_table(rows))
    return 0


def upload_dataset(args: argparse.Namespace) -> int:
    loaded = np.load(args.file, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"{args.file}: upload-dataset takes an .npz archive (numpy.savez), one array per column")
    with loaded, connect(args) as client:
        info = client.upload_dataset(args.name, loaded)
    print(f"dataset {info.dataset_id}  {info.name}")
    print(f"{info.num_examples} examples, {info.size_bytes:,} bytes, sha256 {info.sha256}")
    print(f"columns: {' '.join(_column(column) for column in info.columns)}")
    return 0


def _column(column: DatasetColumn) -> str:
    return f"{column.name}:{column.dtype}[{','.join(map(str, column.shape))}]"


def run_dashboard(args: argparse.Namespace) -> int:
    """Imported only here: the dashboard's web libraries are an optional extra."""
    try:
        dashboard = importlib.import_module("chainrule.dashboard.serve")
    except ImportError as error:
        library = (error.name or "").split(".")[0]
        if library not in DASHBOARD_LIBRARIES:
            raise
        print(f"chainrule: the dashboard needs {library}: pip install 'chainrule[dashboard]'", file=sys.stderr)
        return 1
    return int(dashboard.serve(args, connect(args)))


def plot_history(args: argparse.Namespace) -> int:
    History.load(args.history).plot(args.output, title=args.title)
    print(f"wrote {args.output}")
    return 0


def _reported(command: Command) -> Command:
    """Turn the failures a user can cause or fix (RPC errors, files, missing tools) into one line on stderr."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (ChainruleError, OSError, ValueError, RenderError, ImportError) as error:
            print(f"chainrule: {error}", file=sys.stderr)
            return 1

    return run


def _load_feeds(path: Path) -> dict[str, np.ndarray]:
    loaded = np.load(path, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: --feeds takes an .npz archive (numpy.savez) with one array per input")
    with loaded:
        return {name: loaded[name] for name in loaded.files}


def _timestamp(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _table(rows: Sequence[Sequence[str]], indent: int = 0) -> str:
    widths = [max(len(row[column]) for row in rows if column < len(row)) for column in range(max(map(len, rows)))]
    lines = [
        " " * indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip()
        for row in rows
    ]
    return "\n".join(lines)
