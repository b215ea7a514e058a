"""Input streams end to end (issue 27): recorded by pre-training and fine-tuning, reapplied by
``evaluate`` and ``predict`` without being told, a stream mismatch refused, the scores a
fine-tuning run and ``evaluate --save-scores`` write, and ``mtscale ensemble`` over real runs.

The store comes from the real ``mtscale synth`` + ``mtscale prepare``; the models are tiny
(one epoch): these tests check the mechanics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from support import cli

from mtscale.config import FinetuneConfig, ModelConfig, load_config, to_dict
from mtscale.errors import ConfigError
from mtscale.models.encoder import MotionTransformer
from mtscale.train.checkpoint import encoder_meta, save_encoder
from mtscale.train.classifier import read_meta
from mtscale.train.finetune import run_finetune
from mtscale.train.scores import read_scores

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "finetune" / "tiny_cpu.yaml"
FAST = ["epochs=1", "warmup_epochs=0.5", "run.progress=false", "run.tensorboard=false", "train.batch_size=16",
        "keep_best=false"]


def _cfg(store: str, run_dir: Path, *sets: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, CONFIG, [f"data.store={store}", f"run.dir={run_dir}", *FAST, *sets])


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("streams")
    r = cli("synth", "--out", str(d / "raw"), "--num-samples", "96", "--num-classes", "4", "--seed", "5", "--quiet")
    assert r.returncode == 0, r.stderr
    r = cli("prepare", "--format", "ntu", "--input", str(d / "raw"), "--out", str(d / "store"), "--quiet")
    assert r.returncode == 0, r.stderr
    return str(d / "store")


@pytest.fixture(scope="module")
def runs(store, tmp_path_factory) -> dict[str, Path]:
    """Two fine-tuned classifiers (from scratch, one epoch): the joint and the bone-motion stream."""
    d = tmp_path_factory.mktemp("stream_runs")
    out = {}
    for stream in ("joint", "bone_motion"):
        run_finetune(_cfg(store, d / stream, "protocol=scratch", f"data.stream={stream}"))
        out[stream] = d / stream
    return out


def _encoder(tmp: Path, stream: str) -> Path:
    """An encoder in the export format of ``mtscale pretrain`` (tiny, clip 16, M=2) trained on ``stream``."""
    from mtscale.data.streams import stream_channels

    torch.manual_seed(0)
    model_cfg = ModelConfig(size="tiny", tokenization="patch", patch_frames=4)
    enc = MotionTransformer.from_config(model_cfg, clip_frames=16, num_bodies=2, num_joints=25,
                                        in_chans=stream_channels(stream))
    meta = encoder_meta({"model": to_dict(model_cfg), "data": {"clip_frames": 16, "num_bodies": 2, "stream": stream}},
                        num_joints=25, layout="ntu25", step=0)
    return save_encoder(enc.state_dict(), meta, tmp / f"{stream}.safetensors")


def test_finetune_records_the_stream_and_writes_val_and_test_scores(runs, store):
    from mtscale.data.store import Store

    meta = read_meta(runs["bone_motion"] / "final")
    assert meta["stream"] == "bone_motion" and meta["data"]["stream"] == "bone_motion" and meta["in_chans"] == 3
    s = Store.open(store)
    ids = np.asarray(s.manifest.column("sample_id").to_pylist())
    test_rows = s.select(split="xsub60", part="test")
    for stream, run in runs.items():
        val, test = (read_scores(run / "final" / f"scores_{part}.parquet") for part in ("val", "test"))
        assert val.stream == test.stream == stream and val.part == "val" and test.part == "test"
        assert val.run == str(run) and test.meta["clips"] == 1
        assert test.sample_ids.tolist() == ids[test_rows].tolist()  # every test sample, in row order
        assert test.labels.tolist() == s.labels[test_rows].tolist()
        np.testing.assert_allclose(test.scores_NK.sum(1), 1.0, atol=1e-5)  # softmax probabilities
        assert set(val.sample_ids.tolist()).isdisjoint(test.sample_ids.tolist())
        res = json.loads((run / "results.json").read_text())
        assert res["test_top1"] == pytest.approx(100.0 * (test.scores_NK.argmax(1) == test.labels).mean())
        assert res["val"] == len(val.sample_ids)
    # the same seeds / subset_seed validate on the same held-out samples whatever the stream
    a, b = (read_scores(r / "final" / "scores_val.parquet") for r in runs.values())
    assert a.sample_ids.tolist() == b.sample_ids.tolist()


def test_evaluate_reapplies_the_recorded_stream_and_saves_scores(runs, store, tmp_path):
    import dataclasses

    from mtscale.config import DataConfig, from_dict
    from mtscale.data.store import Store
    from mtscale.train.classifier import load_classifier
    from mtscale.train.evaluate import classifier_forward, score_rows
    from mtscale.train.runtime import setup_runtime

    run = runs["bone_motion"]
    r = cli("evaluate", "--checkpoint", str(run), "--store", store, "--split", "xsub60", "--part", "test",
            "--save-scores", "--out", str(tmp_path / "ev"), "--json", "--quiet",
            "--precision", "fp32")  # as the run was trained (tiny_cpu): auto may pick bf16 on an AMX CPU
    assert r.returncode == 0, r.stderr[-2000:]
    ev = json.loads(r.stdout)
    assert ev["stream"] == "bone_motion" and ev["scores"] == str(tmp_path / "ev" / "scores_test.parquet")
    got = read_scores(ev["scores"])
    assert got.stream == "bone_motion" and got.run == str(run)
    import pyarrow.parquet as pq

    table = pq.read_table(ev["scores"])
    assert set(table.column("stream").to_pylist()) == {"bone_motion"}
    assert set(table.column("run").to_pylist()) == {str(run)}
    assert [c for c in table.column_names if c.startswith("score_")] == [f"score_{k}" for k in range(4)]
    # the same probabilities as the fine-tuning run's own test scores (the same stream, the same clips) ...
    ref = read_scores(run / "final" / "scores_test.parquet")
    assert got.sample_ids.tolist() == ref.sample_ids.tolist()
    np.testing.assert_allclose(got.scores_NK, ref.scores_NK, atol=1e-5)
    assert ev["top1"] == pytest.approx(100.0 * (ref.scores_NK.argmax(1) == ref.labels).mean())
    # ... and not those of the joint stream through the same weights
    model, meta = load_classifier(run)
    s = Store.open(store)
    data = dataclasses.replace(from_dict(DataConfig, meta["data"], "data"), stream="joint")
    joint = score_rows(classifier_forward(model, probs=True), s, data, s.select(split="xsub60", part="test"),
                       setup_runtime("cpu", "fp32"), batch_size=16)
    assert np.abs(joint - got.scores_NK).max() > 1e-3



def test_evaluate_auto_precision_is_the_one_the_checkpoint_was_trained_in(runs, store, tmp_path):
    """A checkpoint records the precision its run trained and scored in; ``evaluate`` (auto)
    reuses it on the same device type, so it reproduces the run's own numbers on any CPU."""
    import shutil

    run = runs["joint"]
    meta = json.loads((run / "final" / "meta.json").read_text())
    assert (meta["precision"], meta["device_type"]) == ("fp32", "cpu")  # tiny_cpu trains in fp32
    copy = tmp_path / "final"
    shutil.copytree(run / "final", copy)
    (copy / "meta.json").write_text(json.dumps(dict(meta, precision="bf16")))
    r = cli("evaluate", "--checkpoint", str(copy), "--store", store, "--split", "xsub60", "--json", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "precision auto -> bf16 (as the checkpoint was trained on cpu)" in r.stderr, r.stderr[-2000:]
    r = cli("evaluate", "--checkpoint", str(copy), "--store", store, "--split", "xsub60", "--json", "--quiet",
            "--precision", "fp32")  # an explicit choice wins
    assert r.returncode == 0 and "as the checkpoint was trained" not in r.stderr, r.stderr[-2000:]


def test_finetuning_on_another_stream_than_pretraining_is_refused(store, tmp_path):
    enc = _encoder(tmp_path, "bone")
    with pytest.raises(ConfigError, match=r"^data\.stream: found 'joint', but the pre-trained encoder .* was trained "
                                          r"on stream 'bone'; expected --set data\.stream=bone"):
        run_finetune(_cfg(store, tmp_path / "r1", f"pretrained={enc}"))
    enc6 = _encoder(tmp_path, "joint+bone")
    assert json.loads(enc6.with_suffix(".json").read_text())["in_chans"] == 6
    with pytest.raises(ConfigError, match=r"found 'bone' \(3 channels\), .* stream 'joint\+bone' \(6 channels\)"):
        run_finetune(_cfg(store, tmp_path / "r2", f"pretrained={enc6}", "data.stream=bone",
                          "allow_stream_mismatch=true"))
    # the explicit override, with as many channels: a logged choice; the classifier records its own stream
    res = run_finetune(_cfg(store, tmp_path / "r3", f"pretrained={enc}", "data.stream=joint_motion",
                            "allow_stream_mismatch=true", "test_part=null"))
    assert read_meta(Path(res["final"]))["stream"] == "joint_motion"
    # the matching stream loads (6 channels in, 6 channels read by the classifier)
    res = run_finetune(_cfg(store, tmp_path / "r4", f"pretrained={enc6}", "data.stream=joint+bone", "test_part=null"))
    assert read_meta(Path(res["final"]))["in_chans"] == 6


def test_pretraining_records_the_stream(store, tmp_path):
    """A real (4-step) pre-training on two streams: the exported encoder says so, reads 6
    channels, and fine-tuning it on that stream needs no flag."""
    run = tmp_path / "pre"
    r = cli("pretrain", "--config", str(ROOT / "configs" / "pretrain" / "tiny_cpu.yaml"), "--set",
            f"data.store={store}", "--set", f"run.dir={run}", "--set", "train.max_steps=4", "--set",
            "data.stream=joint+bone_motion", "--set", "run.progress=false", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((run / "encoder.json").read_text())
    assert meta["stream"] == "joint+bone_motion" and meta["in_chans"] == 6
    from mtscale.train.checkpoint import load_encoder

    enc, _ = load_encoder(run / "encoder.safetensors")
    assert enc.C == 6 and enc.embed.in_features == 4 * 6  # patch of 4 frames x 6 channels
    res = run_finetune(_cfg(store, tmp_path / "ft", f"pretrained={run}", "data.stream=joint+bone_motion",
                            "test_part=null"))
    assert read_meta(Path(res["final"]))["stream"] == "joint+bone_motion"


def test_ensemble_of_two_stream_runs_and_a_refused_one(runs, store, tmp_path):
    r = cli("ensemble", str(runs["joint"]), str(runs["bone_motion"]), "--split", "test", "--out",
            str(tmp_path / "ens"), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["streams"] == ["joint", "bone_motion"] and sum(res["weights"]) == pytest.approx(1.0)
    a, b = (read_scores(runs[s] / "final" / "scores_test.parquet").sorted_by_id() for s in ("joint", "bone_motion"))
    comb = res["weights"][0] * a.scores_NK + res["weights"][1] * b.scores_NK
    assert res["top1"] == pytest.approx(100.0 * (comb.argmax(1) == a.labels).mean())
    assert res["num_samples"] == len(a.labels) and res["val_num_samples"] > 0
    for f in ("confusion.csv", "confusion.png", "metrics.json", "results.md", "scores_test.parquet"):
        assert (tmp_path / "ens" / f).is_file(), f
    # another validation hold-out (subset_seed): its validation scores are on other samples -> refused
    other = tmp_path / "seed7"
    run_finetune(_cfg(store, other, "protocol=scratch", "data.subset_seed=7"))
    r = cli("ensemble", str(runs["joint"]), str(other), "--split", "test", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "validation scores: sample" in r.stderr and "expected runs scored on the same samples" in r.stderr


@pytest.mark.realdata
def test_predict_on_raw_ntu_files_equals_evaluate_for_all_four_streams(ntu_dir, tmp_path):
    """A classifier on joint+bone+joint_motion+bone_motion (12 channels) trained on a store of
    the real NTU files: ``predict`` on the raw files gives the probabilities ``evaluate
    --save-scores`` gives for the same samples (both apply the recorded stream)."""
    st = tmp_path / "ntu"
    r = cli("prepare", "--format", "ntu", "--input", str(ntu_dir), "--out", str(st), "--dtype", "float32",
            "--quiet")
    assert r.returncode == 0, r.stderr
    stream = "joint+bone+joint_motion+bone_motion"
    res = run_finetune(_cfg(str(st), tmp_path / "run", "protocol=scratch", f"data.stream={stream}", "data.split=null",
                            "val_fraction=0", "test_part=null", "train.batch_size=4"))
    assert read_meta(Path(res["final"]))["in_chans"] == 12
    r = cli("evaluate", "--checkpoint", str(tmp_path / "run"), "--store", str(st), "--save-scores", "--out",
            str(tmp_path / "ev"), "--json", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    ev = read_scores(json.loads(r.stdout)["scores"])
    assert ev.stream == stream and len(ev.sample_ids) == 5
    files = sorted(str(p) for p in Path(ntu_dir).glob("*.skeleton"))
    r = cli("predict", "--checkpoint", str(tmp_path / "run"), "--json", "--topk", "1000", *files)
    assert r.returncode == 0, r.stderr[-2000:]
    by_id = {sid: p for sid, p in zip(ev.sample_ids.tolist(), ev.scores_NK)}
    for row in json.loads(r.stdout):
        pred = np.zeros(ev.num_classes, np.float32)
        for t in row["topk"]:
            pred[t["label_id"]] = t["probability"]
        np.testing.assert_allclose(pred, by_id[row["sample_id"]], atol=1e-5)
    assert {row["sample_id"] for row in json.loads(r.stdout)} == set(by_id)
