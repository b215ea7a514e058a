"""``mtscale ensemble``: add the per-sample scores of several runs (typically one per input
stream: joint, bone, joint motion, bone motion) and report the combination like ``evaluate``.

    mtscale ensemble runs/ucla_joint runs/ucla_bone runs/ucla_jm runs/ucla_bm --split test --weights auto

What is added: softmax probabilities (the ``score_*`` columns every scores file holds), weighted,
the weights normalised to sum 1, so the combination is again a distribution over classes.

Inputs: a fine-tuning run directory (its ``final/``), a classifier folder (``<run>/best``), a
folder holding ``scores_<part>.parquet`` (``mtscale evaluate --save-scores --out DIR``, or an
earlier ensemble's output), or one scores file. The scores of ``--split`` (``test`` by default)
are combined; the validation scores are ``scores_val.parquet`` in the same folder: a fine-tuning
run writes both, scored by its final classifier on its validation hold-out (``val_fraction`` of
the training part, chosen by ``data.subset_seed`` / ``val_group``, or the rows ``val_where``
selects) and on the test part.

Weights: ``w1,w2,...`` as given, or ``auto``: chosen on the validation scores only (never on
the ``--split`` scores): every combination of {0, 0.25, 0.5, 0.75, 1} per run (not all zero),
normalised to sum 1; the highest validation top-1 wins; ties go to the lower validation
negative log-likelihood of the combined probabilities, then to the weights closest to uniform,
then to the lexicographically smallest weight vector. More than ``MAX_AUTO_RUNS`` runs (e.g. four
streams x two seeds) are weighted per stream instead: the grid runs over the distinct streams
(at most ``MAX_AUTO_RUNS``), and a stream's weight is shared equally by its runs, which is the
same rule applied to each stream's mean scores over its runs.

Runs must score the same samples with the same labels (matched on ``sample_id``); the first
mismatch is a one-line error. Outputs (``--out``): ``metrics.json``, ``confusion.csv`` /
``confusion.png``, a row in ``results.md`` and the combined ``scores_<split>.parquet`` (+
``scores_val.parquet``), so an ensemble folder is itself an input.

Axis letters: R runs, N samples, K classes, W weight vectors.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from mtscale.errors import BadInputError, ConfigError
from mtscale.train.scores import Scores, read_scores, scores_file, write_scores

log = logging.getLogger(__name__)

GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
"""Per-run weight values tried by ``--weights auto`` (before normalising to sum 1)."""
MAX_AUTO_RUNS = 6
"""``auto`` tries ``len(GRID) ** R`` combinations: at most 15,625."""


# --------------------------------------------------------------------------- inputs


def scores_path(arg: str | Path, part: str) -> Path:
    """The ``part`` scores file of an input (run dir, classifier folder, scores folder or file)."""
    from mtscale.train.classifier import META, resolve_checkpoint

    p = Path(arg)
    if p.is_file():
        if part == "val" and p.name != scores_file(p.parent, "val").name:
            return scores_file(p.parent, "val")
        return p
    if not p.is_dir():
        raise BadInputError(str(p), None, "not found", "a fine-tuning run dir, a classifier folder, or a scores file")
    if scores_file(p, part).is_file() or (p / META).is_file():
        return scores_file(p, part)
    try:
        return scores_file(resolve_checkpoint(p), part)
    except BadInputError:
        return scores_file(p, part)


def load_input(arg: str | Path, part: str) -> Scores:
    """The ``part`` scores of one input; a missing file is a one-line error saying where they come from."""
    f = scores_path(arg, part)
    if not f.is_file():
        how = ("a fine-tuning run with a validation hold-out (val_fraction > 0, val_where or val_part) writes "
               "them; or give --weights w1,w2,...") if part == "val" else \
            "a fine-tuning run writes scores_val/scores_test.parquet into final/; mtscale evaluate --save-scores " \
            "writes scores_<part>.parquet"
        raise BadInputError(str(arg), None, f"no {f.name} (looked for {f})", f"per-sample scores ({how})")
    return read_scores(f)


def align(runs: list[Scores], what: str) -> tuple[list[Scores], np.ndarray, np.ndarray]:
    """The runs ordered by sample id, checked to hold the same samples with the same labels and
    classes; returns (runs, sample ids (N,), labels (N,)). The first mismatch is a ConfigError."""
    runs = [r.sorted_by_id() for r in runs]
    ref = runs[0]
    for r in runs[1:]:
        if r.num_classes != ref.num_classes:
            raise ConfigError(f"{what}: {r.path} has {r.num_classes} classes, {ref.path} {ref.num_classes}; "
                              "expected runs over the same classes")
        a, b = set(ref.sample_ids.tolist()), set(r.sample_ids.tolist())
        if a != b or len(r.sample_ids) != len(ref.sample_ids):
            only_a, only_b = sorted(a - b), sorted(b - a)
            first = (f"sample {only_a[0]!r} is in {ref.path} but not in {r.path}" if only_a else
                     f"sample {only_b[0]!r} is in {r.path} but not in {ref.path}" if only_b else
                     f"{r.path} repeats a sample")
            raise ConfigError(f"{what}: {first} ({len(ref.sample_ids)} vs {len(r.sample_ids)} samples); expected "
                              "runs scored on the same samples (same store, split, subset_seed / val_group / val_where)")
        bad = np.flatnonzero(r.labels != ref.labels)
        if bad.size:
            i = int(bad[0])
            raise ConfigError(f"{what}: sample {ref.sample_ids[i]!r} has label {int(ref.labels[i])} in {ref.path} but "
                              f"{int(r.labels[i])} in {r.path}; expected the same labels")
    return runs, ref.sample_ids, ref.labels


def parse_weights(spec: str, num_runs: int) -> np.ndarray | None:
    """``"auto"`` -> None; ``"1,0.5"`` -> normalised (R,) weights (>= 0, not all zero)."""
    if spec.strip().lower() == "auto":
        return None
    try:
        w = np.asarray([float(x) for x in spec.split(",")], dtype=np.float64)
    except ValueError:
        raise ConfigError(f"--weights: found {spec!r}, expected auto or {num_runs} comma-separated numbers") from None
    if w.size != num_runs or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ConfigError(f"--weights: found {spec!r}, expected {num_runs} non-negative numbers (one per run, "
                          "not all zero), or auto")
    return w / w.sum()


# --------------------------------------------------------------------------- combination


def combine(scores_RNK: np.ndarray, weights_R: np.ndarray) -> np.ndarray:
    """Weighted sum of the runs' probabilities: (N, K)."""
    return np.tensordot(np.asarray(weights_R, dtype=np.float64), scores_RNK.astype(np.float64), axes=1)


