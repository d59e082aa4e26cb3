"""`fieldlens`: the Python client and the local cluster's controls (up, down, demo, classify)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.table import Table

from fieldlens import bench, cluster, gallery
from fieldlens.common import credentials, model_store, tls
from fieldlens.common.credentials import bearer
from fieldlens.common.errors import FieldlensError
from fieldlens.common.settings import data_dir_from_env, model_store_from_env
from fieldlens.common.tls import TlsFiles
from fieldlens.v1 import classifier_pb2, router_pb2, router_pb2_grpc

if TYPE_CHECKING:
    from fieldlens import rollout_report

DEFAULT_ADDR = "127.0.0.1:50051"
DEMO_SAMPLES = 6
DEMO_LEARN_SHOTS = 5
GALLERY_PER_CLASS = 10
NATURE_DOMAINS = ("domain/animal", "domain/plant", "domain/landscape")

# Wide enough for the demo's table when output is not a terminal (CI logs, pipes).
console = Console(width=None if sys.stdout.isatty() else 132)


def _client_tls(args: argparse.Namespace) -> TlsFiles | None:
    """The TLS the client commands use: --tls (the local cluster's CA and client certificate),
    or --ca with --cert/--key (mTLS); None = plaintext."""
    if getattr(args, "tls", False):
        return cluster.ClusterConfig(tls=True).client_tls(mtls=True)
    if getattr(args, "ca", None) is None:
        if getattr(args, "cert", None) or getattr(args, "key", None):
            raise SystemExit("--cert/--key need --ca (the CA the router's certificate chains to)")
        return None
    return TlsFiles(args.cert, args.key, ca=args.ca)


def _stub(args: argparse.Namespace) -> tuple[grpc.Channel, router_pb2_grpc.RouterStub]:
    channel = tls.channel(args.addr, _client_tls(args))
    return channel, router_pb2_grpc.RouterStub(channel)


def render(results: list[tuple[str, router_pb2.ClassifyResponse]], title: str) -> None:
    """A readable table: answer, top suggestions with paths and exemplars, timings."""
    table = Table(title=title, show_lines=True, expand=True)
    table.add_column("image", overflow="fold", max_width=22)
    table.add_column("best-effort answer")
    table.add_column("suggestions: P, path, served by, nearest exemplar (cosine)")
    table.add_column("timings (ms)", max_width=26)
    for name, r in results:
        if r.HasField("error"):
            table.add_row(name, f"[red]error {r.error.code}: {r.error.message}[/red]", "", "")
            continue
        answer = (
            f"[bold]{r.answer.taxon.name}[/bold]\n({r.answer.taxon.rank}, "
            f"P={r.answer.probability:.2f})"
        )
        lines = []
        for s in r.suggestions[:3]:
            path = " > ".join(t.name for t in s.path[2:])
            served = classifier_pb2.ServedBy.Name(s.served_by).lower()
            ex = (
                f"{s.exemplars[0].label_name} {s.exemplars[0].similarity:.2f}"
                if s.exemplars
                else "-"
            )
            lines.append(f"{s.probability:.2f} {path}\n   [dim]{served}; exemplar: {ex}[/dim]")
        total = next((t.duration_ms for t in r.timings if t.stage == "total"), 0.0)
        stages = ", ".join(
            f"{t.stage} {t.duration_ms:.1f}"
            for t in r.timings
            if t.stage in ("broad", "classify", "cache_get")
        )
        flags = (" [green]cached[/green]" if r.cached else "") + "".join(
            f"\n[yellow]{router_pb2.DegradationKind.Name(d.kind)}[/yellow]" for d in r.degradations
        )
        table.add_row(name, answer + flags, "\n".join(lines), f"total {total:.1f}\n{stages}")
    console.print(table)


def cmd_classify(args: argparse.Namespace) -> int:
    channel, stub = _stub(args)
    results = []
    with channel:
        for path in args.images:
            request = router_pb2.ClassifyRequest(
                image=Path(path).read_bytes(),
                request_id=str(path),
                top_k=args.top_k,
                skip_cache=args.skip_cache,
            )
            try:
                results.append((str(path), stub.Classify(request, timeout=args.timeout)))
            except grpc.RpcError as exc:
                err = router_pb2.ClassifyResponse(
                    error=router_pb2.ItemError(
                        code=exc.code().value[0], message=f"{exc.code().name}: {exc.details()}"
                    )
                )
                results.append((str(path), err))
    if args.json:
        print(json.dumps([{"image": n, **MessageToDict(r)} for n, r in results], indent=1))
    else:
        render(results, "fieldlens classify")
    return 0 if all(not r.HasField("error") for _, r in results) else 1


def _config(args: argparse.Namespace) -> cluster.ClusterConfig:
    """The local cluster: as `up`'s flags say, else as the running one was started (its TLS
    mode is kept in .run/tls/mode, so `status` and a plain `up` check it the right way)."""
    tls_flag, mtls_flag = getattr(args, "serve_tls", False), getattr(args, "serve_mtls", False)
    mode = cluster.ClusterConfig().tls_dir / "mode"
    if not (tls_flag or mtls_flag) and mode.is_file():
        running = mode.read_text().strip()
        tls_flag, mtls_flag = running in ("tls", "mtls"), running == "mtls"
    return cluster.ClusterConfig(
        triton_replicas=getattr(args, "triton_replicas", 1),
        tiny_replicas=getattr(args, "tiny_replicas", 1),
        tls=tls_flag,
        mtls=mtls_flag,
    )


def cmd_up(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if cfg.tls or cfg.mtls:
        cfg.pki()
        (cfg.tls_dir / "mode").write_text("mtls\n" if cfg.mtls else "tls\n")
    console.print(
        "starting the local cluster (redis-server, tritonserver, tiny, specialist, router)..."
    )
    t0 = time.time()
    cluster.start(cfg)
    console.print(f"all components SERVING after {time.time() - t0:.1f} s; logs in {cfg.logs_dir}")
    _print_status(cfg)
    return 0


def _print_status(cfg: cluster.ClusterConfig) -> None:
    table = Table(title="local cluster")
    table.add_column("component")
    table.add_column("state")
    for name, state in cluster.status(cfg).items():
        table.add_row(name, state)
    console.print(table)


def cmd_down(args: argparse.Namespace) -> int:
    cfg = _config(args)
    cluster.stop(cfg)
    (cfg.tls_dir / "mode").unlink(missing_ok=True)
    console.print("local cluster stopped")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    _print_status(_config(args))
    return 0


WRITES_WAIT_S = 1800.0


def _wait_for_writes(stub: router_pb2_grpc.RouterStub) -> router_pb2.GetInfoResponse:
    """GetInfo once the router accepts writes (after a re-index for a new backbone, which
    re-embeds the stored exemplars, or a model-set switch), showing why it waits."""
    deadline = time.monotonic() + WRITES_WAIT_S
    info = stub.GetInfo(router_pb2.GetInfoRequest(), timeout=10)
    if not info.writes_blocked:
        return info
    with console.status(f"waiting: {info.writes_blocked}") as status:
        while info.writes_blocked and time.monotonic() < deadline:
            status.update(f"waiting: {info.writes_blocked}")
            time.sleep(1.0)
            info = stub.GetInfo(router_pb2.GetInfoRequest(), timeout=10)
    if info.writes_blocked:
        raise cluster.ClusterError(
            f"router still busy after {WRITES_WAIT_S:.0f} s: {info.writes_blocked}"
        )
    return info


def cmd_index(args: argparse.Namespace) -> int:
    cfg = _config(args)
    channel, stub = _stub(args)
    with channel:
        info = _wait_for_writes(stub)
        if info.exemplar_count and not args.force:
            console.print(
                f"gallery already holds {info.exemplar_count} exemplars (--force to add anyway)"
            )
            return 0
        classes = {
            t.id
            for t in stub.GetTaxonomy(router_pb2.GetTaxonomyRequest()).taxa
            if t.rank == "class"
        }
    summary = gallery.index_gallery(
        args.addr,
        args.data,
        cfg.models_dir,
        args.per_class,
        classes,
        cfg.write_token(),
        _client_tls(args),
    )
    console.print(
        f"indexed {summary.indexed} of {summary.received} "
        f"({summary.duplicates} duplicates, {summary.rejected} rejected)"
    )
    for e in summary.errors:
        console.print(f"  [yellow]{e}[/yellow]")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Starts the cluster, fills the gallery if empty, classifies sample images."""
    cmd_up(args)
    args.force = False
    cmd_index(args)
    cfg = _config(args)
    channel, stub = _stub(args)
    with channel:
        taxa = {t.id: t for t in stub.GetTaxonomy(router_pb2.GetTaxonomyRequest()).taxa}

        def domain(tid: str) -> str:
            while taxa[tid].rank != "domain":
                tid = taxa[tid].parent_id
            return tid

        nature = [t for t in taxa.values() if t.rank == "class" and domain(t.id) in NATURE_DOMAINS]
        samples = gallery.validation_samples(
            args.data, gallery.validation_keys(cfg.models_dir), DEMO_SAMPLES, [t.id for t in nature]
        )
        if not samples:
            console.print("[red]no validation images found to classify[/red]")
            return 1
        results = []
        for key, data, wnid in samples:
            r = stub.Classify(router_pb2.ClassifyRequest(image=data, request_id=key), timeout=30)
            results.append((f"{key}\n(truth: {taxa[wnid].name})", r))
        render(results, "fieldlens demo: held-out validation photos through the whole cluster")
        repeat = stub.Classify(router_pb2.ClassifyRequest(image=samples[0][1]), timeout=30)
        total = next((t.duration_ms for t in repeat.timings if t.stage == "total"), 0.0)
        console.print(f"repeat of the first image: cached={repeat.cached}, {total:.1f} ms")
        _demo_learn(stub, args.data, cfg)
    console.print("the cluster keeps running: `make down` stops it")
    return 0


