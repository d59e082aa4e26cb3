"""One bench run: a cluster (started here, or one already running on loopback), the load
scenarios, the micro-benchmarks, and the results written and printed."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from fieldlens import cluster, gallery
from fieldlens.backends.triton_client import TritonClient
from fieldlens.bench import micro, procs, profiling, report, runner, scrape
from fieldlens.bench.plan import (
    CPU_POINT,
    FAIR_SHARE_ENV,
    MIXED_HIT_FRACTION,
    NOISY_CONCURRENCY,
    NOISY_DEADLINE_S,
    OPEN_LOOP_LOAD,
    SHADOW_CONCURRENCY,
    SHADOW_FRACTION,
    SHADOW_MAX_RATIO,
    SHADOW_SUFFIX,
    Plan,
)
from fieldlens.common import credentials, model_store, runtime, tls
from fieldlens.common.errors import FieldlensError
from fieldlens.common.model_set import MANIFEST, load_model_set
from fieldlens.common.settings import data_dir_from_env
from fieldlens.common.tls import TlsFiles
from fieldlens.v1 import router_pb2, router_pb2_grpc

DEFAULT_TRITON_PORT = 8001
DEFAULT_ROUTER_METRICS_PORT = 9101
DEFAULT_TRITON_METRICS_PORT = 8002
FALLBACK_RATE = 5.0  # open-loop rate when the sweep measured nothing to take half of
TRITON_ARRAYS = 256  # decoded photos cycled through by the direct-Triton scenarios
WARMUP_CALLS = 10
WIDE_CONSOLE = 160
PROFILE_NAME = "profile-router"
# Load keeps going this long past the profile's duration: py-spy attaches before its clock
# starts.
PROFILE_ATTACH_S = 2.0
# Deadline of SetRollout, which loads the candidate's nets (Triton, tiny, specialists), and of
# AbortCandidate, which unloads them.
ROLLOUT_TIMEOUT_S = 300.0
_CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
)
# A subchannel pool of its own: a channel opened with these has its own connection, so the
# router sees it as a client of its own (peer address), not sharing the process's pool.
_OWN_CONNECTION = (*_CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1))


class BenchError(RuntimeError):
    """The bench cannot run as asked (bad target, missing data); the message says why."""


@dataclass(frozen=True)
class Target:
    """Where the load goes, and where its per-stage figures are scraped from."""

    router: str
    triton: str
    router_metrics: str | None
    triton_metrics: str | None
    local: bool
    # Bearer token for the write RPCs (indexing, Learn).
    write_token: str
    # TLS of the router's port (an external cluster started with `fieldlens up --tls`, or
    # --ca/--cert/--key); None = plaintext.
    tls: TlsFiles | None = None


def _host_port(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise BenchError(f"{addr!r} is not host:port")
    return host.strip("[]"), int(port)


def _require_loopback(addr: str) -> str:
    """The bench drives loopback addresses only: it must never load a shared deployment."""
    host, port = _host_port(addr)
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise BenchError(f"cannot resolve {host!r}: {exc}") from exc
    if not infos or not all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos):
        raise BenchError(f"{addr} is not a loopback address; the bench only targets this machine")
    return addr


def _external_target(args: argparse.Namespace) -> Target:
    router = _require_loopback(args.router_addr or f"{cluster.HOST}:50051")
    router_host, _ = _host_port(router)
    triton = _require_loopback(args.triton_addr or f"{router_host}:{DEFAULT_TRITON_PORT}")
    triton_host, _ = _host_port(triton)
    return Target(
        router=router,
        triton=triton,
        router_metrics=_require_loopback(
            args.router_metrics or f"{router_host}:{DEFAULT_ROUTER_METRICS_PORT}"
        ),
        triton_metrics=_require_loopback(
            args.triton_metrics or f"{triton_host}:{DEFAULT_TRITON_METRICS_PORT}"
        ),
        local=False,
        write_token=cluster.ClusterConfig().write_token(),
        tls=_client_tls(args),
    )


def _client_tls(args: argparse.Namespace) -> TlsFiles | None:
    if getattr(args, "tls", False):
        return cluster.ClusterConfig(tls=True).client_tls(mtls=True)
    if getattr(args, "ca", None) is None:
        return None
    return TlsFiles(args.cert, args.key, ca=args.ca)


def _local_target(cfg: cluster.ClusterConfig) -> Target:
    return Target(
        router=cfg.addr(cfg.router_port),
        triton=cfg.addr(cfg.triton_grpc_port),
        router_metrics=cfg.addr(cfg.router_metrics_port),
        triton_metrics=cfg.addr(cfg.triton_metrics_port),
        local=True,
        write_token=cfg.write_token(),
    )


class _Steps:
    """Progress display: one bar for the whole run, one per timed step."""

    def __init__(self, progress: Progress, total: int) -> None:
        self.progress = progress
        self.overall = progress.add_task("bench", total=total, info="")

    def start(self, name: str, seconds: float | None = None) -> TaskID:
        self.progress.update(self.overall, description=f"bench: {name}")
        return self.progress.add_task(f"  {name}", total=seconds, info="")

    def finish(self, task: TaskID, info: str = "") -> None:
        total = self.progress.tasks[task].total
        self.progress.update(task, completed=total if total is not None else 1, total=total or 1)
        self.progress.update(task, info=info, visible=True)
        self.progress.advance(self.overall)


async def _ticker(
    steps: _Steps, task: TaskID, stats: runner.LoadStats, seconds: float, stop: asyncio.Event
) -> None:
    t0 = time.perf_counter()
    while not stop.is_set():
        steps.progress.update(
            task, completed=min(time.perf_counter() - t0, seconds), info=f"{stats.done} calls"
        )
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except TimeoutError:
            pass


class _LoadPhase:
    """The load scenarios against one target, in one event loop."""

    def __init__(
        self,
        plan: Plan,
        target: Target,
        steps: _Steps,
        photos: runner.Photos,
        meter: procs.CpuMeter,
        profile: bool = False,
    ) -> None:
        self.plan = plan
        self.target = target
        self.steps = steps
        self.photos = photos
        self.meter = meter
        self.scenarios: dict[str, dict[str, Any]] = {}
        self.sweep: dict[str, list[dict[str, Any]]] = {"router": [], "triton": []}
        self.broad_model = scrape.TRITON_MODEL
        # --profile: what the profiled run was, and the collapsed stacks it recorded.
        self.profile: dict[str, Any] | None = {} if profile else None
        self.profile_stacks: Counter[str] = Counter()

    async def _measure(
        self,
        name: str,
        load: str,
        seconds: float,
        run: Callable[[runner.LoadStats], Awaitable[object]],
        warmup: Callable[[], Awaitable[object]] | None = None,
        others: Sequence[runner.LoadStats] = (),
    ) -> dict[str, Any]:
        """Runs one scenario point and keeps its figures under `name`. `stats` are the figures
        reported; `others` are the calls of further clients of the same run, whose answers
        share the CPU and the router's stage counts."""
        task = self.steps.start(name, seconds)
        stats = runner.LoadStats()
        stop = asyncio.Event()
        ticker = asyncio.create_task(_ticker(self.steps, task, stats, seconds, stop))
        try:
            if warmup is not None:
                await warmup()
            # Scraped after the warm-up, so the stage figures cover the measured calls only.
            router_before = scrape.fetch(self.target.router_metrics)
            triton_before = scrape.fetch(self.target.triton_metrics)
            # CPU is read inside the scrapes, so it leaves out the work of serving /metrics.
            cpu_before = self.meter.sample()
            await run(stats)
            cpu_after = self.meter.sample()
        finally:
            stop.set()
            await ticker
        summary = stats.summary()
        summary["load"] = load
        answers = summary["ok"] + sum(len(o.latencies_ms) for o in others)
        summary.update(self.meter.summary(cpu_before, cpu_after, answers))
        router_after = scrape.fetch(self.target.router_metrics)
        stages = scrape.stage_breakdown(
            router_before, router_after, summary["requests"] + sum(o.done for o in others)
        )
        if stages:
            summary["stages"] = stages
        shadow = scrape.shadow_breakdown(router_before, router_after)
        if any(shadow.values()):
            summary["shadow"] = shadow
        triton = scrape.triton_breakdown(
            triton_before, scrape.fetch(self.target.triton_metrics), self.broad_model
        )
        if triton.get("requests"):
            summary["triton"] = triton
        self.scenarios[name] = summary
        lat = summary["latency_ms"]
        self.steps.finish(
            task,
            f"{summary['ok']} ok, {sum(summary['errors'].values())} errors, "
            f"{report.fmt(summary['qps'], 1)} QPS, p50 {report.fmt(lat['p50'])} ms",
        )
        return summary

    def _closed(self, name: str, call: runner.Call, concurrency: int) -> Awaitable[dict[str, Any]]:
        plan = self.plan

        def warmup() -> Awaitable[runner.LoadStats]:
            return runner.warm_up(
                call, concurrency, plan.warmup_s, plan.max_requests, plan.request_timeout_s
            )

        def run(stats: runner.LoadStats) -> Awaitable[runner.LoadStats]:
            return runner.closed_loop(
                call, stats, concurrency, plan.duration_s, plan.max_requests, plan.request_timeout_s
            )

        return self._measure(
            name,
            f"closed, {concurrency} in flight",
            plan.warmup_s + plan.duration_s,
            run,
            warmup if plan.warmup_s > 0 else None,
        )

    def _sweep_point(self, target: str, concurrency: int, name: str) -> None:
        s = self.scenarios[name]
        self.sweep[target].append(
            {
                "concurrency": concurrency,
                "scenario": name,
                "qps": s["qps"],
                "p50": s["latency_ms"]["p50"],
                "p99": s["latency_ms"]["p99"],
                "errors": sum(s["errors"].values()),
            }
        )

    async def run(self, data_dir: Path, nonce: str) -> None:
        plan = self.plan
        async with tls.aio_channel(self.target.router, self.target.tls, _CHANNEL_OPTIONS) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            # The baseline is the broad net the router serves: after a model-set switch that
            # is `broad__<version>`, not the boot set's `broad`.
            info = await stub.GetInfo(router_pb2.GetInfoRequest(), timeout=30)
            self.broad_model = info.broad_model or scrape.TRITON_MODEL
            triton = TritonClient(self.target.triton, timeout_s=plan.request_timeout_s)
            try:
                await self._index(stub, data_dir)
                await self._scenarios(stub, triton, nonce)
            finally:
                await triton.close()

    async def _profile(self, call: runner.Call) -> None:
        """An extra run of the cache-miss point at CPU_POINT in flight with py-spy attached to
        the router, after the measured one: py-spy's own CPU, on cores the cluster shares, must
        not touch the measured figures."""
        plan = self.plan
        assert self.profile is not None
        task = self.steps.start(f"profile router, {CPU_POINT} in flight")
        pids = procs.component_pids(self.meter.cfg).get("router", [])
        self.profile.update(
            target="router",
            scenario=f"sweep_router_c{CPU_POINT}",
            concurrency=CPU_POINT,
            pids=pids,
            seconds=plan.profile_s,
            rate=profiling.DEFAULT_RATE,
            idle=False,
            native=False,
            subprocesses=True,
            py_spy=profiling.py_spy_version(),
        )
        stats = runner.LoadStats()
        try:
            if not pids:
                raise profiling.ProfileError(
                    f"no live router pid in a pidfile under {self.meter.cfg.run_dir}; pass "
                    "--run-dir"
                )
            await runner.warm_up(
                call, CPU_POINT, plan.warmup_s, plan.max_requests, plan.request_timeout_s
            )
            load = asyncio.create_task(
                runner.closed_loop(
                    call,
                    stats,
                    CPU_POINT,
                    plan.profile_s + PROFILE_ATTACH_S,
                    plan.max_requests,
                    plan.request_timeout_s,
                )
            )
            try:
                self.profile_stacks = await profiling.record(pids, plan.profile_s)
            finally:
                await load
        except profiling.ProfileError as exc:
            self.profile["error"] = str(exc)
            self.steps.finish(task, "[red]failed[/red]")
            return
        summary = stats.summary()
        self.profile.update(
            qps=summary["qps"], p50=summary["latency_ms"]["p50"], errors=summary["errors"]
        )
        self.steps.finish(task, f"{sum(self.profile_stacks.values())} samples")

    async def _index(self, stub: router_pb2_grpc.RouterStub, data_dir: Path) -> None:
        items = self.photos.gallery
        task = self.steps.start("index_exemplars", float(len(items)))
        before = scrape.fetch(self.target.triton_metrics)
        cpu_before = self.meter.sample()
        stats = await runner.index_exemplars(
            stub,
            items,
            gallery.UPLOAD_CHUNK,
            f"gallery:{data_dir.name}",
            max(60.0, self.plan.request_timeout_s),
            on_chunk=lambda n: self.steps.progress.advance(task, n),
            metadata=credentials.bearer(self.target.write_token),
        )
        cpu_after = self.meter.sample()
        summary = stats.summary(gallery.UPLOAD_CHUNK)
        summary["load"] = f"stream, {gallery.UPLOAD_CHUNK} images per call"
        summary.update(self.meter.summary(cpu_before, cpu_after, summary["ok"]))
        summary["note"] = (
            "gallery bulk load through Router.IndexExemplars (decode, keep the bytes, embed "
            "through Triton at batch 64, upsert into Qdrant), one call at a time; Learn is the "
            "'learn' scenario"
        )
        triton = scrape.triton_breakdown(
            before, scrape.fetch(self.target.triton_metrics), self.broad_model
        )
        if triton.get("requests"):
            summary["triton"] = triton
        self.scenarios["index_exemplars"] = summary
        self.steps.finish(task, f"{report.fmt(summary['images_per_s'], 1)} images/s")

    async def _scenarios(
        self, stub: router_pb2_grpc.RouterStub, triton: TritonClient, nonce: str
    ) -> None:
        plan = self.plan
        timeout = plan.request_timeout_s
        misses = runner.UniquePhotos(self.photos.pool, nonce)
        arrays = runner.decode_for_triton(self.photos.pool[:TRITON_ARRAYS])
        router_miss = runner.router_call(stub, misses, timeout)
        triton_direct = runner.triton_call(triton, arrays, timeout, self.broad_model)

        task = self.steps.start("warm-up")
        for _ in range(WARMUP_CALLS):
            await triton_direct()
            await router_miss()
        self.steps.finish(task)

        await self._closed("triton_direct", triton_direct, 1)
        self._sweep_point("triton", 1, "triton_direct")
        await self._closed("router_miss", router_miss, 1)
        self._sweep_point("router", 1, "router_miss")

        # Cache hits: each photo answered once (and so cached), then only repeats.
        hit_set = [misses() for _ in range(plan.hit_pool)]
        task = self.steps.start("prime cache", float(len(hit_set)))
        prime = runner.router_call(stub, runner.RepeatedPhotos(hit_set), timeout)
        for _ in hit_set:
            await prime()
            self.steps.progress.advance(task)
        self.steps.finish(task)
        hits = runner.RepeatedPhotos(hit_set)
        await self._closed("router_hit", runner.router_call(stub, hits, timeout), 1)
        mixed = runner.MixedPhotos(hits, misses, MIXED_HIT_FRACTION)
        await self._closed(
            "router_mixed", runner.router_call(stub, mixed, timeout), plan.mixed_concurrency
        )
        self.scenarios["router_mixed"]["hit_fraction_sent"] = MIXED_HIT_FRACTION

        for c in plan.sweep_levels:
            if c == 1:
                continue
            for target, call in (("triton", triton_direct), ("router", router_miss)):
                name = f"sweep_{target}_c{c}"
                await self._closed(name, call, c)
                self._sweep_point(target, c, name)
        if self.profile is not None:
            await self._profile(router_miss)

        saturated = max((p["qps"] or 0.0 for p in self.sweep["router"]), default=0.0)
        rate = plan.rate or (OPEN_LOOP_LOAD * saturated if saturated > 0 else FALLBACK_RATE)
        max_in_flight = max(16, 4 * plan.max_concurrency)

        def run_open(stats: runner.LoadStats) -> Awaitable[runner.LoadStats]:
            return runner.open_loop(
                router_miss, stats, rate, plan.open_loop_s, max_in_flight, timeout
            )

        summary = await self._measure(
            "open_loop", f"Poisson {rate:.1f}/s, misses", plan.open_loop_s, run_open
        )
        summary["rate"] = rate
        summary["rate_source"] = "--rate" if plan.rate else f"{OPEN_LOOP_LOAD:g} x saturated"
        summary["max_in_flight"] = max_in_flight
        summary["late_threshold_ms"] = runner.LATE_MS

        # Learn last: it changes what the classifiers answer. One at a time, as a labelling
        # client would send them; every call is durable (journals fsynced) when it returns.
        learn = runner.learn_call(
            stub,
            self.photos.gallery,
            nonce,
            credentials.bearer(self.target.write_token),
            max(timeout, 10.0),
        )
        await self._closed("learn", learn, 1)

    def _miss_call(self, channel: grpc.aio.Channel, nonce: str, timeout_s: float) -> runner.Call:
        photos = runner.UniquePhotos(self.photos.pool, nonce)
        return runner.router_call(router_pb2_grpc.RouterStub(channel), photos, timeout_s)

    async def _neighbours(self, name: str, limits: str, nonce: str) -> None:
        """The quiet client (1 in flight) next to the noisy one (NOISY_CONCURRENCY in flight,
        NOISY_DEADLINE_S deadline, honouring retry hints), each on a connection of its own,
        cache misses. The scenario's figures are the quiet client's; the noisy one's are under
        `noisy`."""
        plan = self.plan
        router = self.target.router
        async with (
            tls.aio_channel(router, self.target.tls, _OWN_CONNECTION) as quiet_channel,
            tls.aio_channel(router, self.target.tls, _OWN_CONNECTION) as noisy_channel,
        ):
            quiet = self._miss_call(quiet_channel, f"{nonce}-{name}-quiet", plan.request_timeout_s)
            noisy = self._miss_call(noisy_channel, f"{nonce}-{name}-noisy", NOISY_DEADLINE_S)
            noisy_stats = runner.LoadStats()

            def both(
                quiet_stats: runner.LoadStats, noisy_stats: runner.LoadStats, seconds: float
            ) -> Awaitable[None]:
                return runner.neighbours(
                    quiet,
                    noisy,
                    quiet_stats,
                    noisy_stats,
                    NOISY_CONCURRENCY,
                    seconds,
                    plan.max_requests,
                    plan.request_timeout_s,
                )

            def warmup() -> Awaitable[None]:
                return both(runner.LoadStats(), runner.LoadStats(), plan.warmup_s)

            summary = await self._measure(
                name,
                f"quiet 1 + noisy {NOISY_CONCURRENCY} in flight, misses; {limits}",
                plan.warmup_s + plan.duration_s,
                lambda stats: both(stats, noisy_stats, plan.duration_s),
                warmup if plan.warmup_s > 0 else None,
                others=(noisy_stats,),
            )
        noisy_summary = noisy_stats.summary()
        summary["noisy"] = {
            "concurrency": NOISY_CONCURRENCY,
            "deadline_ms": NOISY_DEADLINE_S * 1e3,
            **{k: noisy_summary[k] for k in ("requests", "ok", "errors", "qps", "latency_ms")},
        }

    async def shadow(self, nonce: str, publish: Callable[[], str]) -> dict[str, Any]:
        """Shadow rollout: cache misses at SHADOW_CONCURRENCY in flight on the serving set
        alone, then with the candidate that `publish` puts in the store shadowing
        SHADOW_FRACTION of them (SetRollout, no canary), then AbortCandidate. Both runs on one
        connection, each on photos of its own (misses for the candidate too). Returns what
        the rollout was."""
        plan = self.plan
        token = credentials.bearer(self.target.write_token)
        meta: dict[str, Any] = {
            "fraction": SHADOW_FRACTION,
            "concurrency": SHADOW_CONCURRENCY,
            "max_ratio": SHADOW_MAX_RATIO,
        }
        async with tls.aio_channel(self.target.router, self.target.tls, _CHANNEL_OPTIONS) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            timeout = plan.request_timeout_s
            off = self._miss_call(ch, f"{nonce}-shadow-off", timeout)
            await self._closed("shadow_off", off, SHADOW_CONCURRENCY)
            task = self.steps.start(f"publish a candidate, shadow {SHADOW_FRACTION:.0%} to it")
            candidate = await asyncio.to_thread(publish)
            reply = await stub.SetRollout(
                router_pb2.SetRolloutRequest(
                    candidate_version=candidate, canary_weight=0.0, shadow_fraction=SHADOW_FRACTION
                ),
                metadata=token,
                timeout=ROLLOUT_TIMEOUT_S,
            )
            meta.update(candidate=candidate, load_s=reply.seconds)
            self.steps.finish(task, f"{candidate} loaded in {reply.seconds:.1f} s")
            try:
                on = self._miss_call(ch, f"{nonce}-shadow-on", timeout)
                summary = await self._closed("shadow_on", on, SHADOW_CONCURRENCY)
            finally:
                task = self.steps.start("abort the candidate")
                await stub.AbortCandidate(
                    router_pb2.AbortCandidateRequest(), metadata=token, timeout=ROLLOUT_TIMEOUT_S
                )
                self.steps.finish(task)
        summary["shadow"] = {
            "candidate": candidate,
            "fraction": SHADOW_FRACTION,
            "comparisons": 0.0,
            "dropped": 0.0,
            **summary.get("shadow", {}),
        }
        return meta

    async def fair_share(self, nonce: str, limit_router: Callable[[], None]) -> None:
        """Noisy neighbour: next to each other on the router as it runs (default limits), then
        the quiet client alone and next to the noisy one again on a router restarted with the
        per-client limits of FAIR_SHARE_ENV (`limit_router`)."""
        await self._neighbours("noisy_neighbour_defaults", "default limits", nonce)
        limits = ", ".join(f"{k}={v}" for k, v in FAIR_SHARE_ENV)
        task = self.steps.start("restart the router with per-client limits")
        await asyncio.to_thread(limit_router)
        self.steps.finish(task, limits)
        async with tls.aio_channel(self.target.router, self.target.tls, _OWN_CONNECTION) as ch:
            alone = self._miss_call(ch, f"{nonce}-quiet-alone", self.plan.request_timeout_s)
            await self._closed("quiet_alone", alone, 1)
        await self._neighbours("noisy_neighbour_limited", limits, nonce)


