"""Supervised training of a classifier on an encoder: one loop, the protocol is a mode.

    run_finetune(cfg, on_epoch=None, resume_from=None) -> dict   # one seed
    run_seeds(cfg) -> dict                                       # cfg.seeds, mean ± std

Per epoch: train (:class:`FullTrainer` for finetune / semi / scratch; :class:`LinearProbe`
for linear), validate on the held-out rows (never the test part), write a checkpoint folder
``<run>/checkpoints/epoch_XXXX`` (classifier weights + meta.json + train_state.pt) and call
``on_epoch(epoch, metrics, checkpoint_dir)``. After the last epoch the classifier goes to
``<run>/final`` (and the best-on-validation epoch to ``<run>/best``), both are scored on the
validation rows and the test part (per-sample softmax scores in ``scores_val.parquet`` /
``scores_test.parquet`` beside the weights: what ``mtscale ensemble`` combines), and the run
writes ``results.json`` + a markdown row in ``results.md``.

Runs in one process (no process group, no port: Ray Tune trials) or under a launcher
(``deepspeed`` / ``torchrun`` / ``srun``: DistributedDataParallel over gloo or nccl). A run
directory with checkpoints resumes from the latest one unless ``resume_from`` names another.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from mtscale.config import FinetuneConfig, to_dict
from mtscale.data.store import Store
from mtscale.dist import all_reduce_flag
from mtscale.errors import ConfigError
from mtscale.files import atomic_path
from mtscale.train.classifier import WEIGHTS, build_classifier, build_encoder, check_keys, save_classifier, unwrap
from mtscale.train.evaluate import classifier_forward, score_rows
from mtscale.train.finetune_data import Splits, make_splits
from mtscale.train.metrics import (
    append_results_md,
    classification_metrics,
    confusion_matrix,
    hardware_summary,
    mean_std,
    results_row,
    save_confusion,
)
from mtscale.train.rundir import FINETUNE_KEEP, MetricsLog, StopFlag, check_resume, check_run_dir, start_run_dir, write_json
from mtscale.train.runtime import Runtime, setup_runtime
from mtscale.train.scores import sample_ids, scores_file, write_scores
from mtscale.train.state import capture_rng, prune_dirs, restore_rng
from mtscale.train.trainers import FullTrainer, LinearProbe

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float], Path], None]
STATE = "train_state.pt"
PARTIAL = "_partial"  # suffix of an interrupted epoch's checkpoint folder


def run_finetune(cfg: FinetuneConfig, *, on_epoch: EpochCallback | None = None,
                 resume_from: Path | str | None = None, stop: Any = None) -> dict[str, Any]:
    """Train one seed (``train.seed``, or the single entry of ``cfg.seeds``); see the module
    docstring. Returns the final metrics: ``test_top1`` / ``test_top5`` (last epoch) and
    ``test_top1_best`` (best-on-val epoch) where a test part and a validation hold-out are, ``val_top1``,
    ``epochs``, ``wall_s``, ``cpu_s``, ``run_dir``, ``final`` (checkpoint folder).

    SIGTERM / SIGUSR1 (or ``stop``, any object with a ``raised`` flag) stop the run at the next
    optimizer step: a partial-epoch checkpoint is written (weights, optimizer, loader cursor,
    RNG, the epoch's running sums), ``status.json`` says ``preempted`` and the result has
    ``preempted: True`` (the CLI exits ``EXIT_PREEMPTED``); running again resumes at that step."""
    own_stop = stop is None
    stop = StopFlag() if own_stop else stop  # first, so a signal during start-up is not lost
    try:
        return _run_finetune(cfg, on_epoch=on_epoch, resume_from=resume_from, stop=stop)
    finally:
        if own_stop:
            stop.restore()


def _run_finetune(cfg: FinetuneConfig, *, on_epoch: EpochCallback | None, resume_from: Path | str | None,
                  stop: Any) -> dict[str, Any]:
    if cfg.seeds is not None:
        if len(cfg.seeds) > 1:
            raise ConfigError(f"seeds: found {cfg.seeds} in run_finetune, expected one seed (use run_seeds)")
        cfg = dataclasses.replace(cfg, seeds=None, train=dataclasses.replace(cfg.train, seed=int(cfg.seeds[0])))
    t0, c0 = time.perf_counter(), time.process_time()
    seed = cfg.train.seed
    rt = setup_runtime(cfg.train.device, cfg.train.precision, run_dir=Path(cfg.run.dir) if cfg.run.dir else None)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # the same initial weights on every rank
    store = Store.open(cfg.data.store)
    splits = make_splits(store, cfg)
    encoder, model_dict, source = build_encoder(cfg, num_joints=store.layout.num_joints, parents=store.layout.parents)
    model = build_classifier(encoder, store.num_classes, head="linear" if cfg.protocol == "linear" else "layernorm",
                             head_drop=cfg.head_drop, pool=cfg.pool, hidden=cfg.head_hidden).to(rt.device)
    torch.manual_seed(seed * 1000 + rt.world.rank)  # dropout / drop-path / mixup differ per rank
    run_dir = check_run_dir(cfg.run.dir)
    if resume_from is None:
        check_resume(run_dir, to_dict(cfg), FINETUNE_KEEP)  # before anything is written
    meta = dict(_meta(cfg, store, model_dict, source, splits, in_chans=encoder.C), precision=rt.precision,
                device_type=rt.device.type)  # evaluate's auto reuses them
    log.info("%s on %s: %s rows, %d classes, encoder %s, device %s (%s), world %d", cfg.protocol, store.url,
             splits.sizes(), store.num_classes, source or "random init", rt.device, rt.precision, rt.world.world_size)

    trainer_cls = LinearProbe if cfg.protocol == "linear" else FullTrainer
    trainer = trainer_cls(cfg, model, store, splits, rt)
    if rt.world.is_main:  # only now: a config or data error above leaves no half-made run dir behind
        start_run_dir(run_dir, cfg, facts={"precision": rt.precision, "device_type": rt.device.type})
    start, best, before = 0, {"val_top1": -math.inf, "epoch": -1}, {"wall_s": 0.0, "cpu_s": 0.0}
    partial = None
    resume = Path(resume_from) if resume_from is not None else _latest_checkpoint(run_dir)
    if resume is not None:  # ``before``: wall / CPU time of the interrupted segments, so totals add up
        start, best, before, partial = _resume(resume, model, trainer)

    def elapsed() -> dict[str, float]:
        return {"wall_s": before["wall_s"] + time.perf_counter() - t0,
                "cpu_s": before["cpu_s"] + time.process_time() - c0}

    logger = MetricsLog(run_dir, "epoch", first=start, enabled=rt.world.is_main, tensorboard=cfg.run.tensorboard)
    last_ckpt = resume
    metrics: dict[str, float] = {}
    for epoch in range(start, cfg.epochs):
        te = time.perf_counter()
        trained = trainer.train_epoch(epoch, stop=stop, partial=partial)
        if trained.get("stopped"):
            logger.close()
            return _preempted(run_dir, epoch, model, trainer, meta, best, rt, trained["partial"], elapsed(), stop,
                              last_ckpt)
        partial = None
        metrics = {"epoch": epoch, **trained, **trainer.validate()}
        metrics["epoch_s"] = time.perf_counter() - te
        # no validation hold-out (val_fraction 0): there is no best epoch, only the last
        improved = "val_top1" in metrics and (metrics["val_top1"] > best["val_top1"] or best["epoch"] < 0)
        if improved:
            best = {"val_top1": metrics.get("val_top1", math.nan), "epoch": epoch}
        if rt.world.is_main and (epoch == start or (epoch + 1) % max(1, cfg.epochs // 20) == 0):  # <= ~20 lines
            log.info("epoch %d/%d: loss %.4f, train top-1 %.1f, val top-1 %s (%.1f s)", epoch + 1, cfg.epochs,
                     metrics.get("train_loss", math.nan), metrics.get("train_top1", math.nan),
                     f"{metrics['val_top1']:.1f}" if "val_top1" in metrics else "n/a", metrics["epoch_s"])
        logger.write(metrics)  # before the checkpoint: a kill in between re-runs the epoch, and the
        # resumed log drops the rows from the resume epoch on (no row is ever missing or doubled)
        last_ckpt = _save_epoch(run_dir, epoch, model, trainer, meta, metrics, best, rt, cfg.train.keep_checkpoints,
                                elapsed())
        if improved and cfg.keep_best and rt.world.is_main:
            _copy_dir(last_ckpt, run_dir / "best", drop=(STATE,))
        if rt.world.is_main:  # the epoch is complete: its interrupted part is superseded
            shutil.rmtree(run_dir / "checkpoints" / f"epoch_{epoch:04d}{PARTIAL}", ignore_errors=True)
        if on_epoch is not None and rt.world.is_main:
            on_epoch(epoch, dict(metrics), last_ckpt)
        if epoch + 1 < cfg.epochs and all_reduce_flag(stop.raised, rt.device):
            logger.close()  # a signal during validation / saving: the epoch checkpoint just written is the resume point
            return _preempted(run_dir, epoch + 1, model, trainer, meta, best, rt, None, elapsed(), stop, last_ckpt)
    logger.close()
    result = _finish(cfg, model, trainer, store, splits, rt, run_dir, last_ckpt, best, metrics)
    result.update(**elapsed(), seed=seed)  # all segments of a resumed run (rank 0's process)
    if rt.world.is_main:
        (run_dir / "results.json").write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
        write_json(run_dir / "status.json", {"state": "finished", "epoch": cfg.epochs})
        append_results_md(run_dir / "results.md", results_row(
            protocol=_protocol_name(cfg), store=cfg.data.store, split=f"{cfg.data.split}/{cfg.test_part}",
            label_fraction=cfg.data.label_fraction, seeds=[seed], val_top1=[result.get("val_top1", math.nan)],
            test_top1=[result.get("test_top1", math.nan)], test_top1_best=[result.get("test_top1_best", math.nan)],
            epochs=cfg.epochs, wall_s=result["wall_s"], hardware=hardware_summary()))
    return result


def run_seeds(cfg: FinetuneConfig) -> dict[str, Any]:
    """One run per seed of ``cfg.seeds`` (in ``<run>/seed<S>``) and their mean ± std."""
    seeds = cfg.seeds or [cfg.train.seed]
    if len(seeds) == 1:
        return run_finetune(dataclasses.replace(cfg, seeds=None, train=dataclasses.replace(cfg.train, seed=seeds[0])))
    t0 = time.perf_counter()
    runs = []
    for s in seeds:
        sub = dataclasses.replace(cfg, seeds=None, train=dataclasses.replace(cfg.train, seed=int(s)),
                                  run=dataclasses.replace(cfg.run, dir=str(Path(cfg.run.dir) / f"seed{s}")))
        runs.append(run_finetune(sub))
        if runs[-1].get("preempted"):  # the next invocation resumes this seed, then runs the rest
            return dict(runs[-1], seeds=list(seeds))
    out: dict[str, Any] = {"seeds": list(seeds), "runs": runs, "wall_s": time.perf_counter() - t0,
                           "cpu_s": sum(r["cpu_s"] for r in runs)}
    for key in ("val_top1", "test_top1", "test_top5", "test_top1_best"):
        vals = [r[key] for r in runs if key in r]
        if vals:
            out[f"{key}_mean"], out[f"{key}_std"] = mean_std(vals)
    if not dist.is_initialized() or dist.get_rank() == 0:
        run_dir = Path(cfg.run.dir)
        (run_dir / "results.json").write_text(json.dumps(out, indent=2, sort_keys=True, default=str) + "\n")
        append_results_md(run_dir / "results.md", results_row(
            protocol=_protocol_name(cfg), store=cfg.data.store, split=f"{cfg.data.split}/{cfg.test_part}",
            label_fraction=cfg.data.label_fraction, seeds=seeds, val_top1=[r.get("val_top1", math.nan) for r in runs],
            test_top1=[r.get("test_top1", math.nan) for r in runs],
            test_top1_best=[r.get("test_top1_best", math.nan) for r in runs], epochs=cfg.epochs,
            wall_s=out["wall_s"], hardware=hardware_summary()))
    return out


# --------------------------------------------------------------------------- pieces


def _protocol_name(cfg: FinetuneConfig) -> str:
    return cfg.protocol if cfg.data.label_fraction >= 1 else f"{cfg.protocol} ({cfg.data.label_fraction:g} labels)"


def _meta(cfg: FinetuneConfig, store: Store, model_dict: dict, source: str | None, splits: Splits, *,
          in_chans: int) -> dict[str, Any]:
    """What evaluate / predict need, stored beside every classifier checkpoint (the input
    ``stream`` too: evaluate / predict apply it without being told)."""
    from mtscale import __version__

    return {
        "model": model_dict, "clip_frames": cfg.data.clip_frames, "num_bodies": cfg.data.num_bodies,
        "num_joints": store.layout.num_joints, "in_chans": int(in_chans), "stream": cfg.data.stream,
        "layout": store.layout.name,
        "num_classes": store.num_classes, "class_names": store.class_names,
        "head": "linear" if cfg.protocol == "linear" else "layernorm", "pool": cfg.pool,
        "head_hidden": cfg.head_hidden,
        "preprocessing": store.attrs.get("preprocessing"), "source_format": store.attrs.get("format"),
        "data": to_dict(cfg.data), "protocol": cfg.protocol, "pretrained": source, "seed": cfg.train.seed,
        "splits": splits.sizes(), "mtscale_version": __version__,
    }


def _latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete epoch checkpoint, or an interrupted epoch's (``epoch_XXXX_partial``,
    newer than every complete one: it sorts after ``epoch_{XXXX-1}``)."""
    root = run_dir / "checkpoints"
    ckpts = sorted([*root.glob("epoch_*[0-9]"), *root.glob(f"epoch_*{PARTIAL}")])
    ckpts = [c for c in ckpts if (c / STATE).is_file() and (c / WEIGHTS).is_file()]
    return ckpts[-1] if ckpts else None


def _resume(path: Path, model: torch.nn.Module, trainer: Any) -> tuple[int, dict, dict, dict | None]:
    """(first epoch to run, best, elapsed before, the interrupted epoch's state or None)."""
    if not (path / STATE).is_file() or not (path / WEIGHTS).is_file():
        raise ConfigError(f"resume_from: {path} has no {STATE} + {WEIGHTS}, expected an epoch checkpoint folder "
                          "written by run_finetune")
    state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    weights = load_file(str(path / WEIGHTS))
    check_keys(unwrap(model), weights, str(path / WEIGHTS))
    unwrap(model).load_state_dict(weights, strict=True)
    trainer.load_state_dict(state["trainer"])
    before = {k: float(v) for k, v in state.get("elapsed", {"wall_s": 0.0, "cpu_s": 0.0}).items()}
    if state.get("partial") is not None:  # in the middle of epoch state["epoch"]
        restore_rng(state["rng"])
        log.info("resumed from %s (epoch %d, after micro-batch %d)", path, state["epoch"], state["partial"]["micro"])
        return int(state["epoch"]), dict(state["best"]), before, dict(state["partial"])
    restore_rng(state.get("rng"))
    log.info("resumed from %s (epoch %d done)", path, state["epoch"])
    return int(state["epoch"]) + 1, dict(state["best"]), before, None


def _preempted(run_dir: Path, epoch: int, model: torch.nn.Module, trainer: Any, meta: dict, best: dict,
               rt: Runtime, partial: dict | None, elapsed: dict[str, float], stop: Any,
               last_ckpt: Path | None) -> dict[str, Any]:
    """After a signal: write the interrupted epoch's checkpoint (``partial``; None when the signal
    came between epochs and the last epoch checkpoint is the resume point) and ``status.json``."""
    out = last_ckpt
    if partial is not None:
        out = run_dir / "checkpoints" / f"epoch_{epoch:04d}{PARTIAL}"
        if rt.world.is_main:
            with trainer.export_context():
                save_classifier(model, dict(meta, epoch=epoch, partial=True), out)
            state = {"epoch": epoch, "best": best, "trainer": trainer.state_dict(), "elapsed": elapsed,
                     "partial": partial, "rng": capture_rng()}
            with atomic_path(out / STATE) as tmp:
                torch.save(state, tmp)
    status = {"state": "preempted", "epoch": epoch, "signal": getattr(stop, "signum", None),
              "micro_batch": partial["micro"] if partial else 0, "checkpoint": str(out) if out else None}
    if rt.world.is_main:
        write_json(run_dir / "status.json", status)
    if rt.distributed:
        dist.barrier()
    log.warning("preempted: checkpointed in epoch %d (%s); run the same command again to resume", epoch,
                f"after micro-batch {partial['micro']}" if partial else "at its start")
    return {"preempted": True, "run_dir": str(run_dir), "epoch": epoch, **elapsed}


def _save_epoch(run_dir: Path, epoch: int, model: torch.nn.Module, trainer: Any, meta: dict, metrics: dict,
                best: dict, rt: Runtime, keep: int, elapsed: dict[str, float]) -> Path:
    """Rank 0 writes ``<run>/checkpoints/epoch_XXXX``; every rank waits for it."""
    out = run_dir / "checkpoints" / f"epoch_{epoch:04d}"
    trainer.prepare_export()  # on every rank: all of them evaluate the exported classifier
    if rt.world.is_main:
        with trainer.export_context():  # the EMA weights when cfg.ema is on
            save_classifier(model, dict(meta, epoch=epoch, metrics=metrics), out)
        state = {"epoch": epoch, "best": best, "trainer": trainer.state_dict(), "elapsed": elapsed,
                 "rng": capture_rng()}
        with atomic_path(out / STATE) as tmp:
            torch.save(state, tmp)
        prune_dirs(run_dir / "checkpoints", "epoch_*[0-9]", keep)
    if rt.distributed:
        dist.barrier()
    return out


def _copy_dir(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(*drop))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def _finish(cfg: FinetuneConfig, model: torch.nn.Module, trainer: Any, store: Store, splits: Splits, rt: Runtime,
            run_dir: Path, last_ckpt: Path | None, best: dict, last: dict) -> dict[str, Any]:
    """Publish ``final`` (and ``best``), score the validation rows and the test part with both
    (``eval_clips`` clips), write confusion matrices and the per-sample scores
    (``scores_val.parquet``, ``scores_test.parquet``: what ``mtscale ensemble`` reads)."""
    if last_ckpt is None:
        raise ConfigError(f"epochs: nothing was trained and {run_dir} has no checkpoint to finish from")
    if rt.world.is_main:
        _copy_dir(last_ckpt, run_dir / "final", drop=(STATE,))
    if rt.distributed:
        dist.barrier()
    result: dict[str, Any] = {"run_dir": str(run_dir), "final": str(run_dir / "final"), "epochs": cfg.epochs,
                              "protocol": cfg.protocol, "best_epoch": best["epoch"] if best["epoch"] >= 0 else None,
                              **splits.sizes()}
    for k in ("val_top1", "val_loss", "train_loss"):
        if k in last:
            result[k] = last[k]
    parts = [(role, rows) for role, rows in (("val", splits.val), ("test", splits.test))
             if rows is not None and rows.size]
    if not parts:
        return result
    bs = cfg.eval_batch_size or 2 * trainer.micro_batch_size
    variants = [("", None)]
    if cfg.keep_best and (run_dir / "best").is_dir() and best["epoch"] != last.get("epoch", best["epoch"]):
        variants.append(("_best", run_dir / "best" / WEIGHTS))
    for suffix, weights in variants:
        # the published classifier's weights: final/ is the last epoch's file (the EMA with cfg.ema)
        weights = weights or (run_dir / "final" / WEIGHTS)
        unwrap(model).load_state_dict({k: v.to(rt.device) for k, v in load_file(str(weights)).items()}, strict=True)
        folder = run_dir / ("best" if suffix else "final")
        for role, rows in parts:
            rows = np.sort(rows)
            labels = np.asarray(store.labels)[rows]
            probs = score_rows(classifier_forward(unwrap(model), probs=True), store, cfg.data, rows, rt,
                               batch_size=bs, clips=cfg.eval_clips, seed=cfg.train.seed, progress=cfg.run.progress,
                               desc=role)
            if rt.world.is_main:
                _write_scores(cfg, store, run_dir, folder, role, rows, labels, probs)
            if role != "test":
                continue
            m = classification_metrics(probs, labels, prefix="test_")
            result.update({k + suffix: v for k, v in m.items()})
            if rt.world.is_main:
                cm = confusion_matrix(labels, probs.argmax(1), probs.shape[1])
                save_confusion(cm, store.class_names, folder / "test_confusion.csv", folder / "test_confusion.png",
                               title=f"{cfg.protocol}: test top-1 {m['test_top1']:.2f}%")
    if splits.test is None:
        return result
    if splits.val is None or not splits.val.size:  # no hold-out: there is no best epoch to report
        log.info("test top-1 %.2f%% (last epoch; no validation hold-out, so no best-val epoch)", result["test_top1"])
        return result
    if "test_top1_best" not in result and "test_top1" in result:
        result["test_top1_best"] = result["test_top1"]  # the last epoch was the best on val
    log.info("test top-1 %.2f%% (last epoch), %.2f%% (best val epoch %d)", result["test_top1"],
             result["test_top1_best"], best["epoch"])
    return result


def _write_scores(cfg: FinetuneConfig, store: Store, run_dir: Path, folder: Path, role: str, rows: np.ndarray,
                  labels: np.ndarray, probs: np.ndarray) -> None:
    """``<folder>/scores_<role>.parquet`` (see ``mtscale.train.scores``); the metadata says how the
    validation rows were chosen, so an ensemble can tell runs that validated on other samples."""
    d = cfg.data
    write_scores(scores_file(folder, role), sample_ids=sample_ids(store, rows), rows=rows, labels=labels,
                 scores_NK=probs, run=str(run_dir), stream=d.stream, part=role, checkpoint=str(folder),
                 class_names=store.class_names, store=d.store, split=d.split,
                 split_part=cfg.test_part if role == "test" else (cfg.val_part or d.part), clips=cfg.eval_clips,
                 label_fraction=d.label_fraction, seed=cfg.train.seed, protocol=cfg.protocol,
                 validation={"val_part": cfg.val_part, "val_where": cfg.val_where, "val_fraction": cfg.val_fraction,
                             "val_group": cfg.val_group, "subset_seed": d.subset_seed, "where": d.where})
