"""Encoder export / load (exact keys, clear errors), checkpoint pruning, RNG capture that loads
with weights_only=True, metrics truncation on resume. No DeepSpeed engine needed."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mtscale.config import ModelConfig, to_dict
from mtscale.errors import BadInputError
from mtscale.models.encoder import MotionTransformer
from mtscale.train.checkpoint import load_encoder, prune, save_encoder
from mtscale.train.rundir import MetricsLog
from mtscale.train.state import capture_rng, restore_rng

META = {"model": to_dict(ModelConfig(size="tiny")), "clip_frames": 8, "num_bodies": 2, "num_joints": 25,
        "in_chans": 3, "layout": "ntu25", "step": 3}


def _encoder(**model) -> MotionTransformer:
    torch.manual_seed(0)
    return MotionTransformer.from_config(ModelConfig(size="tiny", **model), clip_frames=8, num_bodies=2, num_joints=25)


@pytest.mark.parametrize("rel_bias", [False, True])
def test_export_then_load_exact(tmp_path: Path, rel_bias: bool) -> None:
    enc = _encoder(rel_bias=rel_bias)
    if rel_bias:
        with torch.no_grad():
            enc.bias_v.normal_()
            enc.bias_t.normal_()
    meta = dict(META, model=to_dict(ModelConfig(size="tiny", rel_bias=rel_bias)))
    out = save_encoder(enc.state_dict(), meta, tmp_path / "enc.safetensors")
    assert json.loads((tmp_path / "enc.json").read_text())["num_joints"] == 25
    got, meta = load_encoder(out)
    assert meta["step"] == 3 and meta["layout"] == "ntu25"
    for k, v in enc.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
    x = torch.randn(2, 8, 2, 25, 3)
    torch.testing.assert_close(got.eval().features(x), enc.eval().features(x))


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    sd = _encoder().state_dict()
    dropped = sorted(sd)[0]
    bad = {k: v for k, v in sd.items() if k != dropped}
    bad["decoder.extra"] = torch.zeros(1)
    save_encoder(bad, META, tmp_path / "bad.safetensors")
    with pytest.raises(BadInputError) as e:
        load_encoder(tmp_path / "bad.safetensors")
    assert f"missing keys ['{dropped}']" in str(e.value) and "unexpected keys ['decoder.extra']" in str(e.value)


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    sd = _encoder().state_dict()
    save_encoder(sd, dict(META, num_joints=20), tmp_path / "e.safetensors")
    with pytest.raises(BadInputError, match="mis-shaped"):
        load_encoder(tmp_path / "e.safetensors")


def test_prune_keeps_newest_and_latest(tmp_path: Path) -> None:
    for s in (10, 20, 30, 40):
        (tmp_path / f"step{s:08d}").mkdir()
    (tmp_path / "latest").write_text("step00000020")  # e.g. a newer save was interrupted
    prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step*")) == ["step00000020", "step00000030", "step00000040"]


def test_rng_roundtrip_through_weights_only_load(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng()
    torch.save(state, tmp_path / "rng.pt")
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_metrics_truncated_on_resume(tmp_path: Path) -> None:
    w = MetricsLog(tmp_path, "step", first=0, enabled=True, tensorboard=False)
    for s in range(1, 8):
        w.write({"step": s, "loss": float(s)})
    w.close()
    w = MetricsLog(tmp_path, "step", first=5, enabled=True, tensorboard=False)  # killed after step 7, ckpt at 4
    w.write({"step": 5, "loss": 50.0})
    w.close()
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0)]
    MetricsLog(tmp_path, "step", first=0, enabled=True, tensorboard=False).close()  # a new run: no old rows
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    w = MetricsLog(tmp_path, "epoch", first=0, enabled=False, tensorboard=True)  # not rank 0: writes nothing
    w.write({"epoch": 0, "loss": 1.0})
    w.close()
    assert (tmp_path / "metrics.jsonl").read_text() == "" and not (tmp_path / "tb").exists()
