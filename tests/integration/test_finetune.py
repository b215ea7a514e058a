"""Fine-tuning end to end on a small synthetic NTU-format store: every protocol, resume,
on_epoch, exact key checks, the CLI (finetune / evaluate) and multi-seed reporting.

The store comes from the real ``mtscale synth`` + ``mtscale prepare``; the "pre-trained"
encoder is written with the real export format (``save_encoder``) from a seeded random init:
these tests check the mechanics, ``benchmarks/bench_pretrain_payoff.py`` checks the pay-off.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from support import cli, mtscale_cmd

from mtscale.config import FinetuneConfig, ModelConfig, load_config, to_dict
from mtscale.errors import BadInputError, ConfigError
from mtscale.models.encoder import MotionTransformer
from mtscale.train.checkpoint import encoder_meta, save_encoder
from mtscale.train.classifier import load_classifier
from mtscale.train.finetune import run_finetune

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "finetune" / "tiny_cpu.yaml"
FAST = ["epochs=2", "warmup_epochs=0.5", "run.progress=false", "run.tensorboard=false", "train.batch_size=16"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("ft")
    r = cli("synth", "--out", str(d / "raw"), "--num-samples", "160", "--num-classes", "4", "--seed", "3", "--quiet")
    assert r.returncode == 0, r.stderr
    r = cli("prepare", "--format", "ntu", "--input", str(d / "raw"), "--out", str(d / "store"), "--quiet")
    assert r.returncode == 0, r.stderr
    return str(d / "store")


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory) -> Path:
    """An encoder in the export format of ``mtscale pretrain`` (tiny, clip 16, M=2, NTU-25)."""
    torch.manual_seed(0)
    model_cfg = ModelConfig(size="tiny", tokenization="patch", patch_frames=4)
    enc = MotionTransformer.from_config(model_cfg, clip_frames=16, num_bodies=2, num_joints=25)
    meta = encoder_meta({"model": to_dict(model_cfg), "data": {"clip_frames": 16, "num_bodies": 2}},
                        num_joints=25, layout="ntu25", step=0)
    return save_encoder(enc.state_dict(), meta, tmp_path_factory.mktemp("enc") / "encoder.safetensors")


def _cfg(store: str, run_dir: Path, *sets: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, CONFIG, [f"data.store={store}", f"run.dir={run_dir}", *FAST, *sets])


def test_finetune_protocol_outputs_and_on_epoch(store, encoder_file, tmp_path):
    seen = []
    cfg = _cfg(store, tmp_path / "ft", f"pretrained={encoder_file}")
    res = run_finetune(cfg, on_epoch=lambda e, m, d: seen.append((e, dict(m), Path(d))))
    assert [e for e, _, _ in seen] == [0, 1]
    for e, m, d in seen:
        assert {"val_top1", "val_loss", "train_loss", "epoch"} <= set(m) and m["epoch"] == e
        assert d.name == f"epoch_{e:04d}"
    assert seen[-1][2].is_dir()  # the last epoch's checkpoint stays (keep_checkpoints=2)
    run = tmp_path / "ft"
    for f in ("config.yaml", "metrics.jsonl", "results.json", "results.md", "final/model.safetensors",
              "final/meta.json", "final/test_confusion.csv", "final/test_confusion.png"):
        assert (run / f).is_file(), f
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert 0.0 <= res["test_top1"] <= 100.0 and res["test"] > 0 and res["val"] > 0
    assert res["val_top1"] == pytest.approx(seen[-1][1]["val_top1"])
    row = (run / "results.md").read_text().splitlines()[2]
    assert row.startswith("| finetune |") and f"{res['test_top1']:.2f}" in row
    # the pre-trained weights were loaded: the final encoder is a fine-tuned copy of them
    model, meta = load_classifier(run / "final")
    assert meta["pretrained"] == str(encoder_file) and meta["protocol"] == "finetune"
    from safetensors.torch import load_file

    w0 = load_file(str(encoder_file))["pos_t"]
    w1 = model.encoder.pos_t.detach()
    assert not torch.equal(w0, w1) and torch.corrcoef(torch.stack([w0.flatten(), w1.flatten()]))[0, 1] > 0.9


def test_linear_probe_freezes_encoder_and_folds_head(store, encoder_file, tmp_path):
    cfg = _cfg(store, tmp_path / "lin", "protocol=linear", f"pretrained={encoder_file}", "epochs=8", "train.lr=0.01")
    res = run_finetune(cfg)
    model, meta = load_classifier(tmp_path / "lin" / "final")
    assert meta["head"] == "linear" and not hasattr(model.fc_norm, "weight")
    from safetensors.torch import load_file

    pre = load_file(str(encoder_file))
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, pre[k]), k  # frozen: bit-identical
    lines = [json.loads(s) for s in (tmp_path / "lin" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]  # the head learns
    # the exported (folded) classifier reproduces the reported test accuracy through `evaluate`
    from mtscale.train.evaluate import evaluate_checkpoint

    ev = evaluate_checkpoint(str(tmp_path / "lin" / "final"), store, split="xsub60", part="test", progress=False)
    assert ev["top1"] == pytest.approx(res["test_top1"], abs=1e-6)
    assert ev["num_samples"] == res["test"]


def test_score_rows_training_views_are_augmented_and_seeded(store):
    """``augment=True``: every clip is a training view with ``data.augment`` applied, the same
    for the same seed. With whole clips, no resampling and rotation + scale only, a view of a
    sample is its centre clip through one linear map (distances change, their ratios do not)."""
    import dataclasses

    from mtscale.config import AugmentConfig, DataConfig
    from mtscale.data.store import Store
    from mtscale.train.evaluate import score_rows
    from mtscale.train.runtime import setup_runtime

    s = Store.open(store)
    rows = s.select(split="xsub60", part="test")[:12]
    data = DataConfig(store=store, clip_frames=16, num_bodies=2, crop_min=1.0, crop_max=1.0, eval_crop=1.0,
                      augment=AugmentConfig(rotate_deg=30.0, rotate_axes="xyz", scale=0.2))
    rt = setup_runtime("cpu", "fp32")

    def flat(x, mask, time=None):
        return x.flatten(1)

    centre = score_rows(flat, s, data, rows, rt, batch_size=5)
    v1 = score_rows(flat, s, data, rows, rt, batch_size=5, seed=11, augment=True)
    assert np.array_equal(v1, score_rows(flat, s, data, rows, rt, batch_size=5, seed=11, augment=True))
    v2 = score_rows(flat, s, data, rows, rt, batch_size=5, seed=12, augment=True)
    assert np.abs(v1 - centre).max() > 1e-2 and np.abs(v1 - v2).max() > 1e-2
    off = dataclasses.replace(data, augment=AugmentConfig(rotate_deg=0.0, scale=0.0))
    np.testing.assert_allclose(score_rows(flat, s, off, rows, rt, batch_size=5, seed=11, augment=True), centre,
                               atol=1e-6)  # with nothing to augment, a whole-clip view is the centre clip

    def dist(f):  # distance of joint 0 to joint 1 and to joint 5 of body 0, every frame
        x = torch.from_numpy(f).view(len(rows), 16, 2, 25, 3)[:, :, 0]
        return (x[:, :, 0] - x[:, :, 1]).norm(dim=-1), (x[:, :, 0] - x[:, :, 5]).norm(dim=-1)

    (a0, b0), (a1, b1) = dist(centre), dist(v1)
    keep = (b0 > 1e-3) & (b1 > 1e-3)
    assert not torch.allclose(a0, a1, atol=1e-3)  # scaled
    # a rotation times a scalar: the ratio of two distances in a frame is unchanged
    assert torch.allclose((a0 / b0)[keep], (a1 / b1)[keep], atol=1e-4)


def test_linear_probe_views_resume_exactly(store, encoder_file, tmp_path, caplog):
    """``probe_views=3``: three cached views per training sample (the log says so); the head
    trains on other features than the centre-crop probe's; a run stopped after epoch 1 and
    resumed recaches the same views and ends where the uninterrupted run does."""
    import logging

    base = ("protocol=linear", f"pretrained={encoder_file}", "epochs=3", "train.lr=0.01", "probe_views=3")
    with caplog.at_level(logging.INFO, logger="mtscale.train.trainers"):
        full = run_finetune(_cfg(store, tmp_path / "full", *base))
    assert any("cached 3 train view(s) x " in r.message for r in caplog.records)
    run_finetune(_cfg(store, tmp_path / "one", *base[:-1]))

    class Stop(Exception):
        pass

    def stop_after_1(e, m, d):
        if e == 1:
            raise Stop

    with pytest.raises(Stop):
        run_finetune(_cfg(store, tmp_path / "part", *base), on_epoch=stop_after_1)
    resumed = run_finetune(_cfg(store, tmp_path / "part", *base))
    a, b, c = ([json.loads(s) for s in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
               for r in ("full", "part", "one"))
    assert [m["epoch"] for m in b] == [0, 1, 2]
    for ma, mb in zip(a, b):
        assert mb["train_loss"] == pytest.approx(ma["train_loss"], rel=1e-6)
    assert resumed["test_top1"] == pytest.approx(full["test_top1"], abs=1e-6)
    assert abs(a[0]["train_loss"] - c[0]["train_loss"]) > 1e-4  # the views were trained on
    # an epoch is one pass over the samples (one view each), as with the centre crop alone
    assert [m["step"] for m in a] == [m["step"] for m in c] and a[0]["step"] == -(-full["train"] // 16)
    assert a[-1]["train_loss"] < a[0]["train_loss"]
    with pytest.raises(ConfigError, match="probe_views: found 2, but the run in .* was started with 3"):
        run_finetune(_cfg(store, tmp_path / "part", *base[:-1], "probe_views=2"))
    with pytest.raises(ConfigError, match="probe_views: found 2 with protocol finetune, expected 1"):
        _cfg(store, tmp_path / "ft", f"pretrained={encoder_file}", "probe_views=2")


def test_encoder_blocks_probes_an_intermediate_block(store, encoder_file, tmp_path):
    """encoder_blocks=1 of the 2-block tiny encoder: the classifier is a depth-1 model whose
    features are block 0's output through the pre-trained final norm."""
    cfg = _cfg(store, tmp_path / "b1", "protocol=linear", f"pretrained={encoder_file}", "encoder_blocks=1",
               "epochs=1")
    res = run_finetune(cfg)
    model, meta = load_classifier(tmp_path / "b1" / "final")
    assert meta["model"]["depth"] == 1 and len(model.encoder.transformer.blocks) == 1
    from mtscale.train.checkpoint import load_encoder

    full, _ = load_encoder(encoder_file)
    assert full.depth == 2
    x = torch.randn(3, 16, 2, 25, 3)
    with torch.no_grad():
        h = full.embed_tokens(full.tokenize(x))
        want = full.transformer.norm(full.transformer.blocks[0](h, None))
        got = model.encoder(x)
        assert torch.allclose(got, want, atol=1e-5)
        assert not torch.allclose(full(x), want, atol=1e-2)  # the second block did change the output
    from mtscale.train.evaluate import evaluate_checkpoint

    ev = evaluate_checkpoint(str(tmp_path / "b1" / "final"), store, split="xsub60", part="test", progress=False)
    assert ev["top1"] == pytest.approx(res["test_top1"], abs=1e-6)
    with pytest.raises(ConfigError, match="encoder_blocks: found 3.*has 2 blocks"):
        run_finetune(_cfg(store, tmp_path / "b3", "protocol=linear", f"pretrained={encoder_file}", "encoder_blocks=3"))
    with pytest.raises(ConfigError, match="encoder_blocks: found 1 with protocol scratch"):
        _cfg(store, tmp_path / "b0", "protocol=scratch", "encoder_blocks=1")


