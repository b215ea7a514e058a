"""Run directories: what may become one, and what a resume may change.

A run directory holds one run's resolved ``config.yaml`` and its outputs (metrics, checkpoints,
exported weights). Two rules keep a run's folder truthful, checked before anything is written:

* ``run.dir`` must name a new folder, an empty one, or an mtscale run (one holding ``RUN_MARK``,
  the first file a run writes, or, for runs made before it existed, ``config.yaml`` beside one
  of ``RUN_MARKERS``): an empty
  ``--set run.dir=`` used to write the run into the current directory, overwriting a
  ``config.yaml`` and ``metrics.jsonl`` that were there.
* a run that resumes keeps the fields that decide what its checkpoints contain (the model,
  the objective, the clip geometry, the input stream, the protocol): resuming with another
  ``model.size`` used to rewrite ``config.yaml`` first and then die on a shape mismatch,
  leaving a folder that described the wrong model.

Exit codes of the training entry points (``mtscale pretrain`` / ``finetune``): 0 finished,
2 a user-facing error (one line), ``EXIT_PREEMPTED`` stopped by SIGTERM / SIGUSR1 after a
checkpoint (run the same command again to resume), 1 an internal error.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
from pathlib import Path
from typing import Any

import yaml

from mtscale.config import get_dotted
from mtscale.errors import ConfigError
from mtscale.files import atomic_write

EXIT_PREEMPTED = 75
"""A run stopped by a signal after checkpointing (EX_TEMPFAIL: try again; SLURM templates requeue)."""

RUN_MARK = ".mtscale-run"
"""Written into a run directory before anything else (``start_run_dir``): a run killed before
its first checkpoint (only ``config.yaml`` there) is still recognised and resumed, not refused."""

RUN_MARKERS = ("metrics.jsonl", "checkpoints", "status.json", "results.json", "ds_config.json")

PRETRAIN_KEEP = ("model", "objective", "data.clip_frames", "data.num_bodies", "data.stream", "train.seed",
                 "train.batch_size", "train.zero_stage")
"""Pre-training fields a resume must keep: they decide the checkpoint's tensors, the loader
order it restores, or how DeepSpeed partitioned them (``model.compile``, ``attn_backend`` and
``checkpoint_activations`` may change: they do not change any tensor)."""

FINETUNE_KEEP = ("protocol", "pretrained", "model", "data.clip_frames", "data.num_bodies", "data.stream",
                 "data.split", "pool", "head_hidden", "probe_views", "train.seed", "train.batch_size", "epochs")
"""Fine-tuning fields a resume must keep (the classifier's shape, its data, its schedule)."""

RUNTIME_MODEL_FIELDS = ("compile", "attn_backend", "checkpoint_activations", "drop_path")


def check_run_dir(path: str | Path, field: str = "run.dir") -> Path:
    """``path`` as a Path, or a ConfigError when it is empty or an existing folder that holds
    files but is not an mtscale run."""
    raw = str(path).strip()
    if not raw or raw in (".", "./"):
        raise ConfigError(f"{field}: found {str(path)!r}, expected a folder for this run's outputs "
                          "(e.g. --set run.dir=runs/my_run); the current directory is never used")
    p = Path(raw)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{field}: found {raw!r}, which is a file; expected a folder")
    if p.is_dir() and any(p.iterdir()) and not is_run_dir(p):
        sample = sorted(x.name for x in p.iterdir())[:3]
        raise ConfigError(f"{field}: found {raw!r}, an existing folder that is not an mtscale run (holds "
                          f"{', '.join(sample)}...); expected a new or empty folder, or a run to resume")
    return p


def is_run_dir(p: Path) -> bool:
    return (p / RUN_MARK).is_file() or ((p / "config.yaml").is_file() and any((p / m).exists() for m in RUN_MARKERS))


def start_run_dir(run_dir: Path, cfg: Any, facts: dict[str, Any] | None = None) -> None:
    """Make ``run_dir`` a run: the mark first, then the resolved ``config.yaml`` (atomically),
    so a kill at any moment leaves a folder that the same command resumes. ``facts``: what was
    decided at the start and must hold for the whole run (the precision ``auto`` chose), kept in
    the mark; a resume reads them back (``run_facts``) instead of deciding again."""
    from mtscale.config import save_config

    run_dir.mkdir(parents=True, exist_ok=True)
    old = run_facts(run_dir)
    atomic_write(run_dir / RUN_MARK, json.dumps({"about": "an mtscale run directory: run the same command again to "
                                                 "resume it", **(facts or {}), **old}, indent=2, sort_keys=True) + "\n")
    save_config(cfg, run_dir / "config.yaml")


def run_facts(run_dir: Path) -> dict[str, Any]:
    """The facts ``start_run_dir`` recorded for ``run_dir`` ({} for a new run, or one from before
    facts were recorded)."""
    try:
        facts = json.loads((Path(run_dir) / RUN_MARK).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in facts.items() if k != "about"} if isinstance(facts, dict) else {}


def check_resume(run_dir: Path, new: dict[str, Any], keep: tuple[str, ...]) -> None:
    """Refuse (before anything is written) a resume of ``run_dir`` whose resolved config ``new``
    differs from the saved one in a field of ``keep``; names the first differing field."""
    saved_file = run_dir / "config.yaml"
    if not is_run_dir(run_dir) or not saved_file.is_file():  # killed before its config: nothing to keep
        return
    saved = yaml.safe_load(saved_file.read_text()) or {}
    for dotted in keep:
        a, b = get_dotted(saved, dotted), get_dotted(new, dotted)
        if isinstance(a, dict) or isinstance(b, dict):  # a section: compare field by field
            drop = RUNTIME_MODEL_FIELDS if dotted == "model" else ()
            a = {k: v for k, v in (a or {}).items() if k not in drop}
            b = {k: v for k, v in (b or {}).items() if k not in drop}
            # fields the saved config lacks are newer than the run (a newer mtscale): not a change
            diff = sorted(k for k in a if a.get(k) != b.get(k))
            if not diff:
                continue
            dotted, a, b = f"{dotted}.{diff[0]}", a.get(diff[0]), b.get(diff[0])
        if a != b and a is not None:
            raise ConfigError(f"{dotted}: found {b!r}, but the run in {run_dir} was started with {a!r}; expected "
                              "the same to resume it (or a new run.dir)")


def write_json(path: Path, obj: Any) -> None:
    """A run-dir JSON file (``status.json``, ``ds_config.json``), written beside and renamed."""
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class StopFlag:
    """SIGTERM / SIGUSR1 set a flag; the run checkpoints at its next stop check on every rank
    (the flag is all-reduced), records ``preempted`` in ``status.json`` and exits
    ``EXIT_PREEMPTED``. Made first thing in a run, so a signal during start-up is not lost."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)):
        self.signum: int | None = None
        self._old = {}
        for s in signals:
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[s] = signal.signal(s, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.signum = signum

    @property
    def raised(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class MetricsLog:
    """Rank 0's ``metrics.jsonl`` (+ TensorBoard in ``tb/``), one row per log point, indexed by
    ``key`` (``step`` in pre-training, ``epoch`` in fine-tuning).

    ``first``: the first index this process will write. Rows already in the file from that
    index on were written after the checkpoint being resumed, so they are dropped (and the
    TensorBoard events purged from there): after a kill at any moment and a resume, the file is
    the curve of one continuous run, no row missing or doubled. ``first=0``: a new run."""

    def __init__(self, run_dir: Path, key: str, first: int, enabled: bool, tensorboard: bool):
        self.key, self.path, self.tb, self._f = key, run_dir / "metrics.jsonl", None, None
        if not enabled:  # not rank 0: writes nothing (``_f`` stays None)
            return
        if self.path.is_file():
            keep = [] if first == 0 else [ln for ln in self.path.read_text().splitlines()
                                          if ln.strip() and json.loads(ln).get(key, 0) < first]
            atomic_write(self.path, "".join(ln + "\n" for ln in keep))
        self._f = self.path.open("a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=first or None)

    def write(self, row: dict[str, Any]) -> None:
        if self._f is None:
            return
        self._f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != self.key and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, int(row[self.key]))

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def plot_loss(metrics_path: Path, out_png: Path) -> Path | None:
    """Loss (and LR) against step from ``metrics.jsonl``."""
    if not metrics_path.is_file():
        return None
    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in rows], [r.get("lr", float("nan")) for r in rows], color="tab:orange", alpha=0.5, label="lr")
    ax2.set_ylabel("lr")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
