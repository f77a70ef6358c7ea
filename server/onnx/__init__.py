"""ONNX models in and out: `import_model` maps a serialized ModelProto onto a chainrule Graph
through the table of covered ops (`table.TABLE`); `export_model` writes a graph with its current
parameters and state as a ModelProto. onnx itself does all the parsing, checking, opset
conversion and shape inference. No gRPC here: the service calls these.
"""

from chainrule.server.onnx.exporter import export_model
from chainrule.server.onnx.importer import Imported, import_model
from chainrule.server.onnx.model import IMPORT_OPSET

__all__ = ["IMPORT_OPSET", "Imported", "export_model", "import_model"]
