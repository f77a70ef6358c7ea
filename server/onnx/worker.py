"""onnx's C++ parts read untrusted models in a worker process, never in the server's.

The checker, the inliner, the version converter and shape inference are C++; on some malformed
models (ones the checker passes) the version converter fails a C++ assertion, which aborts the
process it runs in. So `prepare_model` hands the bytes to a worker process (this module's
`main`) that parses, checks, converts and infers them, and answers with the prepared model's
bytes or the refusal. A worker that dies takes only that model down (INVALID_ARGUMENT); the next
import starts another. The worker reads its requests from a pipe only the server holds, so it
ends when the server does, however the server ends.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import threading
from typing import BinaryIO

import onnx
from onnx import ModelProto

from chainrule.server import errors
from chainrule.server.errors import ChainruleError, InvalidArgument
from chainrule.server.onnx.model import MODEL_SUBJECT, convert_opset, infer_types, load_model

Outcome = tuple[str, ...]
"""("model", prepared bytes) or ("refused", error class name, message, reason, subject)."""
LENGTH = struct.Struct("<Q")


def _send(stream: BinaryIO, payload: bytes) -> None:
    stream.write(LENGTH.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def _receive(stream: BinaryIO) -> bytes | None:
    """One message, or None when the other side has gone."""
    head = stream.read(LENGTH.size)
    if len(head) < LENGTH.size:
        return None
    (size,) = LENGTH.unpack(head)
    payload = stream.read(size)
    return payload if len(payload) == size else None


class ModelWorker:
    """One worker process, started on first use and again after it dies; one model at a time."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def prepare(self, data: bytes) -> ModelProto:
        with self._lock:
            outcome = self._ask(data)
        if outcome is None:
            raise InvalidArgument(
                "onnx itself crashed while checking or converting this model (a malformed model the checker "
                "let through); nothing was stored",
                reason="BAD_ONNX_MODEL",
                subject=MODEL_SUBJECT,
            )
        if outcome[0] == "model":
            return onnx.load_from_string(outcome[1])
        _, kind, message, reason, subject = outcome
        error_class = getattr(errors, kind, InvalidArgument)
        raise error_class(message, reason=reason, subject=subject)

    def _ask(self, data: bytes) -> Outcome | None:
        process = self._process
        if process is None or process.poll() is not None:
            process = self._process = subprocess.Popen(
                [sys.executable, "-c", "from chainrule.server.onnx.worker import main; main()"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
        assert process.stdin is not None and process.stdout is not None
        try:
            _send(process.stdin, data)  # type: ignore[arg-type]
            answer = _receive(process.stdout)  # type: ignore[arg-type]
        except (BrokenPipeError, OSError):
            answer = None
        if answer is None:
            process.kill()
            process.wait()
            self._process = None
            return None
        outcome: Outcome = pickle.loads(answer)  # the worker is this module, not the client
        return outcome


WORKER = ModelWorker()


def prepare_model(data: bytes) -> ModelProto:
    """The model parsed, checked, inlined, at the import opset and with inferred types, or the refusal."""
    return WORKER.prepare(data)


def prepare(data: bytes) -> Outcome:
    """What the worker does with one model."""
    from chainrule.server.onnx.table import refuse_uncovered_ops  # the table imports the importer

    try:
        model = load_model(data)
        try:
            model = convert_opset(model)
        except InvalidArgument:
            refuse_uncovered_ops(model)  # a clearer answer than the converter's, when it applies
            raise
        return ("model", infer_types(model).SerializeToString())
    except ChainruleError as error:
        return ("refused", type(error).__name__, error.message, error.reason, error.subject)
    except UnicodeDecodeError as error:  # protobuf parses proto2 strings lazily: a bad one fails when read
        message = f"the model holds a string that is not valid UTF-8 ({error.reason} at byte {error.start})"
        return ("refused", "InvalidArgument", message, "BAD_ONNX_MODEL", MODEL_SUBJECT)


def main() -> None:
    """The worker: one model per request until the server closes the pipe. Answers go to a private
    copy of stdout; anything a library prints goes to stderr (the server's log) instead."""
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    requests = sys.stdin.buffer
    while (data := _receive(requests)) is not None:
        _send(answers, pickle.dumps(prepare(data)))