def weight_grid(num_runs: int) -> np.ndarray:
    """Every combination of ``GRID`` values (not all zero), normalised to sum 1, duplicates
    dropped (first kept, in ``itertools.product`` order): (W, R)."""
    seen, out = set(), []
    for w in itertools.product(GRID, repeat=num_runs):
        s = sum(w)
        if s == 0:
            continue
        n = tuple(round(x / s, 12) for x in w)
        if n not in seen:
            seen.add(n)
            out.append(n)
    return np.asarray(out, dtype=np.float64)


def choose_weights(val_RNK: np.ndarray, labels_N: np.ndarray, streams: list[str] | None = None
                   ) -> tuple[np.ndarray, dict[str, Any]]:
    """``--weights auto`` on validation scores only (see the module docstring for the rule).
    Returns the weights (R,) and what decided: val top-1 / NLL of the choice, combinations tried.
    With more than ``MAX_AUTO_RUNS`` runs, ``streams`` (one name per run) ties the weights of
    runs of one stream; without it, or with too many streams, that many runs are an error."""
    R, N, _ = val_RNK.shape
    if R > MAX_AUTO_RUNS:
        names = list(dict.fromkeys(streams or []))
        if not names or len(names) > MAX_AUTO_RUNS:
            of = f" of {len(names)} streams" if names else " (streams not given)"
            raise ConfigError(f"--weights auto: found {R} runs{of}, expected at most {MAX_AUTO_RUNS} runs or "
                              f"streams (the grid has {len(GRID)}^R combinations); give --weights w1,w2,...")
        group_R = np.asarray([names.index(s) for s in streams])
        share_GR = (group_R[None, :] == np.arange(len(names))[:, None]).astype(np.float64)
        share_GR /= share_GR.sum(axis=1, keepdims=True)  # a stream's weight, split equally among its runs
        w_G, how = choose_weights(np.einsum("gr,rnk->gnk", share_GR, val_RNK.astype(np.float64)), labels_N)
        return w_G @ share_GR, {**how, "tied_by_stream": names}
    grid = weight_grid(R)
    uniform = np.full(R, 1.0 / R)
    p = val_RNK.astype(np.float64)
    chunk = max(1, int(2e7 // max(1, N * val_RNK.shape[2])))
    correct, nll = np.empty(len(grid), np.int64), np.empty(len(grid))
    for lo in range(0, len(grid), chunk):
        comb_WNK = np.einsum("wr,rnk->wnk", grid[lo:lo + chunk], p)
        correct[lo:lo + chunk] = (comb_WNK.argmax(axis=2) == labels_N[None]).sum(axis=1)
        true_WN = np.take_along_axis(comb_WNK, labels_N[None, :, None].repeat(comb_WNK.shape[0], 0), axis=2)[..., 0]
        nll[lo:lo + chunk] = -np.log(np.clip(true_WN, 1e-12, None)).mean(axis=1)
    dist = np.linalg.norm(grid - uniform, axis=1)
    # the fixed rule: max top-1, then min NLL, then closest to uniform, then lexicographically smallest
    best = min(range(len(grid)), key=lambda i: (-correct[i], round(float(nll[i]), 10), round(float(dist[i]), 12),
                                                tuple(grid[i])))
    return grid[best], {"val_top1": 100.0 * correct[best] / max(N, 1), "val_nll": float(nll[best]),
                        "combinations": int(len(grid))}


# --------------------------------------------------------------------------- the verb


def _validation(inputs: list[str], required: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Scores]] | None:
    """The runs' aligned validation scores (R, N, K), ids, labels and files. ``required``
    (``--weights auto``): missing or mismatched ones are errors; otherwise they are only
    reported, and left out (with a warning) when they cannot be."""
    try:
        if not required and not all(scores_path(a, "val").is_file() for a in inputs):
            return None
        runs, ids, labels = align([load_input(a, "val") for a in inputs], "validation scores")
    except (ConfigError, BadInputError) as e:
        if required:
            raise
        log.warning("validation scores left out of the report: %s", e)
        return None
    return np.stack([r.scores_NK for r in runs]), ids, labels, runs


def run_ensemble(inputs: list[str], *, split: str = "test", weights: str = "auto",
                 out_dir: str | None = None) -> dict[str, Any]:
    """Combine the ``split`` scores of ``inputs`` (see the module docstring); write the outputs
    into ``out_dir`` (default ``ensemble_<split>``) and return the metrics."""
    from mtscale.train.metrics import (
        ENSEMBLE_HEADER,
        append_results_md,
        classification_metrics,
        confusion_matrix,
        ensemble_row,
        save_confusion,
    )

    if len(inputs) < 1:
        raise ConfigError("ensemble: no runs given, expected one or more run dirs or scores files")
    fixed = parse_weights(weights, len(inputs))
    runs, ids, labels = align([load_input(a, split) for a in inputs], f"--split {split}")
    for r in runs:
        if r.part == "val" and split != "val":
            raise ConfigError(f"--split {split}: {r.path} holds validation scores, expected the {split} scores "
                              "(validation scores only choose the weights)")
    val = _validation(inputs, required=fixed is None)
    if fixed is None:
        w, how = choose_weights(val[0], val[2], [r.stream for r in val[3]])
        rule = "auto: max validation top-1, then min validation NLL, then closest to uniform" + \
            (" (one weight per stream, shared by its runs)" if "tied_by_stream" in how else "")
    else:
        w, how, rule = fixed, {}, "given"
    scores_RNK = np.stack([r.scores_NK for r in runs])
    comb = combine(scores_RNK, w)
    m = classification_metrics(comb, labels, with_per_class=True)
    K = comb.shape[1]
    names = runs[0].meta.get("class_names") or [str(k) for k in range(K)]
    streams = [r.stream for r in runs]
    per_run = [{"input": str(a), "scores": r.path, "run": r.run, "stream": r.stream,
                f"{split}_top1": classification_metrics(r.scores_NK, labels)["top1"]} for a, r in zip(inputs, runs)]
    out: dict[str, Any] = {
        "top1": m["top1"], "top5": m["top5"], "mean_class_acc": m["mean_class_acc"], "num_samples": m["num_samples"],
        "split": split, "added": "softmax probabilities", "weights": [float(x) for x in w], "weights_rule": rule,
        "streams": streams, "runs": per_run,
        "per_class": {names[k]: v for k, v in enumerate(m["per_class"]) if v is not None},
    }
    if val is not None:
        val_RNK, _, val_labels, val_runs = val
        out["val_top1"] = classification_metrics(combine(val_RNK, w), val_labels)["top1"]
        out["val_num_samples"] = int(val_labels.size)
        for row, r in zip(per_run, val_runs):
            row["val_top1"] = classification_metrics(r.scores_NK, val_labels)["top1"]
    out.update({f"auto_{k}": v for k, v in how.items()})
    folder = Path(out_dir) if out_dir else Path(f"ensemble_{split}")
    out["confusion_csv"], out["confusion_png"] = str(folder / "confusion.csv"), str(folder / "confusion.png")
    label = " + ".join(f"{x:.2f} {s}" for x, s in zip(w, streams))
    cm = confusion_matrix(labels, comb.argmax(1), K)
    save_confusion(cm, names, folder / "confusion.csv", folder / "confusion.png",
                   title=f"ensemble {split}: top-1 {m['top1']:.2f}% ({label})")
    ens_stream = "ensemble(" + ",".join(streams) + ")"
    common = {"class_names": names, "weights": out["weights"], "inputs": [str(a) for a in inputs],
              "store": runs[0].meta.get("store"), "split": runs[0].meta.get("split")}
    out["scores"] = str(write_scores(scores_file(folder, split), sample_ids=ids, rows=runs[0].rows, labels=labels,
                                     scores_NK=comb, run=str(folder), stream=ens_stream, part=split, **common))
    if val is not None and split != "val":
        write_scores(scores_file(folder, "val"), sample_ids=val[1], rows=val[3][0].rows, labels=val[2],
                     scores_NK=combine(val[0], w), run=str(folder), stream=ens_stream, part="val", **common)
    (folder / "metrics.json").write_text(json.dumps(out, indent=2) + "\n")
    append_results_md(folder / "results.md", ensemble_row(
        streams=streams, weights=out["weights"], store=str(runs[0].meta.get("store") or ""),
        split=f"{runs[0].meta.get('split')}/{split}", val_top1=out.get("val_top1", math.nan), top1=m["top1"],
        top5=m["top5"], mean_class_acc=m["mean_class_acc"], num_samples=m["num_samples"]),
        header=ENSEMBLE_HEADER)
    log.info("ensemble of %d runs on %s: top-1 %.2f%% with weights %s (%s)", len(runs), split, m["top1"],
             out["weights"], rule)
    return out