def _limit_router(cfg: cluster.ClusterConfig) -> None:
    """Restarts the local cluster's router with the per-client limits of FAIR_SHARE_ENV."""
    cluster.stop(cfg, ["router"])
    limited = dataclasses.replace(cfg, extra_env=(*cfg.extra_env, *FAIR_SHARE_ENV))
    cluster.start(limited, ["router"])


def _publish_candidate(cfg: cluster.ClusterConfig) -> str:
    """Publishes the boot set again, under its version plus SHADOW_SUFFIX, into the local
    cluster's model store; returns that version. The same nets, so shadowing costs what a
    second serving set costs and the two agree."""
    with tempfile.TemporaryDirectory(prefix="fieldlens-candidate-") as tmp:
        models = Path(tmp) / "models"
        shutil.copytree(cfg.models_dir, models)
        manifest_path = models / MANIFEST
        manifest = json.loads(manifest_path.read_text())
        manifest["model_set_version"] = f"{manifest['model_set_version']}{SHADOW_SUFFIX}"
        manifest_path.write_text(json.dumps(manifest))
        return model_store.publish(cfg.model_store, models, cfg.model_repository)


def _micro_phase(plan: Plan, models_dir: Path, steps: _Steps, results: dict[str, Any]) -> None:
    task = steps.start("micro: tiny ensemble")
    tiny = micro.tiny_ensemble(models_dir, plan.micro_budget_s)
    results["micro"]["tiny"] = tiny
    steps.finish(task, f"{tiny['real']['batch64']['per_image_ms']:.4f} ms/image at batch 64")
    dim = load_model_set(models_dir).embedding_dim
    # Embedding-like vectors decide P5; uniform random ones show the worst case beside it.
    for key, distribution in (("neighbours", "embedding"), ("neighbours_uniform", "uniform")):
        for label, size in zip(("small", "large"), plan.store_sizes, strict=True):
            task = steps.start(f"micro: neighbour search, {size} {distribution} vectors")
            nb = micro.neighbour_search(
                size, dim, plan.store_queries, plan.micro_budget_s, distribution=distribution
            )
            results["micro"].setdefault(key, {})[label] = nb
            steps.finish(
                task, f"optimize {nb['optimize_s']:.1f} s, search p50 {nb['median_ms']:.3f} ms"
            )