def _demo_learn(
    stub: router_pb2_grpc.RouterStub, data_dir: Path, cfg: cluster.ClusterConfig
) -> None:
    """Learns a class the models never saw from five photos, and shows a sixth before/after."""
    novel = gallery.novel_classes(cfg.models_dir)
    if not novel:
        return
    c = novel[0]
    photos = gallery.class_samples(data_dir, [c["wnid"]], DEMO_LEARN_SHOTS + 1)[c["wnid"]]
    if len(photos) <= DEMO_LEARN_SHOTS:
        return
    probe = router_pb2.ClassifyRequest(image=photos[-1], skip_cache=True)

    def top(r: router_pb2.ClassifyResponse) -> str:
        s = r.suggestions[0]
        return f"{s.taxon.name} ({s.probability:.2f})"

    before = stub.Classify(probe, timeout=30)
    label = router_pb2.NewTaxonLabel(name=c["name"], parent_id=c["parent"])
    times, taxon_id = [], ""
    for img in photos[:DEMO_LEARN_SHOTS]:
        t0 = time.perf_counter()
        reply = stub.Learn(
            router_pb2.LearnRequest(image=img, new_taxon=label, source="demo"),
            timeout=60,
            metadata=bearer(cfg.write_token()),
        )
        times.append((time.perf_counter() - t0) * 1e3)
        taxon_id = reply.taxon.id
    own = stub.Classify(router_pb2.ClassifyRequest(image=photos[0], skip_cache=True), timeout=30)
    after = stub.Classify(probe, timeout=30)
    ranks = [s.taxon.id for s in after.suggestions]
    where = (
        f"'{c['name']}' is suggestion #{ranks.index(taxon_id) + 1}"
        if taxon_id in ranks
        else f"'{c['name']}' is not among its {len(ranks)} suggestions"
    )
    console.print(
        f"learned '{c['name']}' (kept out of training) under {c['parent']} from "
        f"{DEMO_LEARN_SHOTS} photos, {sorted(times)[len(times) // 2]:.0f} ms per Learn; "
        f"a learned photo is now {top(own)}; a sixth photo: before {top(before)} -> after "
        f"{top(after)}, {where} (a learned class claims only photos close to its examples: "
        "README, What a learned class may claim)"
    )


