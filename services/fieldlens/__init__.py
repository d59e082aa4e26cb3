"""fieldlens: a gRPC serving cluster for fine-grained image identification down a taxonomy."""

from fieldlens.common.runtime import configure_grpc_core

# Before anything imports grpc: gRPC's core reads its options once, when it starts.
configure_grpc_core()
