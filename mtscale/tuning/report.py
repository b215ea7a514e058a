"""Sweep outputs, written in the experiment dir after ``fit``:

- ``trials.parquet``: one row per trial (id, status, error, epochs run, time, the metric,
  every sampled ``config/<key>`` and the last value of every reported ``metrics/<name>``);
- ``epochs.parquet``: one row per (trial, epoch) report;
- ``best_config.yaml``: the best trial's fine-tuning config, ready for ``mtscale finetune``;
- ``best_trial.json``: its id, metric, epochs run, checkpoint source;
- ``best_checkpoint/``: its last checkpoint (weights) copied out of the trial dir;
- ``plots/metric_per_epoch.png`` and ``plots/metric_vs_<key>.png``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from mtscale.config import FinetuneConfig, from_dict, to_dict
from mtscale.tuning.driver import Sweep, is_url
from mtscale.tuning.space import Dim
from mtscale.tuning.trainable import _RAY_RESERVED, trial_finetune_dict

log = logging.getLogger(__name__)


def _status(result: Any, max_t: int) -> str:
    if result.error is not None:
        return "ERROR"
    if not result.metrics:
        return "NOT_STARTED"
    return "TERMINATED" if int(result.metrics.get("training_iteration", 0)) >= max_t else "STOPPED_EARLY"


def _column(values: list[Any]) -> list[Any]:
    """Parquet needs one type per column: mixed choices (1, 'a', None) become strings."""
    kinds = {type(v) for v in values if v is not None}
    if kinds <= {int, float} or len(kinds) <= 1 and not kinds & {list, dict, tuple}:
        return values
    return [None if v is None else json.dumps(v) if isinstance(v, (list, dict, tuple)) else str(v) for v in values]


def trial_tables(grid: Any, sweep: Sweep) -> tuple[Any, Any]:
    """(trials DataFrame, epochs DataFrame) from a Ray ``ResultGrid``."""
    import pandas as pd

    metric = sweep.cfg.metric
    rows, epoch_rows = [], []
    keys = [d.key for d in sweep.dims]
    for result in grid:
        m = result.metrics or {}
        trial_id = m.get("trial_id") or Path(result.path).name
        df = result.metrics_dataframe
        history = df[metric].tolist() if df is not None and metric in getattr(df, "columns", []) else []
        finite = [v for v in history if v is not None and not (isinstance(v, float) and math.isnan(v))]
        row = {
            "trial_id": trial_id, "status": _status(result, sweep.max_t),
            "error": None if result.error is None else str(result.error).splitlines()[0][:500],
            "epochs": int(m.get("training_iteration", 0)), "time_total_s": float(m.get("time_total_s", 0.0)),
            metric: m.get(metric),
            f"best_{metric}": (max(finite) if sweep.cfg.mode == "max" else min(finite)) if finite else None,
            "path": str(result.path),
        }
        for k in keys:
            row[f"config/{k}"] = (result.config or {}).get(k)
        for k, v in m.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _RAY_RESERVED | {"pid"}:
                row[f"metrics/{k}"] = float(v)
        rows.append(row)
        if df is not None and len(df):
            cols = [c for c in df.columns if not c.startswith("config/")]
            for rec in df[cols].to_dict("records"):
                epoch_rows.append({"trial_id": trial_id, **{k: v for k, v in rec.items()
                                                             if isinstance(v, (int, float, str, bool)) or v is None}})
    trials = pd.DataFrame(rows)
    for c in trials.columns:
        trials[c] = _column(trials[c].tolist())
    epochs = pd.DataFrame(epoch_rows)
    for c in epochs.columns:
        epochs[c] = _column(epochs[c].tolist())
    return trials, epochs


def best_result(grid: Any, sweep: Sweep) -> Any | None:
    """The trial with the best ``metric`` at its last reported epoch (errored trials excluded)."""
    ok = [r for r in grid if r.error is None and r.metrics and sweep.cfg.metric in r.metrics]
    if not ok:
        return None
    sign = 1.0 if sweep.cfg.mode == "max" else -1.0
    # Ties: the trial that ran longer, then the smaller trial id (stable across reruns).
    return max(ok, key=lambda r: (sign * float(r.metrics[sweep.cfg.metric]),
                                  int(r.metrics.get("training_iteration", 0)),
                                  [-ord(c) for c in str(r.metrics.get("trial_id", ""))]))


def write_best_config(result: Any, sweep: Sweep, path: Path) -> dict:
    """The best trial's fine-tuning config as YAML (validated; run.dir points next to it)."""
    data = trial_finetune_dict(sweep.base, result.config or {}, path.parent / "best_finetune")
    resolved = to_dict(from_dict(FinetuneConfig, data))
    epochs_ran = int(result.metrics.get("training_iteration", 0))
    header = [
        f"# Best trial {result.metrics.get('trial_id')} of sweep {sweep.cfg.name}: "
        f"{sweep.cfg.metric}={result.metrics.get(sweep.cfg.metric)} after {epochs_ran} epoch(s).",
        "# Ready to run: mtscale finetune --config best_config.yaml [--set run.dir=...]",
    ]
    if epochs_ran < resolved["epochs"]:
        header.append(f"# NOTE: the trial was stopped after {epochs_ran} of {resolved['epochs']} epochs; "
                      "this config runs the full schedule.")
    if sweep.cfg.scheduler.kind == "pbt":
        header.append("# NOTE: PBT changed hyper-parameters during the trial; these are its last values.")
    path.write_text("\n".join(header) + "\n" + yaml.safe_dump(resolved, sort_keys=False))
    return resolved