def test_semi_uses_label_subset_and_scratch_ignores_pretrained(store, encoder_file, tmp_path):
    cfg = _cfg(store, tmp_path / "semi", "protocol=semi", f"pretrained={encoder_file}", "data.label_fraction=0.25",
               "train.batch_size=8", "epochs=1")
    res = run_finetune(cfg)
    full = _cfg(store, tmp_path / "x", f"pretrained={encoder_file}")
    from mtscale.data.store import Store
    from mtscale.train.finetune_data import make_splits

    n_full = make_splits(Store.open(store), full).train.size
    assert res["train"] == pytest.approx(0.25 * n_full, abs=4)  # per-class rounding
    res = run_finetune(_cfg(store, tmp_path / "scr", "protocol=scratch", "epochs=1"))
    _, meta = load_classifier(tmp_path / "scr" / "final")
    assert meta["pretrained"] is None and res["epochs"] == 1


def test_all_training_clips_without_validation_report_no_best_epoch(store, tmp_path, caplog):
    """``val_fraction=0`` (the final run on every training clip, settings chosen before): every
    training clip trains, the last epoch is reported, and no "best-val epoch" is claimed."""
    import logging

    with caplog.at_level(logging.INFO, logger="mtscale.train.finetune"):
        res = run_finetune(_cfg(store, tmp_path / "all", "protocol=scratch", "epochs=2", "val_fraction=0"))
        alone = caplog.text
        held = run_finetune(_cfg(store, tmp_path / "held", "protocol=scratch", "epochs=1"))
    assert res["val"] == 0 and res["train"] == held["train"] + held["val"] and held["val"] > 0
    assert "test_top1_best" not in res and 0.0 <= res["test_top1"] <= 100.0 and res["best_epoch"] is None
    assert not (tmp_path / "all" / "best").exists()  # epoch 0 was once kept and reported as the "best"
    assert "test_top1_best" in held
    assert "no validation hold-out, so no best-val epoch" in alone and "(best val epoch" not in alone
    assert "(best val epoch" in caplog.text[len(alone):]


