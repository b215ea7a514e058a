"""``mtscale tune --resume`` reproduces the uninterrupted sweep (issue 28).

The same small sweep runs once straight through, and once interrupted with SIGTERM while a
trial is between its first checkpoint and its last epoch, then resumed with ``--resume``. Every
trial's per-epoch metrics must equal the uninterrupted sweep's, no epoch report missing or
doubled. Real local Ray, the real fine-tuning loop, a tiny store.

SIGINT / SIGUSR1 are what Ray Tune 2.x catches (it ends the loop and saves the experiment state
one last time); SIGTERM, what a scheduler sends, ``ray.init`` would turn into a ``sys.exit``
without that save, so ``mtscale tune`` forwards SIGTERM and SIGINT to Tune as SIGUSR1 and then
exits 75 (preempted). This test sends SIGTERM."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support import mtscale_cmd
from test_tune import _env, _mtscale, _tables, _tune_yaml, make_assets

from mtscale.train.rundir import EXIT_PREEMPTED

pytestmark = pytest.mark.slow

EPOCHS = 8
LRS = [3e-3, 1e-3]
# Per-epoch metrics of run_finetune compared across the two sweeps (not timings, not Ray's bookkeeping).
EXACT = ("epoch", "step", "training_iteration", "val_num_samples")
CLOSE = ("train_loss", "train_top1", "lr", "val_loss", "val_top1", "val_top5", "val_mean_class_acc")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """``test_tune.make_assets`` with random crops and augmentation on: a resumed trial must
    restore the RNGs to match."""
    return make_assets(tmp_path_factory.mktemp("tune_resume"), epochs=EPOCHS, warmup_epochs=1, label_smoothing=0.1,
                       crop_min=0.8, batch_size=4, weight_decay=0.05)


def _sweep_yaml(assets: dict[str, Path], name: str) -> Path:
    # FIFO: no trial is stopped early. A grid of 2 learning rates, 1 sample: the same 2 configs in
    # both sweeps, trained at once. reuse_actors off: each trial (and each resumed one) is a new process.
    return _tune_yaml(assets, name, num_samples=1, max_concurrent_trials=2, reuse_actors=False,
                      scheduler={"kind": "fifo"}, space={"train.lr": {"grid": LRS}},
                      overrides={"data.store": str(assets["store"])})


def _state(exp: Path) -> dict[str, tuple[str, int, int]]:
    """Trial id -> (status, training_iteration of its last result, of its latest checkpoint; 0:
    none) in the experiment state that ``--resume`` restores."""
    from ray.tune.utils.serialization import TuneFunctionDecoder

    (path,) = glob.glob(str(exp / "experiment_state-*.json"))
    out = {}
    for trial_json, meta_json in json.loads(Path(path).read_text())["trial_data"]:
        trial = json.loads(trial_json)
        # our own file, just written: the pickled checkpoint manager in it may be loaded
        meta = json.loads(meta_json, cls=TuneFunctionDecoder, allow_cloudpickle=True)
        last = meta.get("last_result") or {}
        ckpt = meta["checkpoint_manager"].latest_checkpoint_result
        out[trial["trial_id"]] = (trial["status"], int(last.get("training_iteration") or 0),
                                  int(ckpt.metrics["training_iteration"]) if ckpt is not None else 0)
    return out


def _interrupt(cfg: Path, exp: Path, log_path: Path) -> None:
    """Start the sweep, SIGTERM its driver (what SLURM sends at preemption or the time limit) once
    a trial is past its first checkpoint, wait for it: the driver hands the signal to Tune
    (``mtscale.tune._forward_stop_signals``), which saves the state, and exits 75.

    A function trainable starts its next epoch only once the driver has taken its last report
    and registered that report's checkpoint (Tune's synchronous reporting), so a trial folder
    holding ``checkpoint_000001`` (written by the trial) means that trial's epoch-0 checkpoint
    is in the driver's state. Tune's handler ends the loop after the event it is handling, so
    no trial gets more than an epoch further; 6 epochs are left."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(mtscale_cmd("tune", "--config", str(cfg)), env=_env(),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not glob.glob(str(exp / "*" / "checkpoint_000001")):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the sweep {'ended' if proc.poll() is not None else 'stalled'} before a trial reported "
                            f"its second epoch; nothing was interrupted:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        time.sleep(2)
        with contextlib.suppress(ProcessLookupError):  # Ray's processes of that driver: the group we created
            os.killpg(proc.pid, signal.SIGKILL)
    out = log_path.read_text()
    assert rc == EXIT_PREEMPTED, f"exit {rc}:\n{out[-3000:]}"
    assert "Experiment has been interrupted, but the most recent state was saved" in out, out[-3000:]
    assert "run the same command with --resume" in out, out[-3000:]


def _per_trial(trials, epochs) -> dict[float, object]:
    """train.lr -> that trial's epoch rows, in report order."""
    lr_of = dict(zip(trials["trial_id"], trials["config/train.lr"]))
    return {lr_of[tid]: g.reset_index(drop=True) for tid, g in epochs.groupby("trial_id", sort=False)}