def _plot_per_epoch(epochs: Any, sweep: Sweep, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = sweep.cfg.metric
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if len(epochs) and metric in epochs.columns:
        for trial_id, g in epochs.groupby("trial_id"):
            ax.plot(g["training_iteration"], g[metric], marker="o", ms=3, label=str(trial_id))
        if epochs["trial_id"].nunique() <= 12:
            ax.legend(fontsize=7)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{sweep.cfg.name}: {metric} per epoch")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _plot_vs_params(trials: Any, dims: list[Dim], sweep: Sweep, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, paths = sweep.cfg.metric, []
    for d in dims:
        col = f"config/{d.key}"
        if d.kind == "const" or col not in trials.columns or metric not in trials.columns:
            continue
        sub = trials[[col, metric, "status"]].dropna(subset=[metric])
        fig, ax = plt.subplots(figsize=(5.5, 4))
        xs = sub[col].tolist()
        if d.kind in ("choice", "grid"):
            labels = [str(v) for v in d.values]
            pos = [labels.index(str(v)) if str(v) in labels else -1 for v in xs]
            ax.set_xticks(range(len(labels)), labels)
            xs = pos
        elif d.is_log:
            ax.set_xscale("log")
        colours = ["tab:red" if s == "STOPPED_EARLY" else "tab:blue" for s in sub["status"]]
        ax.scatter(xs, sub[metric], c=colours)
        ax.set_xlabel(d.key)
        ax.set_ylabel(f"final {metric}")
        ax.set_title("blue: ran to the end, red: stopped early", fontsize=8)
        fig.tight_layout()
        p = out_dir / f"metric_vs_{d.key}.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


def write_outputs(grid: Any, sweep: Sweep, out_dir: Path) -> dict:
    """Write every output into ``out_dir`` (a local dir); returns a summary dict."""
    out_dir.mkdir(parents=True, exist_ok=True)
    trials, epochs = trial_tables(grid, sweep)
    trials.to_parquet(out_dir / "trials.parquet", index=False)
    epochs.to_parquet(out_dir / "epochs.parquet", index=False)
    summary: dict[str, Any] = {
        "experiment_dir": sweep.experiment_dir, "num_trials": len(trials),
        "status": trials["status"].value_counts().to_dict() if len(trials) else {},
    }
    best = best_result(grid, sweep)
    if best is None:
        log.warning("no trial reported %s: no best config written", sweep.cfg.metric)
    else:
        write_best_config(best, sweep, out_dir / "best_config.yaml")
        ckpt_dst = out_dir / "best_checkpoint"
        if ckpt_dst.exists():
            shutil.rmtree(ckpt_dst)
        source = None
        if best.checkpoint is not None:
            best.checkpoint.to_directory(str(ckpt_dst))
            source = best.checkpoint.path
        info = {"trial_id": best.metrics.get("trial_id"), "metric": sweep.cfg.metric,
                "value": best.metrics.get(sweep.cfg.metric), "epochs": int(best.metrics.get("training_iteration", 0)),
                "config": best.config, "checkpoint_source": source, "trial_path": str(best.path)}
        (out_dir / "best_trial.json").write_text(json.dumps(info, indent=2, default=str))
        summary["best"] = info
    if sweep.cfg.plots:
        plots = out_dir / "plots"
        plots.mkdir(exist_ok=True)
        _plot_per_epoch(epochs, sweep, plots / "metric_per_epoch.png")
        _plot_vs_params(trials, sweep.dims, sweep, plots)
    return summary


def write_outputs_to_experiment(grid: Any, sweep: Sweep) -> dict:
    """``write_outputs`` into the experiment dir, uploading through pyarrow when it is a URL."""
    if not is_url(sweep.experiment_dir):
        return write_outputs(grid, sweep, Path(sweep.experiment_dir))
    import pyarrow.fs as pafs

    with tempfile.TemporaryDirectory(prefix="mtscale-tune-") as tmp:
        summary = write_outputs(grid, sweep, Path(tmp))
        pafs.copy_files(tmp, sweep.experiment_dir.rstrip("/"))
    return summary
