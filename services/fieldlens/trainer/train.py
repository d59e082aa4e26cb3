"""`make train`: backbone -> broad head -> specialists -> tiny ensemble -> reports -> export."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import trange

from fieldlens.common.model_set import MANIFEST
from fieldlens.common.settings import data_dir_from_env
from fieldlens.common.taxonomy import Taxonomy
from fieldlens.common.threads import set_cpu_threads
from fieldlens.tiny.ensemble import TinyEnsemble
from fieldlens.tiny.ensemble import fit as tiny_fit
from fieldlens.trainer import calibrate, evaluation, metrics, report
from fieldlens.trainer import data as data_mod
from fieldlens.trainer.config import (
    DEFAULT_MODEL_REPOSITORY,
    DEFAULT_MODELS_DIR,
    DEFAULT_WORK_DIR,
    TrainConfig,
    config_for,
)
from fieldlens.trainer.export import embedding_version, export_all
from fieldlens.trainer.loops import (
    Phase,
    lr_range_test,
    pick_device,
    predict,
    train_classifier,
    training_precision,
)
from fieldlens.trainer.nets import Classifier, EmbedAndLogits, round_to_fp16

logger = logging.getLogger(__name__)


@dataclass
class Context:
    """What every stage shares: config, paths, data and taxonomy."""

    cfg: TrainConfig
    data_dir: Path
    work_dir: Path
    models_dir: Path
    model_repository: Path
    device: torch.device
    classes: list[data_mod.ClassInfo]
    taxonomy: Taxonomy
    train: data_mod.Dataset
    val: data_mod.Dataset
    digest: str
    novel: list[data_mod.ClassInfo]
    precision: str  # what the nets train in here: cfg.precision, or fp32 without bf16 kernels

    @property
    def stage_dir(self) -> Path:
        return self.work_dir / self.cfg.backbone_fingerprint()


def prepare(
    cfg: TrainConfig, data_dir: Path, work_dir: Path, models_dir: Path, model_repository: Path
) -> Context:
    all_classes = data_mod.read_classes(data_dir)
    ds = data_mod.load_dataset(data_dir, all_classes, work_dir.parent / "cache", cfg.shard_limit)
    ds, classes, novel_ds, novel = data_mod.hold_out(ds, all_classes, cfg.novel_classes)
    train, val = data_mod.split(ds, cfg.val_per_class, cfg.seed)
    shards = data_mod.list_shards(data_dir, cfg.shard_limit)
    logger.info(
        "data: %d train / %d val images, %d classes (%d held out as novel: %d images)",
        len(train),
        len(val),
        len(classes),
        len(novel),
        len(novel_ds),
    )
    device = pick_device()
    precision = training_precision(device, cfg.precision)
    if precision != cfg.precision:
        logger.warning(
            "no %s kernels on this %s: training in %s instead (emulated %s is ~10x slower); "
            "the full profile's 90-minute budget assumes a CPU with AVX512-BF16/AMX or a GPU",
            cfg.precision,
            device.type,
            precision,
            cfg.precision,
        )
    return Context(
        cfg,
        data_dir,
        work_dir,
        models_dir,
        model_repository,
        device,
        classes,
        Taxonomy.from_classes(classes),
        train,
        val,
        data_mod.data_digest(data_dir, shards) if shards else "folder",
        novel,
        precision,
    )


def stage_backbone(ctx: Context) -> Classifier:
    """Trains the backbone on the fine classes (LR finder, one-cycle, progressive resizing)."""
    cfg = ctx.cfg
    torch.manual_seed(cfg.seed)
    model = Classifier(cfg.backbone, len(ctx.classes)).to(ctx.device)
    model = model.to(memory_format=torch.channels_last)
    done = ctx.stage_dir / "backbone.pt"
    if done.exists():
        model.load_state_dict(torch.load(done, map_location=ctx.device, weights_only=True))
        return round_to_fp16(model)
    meta_path = ctx.stage_dir / "lr_finder.json"
    if cfg.lr_finder and not meta_path.exists():
        lr, curve = lr_range_test(
            model,
            ctx.train.images,
            ctx.train.labels,
            len(ctx.classes),
            cfg.phases[0].resolution,
            cfg.batch_size,
            cfg.seed,
            divisor=cfg.lr_finder_divisor,
        )
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        meta_path.write_text(json.dumps({"max_lr": lr, "curve": curve}))
    max_lr = json.loads(meta_path.read_text())["max_lr"] if cfg.lr_finder else 0.4
    logger.info("backbone: one-cycle peak LR %.3f", max_lr)

    def evaluate(m: torch.nn.Module, res: int) -> dict[str, float]:
        m.eval()
        logits = predict(m, ctx.val.images, res)
        return {"val_top1": float((logits.argmax(1) == ctx.val.labels).mean())}

    history = train_classifier(
        model,
        ctx.train.images,
        ctx.train.labels,
        len(ctx.classes),
        list(cfg.phases),
        max_lr,
        cfg.batch_size,
        cfg.seed,
        ctx.stage_dir / "backbone.ckpt",
        "backbone",
        mixup_alpha=cfg.mixup_alpha,
        evaluate=evaluate,
        precision=ctx.precision,
        class_groups=metrics.group_matrix(ctx.taxonomy).argmax(1),
        group_weight=cfg.broad_loss_weight,
    )
    (ctx.stage_dir / "backbone_history.json").write_text(
        json.dumps(
            {"max_lr": max_lr, "history": history, "seconds": _epoch_seconds(history)}, indent=1
        )
    )
    model.eval()
    # Frozen at the precision it is served in (fp16 weights): the embedding space is this one.
    round_to_fp16(model)
    torch.save(model.state_dict(), done)
    return model


def _epoch_seconds(history: list[dict[str, float]]) -> float:
    """Training plus per-epoch evaluation time over every epoch, including those trained by an
    earlier, interrupted run (a resume must not hide them)."""
    return float(sum(h["seconds"] + h.get("eval_seconds", 0.0) for h in history))


@dataclass
class Outputs:
    """Network outputs on the training and validation images (eval mode, no augmentation)."""

    train_emb: np.ndarray
    train_logits: np.ndarray
    val_emb: np.ndarray
    val_logits: np.ndarray
    val_logits_tta: np.ndarray


def stage_embed(ctx: Context, model: Classifier) -> Outputs:
    """Embeds every image once with the frozen backbone; later stages reuse the vectors."""
    path = ctx.stage_dir / "outputs.npz"
    if path.exists():
        z = np.load(path)
        return Outputs(*(z[k] for k in Outputs.__dataclass_fields__))
    model.eval()
    res = ctx.cfg.phases[-1].resolution

    both = EmbedAndLogits(model)
    dim = model.backbone.dim
    tr = predict(both, ctx.train.images, res, desc="embed train")
    va = predict(both, ctx.val.images, res, desc="embed val")
    va_tta = predict(model, ctx.val.images, res, flip_tta=True, desc="val tta")
    out = Outputs(tr[:, :dim], tr[:, dim:], va[:, :dim], va[:, dim:], va_tta)
    np.savez(path, **{k: getattr(out, k) for k in Outputs.__dataclass_fields__})
    return out


def served_fine_logits(cfg: TrainConfig, out: Outputs) -> np.ndarray:
    """Validation fine logits as the exported broad net computes them (flip TTA or not)."""
    return out.val_logits_tta if cfg.broad_flip_tta else out.val_logits


def stage_broad(ctx: Context, model: Classifier, out: Outputs) -> tuple[torch.nn.Linear, float]:
    """Broad head on the frozen embedding, then the head/rollup mix that validates best."""
    g = metrics.group_matrix(ctx.taxonomy)
    y_train = g[ctx.train.labels].argmax(1)
    torch.manual_seed(ctx.cfg.seed)
    head = torch.nn.Linear(out.train_emb.shape[1], len(ctx.taxonomy.broad_ids))
    x = torch.from_numpy(out.train_emb)
    y = torch.from_numpy(y_train)
    opt = torch.optim.Adam(head.parameters(), lr=0.05, weight_decay=1e-5)
    for _ in trange(300, desc="broad head", leave=False):
        loss = torch.nn.functional.cross_entropy(head(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    round_to_fp16(head)  # the mix is chosen with the head as it is served
    y_val = g[ctx.val.labels].argmax(1)
    with torch.no_grad():
        p_head = torch.softmax(head(torch.from_numpy(out.val_emb)), 1).numpy()
    p_roll = metrics.softmax(served_fine_logits(ctx.cfg, out)) @ g
    scores = {
        mix: float((((1 - mix) * p_head + mix * p_roll).argmax(1) == y_val).mean())
        for mix in (0.0, 0.5, 1.0)
    }
    mix = max(scores, key=lambda m: (scores[m], -abs(m - 0.5)))
    logger.info("broad top-1 by head/rollup mix: %s -> mix %.1f", scores, mix)
    return head, mix


def stage_specialists(
    ctx: Context, backbone_state: dict[str, torch.Tensor]
) -> dict[str, Classifier]:
    """Fine-tunes a copy of the backbone per specialist group on that group's classes."""
    nets = {}
    for group in ctx.cfg.specialist_groups:
        broad = f"broad/{group}"
        leaves = [c for c in ctx.taxonomy.class_ids if ctx.taxonomy.broad_of(c) == broad]
        cls_idx = np.asarray([ctx.taxonomy.class_ids.index(c) for c in leaves])
        remap = {int(c): i for i, c in enumerate(cls_idx)}
        sel = np.flatnonzero(np.isin(ctx.train.labels, cls_idx))
        labels = np.asarray([remap[int(v)] for v in ctx.train.labels[sel]], dtype=np.int64)
        torch.manual_seed(ctx.cfg.seed)
        net = Classifier(ctx.cfg.backbone, len(leaves)).to(ctx.device)
        net.backbone.load_state_dict(backbone_state)
        net = net.to(memory_format=torch.channels_last)
        done = ctx.stage_dir / f"specialist_{group}.pt"
        if done.exists():
            net.load_state_dict(torch.load(done, map_location=ctx.device, weights_only=True))
        else:
            train_classifier(
                net,
                ctx.train.images[sel],
                labels,
                len(leaves),
                [Phase(ctx.cfg.phases[-1].resolution, ctx.cfg.specialist_epochs)],
                ctx.cfg.specialist_lr,
                min(64, len(labels)),
                ctx.cfg.seed,
                ctx.stage_dir / f"specialist_{group}.ckpt",
                f"specialist {group}",
                precision=ctx.precision,
            )
            round_to_fp16(net)
            torch.save(net.state_dict(), done)
        net.eval()
        net.labels = leaves  # type: ignore[assignment]
        nets[group] = net
    return nets