def test_resume_continues_and_matches_uninterrupted(store, tmp_path):
    base = ("protocol=scratch", "epochs=3", "data.crop_min=1.0", "data.augment.rotate_deg=0", "data.augment.scale=0")
    full = run_finetune(_cfg(store, tmp_path / "full", *base))
    # a run that stops after epoch 1 (epochs=2 would change the schedule: stop via the callback)

    class Stop(Exception):
        pass

    def stop_after_1(e, m, d):
        if e == 1:
            raise Stop

    with pytest.raises(Stop):
        run_finetune(_cfg(store, tmp_path / "part", *base), on_epoch=stop_after_1)
    t = time.perf_counter()
    resumed = run_finetune(_cfg(store, tmp_path / "part", *base))  # picks up checkpoints/epoch_0001
    segment = time.perf_counter() - t
    a = [json.loads(s) for s in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(s) for s in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in b] == [0, 1, 2]
    assert b[2]["train_loss"] == pytest.approx(a[2]["train_loss"], rel=1e-4)
    assert resumed["test_top1"] == pytest.approx(full["test_top1"], abs=1e-6)
    # the resumed run's wall time counts the interrupted segment's epochs too, not only its own
    assert resumed["wall_s"] >= 0.95 * segment + b[0]["epoch_s"] + b[1]["epoch_s"]
    # resume_from an explicit checkpoint dir (what a Ray Tune trial gets back) in a new run dir
    again = run_finetune(_cfg(store, tmp_path / "other", *base),
                         resume_from=tmp_path / "full" / "checkpoints" / "epoch_0001")
    assert again["test_top1"] == pytest.approx(full["test_top1"], abs=1e-6)


