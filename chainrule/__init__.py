"""chainrule: a gRPC service that runs dataflow graphs and differentiates them."""

__version__ = "0.1.0"