def stage_tiny(ctx: Context, out: Outputs, embedding_version: str) -> TinyEnsemble:
    leaves = np.asarray([ctx.taxonomy.class_ids[y] for y in ctx.train.labels])
    return tiny_fit(
        ctx.taxonomy,
        out.train_emb,
        leaves,
        embedding_version,
        epochs=ctx.cfg.tiny_epochs,
        seed=ctx.cfg.seed,
    )


def run(
    cfg: TrainConfig, data_dir: Path, work_dir: Path, models_dir: Path, model_repository: Path
) -> dict[str, object]:
    """Every stage in order; each one resumes from its checkpoint in the work dir."""
    t0 = time.time()
    ctx = prepare(cfg, data_dir, work_dir, models_dir, model_repository)
    t_backbone = time.time()
    model = stage_backbone(ctx)
    # The backbone's epochs are counted from its history (an interrupted run's included), so
    # this run's own time spent training it is left out of the wall time below.
    t0 += time.time() - t_backbone
    out = stage_embed(ctx, model)
    emb_version = embedding_version(model.backbone)
    head, mix = stage_broad(ctx, model, out)
    specialists = stage_specialists(ctx, model.backbone.state_dict())
    ens = stage_tiny(ctx, out, emb_version)
    report_dir = models_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    broad_probs = evaluation.broad_probabilities(
        head, mix, out.val_emb, served_fine_logits(ctx.cfg, out), ctx.taxonomy
    )
    val_metrics, routing = evaluation.evaluate(
        ctx.taxonomy,
        ctx.val,
        out.val_emb,
        out.val_logits,
        out.val_logits_tta,
        broad_probs,
        ens,
        specialists,
        cfg.phases[-1].resolution,
        report_dir,
        cfg.val_per_class,
    )
    curation = evaluation.curate(ctx.taxonomy, ctx.train, out.train_logits, report_dir)
    history = json.loads((ctx.stage_dir / "backbone_history.json").read_text())
    manifest = export_all(
        ctx.taxonomy,
        model,
        head,
        mix,
        specialists,
        routing,
        ens,
        models_dir,
        model_repository,
        {
            "profile_fingerprint": cfg.fingerprint(),
            "training_precision": ctx.precision,
            "data_digest": ctx.digest,
            "config": asdict(cfg),
            "metrics": {"validation": val_metrics},
            "curation": curation,
            "backbone_history": history,
            # Backbone epochs (from the history, resumed ones included) plus this run's other
            # stages; a resumed run does not count stages it loaded from checkpoints.
            "training_seconds": history["seconds"] + time.time() - t0,
        },
        out.train_emb.mean(axis=0),
        flip_tta=cfg.broad_flip_tta,
    )
    # The validation keys travel with the models: the gallery and later evaluations skip them.
    (models_dir / "split.json").write_text(
        json.dumps(
            {"seed": cfg.seed, "per_class": cfg.val_per_class, "val_keys": sorted(ctx.val.keys)}
        )
    )
    (models_dir / "novel.json").write_text(
        json.dumps({"classes": novel_classes(ctx.taxonomy, ctx.novel)}, indent=1)
    )
    doc = {**manifest, "validation": val_metrics}
    (report_dir / "README.md").write_text(report.markdown(doc))
    # Last: the stated probabilities, the default threshold and the learned-class bias, fitted
    # on what the exported nets answer (rewrites the manifest, the version and the report).
    calibrate.calibrate(models_dir, model_repository, data_dir)
    manifest = json.loads((models_dir / MANIFEST).read_text())
    logger.info(
        "model set %s written: fine top-1 %.3f, broad top-1 %.3f",
        manifest["model_set_version"],
        val_metrics["fine_top1"],
        val_metrics["broad_top1"],
    )
    return manifest