def cmd_probe(args: argparse.Namespace) -> int:
    """p50 of one image through the router (cache skipped) next to a direct Triton call."""
    import asyncio
    import statistics

    import numpy as np
    from PIL import Image

    from fieldlens.backends.triton_client import TritonClient

    data = args.image.read_bytes()
    with Image.open(args.image) as im:
        rgb = np.asarray(im.convert("RGB").resize((64, 64), Image.BILINEAR), dtype=np.uint8)
    channel, stub = _stub(args)
    router_ms = []
    with channel:
        request = router_pb2.ClassifyRequest(image=data, skip_cache=True)
        stub.Classify(request, timeout=30)  # warm-up
        for _ in range(args.n):
            t0 = time.perf_counter()
            stub.Classify(request, timeout=30)
            router_ms.append((time.perf_counter() - t0) * 1e3)

    async def triton_times() -> list[float]:
        out = []
        async with TritonClient(args.triton) as client:
            await client.infer_broad(rgb[None])
            for _ in range(args.n):
                t0 = time.perf_counter()
                await client.infer_broad(rgb[None])
                out.append((time.perf_counter() - t0) * 1e3)
        return out

    triton_ms = asyncio.run(triton_times())
    r50, t50 = statistics.median(router_ms), statistics.median(triton_ms)
    console.print(
        f"router Classify p50 {r50:.2f} ms (cache skipped), direct Triton broad p50 "
        f"{t50:.2f} ms, ratio {r50 / t50:.2f} ({args.n} calls each, concurrency 1)"
    )
    return 0


