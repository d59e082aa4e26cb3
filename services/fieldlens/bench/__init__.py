"""`python -m fieldlens.bench` / `fieldlens bench`: load and micro benchmarks of the cluster.

This module holds only the command line; the work lives in `suite` (imported when a run starts,
so that `fieldlens --help` does not pay for numpy, tritonclient or matplotlib).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from fieldlens.bench.plan import DEFAULT_OUT_DIR


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench's options, shared by `python -m fieldlens.bench` and `fieldlens bench`."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short run (about a minute): fewer points, shorter scenarios, smaller stores",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="with --addr: call a local cluster started with `fieldlens up --tls/--mtls` over TLS",
    )
    parser.add_argument("--ca", type=Path, help="with --addr: the CA of the router's certificate")
    parser.add_argument("--cert", type=Path, help="with --addr, mTLS: the client certificate")
    parser.add_argument("--key", type=Path, help="with --addr, mTLS: the client key")
    parser.add_argument(
        "--addr",
        dest="router_addr",
        metavar="HOST:PORT",
        default=None,
        help="router of an already-running cluster (loopback host:port); default: start a "
        "local cluster on free ports and stop it at the end",
    )
    parser.add_argument(
        "--triton",
        dest="triton_addr",
        metavar="HOST:PORT",
        default=None,
        help="Triton gRPC address of that cluster (default: the --addr host, port 8001)",
    )
    parser.add_argument(
        "--router-metrics",
        metavar="HOST:PORT",
        default=None,
        help="the router's /metrics host:port (default: the --addr host, port 9101)",
    )
    parser.add_argument(
        "--triton-metrics",
        metavar="HOST:PORT",
        default=None,
        help="Triton's /metrics host:port (default: the --triton host, port 8002)",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="run directory of an already-running local cluster, for its pidfiles (memory, "
        "CPU, --profile); "
        "default: .run",
    )
    parser.add_argument("--duration", type=float, default=None, help="seconds per scenario point")
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="highest in-flight count of the closed-loop sweep (levels are powers of two)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="open-loop arrival rate, requests/s (default: half the router's saturated QPS)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help=f"results folder (default {DEFAULT_OUT_DIR})",
    )
    parser.add_argument(
        "--compare",
        type=Path,
        default=None,
        metavar="PREVIOUS.json",
        help="print deltas against an earlier results file and flag regressions",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="Tiny ImageNet shards (default: FIELDLENS_DATA_DIR, else "
        "../shared/data/tiny-imagenet)",
    )
    parser.add_argument(
        "--no-micro", action="store_true", help="skip the micro-benchmarks (tiny, neighbours)"
    )
    parser.add_argument(
        "--only",
        choices=("shadow", "fair-share"),
        default=None,
        help="run one part alone, on the bench's own cluster: shadow = cache misses at 8 in "
        "flight without and with a candidate set shadowing 20%% of them; fair-share = the "
        "noisy-neighbour scenarios (quiet client alone, next to a noisy one with default and "
        "with per-client limits)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also record a py-spy profile of the router under cache misses at 16 in flight, "
        "in an extra run after the sweep (profile-router.{svg,md,folded} in --out)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the bench for parsed arguments; the exit status (0 = every figure was measured)."""
    from fieldlens.bench.suite import run_bench

    return run_bench(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fieldlens.bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
