"""Fault injection (issue 29): SIGKILL at seeded random moments of ``prepare``, ``pretrain`` and
``finetune``, a full disk under ``prepare``, and truncated artefacts. Whatever the moment, running
the same command again gives exactly the uninterrupted run's outputs: no data lost, nothing
silent, nothing half-written left in the way.

``prepare`` is killed at a moment drawn (seeded) between 10 % and 60 % of the reference run's wall
time. Pre-training and fine-tuning are killed at a phase of the run itself, read from its own
files, so the kill lands while the run is going however loaded the machine is (a moment taken
from the reference's wall time let a killed run finish first when the load dropped between the
two): ``start``, as soon as the run directory is marked (nothing trained, no checkpoint), and
``mid``, a seeded fraction of a step / epoch after a seeded row of ``metrics.jsonl`` (mid-step
or mid-checkpoint, with at least one row still to come).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from support import cpu_env, mtscale_cmd, run_ok

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
SEEDS = (1, 2)


def _timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    run_ok(cmd)
    return time.perf_counter() - t0


def _kill_at(cmd: list[str], seconds: float) -> bool:
    """Start ``cmd`` in its own process group, SIGKILL the whole group after ``seconds`` (as a node
    failure would). True if it was still running when killed."""
    p = subprocess.Popen(cmd, env=cpu_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        p.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return True


def _moment(seed: int, ref_s: float) -> float:
    return random.Random(seed).uniform(0.1, 0.6) * ref_s


PHASES = ("start", "mid1", "mid2")  # mid<seed>


def _rows(run_dir: Path) -> int:
    try:
        return (run_dir / "metrics.jsonl").read_text().count("\n")  # complete rows only
    except FileNotFoundError:
        return 0


def _kill_in_phase(cmd: list[str], run_dir: Path, phase: str, n_rows: int) -> None:
    """Run ``cmd`` (which writes ``n_rows`` rows of ``run_dir/metrics.jsonl``) and SIGKILL its
    process group in ``phase``: ``start`` once the run directory is marked; ``mid<seed>`` once
    row k + 1 is written (k seeded in 1..n_rows-2), plus a seeded fraction (0-50 %) of the time
    this run took from row k to row k + 1. Fails if the run ended before the kill."""
    from mtscale.train.rundir import RUN_MARK

    log = run_dir.parent / "killed_run.log"
    with log.open("w") as err:  # a file, not a pipe: a full pipe would stall the run
        p = subprocess.Popen(cmd, env=cpu_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
                             start_new_session=True)

    def wait_for(done) -> float:
        while not done():
            assert p.poll() is None, f"the run ended (exit {p.returncode}) before the kill:\n{log.read_text()[-2000:]}"
            time.sleep(0.01)
        return time.perf_counter()

    try:
        if phase == "start":
            wait_for(lambda: (run_dir / RUN_MARK).is_file())
        else:
            rng = random.Random(int(phase[3:]))
            k = rng.randint(1, n_rows - 2)
            ta = wait_for(lambda: _rows(run_dir) >= k)
            tb = wait_for(lambda: _rows(run_dir) >= k + 1)
            time.sleep(rng.uniform(0.0, 0.5) * (tb - ta))
        assert p.poll() is None, f"the run ended before the kill (phase {phase})"
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("faults") / "raw"
    run_ok(mtscale_cmd("synth", "--out", str(d), "--num-samples", "96", "--num-classes", "4", "--seed", "5", "--quiet"))
    return d


def _same_store(a: Path, b: Path) -> None:
    from mtscale.data.store import Store

    sa, sb = Store.open(str(a)), Store.open(str(b))
    assert sa.manifest.equals(sb.manifest)
    np.testing.assert_array_equal(sa.frames[:], sb.frames[:])
    run_ok(mtscale_cmd("verify", str(b), "--quiet"))


@pytest.fixture(scope="module")
def reference_store(raw: Path) -> tuple[Path, float]:
    out = raw.parent / "ref_store"
    secs = _timed(mtscale_cmd("prepare", "--format", "ntu", "--input", str(raw), "--out", str(out), "--dtype", "float32",
                              "--quiet"))
    return out, secs


@pytest.mark.parametrize("seed", SEEDS)
def test_prepare_killed_anywhere_resumes_to_the_same_store(raw: Path, reference_store, tmp_path: Path, seed: int):
    ref, secs = reference_store
    out = tmp_path / "store"
    cmd = mtscale_cmd("prepare", "--format", "ntu", "--input", str(raw), "--out", str(out), "--dtype", "float32", "--quiet",
                      "--workers", str(1 + seed % 2))
    _kill_at(cmd, _moment(seed, secs))
    if not out.exists():  # the store appears only complete (renamed from .partial), so: resume it
        run_ok(cmd)
    _same_store(ref, out)


def test_full_disk_then_room_resumes_to_the_same_store(raw: Path, reference_store, tmp_path: Path):
    """A full disk is one line (exit 2); after room is made the same command finishes the store."""
    ref, _ = reference_store
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        cmd = mtscale_cmd("prepare", "--format", "ntu", "--input", str(raw), "--out", str(mnt / "store"), "--dtype",
                          "float32", "--quiet")
        p = subprocess.run(cmd, env=cpu_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and "No space left on device" in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert not (mnt / "store").exists()  # nothing half-visible
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        run_ok(cmd)
        _same_store(ref, mnt / "store")
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def _pretrain_cmd(store: Path, run_dir: Path) -> list[str]:
    sets = {"data.store": store, "run.dir": run_dir, "train.max_steps": 12, "train.ckpt_every": 2,
            "train.keep_checkpoints": 2, "train.log_every": 1, "run.progress": "false", "run.tensorboard": "false",
            "data.num_workers": 1, "train.precision": "fp32"}  # fp32: two separate starts must not measure apart
    return mtscale_cmd("pretrain", "--config", str(ROOT / "configs" / "pretrain" / "tiny_cpu.yaml"),
                       *sum((["--set", f"{k}={v}"] for k, v in sets.items()), []))


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def reference_pretrain(reference_store, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("ref_pretrain") / "run"
    run_ok(_pretrain_cmd(reference_store[0], run_dir))
    return run_dir


@pytest.mark.parametrize("phase", PHASES)
def test_pretrain_killed_anywhere_resumes_to_the_same_curve(reference_store, reference_pretrain, tmp_path: Path,
                                                            phase: str):
    ref = reference_pretrain
    run_dir = tmp_path / "run"
    cmd = _pretrain_cmd(reference_store[0], run_dir)
    _kill_in_phase(cmd, run_dir, phase, n_rows=12)
    run_ok(cmd)
    got, want = _losses(run_dir), _losses(ref)
    assert sorted(got) == sorted(want) == list(range(1, 13))
    for s in want:
        assert got[s] == pytest.approx(want[s], rel=1e-5, abs=1e-7), (s, got[s], want[s])
    from mtscale.train.checkpoint import load_encoder

    a, _ = load_encoder(ref / "encoder.safetensors")
    b, _ = load_encoder(run_dir / "encoder.safetensors")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        np.testing.assert_allclose(vb.numpy(), va.numpy(), rtol=1e-5, atol=1e-6, err_msg=k)


def _finetune_cmd(store: Path, run_dir: Path) -> list[str]:
    sets = ["protocol=scratch", "epochs=3", "warmup_epochs=0.5", "train.batch_size=16",
            "train.precision=fp32", "run.progress=false",  # fp32: reference and killed run must not measure apart
            "run.tensorboard=false", f"data.store={store}", f"run.dir={run_dir}"]
    return mtscale_cmd("finetune", "--config", str(ROOT / "configs" / "finetune" / "tiny_cpu.yaml"),
                       *sum((["--set", s] for s in sets), []))


@pytest.fixture(scope="module")
def reference_finetune(reference_store, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("ref_finetune") / "run"
    run_ok(_finetune_cmd(reference_store[0], run_dir))
    return run_dir


@pytest.mark.parametrize("phase", PHASES)
def test_finetune_killed_anywhere_resumes_to_the_same_model(reference_store, reference_finetune, tmp_path: Path,
                                                            phase: str):
    from safetensors.torch import load_file

    ref = reference_finetune
    run_dir = tmp_path / "run"
    cmd = _finetune_cmd(reference_store[0], run_dir)
    _kill_in_phase(cmd, run_dir, phase, n_rows=3)
    run_ok(cmd)
    a, b = (json.loads((d / "results.json").read_text()) for d in (ref, run_dir))
    assert b["test_top1"] == pytest.approx(a["test_top1"], abs=1e-6)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]  # one row per epoch: none missing, none doubled
    for ra, rb in zip(ref_rows, rows):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-5, abs=1e-7)
    wa, wb = (load_file(str(d / "final" / "model.safetensors")) for d in (ref, run_dir))
    for k in wa:
        np.testing.assert_allclose(wb[k].numpy(), wa[k].numpy(), rtol=1e-5, atol=1e-6, err_msg=k)


def test_truncated_artefacts_are_named_not_used(reference_store, reference_finetune, tmp_path: Path):
    """A truncated classifier file is one line naming it (never a crash, never a silent score)."""
    ref = reference_finetune
    bad = tmp_path / "final"
    shutil.copytree(ref / "final", bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:64])
    p = subprocess.run(mtscale_cmd("evaluate", "--checkpoint", str(bad), "--store", str(reference_store[0])),
                       env=cpu_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "model.safetensors" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