class _StopAfter:
    """A StopFlag stand-in raised from its n-th read on (the loop reads it once per optimizer
    step and once between epochs): a signal arriving at an exact, repeatable point."""

    signum = 15

    def __init__(self, n: int):
        self.n, self.reads = n, 0

    @property
    def raised(self) -> bool:
        self.reads += 1
        return self.reads >= self.n


@pytest.mark.parametrize("reads", [6, 4])  # 6: mid-epoch 1; 4: between epochs 0 and 1
def test_signal_mid_epoch_then_resume_equals_uninterrupted(store, tmp_path, reads):
    """Issue 28: fine-tuning is preemption-safe. A signal stops the run at the next optimizer step
    with a partial-epoch checkpoint (weights, optimizer, loader cursor, RNG, running sums) and
    status ``preempted``; running again finishes with the uninterrupted run's per-epoch losses,
    weights and test accuracy (augmentation, crops and drop-path on: every random draw resumes)."""
    from safetensors.torch import load_file

    base = ("protocol=scratch", "epochs=2", "model.drop_path=0.1")
    full = run_finetune(_cfg(store, tmp_path / "full", *base))
    part = tmp_path / "part"
    out = run_finetune(_cfg(store, part, *base), stop=_StopAfter(reads))
    assert out["preempted"] and out["epoch"] == 1
    status = json.loads((part / "status.json").read_text())
    assert status["state"] == "preempted" and status["signal"] == 15
    ckpts = sorted(d.name for d in (part / "checkpoints").iterdir())
    assert ckpts == (["epoch_0000", "epoch_0001_partial"] if reads == 6 else ["epoch_0000"])
    assert not (part / "final").exists()
    resumed = run_finetune(_cfg(store, part, *base))
    assert json.loads((part / "status.json").read_text())["state"] == "finished"
    assert "epoch_0001_partial" not in [d.name for d in (part / "checkpoints").iterdir()]  # superseded
    a = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in b] == [0, 1]
    for ma, mb in zip(a, b):
        for k in ("train_loss", "train_top1", "val_loss", "step"):
            assert mb[k] == pytest.approx(ma[k], rel=1e-5, abs=1e-6), (k, ma[k], mb[k])
    wa, wb = (load_file(str(d / "final" / "model.safetensors")) for d in (tmp_path / "full", part))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
    assert resumed["test_top1"] == pytest.approx(full["test_top1"], abs=1e-6)


