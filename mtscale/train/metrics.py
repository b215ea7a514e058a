"""Classification metrics of fine-tuning and evaluation, and how they are written out.

Everything here works on plain numpy arrays of *gathered* predictions (scores (N, K) and
labels (N,)), so the same code reports one rank, many ranks or many clips:

- :func:`topk_accuracy`, :func:`per_class_accuracy`, :func:`confusion_matrix`,
  :func:`classification_metrics` (all of them in one flat dict);
- :func:`save_confusion` (CSV with class names + a PNG heat map);
- :func:`mean_std` / :func:`format_mean_std` over seeds;
- :func:`results_row` / :func:`append_results_md`: the markdown results table a run writes
  (``results.md`` in the run dir) and the README copies; :func:`ensemble_row` the one of
  ``mtscale ensemble``.
"""

from __future__ import annotations

import csv
import math
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np


def topk_accuracy(scores_NK: np.ndarray, labels_N: np.ndarray, k: int) -> float:
    """Percentage of samples whose label is among the ``k`` highest scores (k clipped to K).

    Ties are broken by class index (stable argsort), so the result is deterministic.
    """
    scores_NK = np.asarray(scores_NK)
    labels_N = np.asarray(labels_N, dtype=np.int64)
    if scores_NK.ndim != 2 or scores_NK.shape[0] != labels_N.shape[0]:
        raise ValueError(f"topk_accuracy: scores {scores_NK.shape} vs labels {labels_N.shape}, expected (N, K) and (N,)")
    n = labels_N.shape[0]
    if n == 0:
        return float("nan")
    k = max(1, min(int(k), scores_NK.shape[1]))
    top = np.argsort(-scores_NK, axis=1, kind="stable")[:, :k]  # (N, k)
    hit = (top == labels_N[:, None]).any(axis=1)
    return 100.0 * float(hit.mean())