def test_interrupted_and_resumed_sweep_reproduces_the_uninterrupted_one(assets):
    results = assets["root"] / "results"
    _mtscale("tune", "--config", str(_sweep_yaml(assets, "straight")))
    ref_trials, ref_epochs = _tables(results / "straight")
    ref = _per_trial(ref_trials, ref_epochs)
    assert sorted(ref) == sorted(LRS) and (ref_trials["status"] == "TERMINATED").all()
    for g in ref.values():
        assert g["training_iteration"].tolist() == list(range(1, EPOCHS + 1)) and g["pid"].nunique() == 1

    cfg, exp = _sweep_yaml(assets, "interrupted"), results / "interrupted"
    _interrupt(cfg, exp, assets["root"] / "interrupted.log")
    state = _state(exp)
    # The interruption came before the end: some trial is unfinished, with a checkpoint (see
    # _interrupt) that the resume continues it from.
    midway = {tid: ckpt for tid, (status, _, ckpt) in state.items() if status != "TERMINATED" and 1 <= ckpt < EPOCHS}
    assert len(state) == len(LRS) and midway, f"no trial was interrupted midway: {state}"

    _mtscale("tune", "--config", str(cfg), "--resume")
    trials, epochs = _tables(exp)
    assert (trials["status"] == "TERMINATED").all() and (trials["epochs"] == EPOCHS).all(), trials
    assert set(trials["trial_id"]) == set(state)  # the same trials, continued: none added
    got = _per_trial(trials, epochs)
    assert sorted(got) == sorted(LRS)
    for lr in LRS:
        g, r = got[lr], ref[lr]
        # Every epoch reported once, in order: none missing, none doubled.
        assert g["training_iteration"].tolist() == list(range(1, EPOCHS + 1)), g[["training_iteration", "pid"]]
        for col in EXACT:
            assert g[col].tolist() == r[col].tolist(), (lr, col)
        for col in CLOSE:
            assert g[col].tolist() == pytest.approx(r[col].tolist(), rel=0, abs=1e-6), (lr, col)
        # Correct predictions per epoch, as counts: exactly the same.
        assert (g["val_top1"] * g["val_num_samples"] / 100).round().tolist() == \
            (r["val_top1"] * r["val_num_samples"] / 100).round().tolist(), lr
    # The midway trials really were resumed from their checkpoint (not from scratch) by a new
    # process: the epochs up to the checkpoint come from the interrupted sweep's trial process.
    for tid, ckpt in midway.items():
        g = epochs[epochs["trial_id"] == tid]
        resumed = g[g["pid"] == g["pid"].iloc[-1]]
        assert g["pid"].nunique() == 2 and resumed["training_iteration"].tolist() == list(range(ckpt + 1, EPOCHS + 1)), \
            (state[tid], g[["training_iteration", "pid", "iterations_since_restore"]])
        assert resumed["iterations_since_restore"].tolist() == list(range(1, EPOCHS - ckpt + 1))
        # The trial's own fine-tuning run dir, carried over into the resumed sweep's new Ray
        # session (restore_run_dir): its metrics.jsonl has every epoch once.
        (run,) = glob.glob(str(exp / f"*_{tid}_*" / "finetune"))
        rows = [json.loads(x) for x in Path(run, "metrics.jsonl").read_text().splitlines()]
        lr = float(trials.set_index("trial_id").loc[tid, "config/train.lr"])
        assert [x["epoch"] for x in rows] == list(range(EPOCHS))
        assert [x["val_loss"] for x in rows] == pytest.approx(ref[lr]["val_loss"].tolist(), rel=0, abs=1e-6)
    # The same best trial, config and value.
    best, ref_best = (json.loads((d / "best_trial.json").read_text()) for d in (exp, results / "straight"))
    assert best["config"] == ref_best["config"] and best["value"] == pytest.approx(ref_best["value"], abs=1e-6)


def test_restore_run_dir_copies_the_trials_own_run_dir_back_without_its_checkpoints(tmp_path):
    from ray.tune import Checkpoint

    from mtscale.tuning.trainable import RUN_DIR, restore_run_dir

    name = "finetune_trainable_abc12_00000_0_lr=0.001"
    stored = tmp_path / "experiment" / name  # the trial's folder in the storage path
    (stored / RUN_DIR / "checkpoints" / "epoch_0000").mkdir(parents=True)
    (stored / RUN_DIR / "checkpoints" / "epoch_0000" / "train_state.pt").write_bytes(b"big")
    (stored / RUN_DIR / "best").mkdir()
    (stored / RUN_DIR / "best" / "model.safetensors").write_bytes(b"w")
    (stored / RUN_DIR / "metrics.jsonl").write_text('{"epoch": 0}\n')
    (stored / "checkpoint_000000").mkdir()
    (stored / "checkpoint_000000" / "train_state.pt").write_bytes(b"s")
    ckpt = Checkpoint.from_directory(str(stored / "checkpoint_000000"))

    staging = tmp_path / "session_2" / name  # the resumed trial's new, empty trial dir
    staging.mkdir(parents=True)
    assert restore_run_dir(ckpt, staging) == staging / RUN_DIR
    files = sorted(str(p.relative_to(staging / RUN_DIR)) for p in (staging / RUN_DIR).rglob("*") if p.is_file())
    assert files == ["best/model.safetensors", "metrics.jsonl"]
    assert not (staging / f"{RUN_DIR}.restoring").exists()
    # the run dir is there already (a retry in the same session): left alone
    (staging / RUN_DIR / "metrics.jsonl").write_text("")
    assert restore_run_dir(ckpt, staging) is None and (staging / RUN_DIR / "metrics.jsonl").read_text() == ""
    # another trial's checkpoint (a PBT exploit): its run dir is not this trial's
    other = tmp_path / "session_2" / "finetune_trainable_abc12_00001_1_lr=0.01"
    other.mkdir()
    assert restore_run_dir(ckpt, other) is None and not (other / RUN_DIR).exists()
