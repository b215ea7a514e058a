"""Exact evaluation under 2 ranks (the real ``torchrun`` launcher, gloo on CPU): every test
sample is counted exactly once, and the numbers equal a one-process evaluation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mtscale.config import DataConfig, ModelConfig, to_dict
from mtscale.data.store_writer import write_store
from mtscale.models.encoder import MotionTransformer
from mtscale.train.classifier import _resolved_model, build_classifier, save_classifier
from mtscale.train.evaluate import evaluate_checkpoint

ROOT = Path(__file__).resolve().parents[2]
NUM_TEST = 37  # odd: ranks get 18 and 19 samples


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("exact")
    rng = np.random.default_rng(0)
    samples = []
    for i in range(NUM_TEST + 10):
        x = rng.normal(size=(int(rng.integers(6, 20)), 1, 25, 3)).astype(np.float32) * (1 + i % 5)
        samples.append((f"s{i:03d}", x, i % 5, {"split_demo": "test" if i < NUM_TEST else "train"}))
    # small chunks: the test rows span several read blocks
    store = write_store(str(d / "store"), samples, layout="ntu25", num_bodies=1, dtype="float32", chunk_frames=64)
    torch.manual_seed(0)
    mcfg = ModelConfig(size="tiny", tokenization="patch", patch_frames=4)
    model = build_classifier(MotionTransformer.from_config(mcfg, clip_frames=8, num_bodies=1, num_joints=25), 5)
    torch.nn.init.normal_(model.head.weight, std=0.5)  # spread predictions over classes
    meta = {"model": _resolved_model(mcfg), "clip_frames": 8, "num_bodies": 1, "num_joints": 25, "in_chans": 3,
            "layout": "ntu25", "num_classes": 5, "class_names": [f"c{k}" for k in range(5)], "head": "layernorm",
            "data": to_dict(DataConfig(clip_frames=8, num_bodies=1, num_workers=0))}
    ckpt = save_classifier(model, meta, d / "ckpt")
    return store.url, ckpt, d


def _evaluate_two_ranks(ckpt, store: str, out: Path, *args: str) -> dict:
    """``mtscale.evaluate`` under ``torchrun`` with 2 processes; returns its JSON output."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun not found"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "mtscale.evaluate",
                        "--checkpoint", str(ckpt), "--store", store, "--split", "demo", *args,
                        "--json", "--quiet", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout[r.stdout.index("{"):])


def test_two_ranks_count_every_sample_once(setup):
    store, ckpt, d = setup
    one = evaluate_checkpoint(str(ckpt), store, split="demo", part="test", batch_size=4, out_dir=str(d / "one"),
                              progress=False)
    assert one["num_samples"] == NUM_TEST and one["num_ranks"] == 1
    two = _evaluate_two_ranks(ckpt, store, d / "two", "--part", "test", "--batch-size", "4")
    assert two["num_ranks"] == 2
    assert two["num_samples"] == NUM_TEST
    assert two["top1"] == pytest.approx(one["top1"], abs=1e-9)
    assert two["top5"] == pytest.approx(one["top5"], abs=1e-9)
    assert two["per_class"] == pytest.approx(one["per_class"])
    cm1 = (d / "one" / "confusion.csv").read_text()
    assert (d / "two" / "confusion.csv").read_text() == cm1
    counts = [int(v) for line in cm1.splitlines()[1:] for v in line.split(",")[1:]]
    assert sum(counts) == NUM_TEST
    # multi-clip averaging under 2 ranks is exact as well
    three = _evaluate_two_ranks(ckpt, store, d / "clips", "--clips", "3", "--batch-size", "5")
    assert three["num_samples"] == NUM_TEST and three["clips"] == 3
    ref = evaluate_checkpoint(str(ckpt), store, split="demo", part="test", batch_size=5, clips=3,
                              out_dir=str(d / "clips1"), progress=False)
    assert three["top1"] == pytest.approx(ref["top1"], abs=1e-9)