def cmd_learn(args: argparse.Namespace) -> int:
    """Learns image files as one taxon: an existing leaf id, or a new name under a parent."""
    if bool(args.taxon) == bool(args.new):
        console.print("[red]give --taxon ID, or --new NAME with --parent ID[/red]")
        return 2
    if args.new and not args.parent:
        console.print("[red]--new needs --parent (an internal taxon id; see GetTaxonomy)[/red]")
        return 2
    cfg = _config(args)
    channel, stub = _stub(args)
    with channel:
        for path in args.images:
            request = router_pb2.LearnRequest(image=path.read_bytes(), source=args.source)
            if args.taxon:
                request.taxon_id = args.taxon
            else:
                request.new_taxon.name, request.new_taxon.parent_id = args.new, args.parent
            r = stub.Learn(request, timeout=60, metadata=bearer(cfg.write_token()))
            state = (
                "duplicate" if r.duplicate else "created taxon" if r.created_taxon else "learned"
            )
            path_names = " > ".join(t.name for t in r.path[1:])
            console.print(f"{path}: {state} {r.taxon.id} ({path_names}); {r.learned_total} total")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    """Forgets exemplars by id, or a learned taxon with every example of it."""
    cfg = _config(args)
    channel, stub = _stub(args)
    with channel:
        r = stub.Forget(
            router_pb2.ForgetRequest(exemplar_ids=args.exemplar or [], taxon_id=args.taxon or ""),
            timeout=args.timeout,
            metadata=bearer(cfg.write_token()),
        )
    console.print(
        f"forgotten: {r.forgotten} exemplars ({r.learned_forgotten} learned examples); "
        f"{r.learned_total} learned examples left"
    )
    if r.removed_taxa:
        console.print(f"taxa removed (no example left): {', '.join(r.removed_taxa)}")
    if r.not_found:
        console.print(f"not found (already forgotten, or never stored): {', '.join(r.not_found)}")
    return 0


def cmd_learn_eval(args: argparse.Namespace) -> int:
    from fieldlens import learn_eval

    cfg = _config(args)
    result = learn_eval.evaluate(args.data, cfg.models_dir, args.shots, args.held_out)
    table = Table(title=f"Learned from {args.shots} photos: classes the models never saw")
    for col in (
        "class",
        "learned under",
        "held-out",
        "recall@1",
        "recall@5",
        "precision",
        "in its group",
        "trained photos it took",
    ):
        table.add_column(col)

    def pct(v: object) -> str:
        return "-" if v is None else f"{v:.0%}"

    for row in result["classes"]:
        table.add_row(
            row["class"],
            row["parent"],
            str(row["held_out"]),
            pct(row["recall_at_1"]),
            pct(row["recall_at_5"]),
            pct(row["precision"]),
            pct(row["precision_in_group"]),
            str(row["claimed_trained_photos"]),
        )
    console.print(table)
    groups = Table(title="Trained classes' top-1 in the groups the new classes joined")
    for col in ("broad group", "learned", "photos", "before", "after"):
        groups.add_column(col)
    for g in result["affected_groups"]:
        groups.add_row(
            g["broad"],
            ", ".join(g["learned"]),
            str(g["photos"]),
            f"{g['top1_before']:.1%}",
            f"{g['top1_after']:.1%}",
        )
    console.print(groups)
    before, after = result["answer_before"], result["answer_after"]
    console.print(
        f"novel mean recall@1 {result['mean_recall_at_1']:.1%} (recall@5 "
        f"{result['mean_recall_at_5']:.1%}); precision of answers naming a learned class "
        f"{pct(result['learned_mean_precision'])} (trained classes "
        f"{result['trained_mean_precision']:.0%}); trained top-1 over "
        f"{result['trained_photos']} photos {result['trained_top1_before']:.1%} -> "
        f"{result['trained_top1_after']:.1%} ({result['claimed_trained_photos']} taken by "
        f"learned classes); harmonic mean {result['harmonic_mean']:.2f}"
    )
    console.print(
        f"best-effort answer right {before['precision']:.1%} -> {after['precision']:.1%} "
        f"(mean depth {before['mean_depth']:.2f} -> {after['mean_depth']:.2f}); Learn p50 "
        f"{result['learn_p50_ms']:.1f} ms (durable), Classify p50 "
        f"{result['classify_p50_ms']:.1f} ms (cache skipped)"
    )
    learn_eval.save(result, args.out)
    learn_eval.plot(result, args.out.with_suffix(".png"))
    console.print(f"written to {args.out} and {args.out.with_suffix('.png')}")
    return 0


