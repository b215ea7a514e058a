"""The Ray Tune function trainable: one trial = one real fine-tuning run (``run_finetune``).

Every trial starts from the same base config (constant overrides + pre-trained weights already
applied by the driver, paths absolute), sets its sampled hyper-parameters by dotted key, and
reports the validation metrics of every epoch with that epoch's checkpoint, so ASHA can stop
it early, PBT can clone it, and a retry resumes it (``tune.get_checkpoint()`` -> ``resume_from``).
"""

from __future__ import annotations

import copy
import logging
import math
import os
from pathlib import Path
from typing import Any

from mtscale.config import set_dotted

log = logging.getLogger(__name__)

FAIL_MARKER = "fail_first_attempt.marker"
"""Written in the trial dir by the fault-injection knob ``fail_first_attempt`` before it raises."""

RUN_DIR = "finetune"
"""The trial's fine-tuning run dir, in its trial dir."""

# Ray fills these in itself; a fine-tuning metric of the same name would be overwritten.
_RAY_RESERVED = frozenset({
    "done", "training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "trial_id",
    "experiment_id", "date", "pid", "hostname", "node_ip", "config", "should_checkpoint",
    "time_since_restore", "iterations_since_restore", "checkpoint_dir_name",
})

# Launcher variables a driver started under srun / torchrun would pass down to trial workers:
# a trial is one process and must not think it is rank i of the driver's job.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK",
                  "CROSS_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "MASTER_ADDR",
                  "MASTER_PORT", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_STEP_NUM_TASKS")


class InjectedFailure(RuntimeError):
    """Raised by the ``fail_first_attempt`` fault-injection knob (tests of the retry path)."""


def trial_finetune_dict(base: dict, trial_config: dict[str, Any], run_dir: str | Path) -> dict:
    """The fine-tuning config (plain dict) of one trial: base + sampled keys + its run dir."""
    data = copy.deepcopy(base)
    for key, value in trial_config.items():
        set_dotted(data, key, value, where="space")
    data.setdefault("run", {})["dir"] = str(run_dir)
    return data


def restore_run_dir(checkpoint: Any, trial_dir: Path) -> Path | None:
    """Copy the trial's fine-tuning run dir back from its folder in the experiment before it
    resumes there; returns the run dir, or None when there was nothing to copy.

    The trial dir a trial writes in is Ray's staging folder of the driver's Ray session, synced
    to ``<experiment>/<trial>`` (the storage path). A resumed sweep is a new session with a new,
    empty staging folder: the trial would resume its weights from the checkpoint but start a new
    run dir, whose ``metrics.jsonl`` (from the resume epoch on) then overwrites the whole one in
    the experiment. The trial's earlier files are in the storage copy, next to its checkpoint.
    ``checkpoints/`` stays behind (the resume point is the checkpoint Ray hands over); a retry
    within the session (the run dir is still there) and a PBT exploit (another trial's
    checkpoint) copy nothing."""
    import shutil
    from pathlib import PurePosixPath

    import pyarrow.fs as pafs

    run_dir = trial_dir / RUN_DIR
    src_trial = PurePosixPath(checkpoint.path).parent
    if run_dir.exists() or src_trial.name != trial_dir.name:
        return None
    fs, src = checkpoint.filesystem, f"{src_trial}/{RUN_DIR}"
    if fs.get_file_info(src).type != pafs.FileType.Directory:
        return None
    tmp = trial_dir / f"{RUN_DIR}.restoring"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for info in fs.get_file_info(pafs.FileSelector(src, recursive=True)):
        rel = PurePosixPath(info.path).relative_to(src)
        if info.type != pafs.FileType.File or rel.parts[0] == "checkpoints":
            continue
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path) as f_in, open(tmp / rel, "wb") as f_out:
            shutil.copyfileobj(f_in, f_out)
    tmp.rename(run_dir)
    return run_dir


def limit_threads(cpus: float) -> int:
    """Limit torch (and OpenMP / MKL in child processes) to the trial's CPU allocation."""
    n = max(1, int(math.floor(cpus)))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)
    return n


def _scalar_metrics(epoch: int, metrics: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if k in _RAY_RESERVED:
            continue
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue  # non-scalar entries (lists, strings) stay in the run's own metrics.jsonl
    out["epoch"] = float(epoch)
    return out


def finetune_trainable(config: dict[str, Any], *, base: dict, cpus_per_trial: float = 1.0,
                       fail_first_attempt: bool = False) -> None:
    """Ray Tune function trainable (wrapped with ``tune.with_parameters`` by the driver).

    ``config``: the trial's sampled hyper-parameters, keyed by dotted fine-tuning keys.
    ``base``: the resolved base fine-tuning config (plain dict, absolute paths).
    """
    from ray import tune

    from mtscale.config import FinetuneConfig, from_dict
    from mtscale.malloc import tune_malloc
    from mtscale.train.finetune import run_finetune

    for var in _LAUNCHER_VARS:
        os.environ.pop(var, None)
    limit_threads(cpus_per_trial)
    tune_malloc()  # the trial's worker process is Ray's, running only our trainable
    ctx = tune.get_context()
    trial_dir = Path(ctx.get_trial_dir())
    trial_dir.mkdir(parents=True, exist_ok=True)
    data = trial_finetune_dict(base, config, trial_dir / RUN_DIR)
    cfg = from_dict(FinetuneConfig, data)

    resume_from: Path | None = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # a retry, a resumed sweep, or a PBT exploit: continue from it
        restore_dir = trial_dir / "restored_checkpoint"
        if restore_dir.exists():
            import shutil

            shutil.rmtree(restore_dir)
        resume_from = Path(checkpoint.to_directory(str(restore_dir)))
        log.info("trial %s resumes from %s", ctx.get_trial_id(), checkpoint.path)
        if restore_run_dir(checkpoint, trial_dir) is not None:
            log.info("trial %s: run dir %s copied back from the experiment", ctx.get_trial_id(), trial_dir / RUN_DIR)

    marker = trial_dir / FAIL_MARKER

    def on_epoch(epoch: int, metrics: dict[str, float], checkpoint_dir: Path) -> None:
        tune.report(_scalar_metrics(epoch, metrics),
                    checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))
        if fail_first_attempt and not marker.exists():
            marker.write_text(f"trial {ctx.get_trial_id()} failed on purpose after epoch {epoch}\n")
            raise InjectedFailure(f"fail_first_attempt: trial {ctx.get_trial_id()} raises after epoch {epoch} (test knob)")

    run_finetune(cfg, on_epoch=on_epoch, resume_from=resume_from)