def _step_count(
    plan: Plan, local: bool, micro_on: bool, profile: bool, only: str | None = None
) -> int:
    # read photos, index, warm-up, two c=1 points, prime, hit, mixed, open loop, memory;
    # the sweep's other points for both targets; start and stop; tiny and two store sizes for
    # each of two vector distributions; the profiled run; on a local cluster the shadow
    # rollout: off, publish and SetRollout, on, abort; and the noisy neighbour: defaults, the
    # router's restart, the quiet client alone, limited.
    parts = {"shadow": 4 if local else 0, "fair-share": 4 if local else 0}
    if only is not None:
        return 1 + 2 + parts[only]  # read photos, start and stop
    n = 10 + 2 * (len(plan.sweep_levels) - 1)
    extra = (2 if local else 0) + (5 if micro_on else 0) + (1 if profile else 0)
    return n + extra + sum(parts.values())


def _write_profile(phase: _LoadPhase, out: Path) -> dict[str, Any] | None:
    """The profile's files in `out` and its figures for the results (None: not asked for)."""
    meta = phase.profile
    if meta is None or "error" in meta:
        return meta
    measured = phase.scenarios.get(meta["scenario"]) or {}
    lat = measured.get("latency_ms") or {}
    samples = sum(phase.profile_stacks.values())
    ticks = meta["seconds"] * meta["rate"]
    about = [
        f"{meta['py_spy'] or 'py-spy'} attached to the router (pid "
        f"{', '.join(map(str, meta['pids']))}, subprocesses followed) for {meta['seconds']:g} s "
        f"at {meta['rate']} Hz while the bench kept {meta['concurrency']} cache misses in "
        "flight: an extra run after the measured sweep, so the profiler's own CPU is not in "
        "the measured figures.",
        "",
        f"{report.fmt(samples / ticks if ticks else None)} running threads per tick on "
        "average: samples of running threads only (py-spy without `--idle`: a thread parked in "
        "epoll or on a lock costs no CPU), one per thread per tick, so the shares below are "
        "shares of the router's CPU time. The router is not paused (`--nonblocking`), so there "
        "are no native frames: time in a C extension (grpc's core, protobuf, numpy, Qdrant "
        "Edge) shows as the Python function that called it (grpc's asyncio poller thread as "
        "`Thread.run`), and threads started in C, without a Python frame, are not seen.",
        "",
        f"Load while profiled: {report.fmt(meta.get('qps'), 1)} QPS, p50 "
        f"{report.fmt(meta.get('p50'))} ms; measured without the profiler "
        f"({meta['scenario']}): {report.fmt(measured.get('qps'), 1)} QPS, p50 "
        f"{report.fmt(lat.get('p50'))} ms.",
    ]
    title = f"router CPU profile, cache misses at {meta['concurrency']} in flight"
    return {**meta, **profiling.write(phase.profile_stacks, out, PROFILE_NAME, title, about)}


