"""``mtscale pretrain`` end to end in one process (the console script), and its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "pretrain" / "tiny_cpu.yaml"
MTSCALE = Path(sys.executable).parent / "mtscale"


def _env() -> dict[str, str]:
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="2")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mtscale.data.store import write_store

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
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
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
                                   "train.keep_checkpoints=1"], env=_env(), capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "resuming at step 4" in p.stderr
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


def test_missing_store_is_one_line_error(tmp_path: Path) -> None:
    p = subprocess.run([str(MTSCALE), "pretrain", "--config", str(CONFIG)], env=_env(), capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("mtscale pretrain: error: data.store: empty")
    assert "Traceback" not in p.stderr


def test_bad_override_is_one_line_error(tmp_path: Path) -> None:
    p = subprocess.run([str(MTSCALE), "pretrain", "--config", str(CONFIG), "--set", "train.zero_stage=5"],
                       env=_env(), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2 and "train.zero_stage: found 5" in p.stderr and "Traceback" not in p.stderr


def test_script_entry_accepts_local_rank_and_prints_config(tmp_path: Path) -> None:
    """``deepspeed mtscale/pretrain.py`` runs the file as a script with ``--local_rank``."""
    p = subprocess.run([sys.executable, str(ROOT / "mtscale" / "pretrain.py"), "--local_rank=0", "--config",
                        str(CONFIG), "--set", "train.zero_stage=2", "--print-config"], env=_env(),
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert '"stage": 2' in p.stdout and "gradient_clipping" in p.stdout