def novel_classes(taxonomy: Taxonomy, novel: list[data_mod.ClassInfo]) -> list[dict[str, str]]:
    """Held-out classes with the deepest served taxon on their WordNet chain (their parent)."""
    rows = []
    for c in novel:
        broad = f"broad/{c.broad}"
        chain = set(c.wordnet_path[:-1])
        inner = [
            t
            for t in _descendants(taxonomy, broad)
            if taxonomy.children(t) and taxonomy.get(t).name in chain
        ]
        parent = max(inner, key=lambda t: taxonomy.get(t).depth, default=broad)
        rows.append({"wnid": c.wnid, "name": c.name, "broad": broad, "parent": parent})
    return rows


def _descendants(taxonomy: Taxonomy, taxon: str) -> list[str]:
    out, stack = [], [taxon]
    while stack:
        t = stack.pop()
        out.append(t)
        stack.extend(taxonomy.children(t))
    return out


def _threads(raw: str) -> int:
    try:
        threads = int(raw)
    except ValueError:
        threads = 0
    if threads < 1:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {raw!r}")
    return threads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fieldlens-train", description=__doc__)
    parser.add_argument(
        "--profile",
        choices=["full", "smoke"],
        default="full",
        help="full: the shipped models (<= 90 min on 2 CPU cores); smoke: a shard "
        "or two and one epoch, for tests",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=data_dir_from_env(),
        help="Tiny ImageNet shards or the official folder",
    )
    parser.add_argument(
        "--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="checkpoints and caches (resumable)"
    )
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_MODEL_REPOSITORY)
    parser.add_argument(
        "--threads",
        type=_threads,
        default=os.cpu_count() or 1,
        help="torch, OpenMP and BLAS threads of the training run (default: every core; unlike "
        "the serving processes' FIELDLENS_CPU_THREADS, training wants them all)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    set_cpu_threads(args.threads, source="--threads")
    cfg = config_for(args.profile)
    run(cfg, args.data, args.work_dir, args.models_dir, args.model_repository)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
