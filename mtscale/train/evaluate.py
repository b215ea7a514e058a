"""Exact, rank-partitioned inference: every selected sample is scored exactly once whatever
the number of ranks, and the scores are gathered by store row on every rank.

Axis letters: N samples, K classes, D feature width.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mtscale.config import DataConfig
from mtscale.data.loader import model_mask
from mtscale.train.finetune_data import rows_loader
from mtscale.train.runtime import Runtime, all_gather_objects, setup_runtime

log = logging.getLogger(__name__)


def gather_by_index(index_N: np.ndarray, values_NX: np.ndarray, expected_rows: np.ndarray
                    ) -> np.ndarray:
    """Gather every rank's (row index, values) and return values ordered as ``expected_rows``.

    Raises if a row was scored twice or a row is missing: evaluation is exact or it fails."""
    parts = all_gather_objects((np.asarray(index_N, dtype=np.int64), np.asarray(values_NX)))
    idx = np.concatenate([p[0] for p in parts])
    vals = np.concatenate([p[1] for p in parts]) if idx.size else np.zeros((0,) + values_NX.shape[1:])
    uniq, counts = np.unique(idx, return_counts=True)
    if (counts > 1).any():
        raise RuntimeError(f"exact evaluation: rows {uniq[counts > 1][:5].tolist()} scored more than once")
    expected_rows = np.sort(np.asarray(expected_rows, dtype=np.int64))
    if uniq.size != expected_rows.size or not np.array_equal(uniq, expected_rows):
        missing = np.setdiff1d(expected_rows, uniq)
        raise RuntimeError(f"exact evaluation: scored {uniq.size} rows, expected {expected_rows.size} "
                           f"(missing e.g. {missing[:5].tolist()})")
    return vals[np.argsort(idx, kind="stable")]


@torch.no_grad()
def score_rows(forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], store: Any, data: DataConfig,
               rows: np.ndarray, rt: Runtime, *, batch_size: int, clips: int = 1, seed: int = 0,
               augment: bool = False, progress: bool = False, desc: str = "eval") -> np.ndarray:
    """``forward(x_NTMVC, mask_NT) -> (N, X)`` over ``rows``, exactly once each, gathered on
    every rank in sorted row order: (len(rows), X) float32.

    ``clips > 1`` averages ``forward`` over the centre crop plus ``clips - 1`` random crops
    (seeded, training crop range, no augmentation). ``forward`` should return probabilities
    (or features) when averaging clips.

    ``augment``: every clip, the first too, is a training view instead (random crop,
    ``data.sampling`` and ``data.augment``, seeded by ``seed``, the rank and the position)."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    total = None
    for k in range(clips):
        loader = rows_loader(store, data, rows, batch_size=batch_size, seed=seed + 7919 * k, rank=rt.world.rank,
                             world_size=rt.world.world_size, train=augment or k > 0, exact=True, augment=augment,
                             device=rt.device)
        idx, outs = [], []
        bar = tqdm(total=loader.num_samples, desc=desc if clips == 1 else f"{desc} clip {k + 1}/{clips}",
                   unit="sample", disable=not (progress and rt.world.is_main), leave=False)
        for batch in loader:
            with rt.autocast():
                y = forward(batch["x"], model_mask(batch), batch.get("time"))
            outs.append(y.float().cpu().numpy())
            idx.append(batch["index"].cpu().numpy())
            bar.update(len(idx[-1]))
        bar.close()
        width = outs[0].shape[1] if outs else 0
        if not outs:  # a rank with no samples (more ranks than rows) still joins the gather
            width = _agreed_width(0)
        else:
            _agreed_width(width)
        vals = np.concatenate(outs) if outs else np.zeros((0, width), np.float32)
        got = gather_by_index(np.concatenate(idx) if idx else np.zeros(0, np.int64), vals, rows)
        total = got if total is None else total + got
    return (total / clips).astype(np.float32)


def _agreed_width(width: int) -> int:
    """The output width agreed across ranks (ranks with no samples report 0)."""
    return max(all_gather_objects(int(width)))


def classifier_forward(model: torch.nn.Module, probs: bool) -> Callable[..., torch.Tensor]:
    """``(x, mask, time) -> logits`` (or softmax probabilities) of a classifier in eval mode."""
    model.eval()

    def f(x: torch.Tensor, mask: torch.Tensor | None, time: torch.Tensor | None = None) -> torch.Tensor:
        logits = model(x, mask, time).float()
        return F.softmax(logits, dim=1) if probs else logits

    return f