def _model_store(args: argparse.Namespace, cfg: cluster.ClusterConfig) -> Path:
    """The store `model-set` publishes into and lists: --store, else FIELDLENS_MODEL_STORE
    (the services' own setting, so a Job or shell configured like them finds their store),
    else the local cluster's."""
    if args.store is not None:
        return Path(args.store)
    return model_store_from_env(cfg.model_store)


def _validation_metric(manifest: Mapping[str, Any], name: str) -> str:
    """One of a model set's validation metrics (manifest `metrics.validation`, written by the
    trainer) as a percentage; "-" when the manifest has none."""
    value = manifest.get("metrics", {}).get("validation", {}).get(name)
    return "-" if value is None else f"{value:.1%}"


def cmd_model_set(args: argparse.Namespace) -> int:
    """Publish a trained model set into the store, list the store, or switch the routers."""
    cfg = _config(args)
    store = _model_store(args, cfg)
    if args.action == "publish":
        version = model_store.publish(
            store, args.models or cfg.models_dir, args.model_repository or cfg.model_repository
        )
        console.print(f"published model set {version} in {store}")
        console.print(f"serve it with: fieldlens model-set switch {version}")
        return 0
    if args.action == "list":
        current = model_store.current(store)
        table = Table(title=f"model sets in {store}")
        for col in ("version", "embedding space", "fine top-1", "broad top-1", "current"):
            table.add_column(col)
        for version in model_store.published(store):
            ms = model_store.load(store, version)
            table.add_row(
                version,
                ms.embedding_version,
                _validation_metric(ms.manifest, "fine_top1"),
                _validation_metric(ms.manifest, "broad_top1"),
                "yes" if version == current else "",
            )
        console.print(table)
        if current is None:
            console.print("the routers serve their boot model set (FIELDLENS_MODELS_DIR)")
        return 0
    if args.action == "compare":
        return _compare(args, cfg)
    if args.action in ROLLOUT_ACTIONS:
        return _rollout(args, cfg)
    if not args.version:
        console.print("[red]switch needs a VERSION (see `fieldlens model-set list`)[/red]")
        return 2
    channel, stub = _stub(args)
    with channel, console.status(f"switching to {args.version} (the old set serves meanwhile)"):
        r = stub.SwitchModelSet(
            router_pb2.SwitchModelSetRequest(version=args.version),
            timeout=args.timeout,
            metadata=bearer(cfg.write_token()),
        )
    if r.previous_model_set_version == r.model_set_version:
        console.print(f"already serving {r.model_set_version}")
    else:
        console.print(
            f"serving {r.model_set_version} (was {r.previous_model_set_version}) after "
            f"{r.seconds:.1f} s: {r.reindexed} exemplars re-embedded, {r.relearned} learned "
            "examples re-applied"
        )
    return 0


ROLLOUT_ACTIONS = ("shadow", "canary", "promote", "abort", "status")


def _rollout_line(r: router_pb2.RolloutStatus) -> str:
    return (
        f"candidate {r.candidate_version}: canary {r.canary_weight:.1%} of images, shadow "
        f"{r.shadow_fraction:.1%} of the rest ({r.shadows_in_flight} shadow calls in flight)"
    )