def test_cli_finetune_exits_preempted_on_sigterm(store, tmp_path):
    """The real signal through the CLI: SIGTERM mid-run -> exit EXIT_PREEMPTED, status.json
    ``preempted``; the same command again finishes (exit 0) with a complete metrics file."""
    import os
    import signal

    from mtscale.train.rundir import EXIT_PREEMPTED

    run_dir = tmp_path / "sig"
    cmd = mtscale_cmd("finetune", "--config", CONFIG, "--protocol", "scratch", "--set", f"data.store={store}",
                      "--set", f"run.dir={run_dir}", *sum((["--set", x] for x in FAST), []), "--set", "epochs=40")
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None:
            m = run_dir / "metrics.jsonl"
            if m.is_file() and len(m.read_text().splitlines()) >= 1:
                break
            time.sleep(0.1)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == EXIT_PREEMPTED, err[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "preempted"
    done_epochs = len((run_dir / "metrics.jsonl").read_text().splitlines())
    assert done_epochs < 40
    r = subprocess.run(cmd[:-2] + ["--set", "epochs=40"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in rows] == list(range(40))


def test_pretrained_key_and_geometry_errors(store, encoder_file, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(encoder_file))
    sd.pop("embed.bias")
    sd["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    meta_json = encoder_file.with_suffix(".json").read_text()
    save_file(sd, str(bad), metadata={"mtscale": meta_json})
    with pytest.raises(BadInputError, match=r"missing keys \['embed.bias'\], unexpected keys \['extra.weight'\]"):
        run_finetune(_cfg(store, tmp_path / "r1", f"pretrained={bad}"))
    with pytest.raises(ConfigError, match="clip_frames"):
        run_finetune(_cfg(store, tmp_path / "r2", f"pretrained={encoder_file}", "data.clip_frames=32"))
    with pytest.raises(ConfigError, match="pretrained: missing"):
        run_finetune(_cfg(store, tmp_path / "r3"))


def test_new_branches_over_an_old_encoder_start_where_it_was(store, encoder_file, tmp_path, caplog):
    """Issue 26: ``model.temporal_conv`` / ``model.joint_mix`` over an encoder pre-trained without
    them: the branches' parameters are the only missing keys (logged by name), the file's weights
    load exactly, the classifier records the architecture and evaluate reloads it."""
    from safetensors.torch import load_file

    caplog.set_level("INFO", logger="mtscale")
    run_dir = tmp_path / "branches"
    out = run_finetune(_cfg(store, run_dir, f"pretrained={encoder_file}", "model.temporal_conv=3",
                            "model.joint_mix=adjacency", "epochs=1"))
    assert any("added temporal_conv=3, joint_mix='adjacency' over the pre-trained encoder" in r.message
               and "encoder.transformer.blocks.0.tconv_gate" not in r.message and "tconv_gate" in r.message
               for r in caplog.records)
    clf, meta = load_classifier(out["final"])
    assert meta["model"]["temporal_conv"] == 3 and meta["model"]["joint_mix"] == "adjacency"
    assert clf.encoder.transformer.blocks[0].tconv is not None
    with pytest.raises(ConfigError, match="model.temporal_conv: found 5"):
        enc_dir = tmp_path / "enc_tc3"
        from mtscale.train.checkpoint import encoder_meta, save_encoder

        sd = {k.removeprefix("encoder."): v for k, v in load_file(str(Path(out["final"]) / "model.safetensors")).items()
              if k.startswith("encoder.")}
        meta3 = encoder_meta({"model": meta["model"], "data": {"clip_frames": 16, "num_bodies": 2}}, num_joints=25,
                             layout="ntu25", step=0)
        f3 = save_encoder(sd, meta3, enc_dir / "encoder.safetensors")
        run_finetune(_cfg(store, tmp_path / "r_tc5", f"pretrained={f3}", "model.temporal_conv=5"))


def test_graph_stem_over_an_old_encoder_trains_and_evaluate_reloads_it(store, encoder_file, tmp_path, caplog):
    """Issue 26: ``model.graph_stem`` (with its width and the pyramid shape; the flat stem runs in
    tests/distributed/test_finetune_ddp.py) over an encoder pre-trained without it: its keys are the
    only new ones (logged), its projection leaves zero (the stem is trained), the classifier records
    it, and evaluate rebuilds it (two bodies folded, NTU-25's tree) and reproduces the reported test
    accuracy."""
    from mtscale.train.evaluate import evaluate_checkpoint

    caplog.set_level("INFO", logger="mtscale")
    run = tmp_path / "stem"
    res = run_finetune(_cfg(store, run, f"pretrained={encoder_file}", "model.graph_stem=3",
                            "model.graph_stem_width=8", "model.graph_stem_pyramid=true"))
    assert any("added graph_stem=3 over the pre-trained encoder" in r.message and "stem.proj.weight" in r.message
               for r in caplog.records)
    clf, meta = load_classifier(run / "final")
    assert meta["model"]["graph_stem"] == 3 and meta["model"]["graph_stem_width"] == 8
    assert meta["model"]["graph_stem_pyramid"] is True
    assert [b.gcn.out_channels for b in clf.encoder.stem.blocks] == [8, 16, 32]
    assert clf.encoder.stem.proj.weight.abs().max() > 0  # left its zero init
    assert clf.encoder.stem.blocks[0].bn1.num_batches_tracked > 0  # BatchNorm statistics kept
    ev = evaluate_checkpoint(str(run / "final"), store, split="xsub60", part="test", progress=False)
    assert ev["top1"] == pytest.approx(res["test_top1"], abs=1e-6)
    # over a frozen encoder (linear probe) a new branch would stay at zero: refused, naming it
    with pytest.raises(ConfigError, match="graph_stem=1 added over the pre-trained encoder with protocol linear"):
        run_finetune(_cfg(store, tmp_path / "lin_stem", "protocol=linear", f"pretrained={encoder_file}",
                          "model.graph_stem=1"))


def test_unfinished_pretraining_and_unsafe_run_dirs_are_refused(store, tmp_path):
    """Issue 29, items 3 and 9: a preempted pre-training run (no exported encoder) is refused as
    --pretrained unless pretrained_partial; an empty run.dir or a foreign folder is refused."""
    run = tmp_path / "pre"
    (run / "checkpoints").mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "preempted", "step": 16}))
    with pytest.raises(ConfigError, match=r"a preempted pre-training run \(step 16\).*pretrained_partial=true"):
        run_finetune(_cfg(store, tmp_path / "r1", f"pretrained={run}"))
    with pytest.raises(ConfigError, match="run.dir: found '.*', expected a folder"):
        run_finetune(_cfg(store, Path(""), "protocol=scratch"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.csv").write_text("x\n")
    with pytest.raises(ConfigError, match="not an mtscale run"):
        run_finetune(_cfg(store, foreign, "protocol=scratch"))
    assert sorted(x.name for x in foreign.iterdir()) == ["data.csv"]


def test_time_index_over_an_old_encoder_trains_and_evaluate_reproduces_it(store, encoder_file, tmp_path, caplog):
    """``model.time_index`` over an encoder pre-trained without it: its projection is the only new
    key (logged), the times reach the model in training (the projection moves), ``mtscale
    evaluate`` (which rebuilds the clips and their times) gives the fine-tuning run's test accuracy,
    and a linear probe (frozen encoder: the projection would stay at zero) refuses it."""
    from safetensors.torch import load_file

    caplog.set_level("INFO", logger="mtscale")
    out = run_finetune(_cfg(store, tmp_path / "timed", f"pretrained={encoder_file}", "model.time_index=true",
                            "epochs=1", "train.lr=0.01"))
    assert any("added time_index=True over the pre-trained encoder: 2 new parameters" in r.message
               for r in caplog.records)
    w = load_file(str(Path(out["final"]) / "model.safetensors"))["encoder.time_proj.weight"]
    assert w.abs().sum() > 0  # zero at init: moved, so the times reached it
    r = cli("evaluate", "--checkpoint", str(out["final"]), "--store", store, "--split", "xsub60", "--json",
            "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["top1"] == pytest.approx(out["test_top1"], abs=1e-6)
    raw = sorted((Path(store).parent / "raw").glob("*.skeleton"))[:2]
    r = cli("predict", "--checkpoint", str(out["final"]), *map(str, raw), "--json")  # its clips carry times too
    assert r.returncode == 0 and len(json.loads(r.stdout)) == 2, r.stderr[-2000:]
    # a linear probe freezes the encoder, so an added projection would stay at zero: refused, named
    with pytest.raises(ConfigError, match="time_index=True added over the pre-trained encoder with protocol linear"):
        run_finetune(_cfg(store, tmp_path / "timed_lin", "protocol=linear", f"pretrained={encoder_file}",
                          "model.time_index=true", "epochs=1"))


def test_cli_finetune_seeds_and_evaluate(store, encoder_file, tmp_path):
    run = tmp_path / "cli"
    r = cli("finetune", "--config", str(CONFIG), "--pretrained", str(encoder_file), "--seeds", "0,1", "--json",
            "--set", f"data.store={store}", "--set", f"run.dir={run}", *[x for s in FAST for x in ("--set", s)],
            "--set", "epochs=1", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["seeds"] == [0, 1] and len(out["runs"]) == 2
    accs = [x["test_top1"] for x in out["runs"]]
    assert out["test_top1_mean"] == pytest.approx(np.mean(accs))
    assert out["test_top1_std"] == pytest.approx(np.std(accs, ddof=1))
    assert "±" in (run / "results.md").read_text() or accs[0] == accs[1]
    r = cli("evaluate", "--checkpoint", str(run / "seed1" / "final"), "--store", store, "--split", "xsub60",
            "--json", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    ev = json.loads(r.stdout)
    assert ev["top1"] == pytest.approx(out["runs"][1]["test_top1"], abs=1e-6)
    assert Path(ev["confusion_png"]).is_file() and Path(ev["confusion_csv"]).is_file()
    r = cli("finetune", "--config", str(CONFIG), "--set", f"data.store={store}", "--set", "protocol=semi")
    assert r.returncode == 2 and "label_fraction" in r.stderr and "Traceback" not in r.stderr


def test_non_finite_fine_tuning_loss_stops_the_run(store, tmp_path):
    """Issue 29, item 2: fine-tuning used to log a NaN train loss every epoch and exit 0 at chance.
    Now the epoch's first non-finite loss stops it with one line naming the micro-batch and samples,
    before a checkpoint of the poisoned weights is written."""
    from mtscale.errors import NonFiniteLossError

    run_dir = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"epoch 0, micro-batch \d+: loss is nan.*sample rows \["):
        run_finetune(_cfg(store, run_dir, "protocol=scratch", "train.lr=1e30", "train.grad_clip=0",
                          "warmup_epochs=0"))
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
    assert not (run_dir / "final").exists()


def test_ema_weights_are_published_and_resume_exactly(store, tmp_path):
    """Issue 26 recipe option ``ema``: the classifier files (epoch checkpoints, final/) hold the
    weight average, training continues on the raw weights (kept in train_state.pt), and a run
    stopped mid-epoch resumes to the uninterrupted run's EMA weights and test accuracy."""
    from safetensors.torch import load_file

    base = ("protocol=scratch", "epochs=2", "ema=0.9")
    full = run_finetune(_cfg(store, tmp_path / "full", *base))
    ck = tmp_path / "full" / "checkpoints" / "epoch_0001"
    state = torch.load(ck / "train_state.pt", weights_only=True)
    published = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    k = "head.weight"
    torch.testing.assert_close(published[k], state["trainer"]["ema"][k])
    assert (published[k] - state["trainer"]["raw"][k]).abs().max() > 1e-6  # not the raw weights
    part = tmp_path / "part"
    assert run_finetune(_cfg(store, part, *base), stop=_StopAfter(6))["preempted"]
    resumed = run_finetune(_cfg(store, part, *base))
    got = load_file(str(part / "final" / "model.safetensors"))
    for name in published:
        torch.testing.assert_close(got[name], published[name], rtol=1e-5, atol=1e-6)
    assert resumed["test_top1"] == pytest.approx(full["test_top1"], abs=1e-6)
    with pytest.raises(ConfigError, match="ema"):
        _cfg(store, tmp_path / "bad", "ema=1.0")


def test_fp16_fine_tuning_scales_the_loss(store, tmp_path):
    """Issue 25, item 8: fp16 autocast fine-tuning runs with a gradient scaler (its state is in
    the checkpoint, so a resume keeps the scale); bf16 / fp32 runs have none."""
    out = run_finetune(_cfg(store, tmp_path / "fp16", "protocol=scratch", "epochs=1", "train.precision=fp16"))
    state = torch.load(tmp_path / "fp16" / "checkpoints" / "epoch_0000" / "train_state.pt", weights_only=True)
    scaler = state["trainer"]["scaler"]
    assert scaler and scaler["scale"] > 1.0  # an enabled scaler (a disabled one saves {})
    assert np.isfinite(out["train_loss"]) and 0 <= out["test_top1"] <= 100
    run_finetune(_cfg(store, tmp_path / "fp32", "protocol=scratch", "epochs=1"))
    state = torch.load(tmp_path / "fp32" / "checkpoints" / "epoch_0000" / "train_state.pt", weights_only=True)
    assert not state["trainer"]["scaler"]
