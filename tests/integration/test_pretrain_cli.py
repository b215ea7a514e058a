"""``mtscale pretrain`` end to end in one process (the console script), and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import cpu_env

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "pretrain" / "tiny_cpu.yaml"
MTSCALE = Path(sys.executable).parent / "mtscale"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mtscale.data.store_writer import write_store

    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("cli_store") / "s.zarr"
    samples = ((f"s{i}", rng.normal(size=(20 + i, 2, 25, 3)).astype(np.float32), i % 3, {}) for i in range(16))
    write_store(str(path), samples, layout="ntu25", num_bodies=2, dtype="float32", chunk_frames=64, shard_chunks=2)
    return path


@pytest.mark.slow
def test_mtscale_pretrain_one_process(store: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [str(MTSCALE), "pretrain", "--config", str(CONFIG), "--set", f"data.store={store}",
           "--set", f"run.dir={run_dir}", "--set", "train.max_steps=4", "--set", "train.ckpt_every=2",
           "--set", "train.keep_checkpoints=1"]
    p = subprocess.run(cmd, env=cpu_env(threads=2), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    for name in ("config.yaml", "ds_config.json", "metrics.jsonl", "loss.png", "encoder.safetensors",
                 "encoder.json", "status.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "lr", "samples_per_s", "tokens_per_s", "tflops", "mfu"):
        assert np.isfinite(rows[-1][key]), key
    assert 0 < rows[-1]["mfu"] < 1.5
    # keep_checkpoints=1: only the final one is left, and ``latest`` names it
    tags = sorted(d.name for d in (run_dir / "checkpoints").iterdir() if d.is_dir())
    assert tags == ["step00000004"] and (run_dir / "checkpoints" / "latest").read_text() == "step00000004"
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 8 and ds["gradient_clipping"] == 1.0 and ds["zero_optimization"]["stage"] == 0
    from mtscale.train.checkpoint import load_encoder

    enc, meta = load_encoder(run_dir / "encoder.safetensors")
    assert meta["step"] == 4 and meta["model"]["size"] == "tiny"
    x = np.zeros((1, 16, 2, 25, 3), np.float32)
    import torch

    assert enc.features(torch.from_numpy(x)).shape == (1, 64)

    # rerun with a higher max_steps: resumes from step 4 instead of starting over
    p = subprocess.run(cmd[:-6] + ["--set", "train.max_steps=5", "--set", "train.ckpt_every=2", "--set",
                                   "train.keep_checkpoints=1"], env=cpu_env(threads=2), capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "resuming at step 4" in p.stderr
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


def test_missing_store_is_one_line_error(tmp_path: Path) -> None:
    p = subprocess.run([str(MTSCALE), "pretrain", "--config", str(CONFIG)], env=cpu_env(threads=2), capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("mtscale pretrain: error: data.store: empty")
    assert "Traceback" not in p.stderr


def test_bad_override_is_one_line_error(tmp_path: Path) -> None:
    p = subprocess.run([str(MTSCALE), "pretrain", "--config", str(CONFIG), "--set", "train.zero_stage=5"],
                       env=cpu_env(threads=2), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2 and "train.zero_stage: found 5" in p.stderr and "Traceback" not in p.stderr


def test_script_entry_accepts_local_rank_and_prints_config(tmp_path: Path) -> None:
    """``deepspeed mtscale/pretrain.py`` runs the file as a script with ``--local_rank``."""
    p = subprocess.run([sys.executable, str(ROOT / "mtscale" / "pretrain.py"), "--local_rank=0", "--config",
                        str(CONFIG), "--set", "train.zero_stage=2", "--print-config"], env=cpu_env(threads=2),
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert '"stage": 2' in p.stdout and "gradient_clipping" in p.stdout


def _pretrain(store: Path, run_dir: Path, *sets: str) -> subprocess.CompletedProcess:
    cmd = [str(MTSCALE), "pretrain", "--config", str(CONFIG), "--set", f"data.store={store}",
           "--set", f"run.dir={run_dir}", "--set", "run.tensorboard=false", "--set", "run.progress=false"]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, env=cpu_env(threads=2), capture_output=True, text=True, timeout=600, cwd=run_dir.parent)


def test_model_compile_is_never_silently_ignored(store: Path, tmp_path: Path) -> None:
    """Issue 25, item 10: ``model.compile`` used to be silently ignored by pre-training. On CUDA it
    compiles the engine in place (benchmarks/gpu_check.py checks that); on CPU, where torch.compile
    under DeepSpeed aborts with heap corruption (torch 2.13.0+cpu), the run says so and runs eager."""
    run_dir = tmp_path / "compiled"
    p = _pretrain(store, run_dir, "train.max_steps=2", "model.compile=true")
    assert p.returncode == 0, p.stderr[-4000:]
    assert "model.compile: not applied on CPU pre-training" in p.stderr


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_naming_step_and_samples(store: Path, tmp_path: Path) -> None:
    """Issue 29, item 2: a diverging run stops at its first non-finite loss with one line naming
    the step and the batch's samples, exports nothing and leaves no checkpoint of the poisoned
    weights (before: NaN rows dropped, an all-NaN encoder exported, exit 0)."""
    run_dir = tmp_path / "diverge"
    p = _pretrain(store, run_dir, "train.max_steps=40", "train.lr=1e30", "train.warmup_steps=1",
                  "train.grad_clip=0", "train.ckpt_every=1000", "train.log_every=5")
    assert p.returncode == 2, p.stderr[-3000:]
    line = [ln for ln in p.stderr.splitlines() if "expected a finite value" in ln]
    assert len(line) == 1 and "sample rows [" in line[0], p.stderr[-3000:]
    step = int(line[0].split("step ")[1].split(":")[0])
    assert 1 <= step <= 40
    assert "Traceback" not in p.stderr
    assert not (run_dir / "encoder.safetensors").exists() and not (run_dir / "checkpoints" / "latest").exists()
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows) and all(r["step"] < step for r in rows)


def test_empty_or_foreign_run_dir_is_refused(store: Path, tmp_path: Path) -> None:
    """Issue 29, item 3: ``--set run.dir=`` used to write the run into the current directory,
    overwriting a config.yaml and metrics.jsonl there. Now: one line, nothing written."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "config.yaml").write_text("mine: 1\n")
    (work / "notes.txt").write_text("keep me\n")
    for run_dir in ("", "."):
        cmd = [str(MTSCALE), "pretrain", "--config", str(CONFIG), "--set", f"data.store={store}",
               "--set", f"run.dir={run_dir}", "--set", "train.max_steps=1"]
        p = subprocess.run(cmd, env=cpu_env(threads=2), capture_output=True, text=True, timeout=300, cwd=work)
        assert p.returncode == 2 and "run.dir: found" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    p = subprocess.run([str(MTSCALE), "pretrain", "--config", str(CONFIG), "--set", f"data.store={store}",
                        "--set", f"run.dir={work}", "--set", "train.max_steps=1"],
                       env=cpu_env(threads=2), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 2 and "not an mtscale run" in p.stderr, p.stderr[-2000:]
    assert sorted(x.name for x in work.iterdir()) == ["config.yaml", "notes.txt"]
    assert (work / "config.yaml").read_text() == "mine: 1\n"


@pytest.mark.slow
def test_resume_refuses_another_model_and_falls_back_from_a_damaged_checkpoint(store: Path, tmp_path: Path) -> None:
    """Issue 29, items 5 and 6: a resume with another model.size is refused before anything is
    written (config.yaml unchanged); a truncated newest checkpoint falls back to the intact one
    before it, saying so, and the curve continues from there."""
    run_dir = tmp_path / "run"
    p = _pretrain(store, run_dir, "train.max_steps=4", "train.ckpt_every=2",
                  "train.keep_checkpoints=2", "train.log_every=1")
    assert p.returncode == 0, p.stderr[-3000:]
    saved = (run_dir / "config.yaml").read_text()
    p = _pretrain(store, run_dir, "train.max_steps=6", "model.size=small")
    assert p.returncode == 2 and "model.size: found 'small'" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert (run_dir / "config.yaml").read_text() == saved
    # truncate the newest checkpoint's model file: resume must use step 2 and redo steps 3, 4
    newest = run_dir / "checkpoints" / "step00000004"
    f = next(newest.glob("*model_states.pt"))
    f.write_bytes(f.read_bytes()[:100])
    p = _pretrain(store, run_dir, "train.max_steps=5", "train.ckpt_every=2", "train.keep_checkpoints=2",
                  "train.log_every=1")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "could not be loaded" in p.stderr and "resuming at step 2 of 5" in p.stderr, p.stderr[-3000:]
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