def run_bench(args: argparse.Namespace) -> int:
    console = Console()
    if not console.is_terminal:
        console = Console(width=WIDE_CONSOLE)  # logs and CI: rich's 80 columns fold the tables
    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
        force=True,
    )
    try:
        if args.profile:
            profiling.py_spy()  # fail before the cluster starts, not after the sweep
        plan = (Plan.quick() if args.quick else Plan.full()).with_overrides(
            args.duration, args.max_concurrency, args.rate
        )
        previous = report.load_json(args.compare) if args.compare else None
        external = args.router_addr is not None or args.triton_addr is not None
        target = _external_target(args) if external else None
        only: str | None = args.only
        if only is not None and external:
            raise BenchError(
                f"--only {only} reconfigures the cluster it runs on: only on its own cluster"
            )
    except (BenchError, profiling.ProfileError, ValueError, OSError) as exc:
        console.print(f"[red]bench: {exc}[/red]")
        return 2
    data_dir: Path = args.data or data_dir_from_env()
    base = cluster.ClusterConfig()
    models_dir = base.models_dir
    started = time.time()
    results: dict[str, Any] = {
        "schema": report.SCHEMA,
        "mode": plan.mode,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": report.describe_machine(),
        "plan": dataclasses.asdict(plan),
        "micro": {},
    }
    console.print(
        f"fieldlens bench, {plan.mode} run: {plan.duration_s:g} s per point, sweep "
        f"{list(plan.sweep_levels)}, stores {list(plan.store_sizes)}; load average "
        f"{', '.join(f'{x:.2f}' for x in results['machine']['loadavg_start'])} on "
        f"{results['machine']['cores_logical']} cores"
    )
    run_dir: Path | None = None
    profile: dict[str, Any] | None = None
    cfg = cluster.ClusterConfig(run_dir=args.run_dir.resolve()) if args.run_dir else base
    failed = True
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
    )
    try:
        with progress:
            steps = _Steps(
                progress,
                _step_count(plan, target is None, not args.no_micro, args.profile, only),
            )
            if target is None:
                run_dir = Path(tempfile.mkdtemp(prefix="fieldlens-bench-"))
                cfg = cluster.ClusterConfig(run_dir=run_dir).with_free_ports()
                task = steps.start("start local cluster")
                t0 = time.perf_counter()
                cluster.start(cfg)
                results["cluster_start_s"] = time.perf_counter() - t0
                steps.finish(task, f"{results['cluster_start_s']:.1f} s")
                target = _local_target(cfg)
            results["target"] = dataclasses.asdict(target)
            try:
                task = steps.start("read photos")
                classes = set(load_model_set(models_dir).taxonomy.class_ids)
                photos = runner.read_photos(
                    data_dir, models_dir, plan.gallery_per_class, plan.miss_pool, classes
                )
                steps.finish(task, f"{len(photos.gallery)} gallery, {len(photos.pool)} pool")
                results["cpu_accounting"] = procs.cpu_accounting(cfg)
                phase = _LoadPhase(plan, target, steps, photos, procs.CpuMeter(cfg), args.profile)
                nonce = secrets.token_hex(6)
                results["scenarios"] = phase.scenarios
                if only is None:
                    runtime.run(phase.run(data_dir, nonce))
                    results["sweep"] = phase.sweep
                    profile = _write_profile(phase, args.out)
                    if profile is not None:
                        results["profile"] = profile
                    task = steps.start("memory")
                    results["memory"] = procs.cluster_memory(cfg)
                    steps.finish(task, f"{report.fmt(results['memory']['rss_gib'])} GiB RSS")
                # Publishes into the cluster's store and loads a candidate: only on the bench's
                # own cluster. Before the noisy neighbour, whose per-client limits stay on.
                if target.local and only in (None, "shadow"):
                    results["shadow"] = runtime.run(
                        phase.shadow(nonce, lambda: _publish_candidate(cfg))
                    )
                elif not target.local:
                    results["shadow"] = {
                        "skipped": "it publishes a candidate set: only on the bench's own cluster"
                    }
                # Last: it restarts the router. Only on the bench's own cluster.
                if target.local and only in (None, "fair-share"):
                    runtime.run(phase.fair_share(nonce, lambda: _limit_router(cfg)))
                    results["fair_share"] = {
                        "limits": dict(FAIR_SHARE_ENV),
                        "noisy_concurrency": NOISY_CONCURRENCY,
                        "noisy_deadline_ms": NOISY_DEADLINE_S * 1e3,
                    }
                elif not target.local:
                    results["fair_share"] = {
                        "skipped": "it restarts the router: only on the bench's own cluster"
                    }
            finally:
                if target.local:
                    task = steps.start("stop local cluster")
                    cluster.stop(cfg)
                    steps.finish(task)
            if not args.no_micro and only is None:
                _micro_phase(plan, models_dir, steps, results)
        failed = False
    except cluster.ClusterError as exc:
        console.print(f"[red]bench: the local cluster failed: {exc}[/red]")
        return 1
    except (grpc.RpcError, FieldlensError, FileNotFoundError) as exc:
        console.print(f"[red]bench: {exc}[/red]")
        return 1
    finally:
        if run_dir is not None:
            if failed:
                console.print(f"local cluster files kept for inspection in {run_dir}")
            else:
                shutil.rmtree(run_dir, ignore_errors=True)

    results["ratios"] = report.ratios(results)
    results["wall_s"] = time.time() - started
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    if previous is not None:
        results["compare"] = {"previous": str(args.compare), **report.compare(previous, results)}
    out: Path = args.out
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    report.write_json(results, out / "latest.json")
    report.write_json(results, out / f"run-{stamp}.json")
    report.write_markdown(results, out / "latest.md")
    report.plot(results, out / "latest.png")
    report.print_results(results, console)
    if "compare" in results:
        report.print_comparison(results["compare"], console)
    console.print(
        f"{plan.mode} run took {results['wall_s']:.0f} s; results in {out}/latest.json, "
        f"latest.md, latest.png (and run-{stamp}.json)"
        + (f", {PROFILE_NAME}.{{svg,md,folded}}" if profile and "error" not in profile else "")
    )
    return 1 if profile and "error" in profile else 0
