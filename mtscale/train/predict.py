"""Classify raw recordings with a fine-tuned checkpoint: reader -> the store's recorded
preprocessing -> the evaluation clip (centre crop, resampled to T, normalised, in the input
stream) -> model -> top-k.

The checkpoint's ``meta.json`` carries everything needed (layout, clip geometry, crops,
preprocessing options, input stream, class names), so no store is needed at prediction time.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mtscale.config import DataConfig, from_dict
from mtscale.data.clips import crop_windows, frame_times, gather_clips, normalize_clips, resample_indices
from mtscale.data.formats import RawSample, get_reader
from mtscale.data.layouts import get_layout
from mtscale.data.preprocess import PrepareOptions, preprocess
from mtscale.data.streams import apply_stream
from mtscale.errors import BadInputError, ConfigError
from mtscale.train.classifier import load_classifier, meta_stream

log = logging.getLogger(__name__)

EXTENSIONS = {".skeleton": "ntu", ".json": "nw-ucla"}


def guess_format(path: str, meta: dict[str, Any]) -> str:
    """Format from the file extension, else the format the checkpoint's store was prepared from."""
    fmt = EXTENSIONS.get(Path(path).suffix.lower()) or meta.get("source_format")
    if not fmt:
        raise ConfigError(f"--format: cannot tell the format of {path}, expected --format ntu|nw-ucla|generic|...")
    return fmt


def prepare_options(meta: dict[str, Any]) -> PrepareOptions:
    """The PrepareOptions recorded in the store the classifier was trained on."""
    rec = meta.get("preprocessing") or {}
    names = {f.name for f in dataclasses.fields(PrepareOptions)}
    return PrepareOptions(**{k: v for k, v in rec.items() if k in names})


def eval_clip(x_TMVC: np.ndarray, data: DataConfig, num_bodies: int,
              parents: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The evaluation clip the loader would cut, normalised and in ``data.stream`` as the loader
    gives it: (1, T, M, V, 3 x streams) float32, mask (1, T) and each frame's time in the
    recording (1, T). ``parents``: the layout's tree (needed by the bone streams)."""
    T, M = x_TMVC.shape[:2]
    if M < num_bodies:  # pad absent bodies with zeros, as the loader does
        pad = np.zeros((T, num_bodies - M) + x_TMVC.shape[2:], dtype=x_TMVC.dtype)
        x_TMVC = np.concatenate([x_TMVC, pad], axis=1)
    x_TMVC = np.ascontiguousarray(x_TMVC[:, :num_bodies], dtype=np.float32)
    start, crop = crop_windows(np.array([T]), train=False, crop_min=data.crop_min, crop_max=data.crop_max,
                               eval_crop=data.eval_crop)
    i0, i1, w, mask = resample_indices(crop, data.clip_frames, pad_short=data.short_clips == "pad")
    x = gather_clips(x_TMVC, start, i0, i1, w, mask)  # (1, T', M, V, C)
    mask_t = torch.from_numpy(mask)
    x = apply_stream(normalize_clips(x, mask_t, data.normalize), mask_t, parents, data.stream)
    return x, mask_t, torch.from_numpy(frame_times(start, i0, w))


def iter_samples(files: list[str], fmt: str | None, meta: dict[str, Any]) -> Iterator[tuple[str, RawSample]]:
    for f in files:
        reader = get_reader(fmt or guess_format(f, meta))
        listing = reader.list_units(f)
        if not listing.units:
            raise BadInputError(f, None, "excluded by the reader (e.g. a published missing-skeleton sample)",
                                "a readable recording")
        for unit in listing.units:
            where = getattr(unit, "npy_path", None) or f  # a folder (generic format): each sample's own file
            for sample in reader.read_unit(unit):
                if isinstance(sample, BadInputError):  # a bad record of a many-record file
                    raise sample
                yield where, sample


@torch.no_grad()
def predict_files(checkpoint: str, files: list[str], *, fmt: str | None = None, topk: int = 5,
                  device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """One row per recording: file, sample_id, label_id, class_name, probability, top-k list
    (label_id, class_name, probability), and true_label where the file name gives it."""
    model, meta = load_classifier(checkpoint, device)
    data = dataclasses.replace(from_dict(DataConfig, meta["data"], "data"), stream=meta_stream(meta))
    parents = get_layout(meta["layout"]).parents
    options = prepare_options(meta)
    names = meta.get("class_names") or [str(i) for i in range(int(meta["num_classes"]))]
    rows = []
    for f, sample in iter_samples(list(files), fmt, meta):
        if sample.layout != meta["layout"]:
            raise BadInputError(f, None, f"layout {sample.layout!r}", f"{meta['layout']!r} (the checkpoint's)")
        x_TMVC = preprocess(sample, options)
        x, mask, time = eval_clip(x_TMVC, data, int(meta["num_bodies"]), parents)
        probs = F.softmax(model(x.to(device), mask.to(device), time.to(device)).float(), dim=1)[0].cpu()
        if not bool(torch.isfinite(probs).all()):  # e.g. a checkpoint with non-finite weights
            raise BadInputError(str(checkpoint), None, f"non-finite class scores for {f}",
                                "a classifier with finite weights (mtscale verify the store; re-train)")
        p, k = probs.topk(min(topk, probs.numel()))
        top = [{"label_id": int(i), "class_name": names[int(i)], "probability": float(q)} for q, i in zip(p, k)]
        row = {"file": f, "sample_id": sample.sample_id, **top[0], "topk": top}
        if sample.label >= 0:
            row["true_label"] = int(sample.label)
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table: file, predicted class, probability, runner-up."""
    out = [f"{'file':<40} {'id':>4}  {'class':<34} {'prob':>6}  next"]
    for r in rows:
        nxt = r["topk"][1] if len(r["topk"]) > 1 else None
        nxt_s = f"{nxt['class_name']} ({nxt['probability']:.2f})" if nxt else ""
        out.append(f"{Path(r['file']).name:<40} {r['label_id']:>4}  {r['class_name'][:34]:<34} "
                   f"{r['probability']:>6.3f}  {nxt_s}")
    return "\n".join(out)
