"""The gRPC servicers, one module per service, and the per-call plumbing they share (`calls`)."""
