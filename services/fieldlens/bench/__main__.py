"""Entry point: `python -m fieldlens.bench`."""

import sys

from fieldlens.common.runtime import configure_grpc_core

# Before grpc loads: the load generator's gRPC core does its I/O as the services' does.
configure_grpc_core()

from fieldlens.bench import main  # noqa: E402

sys.exit(main())
