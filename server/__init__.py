"""The chainrule server: graph store, execution engine and gRPC service."""