def evaluate_checkpoint(checkpoint: str, store_url: str, *, split: str | None, part: str | None = "test",
                        where: str | None = None, clips: int = 1, batch_size: int = 64, out_dir: str | None = None,
                        device: str = "auto", precision: str = "auto", seed: int = 0,
                        progress: bool = True, save_scores: bool = False) -> dict[str, Any]:
    """Exact evaluation of a classifier checkpoint on ``store_url`` (split / part / where), in
    the input stream recorded in its meta.json.

    Every selected sample is scored exactly once across ranks (gathered by row; a duplicate or
    missing row is an error). Returns top1, top5, mean_class_acc, num_samples, per_class
    ({class name: accuracy}), and the paths of the confusion matrix CSV / PNG written by rank 0
    into ``out_dir`` (default ``<checkpoint>/eval_<split>_<part>``); with ``save_scores`` also
    the per-sample softmax scores, ``scores_<part>.parquet`` there (``mtscale.train.scores``)."""
    import dataclasses
    from pathlib import Path

    from mtscale.config import DataConfig, from_dict
    from mtscale.data.store import Store
    from mtscale.errors import ConfigError
    from mtscale.train.classifier import load_classifier, meta_stream, resolve_checkpoint
    from mtscale.train.metrics import classification_metrics, confusion_matrix, save_confusion

    if clips < 1:
        raise ConfigError(f"--clips: found {clips}, expected >= 1")
    rt = setup_runtime(device, precision)
    ckpt_dir = resolve_checkpoint(checkpoint)
    model, meta = load_classifier(ckpt_dir, rt.device)
    if precision == "auto" and meta.get("device_type") == rt.device.type and meta.get("precision") not in (None, rt.precision):
        # the precision the run trained and scored itself in, so evaluate reproduces its own numbers
        log.info("precision auto -> %s (as the checkpoint was trained on %s)", meta["precision"], rt.device.type)
        rt = dataclasses.replace(rt, precision=str(meta["precision"]))
    store = Store.open(store_url)
    if store.layout.name != meta["layout"]:
        raise ConfigError(f"--store: {store_url} has layout {store.layout.name!r}, expected {meta['layout']!r} "
                          f"(the checkpoint {ckpt_dir} was trained on it)")
    rows = store.select(split=split, part=part if split else None, where=where)
    labels = np.asarray(store.labels)[rows]
    rows, labels = rows[labels >= 0], labels[labels >= 0]
    if rows.size == 0:
        raise ConfigError(f"--split/--part: {store_url} split={split!r} part={part!r} where={where!r} selects no "
                          "labelled samples, expected at least one")
    K = int(meta["num_classes"])
    if labels.max() >= K:
        raise ConfigError(f"--store: {store_url} has label {int(labels.max())}, expected < {K} (the checkpoint's classes)")
    data = from_dict(DataConfig, meta["data"], "data")
    data = dataclasses.replace(data, store=store_url, num_workers=min(data.num_workers, 2), stream=meta_stream(meta))
    probs = score_rows(classifier_forward(model, probs=True), store, data, rows, rt, batch_size=batch_size,
                       clips=clips, seed=seed, progress=progress, desc="evaluate")
    m = classification_metrics(probs, labels, with_per_class=True)
    names = meta.get("class_names") or [str(i) for i in range(K)]
    out = {"top1": m["top1"], "top5": m["top5"], "mean_class_acc": m["mean_class_acc"],
           "num_samples": m["num_samples"], "num_ranks": rt.world.world_size, "clips": clips,
           "checkpoint": str(ckpt_dir), "store": store_url, "split": split, "part": part, "stream": data.stream,
           "per_class": {names[k]: v for k, v in enumerate(m["per_class"]) if v is not None}}
    folder = Path(out_dir) if out_dir else ckpt_dir / f"eval_{split or 'all'}_{part or 'all'}"
    out["confusion_csv"], out["confusion_png"] = str(folder / "confusion.csv"), str(folder / "confusion.png")
    if save_scores:
        from mtscale.train.scores import sample_ids, scores_file, write_scores

        scored = part if split else "all"  # without a split every sample is scored
        out["scores"] = str(scores_file(folder, scored))
        if rt.world.is_main:
            run = ckpt_dir.parent if ckpt_dir.name in ("final", "best") else ckpt_dir
            write_scores(out["scores"], sample_ids=sample_ids(store, rows), rows=rows, labels=labels, scores_NK=probs,
                         run=str(run), stream=data.stream, part=scored, checkpoint=str(ckpt_dir),
                         class_names=names, store=store_url, split=split, split_part=part if split else None,
                         where=where, clips=clips)
    if rt.world.is_main:
        cm = confusion_matrix(labels, probs.argmax(1), K)
        save_confusion(cm, names, folder / "confusion.csv", folder / "confusion.png",
                       title=f"{Path(store_url).name} {split}/{part}: top-1 {m['top1']:.2f}%")
        import json

        (folder / "metrics.json").write_text(json.dumps(out, indent=2) + "\n")
    return out
