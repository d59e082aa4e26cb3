"""fieldlens: a gRPC serving cluster for fine-grained image identification down a taxonomy."""
