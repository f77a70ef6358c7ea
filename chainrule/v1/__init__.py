"""Generated protobuf and gRPC stubs of the chainrule.v1 wire contract (see proto/chainrule/v1)."""