def confusion_matrix(labels_N: np.ndarray, preds_N: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts: row = true class, column = predicted class."""
    labels_N = np.asarray(labels_N, dtype=np.int64)
    preds_N = np.asarray(preds_N, dtype=np.int64)
    if labels_N.size and (labels_N.min() < 0 or labels_N.max() >= num_classes):
        raise ValueError(f"confusion_matrix: labels outside [0, {num_classes})")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels_N, preds_N), 1)
    return cm


def per_class_accuracy(cm_KK: np.ndarray) -> np.ndarray:
    """(K,) percentage correct per true class; NaN for a class with no samples."""
    support = cm_KK.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, 100.0 * np.diag(cm_KK) / np.maximum(support, 1), np.nan)


def classification_metrics(scores_NK: np.ndarray, labels_N: np.ndarray, *, prefix: str = "",
                           with_per_class: bool = False) -> dict:
    """top1, top5, mean per-class accuracy and num_samples (keys prefixed by ``prefix``).

    With ``with_per_class`` also ``per_class`` (list, NaN -> None) and ``confusion`` (list of
    lists) for JSON output.
    """
    scores_NK = np.asarray(scores_NK, dtype=np.float64)
    labels_N = np.asarray(labels_N, dtype=np.int64)
    K = scores_NK.shape[1]
    cm = confusion_matrix(labels_N, scores_NK.argmax(axis=1), K)
    pc = per_class_accuracy(cm)
    out = {
        f"{prefix}top1": topk_accuracy(scores_NK, labels_N, 1),
        f"{prefix}top5": topk_accuracy(scores_NK, labels_N, 5),
        f"{prefix}mean_class_acc": float(np.nanmean(pc)) if np.isfinite(pc).any() else float("nan"),
        f"{prefix}num_samples": int(labels_N.size),
    }
    if with_per_class:
        out[f"{prefix}per_class"] = [None if math.isnan(v) else float(v) for v in pc]
        out[f"{prefix}confusion"] = cm.tolist()
    return out


def save_confusion(cm_KK: np.ndarray, class_names: Sequence[str] | None, csv_path: str | Path,
                   png_path: str | Path | None = None, title: str = "") -> None:
    """Write the confusion matrix as CSV (header = predicted class names, first column = true
    class) and optionally as a row-normalised PNG heat map."""
    K = cm_KK.shape[0]
    names = list(class_names) if class_names and len(class_names) == K else [str(i) for i in range(K)]
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted"] + names)
        for i in range(K):
            w.writerow([names[i]] + [int(v) for v in cm_KK[i]])
    if png_path is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm = cm_KK / np.maximum(cm_KK.sum(axis=1, keepdims=True), 1)
    side = min(4 + 0.25 * K, 30)
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    if K <= 60:
        ax.set_xticks(range(K), names, rotation=90, fontsize=max(4, 10 - K // 10))
        ax.set_yticks(range(K), names, fontsize=max(4, 10 - K // 10))
    if K <= 20:
        for i in range(K):
            for j in range(K):
                if cm_KK[i, j]:
                    ax.text(j, i, str(int(cm_KK[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    v = np.asarray([x for x in values], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def format_mean_std(values: Iterable[float], digits: int = 2) -> str:
    """``"93.10 ± 0.42"`` (or just ``"93.10"`` for one value)."""
    v = list(values)
    m, s = mean_std(v)
    return f"{m:.{digits}f}" if len(v) <= 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def hardware_summary() -> str:
    """One short line: the accelerator (CUDA device name x count) or the CPU model and cores."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    except Exception:  # pragma: no cover - torch is a dependency; defensive only
        pass
    model = cpu_model()
    import os

    return f"CPU {model} ({len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores)"


RESULTS_HEADER = ("| protocol | store | split | label fraction | seeds | val top-1 | test top-1 (last epoch) "
                  "| test top-1 (best val) | epochs | wall time | hardware |\n"
                  "|---|---|---|---:|---|---:|---:|---:|---:|---:|---|")


def results_row(*, protocol: str, store: str, split: str, label_fraction: float, seeds: Sequence[int],
                val_top1: Sequence[float], test_top1: Sequence[float], test_top1_best: Sequence[float],
                epochs: int, wall_s: float, hardware: str) -> str:
    """One markdown row of :data:`RESULTS_HEADER` (accuracies as mean ± std over seeds)."""

    def cell(v: Sequence[float]) -> str:
        v = [x for x in v if x is not None and not math.isnan(x)]
        return format_mean_std(v) if v else "–"

    return (f"| {protocol} | {Path(store).name} | {split} | {label_fraction:g} | {','.join(map(str, seeds))} "
            f"| {cell(val_top1)} | {cell(test_top1)} | {cell(test_top1_best)} | {epochs} "
            f"| {wall_s / 60:.1f} min | {hardware} |")


ENSEMBLE_HEADER = ("| ensemble of streams | weights | store | split | val top-1 | top-1 | top-5 | mean class "
                   "| samples |\n"
                   "|---|---|---|---|---:|---:|---:|---:|---:|")


def ensemble_row(*, streams: Sequence[str], weights: Sequence[float], store: str, split: str, val_top1: float,
                 top1: float, top5: float, mean_class_acc: float, num_samples: int) -> str:
    """One markdown row of :data:`ENSEMBLE_HEADER` (``mtscale ensemble``)."""
    val = "–" if val_top1 is None or math.isnan(val_top1) else f"{val_top1:.2f}"
    return (f"| {' + '.join(streams)} | {', '.join(f'{w:.2f}' for w in weights)} | {Path(store).name} | {split} "
            f"| {val} | {top1:.2f} | {top5:.2f} | {mean_class_acc:.2f} | {num_samples} |")


def append_results_md(path: str | Path, row: str, header: str = RESULTS_HEADER) -> None:
    """Append ``row`` to the markdown table at ``path`` (writing ``header`` first if new)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    new = not p.exists() or not p.read_text().strip()
    with p.open("a") as f:
        if new:
            f.write(header + "\n")
        f.write(row + "\n")