def _rollout(args: argparse.Namespace, cfg: cluster.ClusterConfig) -> int:
    """shadow / canary: start or change the rollout of a candidate set, keeping the other
    share; promote, abort: end it; status: what serves and what rolls out."""
    if args.action in ("shadow", "canary") and not args.version:
        console.print(f"[red]{args.action} needs a VERSION (see `fieldlens model-set list`)[/red]")
        return 2
    token = bearer(cfg.write_token()) if args.action != "status" else ()
    channel, stub = _stub(args)
    with channel:
        info = stub.GetInfo(router_pb2.GetInfoRequest(), timeout=30)
        running = info.rollout if info.HasField("rollout") else None
        if args.action == "status":
            console.print(f"serving model set {info.model_set_version}")
            console.print(_rollout_line(running) if running else "no rollout running")
            return 0
        if args.action == "abort":
            r = stub.AbortCandidate(router_pb2.AbortCandidateRequest(), timeout=60, metadata=token)
            console.print(
                f"rollout of {r.aborted_version} aborted; {info.model_set_version} answers "
                "everything"
                if r.aborted_version
                else "no rollout was running"
            )
            return 0
        if args.action == "promote":
            with console.status("promoting the candidate (the current set serves meanwhile)"):
                p = stub.PromoteCandidate(
                    router_pb2.PromoteCandidateRequest(), timeout=args.timeout, metadata=token
                )
            console.print(
                f"serving {p.model_set_version} (was {p.previous_model_set_version}) after "
                f"{p.seconds:.1f} s"
            )
            return 0
        same = running is not None and running.candidate_version == args.version
        weight = running.canary_weight if same and running else 0.0
        fraction = running.shadow_fraction if same and running else 0.0
        if args.action == "shadow":
            fraction = args.fraction
        else:
            weight = args.weight
        with console.status(f"loading {args.version} next to {info.model_set_version}"):
            r = stub.SetRollout(
                router_pb2.SetRolloutRequest(
                    candidate_version=args.version, canary_weight=weight, shadow_fraction=fraction
                ),
                timeout=args.timeout,
                metadata=token,
            )
    console.print(
        _rollout_line(r.rollout) + (f"; loaded in {r.seconds:.1f} s" if r.seconds else "")
    )
    return 0


def _router_metrics_urls(args: argparse.Namespace, cfg: cluster.ClusterConfig) -> list[str]:
    """--metrics-url (each router replica's), else FIELDLENS_METRICS_PORT on this host (the
    router's own setting), else the local cluster's router."""
    if args.metrics_url:
        return list(args.metrics_url)
    port = os.environ.get("FIELDLENS_METRICS_PORT", "").strip() or str(cfg.router_metrics_port)
    return [f"http://127.0.0.1:{port}/metrics"]


def _compare(args: argparse.Namespace, cfg: cluster.ClusterConfig) -> int:
    """The shadow comparison so far, from the routers' counters: agreement by answer and by
    taxonomy level, and the confusion between the two sets by broad group."""
    import urllib.request

    from fieldlens import rollout_report

    texts = []
    for url in _router_metrics_urls(args, cfg):
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                texts.append(response.read().decode())
        except OSError as exc:
            console.print(f"[red]cannot read {url}: {exc}[/red]")
            return 1
    reports = rollout_report.read_reports(texts)
    if args.version:
        reports = {v: r for v, r in reports.items() if v == args.version}
    if not reports:
        console.print("no rollout counted by the routers (start one: fieldlens model-set shadow)")
        return 1
    for report in reports.values():
        _print_report(report)
        if args.plot is not None:
            path = args.plot
            if len(reports) > 1:
                path = path.with_name(f"{path.stem}-{report.candidate}{path.suffix}")
            rollout_report.plot(report, path)
            console.print(f"plot written to {path}")
    return 0


def _print_report(report: rollout_report.ShadowReport) -> None:
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.1%}"

    requests = report.requests
    shadow_calls = sum(n for (arm, _), n in requests.items() if arm == "shadow")
    shadow_failed = sum(
        n for (arm, code), n in requests.items() if arm == "shadow" and code != "OK"
    )
    console.print(
        f"candidate {report.candidate}: {report.comparisons:.0f} shadowed requests compared, "
        f"{shadow_failed:.0f} of {shadow_calls:.0f} shadow calls failed, "
        f"{report.dropped:.0f} dropped"
    )
    agreement = Table(title=f"{report.candidate}: same answer as the serving set")
    for col in ("top-1", "best-effort answer", "broad group"):
        agreement.add_column(col)
    agreement.add_row(*(pct(report.agreement(a)) for a in ("top1", "best_effort", "broad")))
    console.print(agreement)
    levels = Table(title="deepest taxonomy level both answers share (0 root, 1 domain, 2 broad)")
    levels.add_column("level")
    levels.add_column("top-1")
    levels.add_column("best-effort answer")
    top1, best = report.depth_shares("top1"), report.depth_shares("best_effort")
    for depth in sorted(set(top1) | set(best)):
        levels.add_row(str(depth), pct(top1.get(depth)), pct(best.get(depth)))
    console.print(levels)
    rows = report.broad_confusion()
    if not rows:
        console.print("no broad-group pairs counted (a router older than this client)")
        return
    confusion = Table(title="by the serving set's broad group")
    for col in ("broad group", "compared", "candidate agrees", "else most often"):
        confusion.add_column(col)
    for group, total, same, instead in rows:
        confusion.add_row(group, f"{total:.0f}", pct(same), instead or "-")
    console.print(confusion)


