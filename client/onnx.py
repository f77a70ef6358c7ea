"""The client side of ImportOnnx and ExportOnnx: reading models, naming the size limit, writing files.

The client needs no `onnx` package: models travel as serialized bytes. Anything with a
`SerializeToString()` (an onnx.ModelProto, `torch.onnx.export(...).model_proto`) is accepted too.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import grpc

from .errors import ChainruleError

if TYPE_CHECKING:
    from .client import GraphInfo

GRPC_SIZE_MESSAGE = "larger than max"
"""What gRPC's own refusal of an oversized message says (the server's handler never sees those)."""


@runtime_checkable
class SerializableModel(Protocol):
    def SerializeToString(self) -> bytes: ...  # noqa: N802 (protobuf's name)


OnnxModel = str | os.PathLike[str] | bytes | bytearray | memoryview | SerializableModel
"""A path to an .onnx file, its bytes, or a ModelProto."""


@dataclass(frozen=True)
class ImportedModel:
    """What ImportOnnx answers: the stored graph, and the node names of the ONNX graph's outputs, in order."""

    graph: GraphInfo
    outputs: tuple[str, ...]

    @property
    def graph_id(self) -> str:
        return self.graph.graph_id


def model_bytes(model: OnnxModel) -> bytes:
    if isinstance(model, bytes | bytearray | memoryview):
        return bytes(model)
    if isinstance(model, SerializableModel):
        return model.SerializeToString()
    return Path(model).read_bytes()


@contextmanager
def size_refusals(size: int) -> Iterator[None]:
    """Name --max-message-mb when gRPC itself refused the model for its size (a model far over the
    server's limit never reaches the server's own check, which names it)."""
    try:
        yield
    except ChainruleError as error:
        if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and GRPC_SIZE_MESSAGE in error.message:
            raise ChainruleError(
                error.code,
                f"the model is {size:,} bytes, more than the server accepts (chainrule serve --max-message-mb); "
                f"gRPC said: {error.message}",
                reason="MODEL_TOO_LARGE",
            ) from None
        raise


def write_model(path: str | os.PathLike[str], model: bytes) -> None:
    """Write the file whole or not at all: a failed export never leaves half a model behind."""
    target = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(model)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
