"""``mtscale tune --resume`` reproduces the uninterrupted sweep (issue 28): the same small sweep
runs once straight through and once interrupted by SIGINT (what Ray Tune catches to save the
experiment state one last time; SIGTERM is not caught by Tune and ends the driver at once)
while a trial is between its first checkpoint and its last epoch, then resumed with
``--resume``. Every trial's per-epoch metrics must equal those of the uninterrupted sweep, with
no epoch report missing or doubled. Real local Ray, real fine-tuning loop, tiny store."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import yaml

from test_tune import MODEL, _env, _mtscale, _tables, _tune_yaml

pytestmark = pytest.mark.slow

EPOCHS = 8
LRS = [3e-3, 1e-3]
# Metrics of run_finetune compared across the two sweeps (timings and Ray's bookkeeping are not).
EXACT = ("epoch", "step", "training_iteration")
CLOSE = ("train_loss", "val_loss", "val_top1", "val_top5", "lr")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A 96-sample synthetic NTU store (3 classes), a seeded random encoder in the real
    ``encoder.safetensors`` format and a base fine-tuning YAML (random crops and augmentation
    on: a resumed trial must restore the RNGs to match)."""
    import torch

    from mtscale.config import ModelConfig, from_dict
    from mtscale.models.encoder import MotionTransformer
    from mtscale.train.checkpoint import encoder_meta, save_encoder

    root = tmp_path_factory.mktemp("tune_resume")
    _mtscale("synth", "--out", str(root / "raw"), "--num-samples", "96", "--num-classes", "3", "--seed", "0", "--quiet")
    _mtscale("prepare", "--format", "ntu", "--input", str(root / "raw"), "--out", str(root / "store"), "--quiet")
    torch.manual_seed(0)
    enc = MotionTransformer.from_config(from_dict(ModelConfig, MODEL), clip_frames=16, num_bodies=2, num_joints=25)
    meta = encoder_meta({"model": MODEL, "data": {"clip_frames": 16, "num_bodies": 2}}, num_joints=25,
                        layout="ntu25", step=0)
    save_encoder(enc.state_dict(), meta, root / "encoder.safetensors")
    base = {
        "protocol": "finetune", "epochs": EPOCHS, "warmup_epochs": 1, "layer_decay": 1.0, "label_smoothing": 0.1,
        "val_fraction": 0.25, "test_part": None, "keep_best": False,
        "data": {"store": "store", "split": "xsub60", "part": "train", "clip_frames": 16, "num_bodies": 2,
                 "num_workers": 0, "shuffle_buffer": 64, "crop_min": 0.8},
        "model": MODEL,
        "train": {"seed": 0, "batch_size": 4, "lr": 1e-3, "min_lr": 0.0, "weight_decay": 0.05, "device": "cpu",
                  "precision": "fp32"},
        "run": {"dir": "unused", "progress": False, "tensorboard": False, "export_encoder": False},
    }
    (root / "ft_base.yaml").write_text(yaml.safe_dump(base))
    return {"root": root, "store": root / "store", "encoder": root / "encoder.safetensors"}


def _sweep_yaml(assets: dict[str, Path], name: str) -> Path:
    # FIFO: no trial stopped early; a grid of 2 learning rates, 1 sample each, both at once;
    # reuse_actors off: each trial is its own process (the resumed one a new process too).
    return _tune_yaml(assets, name, num_samples=1, max_concurrent_trials=2, reuse_actors=False,
                      scheduler={"kind": "fifo"}, space={"train.lr": {"grid": LRS}},
                      overrides={"data.store": str(assets["store"])})


def _state(exp: Path) -> dict[str, dict]:
    """Trial id -> {status, iteration, checkpoint} from the newest readable experiment state
    (what --resume restores); {} while none is written."""
    files = sorted(glob.glob(str(exp / "experiment_state-*.json")), key=os.path.getmtime, reverse=True)
    for f in files:
        try:
            state = json.loads(Path(f).read_text())
        except (OSError, json.JSONDecodeError):  # being rewritten
            continue
        out = {}
        for trial_json, meta_json in state.get("trial_data", []):
            t, meta = json.loads(trial_json), json.loads(meta_json)
            last = json.loads(meta["last_result"]) if isinstance(meta.get("last_result"), str) else meta.get("last_result") or {}
            out[t["trial_id"]] = {"status": t["status"], "iteration": int(last.get("training_iteration", 0) or 0),
                                  "meta": meta}
        return out
    return {}


def test_interrupted_and_resumed_sweep_reproduces_the_uninterrupted_one(assets):
    full_cfg = _sweep_yaml(assets, "straight")
    t0 = time.monotonic()
    _mtscale("tune", "--config", str(full_cfg))
    print(f"uninterrupted sweep: {time.monotonic() - t0:.1f} s")
    full_trials, full_epochs = _tables(assets["root"] / "results" / "straight")
    print(full_epochs[["trial_id", "epoch", "training_iteration", "pid", "iterations_since_restore", "val_loss", "train_loss"]].to_string())

    cfg = _sweep_yaml(assets, "interrupted")
    exp = assets["root"] / "results" / "interrupted"
    log_path = assets["root"] / "interrupted.log"
    t0 = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mtscale.cli", "tune", "--config", str(cfg)], env=_env(),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and not glob.glob(str(exp / "*" / "checkpoint_000001")):
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGSTOP)
        print("stopped at", time.monotonic() - t0, sorted(p.split("/")[-2][:40] + "/" + p.split("/")[-1] for p in glob.glob(str(exp / "*" / "checkpoint_*"))))
        print({Path(f).parent.name[:40]: len(Path(f).read_text().splitlines()) for f in glob.glob(str(exp / "*" / "result.json"))})
        os.kill(proc.pid, signal.SIGINT)
        os.kill(proc.pid, signal.SIGCONT)
        rc = proc.wait(timeout=300)
        print("rc", rc, time.monotonic() - t0)
    finally:
        time.sleep(3)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    st = _state(exp)
    print({k: (v["status"], v["iteration"]) for k, v in st.items()})
    print({Path(f).parent.name[:40]: len(Path(f).read_text().splitlines()) for f in glob.glob(str(exp / "*" / "result.json"))})
    print(log_path.read_text()[-3000:])
    t0 = time.monotonic()
    _mtscale("tune", "--config", str(cfg), "--resume")
    print("resume", time.monotonic() - t0)
    trials, epochs = _tables(exp)
    print(trials.to_string())
    print(epochs[["trial_id", "epoch", "training_iteration", "pid", "iterations_since_restore", "val_loss", "train_loss"]].to_string())
    print(full_trials.to_string())