def _tokens_file(args: argparse.Namespace) -> Path:
    """The tokens file `token` manages: --file, else FIELDLENS_TOKENS_FILE (the router's own
    setting), else the local cluster's."""
    if args.file is not None:
        return Path(args.file)
    from_env = os.environ.get(credentials.TOKENS_FILE_ENV, "").strip()
    return Path(from_env) if from_env else cluster.ClusterConfig().tokens_path


def cmd_token(args: argparse.Namespace) -> int:
    """Add a named, scoped write token (shown once), revoke one, or list them."""
    path = _tokens_file(args)
    try:
        if args.action == "add":
            token = credentials.add_token(path, args.name, args.scopes.split(","))
            console.print(
                f"added client {args.name!r} ({args.scopes}) to {path}; its token, shown only "
                "this once (the file keeps its SHA-256):"
            )
            print(token, flush=True)
        elif args.action == "revoke":
            credentials.revoke_token(path, args.name)
            console.print(f"revoked {args.name!r} in {path}: its next write call is refused")
        else:
            table = Table(title=f"write tokens in {path}")
            for col in ("name", "scopes", "created"):
                table.add_column(col)
            for t in credentials.read_tokens(path):
                table.add_row(
                    t.name, ",".join(s for s in credentials.SCOPES if s in t.scopes), t.created
                )
            console.print(table)
    except ValueError as exc:  # TokensFileError included
        console.print(f"[red]{exc}[/red]")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fieldlens", description=__doc__)
    parser.add_argument("--addr", default=DEFAULT_ADDR, help="router address (host:port)")
    parser.add_argument(
        "--tls",
        action="store_true",
        help="call the local cluster over TLS (started with `fieldlens up --tls`: its CA and "
        "client certificate)",
    )
    parser.add_argument("--ca", type=Path, help="TLS: the CA the router's certificate chains to")
    parser.add_argument("--cert", type=Path, help="mTLS: this client's certificate chain")
    parser.add_argument("--key", type=Path, help="mTLS: this client's private key")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("classify", help="classify image files through the router")
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--skip-cache", action="store_true")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_classify)
    p = sub.add_parser("probe", help="router p50 vs direct Triton p50 for one image")
    p.add_argument("image", type=Path)
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--triton", default="127.0.0.1:8001", help="Triton gRPC address")
    p.set_defaults(func=cmd_probe)
    p = sub.add_parser("bench", help="load and micro benchmarks (see python -m fieldlens.bench)")
    bench.add_arguments(p)
    p.set_defaults(func=bench.run)
    p = sub.add_parser("learn", help="learn labelled image files at once (needs the token)")
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--taxon", help="an existing leaf taxon id")
    p.add_argument("--new", help="name of a new taxon to create")
    p.add_argument("--parent", help="internal taxon id the new taxon goes under")
    p.add_argument("--source", default="cli", help="provenance stored with the exemplars")
    p.set_defaults(func=cmd_learn)
    p = sub.add_parser(
        "forget", help="forget exemplars by id, or a learned taxon (needs the token)"
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--exemplar", nargs="+", metavar="ID", help="exemplar ids (the images' content hashes)"
    )
    what.add_argument("--taxon", help="a learned taxon id (learned/...), with all its examples")
    p.add_argument("--timeout", type=float, default=180.0)
    p.set_defaults(func=cmd_forget)
    p = sub.add_parser("learn-eval", help="recall of novel classes learned from a few photos")
    p.add_argument("--data", type=Path, default=data_dir_from_env())
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--held-out", type=int, default=50)
    p.add_argument("--out", type=Path, default=Path("build/learn-eval.json"))
    p.set_defaults(func=cmd_learn_eval)
    p = sub.add_parser(
        "model-set",
        help="publish a trained model set; switch the routers to it, no downtime; or roll it "
        "out: shadow, canary, promote, abort, status, compare",
    )
    p.add_argument("action", choices=("publish", "list", "switch", *ROLLOUT_ACTIONS, "compare"))
    p.add_argument(
        "version",
        nargs="?",
        help="model-set version to switch to, or to shadow or canary (compare: the candidate "
        "to report on, default every one counted)",
    )
    p.add_argument(
        "--metrics-url",
        action="append",
        help="compare: a router's /metrics URL, once per replica (default: this host's "
        "FIELDLENS_METRICS_PORT, else the local cluster's router)",
    )
    p.add_argument(
        "--plot", type=Path, help="compare: also write agreement by level and confusion to a PNG"
    )
    p.add_argument(
        "--fraction",
        type=float,
        default=0.1,
        help="shadow: share of Classify requests the candidate also answers, off the response "
        "path (default 0.1; 0 stops shadowing)",
    )
    p.add_argument(
        "--weight",
        type=float,
        default=0.05,
        help="canary: share of images the candidate answers instead (default 0.05; 0 stops it)",
    )
    p.add_argument("--models", type=Path, help="publish: manifest dir (deploy/models)")
    p.add_argument(
        "--model-repository", type=Path, help="publish: its Triton nets (deploy/triton/...)"
    )
    p.add_argument(
        "--store",
        type=Path,
        help="publish, list: the model store (default: FIELDLENS_MODEL_STORE, else the local "
        "cluster's .run/state/model-sets)",
    )
    p.add_argument(
        "--timeout", type=float, default=900.0, help="seconds a switch (or a load) may take"
    )
    p.set_defaults(func=cmd_model_set)
    p = sub.add_parser(
        "token", help="manage named write tokens and their scopes (the router's tokens file)"
    )
    actions = p.add_subparsers(dest="action", required=True)
    for action, text in (
        ("add", "add a client; prints its new token once"),
        ("revoke", "remove a client: its token stops working at once, no restart"),
        ("list", "clients, their scopes and when they were added"),
    ):
        q = actions.add_parser(action, help=text)
        if action != "list":
            q.add_argument("name", help="the client's name (recorded with what it writes)")
        if action == "add":
            q.add_argument(
                "--scopes",
                required=True,
                help=f"comma-separated, of {', '.join(credentials.SCOPES)} (learn: Learn, "
                "LearnStream, Forget; index: IndexExemplars; admin: SwitchModelSet and the "
                "rollout RPCs)",
            )
        q.add_argument(
            "--file",
            type=Path,
            help="the tokens file (default: FIELDLENS_TOKENS_FILE, else the local cluster's "
            ".run/tokens.jsonl)",
        )
        q.set_defaults(func=cmd_token)
    p = sub.add_parser("up", help="start the local cluster")
    p.add_argument(
        "--triton-replicas",
        type=int,
        default=1,
        help="Triton servers, addressed as one target the way the router addresses Triton pods "
        "on Kubernetes (default 1)",
    )
    p.add_argument(
        "--tiny-replicas",
        type=int,
        default=1,
        help="tiny-classifier replicas, each with its own journal, peers of each other and one "
        "target for the router (default 1)",
    )
    p.add_argument(
        "--tls",
        dest="serve_tls",
        action="store_true",
        help="every gRPC hop over TLS, with a throwaway CA and certificates under .run/tls/ "
        "(call it with `fieldlens --tls ...`)",
    )
    p.add_argument(
        "--mtls",
        dest="serve_mtls",
        action="store_true",
        help="--tls, and clients need a certificate",
    )
    p.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop the local cluster").set_defaults(func=cmd_down)
    sub.add_parser("status", help="local cluster state").set_defaults(func=cmd_status)
    for name, func, text in (
        ("index-gallery", cmd_index, "embed and index labelled exemplars"),
        ("demo", cmd_demo, "start, index if empty, classify samples"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument(
            "--data",
            type=Path,
            default=data_dir_from_env(),
            help="Tiny ImageNet shards (or the official tiny-imagenet-200 folder)",
        )
        p.add_argument("--per-class", type=int, default=GALLERY_PER_CLASS)
        p.add_argument("--force", action="store_true")
        p.set_defaults(func=func)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (cluster.ClusterError, FieldlensError) as exc:
        console.print(f"[red]{exc}[/red]")
        return 1
    except grpc.RpcError as exc:
        console.print(f"[red]router at {args.addr}: {exc.code().name}: {exc.details()}[/red]")
        return 1


if __name__ == "__main__":
    sys.exit(main())
