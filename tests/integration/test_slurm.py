"""The SLURM templates in cluster/slurm/, submitted with ``sbatch`` to a real SLURM (the one-node
cluster of cluster/local/start-slurm.sh) in CPU mode: the jobs run the real CLI, launcher and Ray.

- pretrain.sbatch: 2 srun tasks (gloo); USR1 (what ``--signal=B:USR1@300`` sends before the time
  limit) makes the job checkpoint, requeue itself and resume from that checkpoint;
- prepare.sbatch: an array job of 3 parts + the dependent merge job the script submits itself;
- tune.sbatch: a Ray head started by srun on job-derived ports, ``mtscale tune --address`` on it.

Skipped with a reason where SLURM is not installed / not running, unless MTSCALE_REQUIRE_SLURM=1
(CI), where that is a failure. Every job submitted is cancelled at teardown, pass or fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import mtscale_cmd, run_ok

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SLURM_DIR = ROOT / "cluster" / "slurm"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}
# CPU mode: no GPUs requested, 2 tasks x 1 CPU (the local cluster has 2 CPUs, oversubscribable).
CPU_OPTS = ["--gpus-per-node=0", "--nodes=1", "--cpus-per-task=1", "--time=20", "--mem=0"]


def _slurm_problem() -> str | None:
    for tool in ("sbatch", "squeue", "scontrol", "scancel", "sinfo"):
        if shutil.which(tool) is None:
            return f"{tool} not found (SLURM not installed; see cluster/local/start-slurm.sh)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out (slurmctld not responding)"
    if out.returncode != 0 or not re.search(r"^(idle|mixed|allocated)", out.stdout, re.M):
        return f"no SLURM node up (sinfo: {(out.stdout + out.stderr).strip()[:200]!r})"
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm() -> None:
    problem = _slurm_problem()
    if problem:
        if os.environ.get("MTSCALE_REQUIRE_SLURM") == "1":
            pytest.fail(problem + " but MTSCALE_REQUIRE_SLURM=1")
        pytest.skip(problem)


def _job_env(**extra: str) -> dict[str, str]:
    """The environment sbatch exports to the job: this test's Python, CPU mode, no launcher vars."""
    bindir = Path(sys.executable).parent
    setup = f"source {bindir / 'activate'}" if (bindir / "activate").is_file() else f"export PATH={bindir}:$PATH"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "RAY_", "PYTEST_"))}
    env.update(MTSCALE_ENV_SETUP=setup, MTSCALE_DEVICE="cpu", RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


class Jobs:
    """Submits jobs, tracks them, and cancels every one at teardown."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def submit(self, script: str, *script_args: str, opts: list[str], env: dict[str, str], cwd: Path) -> str:
        cmd = ["sbatch", "--parsable", "--export=ALL", *opts, str(SLURM_DIR / script), *script_args]
        p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, f"sbatch failed: {p.stderr}"
        job_id = p.stdout.strip().split(";")[0]
        self.ids.append(job_id)
        return job_id

    def cancel_all(self) -> None:
        if self.ids:
            subprocess.run(["scancel", *self.ids], capture_output=True, timeout=60)


@pytest.fixture
def jobs():
    j = Jobs()
    try:
        yield j
    finally:
        j.cancel_all()


def job_info(job_id: str) -> dict[str, str]:
    """``scontrol show job -o`` as a dict (empty when SLURM no longer knows the job)."""
    p = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        return {}
    return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", p.stdout.splitlines()[0]))


def wait_for(what: str, predicate, timeout: float, log: Path | None = None, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = log.read_text()[-4000:] if log is not None and log.is_file() else "(no log)"
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; log tail:\n{tail}")
        time.sleep(every)


def wait_done(job_id: str, timeout: float, log: Path | None = None) -> dict[str, str]:
    """Wait for the job to reach a terminal state. SLURM holds a requeued job ~2 min (Reason
    BeginTime) while the old job credential expires; after a few seconds the hold is lifted with
    ``scontrol update StartTime=now`` (earlier, slurmd refuses the job: "credential revoked")."""
    pending_since: list[float] = []

    def done():
        info = job_info(job_id)
        if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            pending_since.append(time.monotonic())
            if pending_since[-1] - pending_since[0] > 5:
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True,
                               timeout=30)
        return info if info.get("JobState") in TERMINAL else None
    return wait_for(f"job {job_id} to end", done, timeout, log)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_ok(mtscale_cmd(*args), cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def raw_and_store(tmp_path_factory) -> tuple[Path, Path]:
    """24 synthetic NTU-format recordings (3 classes) and the (float32) store prepared from them."""
    root = tmp_path_factory.mktemp("slurm_data")
    run_cli("synth", "--out", str(root / "raw"), "--num-samples", "24", "--num-classes", "3", "--seed", "0",
            "--quiet", cwd=root)
    run_cli("prepare", "--format", "ntu", "--input", str(root / "raw"), "--out", str(root / "store"), "--quiet",
            "--dtype", "float32", cwd=root)
    return root / "raw", root / "store"


# --------------------------------------------------------------------------- pretrain.sbatch

def test_pretrain_checkpoints_on_usr1_requeues_itself_and_resumes(jobs: Jobs, raw_and_store, tmp_path: Path):
    _, store = raw_and_store
    run_dir, log = tmp_path / "run", tmp_path / "pretrain.log"
    max_steps = 60
    env = _job_env(MTSCALE_STORE=str(store), MTSCALE_RUN_DIR=str(run_dir))
    # The config as the configs' headers document it: `sbatch cluster/slurm/pretrain.sbatch CONFIG.yaml [--set ...]`
    job = jobs.submit("pretrain.sbatch", str(ROOT / "configs" / "pretrain" / "tiny_cpu.yaml"),
                      "--set", f"train.max_steps={max_steps}", "--set", "train.ckpt_every=10",
                      "--set", "train.keep_checkpoints=2", "--set", "run.progress=false",
                      "--set", "run.tensorboard=false",
                      opts=CPU_OPTS + ["--ntasks-per-node=2", f"--output={log}", "--job-name=mt-pretrain-test"],
                      env=env, cwd=tmp_path)
    # Once the first periodic checkpoint exists, send what --signal=B:USR1@300 sends at the
    # time limit: USR1 to the batch shell only.
    wait_for("the first checkpoint", lambda: (run_dir / "checkpoints" / "latest").is_file(), 300, log, every=0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    info = wait_done(job, 360, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", f"{info}\n{text[-4000:]}"
    assert info["Restarts"] == "1", text[-4000:]
    # First run: signal forwarded, checkpoint at a step boundary, self-requeue.
    assert "got SIGUSR1" in text and f"requeueing job {job} (restart 1)" in text
    m = re.search(r"signal 10: checkpointed at step (\d+), stopping", text)
    assert m, text[-4000:]
    k = int(m.group(1))
    assert 10 <= k < max_steps
    # Second run (same job id, appended log): resumed from step k instead of starting over.
    assert "(restart 1)" in text and f"resuming at step {k} of {max_steps}" in text
    assert text.count("rank 0 of 2 (2 per node)") == 2
    assert "SRUN_CPUS_PER_TASK=1" in text  # srun >= 22.05 does not inherit --cpus-per-task by itself
    port = 15000 + int(job) % 20000
    assert f"master {job_info(job)['BatchHost']}:{port}" in text or f":{port}" in text
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, max_steps + 1))  # one continuous curve
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == max_steps and status["world_size"] == 2
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step{max_steps:08d}"
    assert (run_dir / "encoder.safetensors").stat().st_size > 0


# --------------------------------------------------------------------------- prepare.sbatch

def _info(store: Path) -> dict:
    return json.loads(run_cli("info", "--json", str(store), cwd=store.parent).stdout)


def test_prepare_array_job_then_dependent_merge_equals_one_shot_prepare(jobs: Jobs, raw_and_store, tmp_path: Path):
    raw, one_shot = raw_and_store
    out = tmp_path / "joined"
    env = _job_env(MTSCALE_INPUT=str(raw), MTSCALE_OUT=str(out), MTSCALE_NUM_PARTS="3",
                   MTSCALE_SBATCH_ARGS="--cpus-per-task=1 --time=10 --job-name=mt-prepare-test")
    # `bash prepare.sbatch` submits the array and the afterok merge job itself.
    p = subprocess.run(["bash", str(SLURM_DIR / "prepare.sbatch"), "--dtype", "float32"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"submitted array job (\d+) \(3 parts\) and merge job (\d+) \(afterok:(\d+)\)", p.stdout)
    assert p.returncode == 0 and m, p.stdout + p.stderr
    array_id, merge_id = m.group(1), m.group(2)
    jobs.ids += [array_id, merge_id]
    assert m.group(3) == array_id
    assert job_info(merge_id).get("Dependency", "").startswith(f"afterok:{array_id}")
    info = wait_done(merge_id, 240)
    logs = "\n".join(f.read_text() for f in sorted(tmp_path.glob("*.out")))
    assert info["JobState"] == "COMPLETED", f"{info}\n{logs[-4000:]}"
    # Three parts, slices 0..2 of 3, each made by its own array task.
    parts = sorted((tmp_path / "joined.parts").iterdir())
    assert [q.name for q in parts] == ["part-00000", "part-00001", "part-00002"]
    part_infos = [_info(q) for q in parts]
    assert [(i["ingest"]["part_index"], i["ingest"]["num_parts"]) for i in part_infos] == [(0, 3), (1, 3), (2, 3)]
    assert all(i["num_samples"] > 0 and i["dtype"] == "float32" for i in part_infos)  # script args reached prepare
    for k in range(3):
        assert f"part {k} of 3" in logs
    # The joined store: counts are the sums of the parts, it verifies, and it holds exactly the
    # samples of a one-shot prepare of the same files, with the same checksums.
    joined = _info(out)
    assert joined["num_samples"] == sum(i["num_samples"] for i in part_infos) == 24
    assert joined["num_frames"] == sum(i["num_frames"] for i in part_infos) == _info(one_shot)["num_frames"]
    assert "ok" in run_cli("verify", "--quiet", str(out), cwd=tmp_path).stdout
    import pyarrow.parquet as pq

    def checksums(store: Path) -> dict[str, str]:
        (manifest,) = [f for f in store.rglob("*.parquet")]
        t = pq.read_table(manifest, columns=["sample_id", "checksum"]).to_pydict()
        return dict(zip(t["sample_id"], t["checksum"]))

    assert checksums(out) == checksums(one_shot)
    assert "merge: joining 3 parts" in logs and f"{out}: ok" in logs


# --------------------------------------------------------------------------- tune.sbatch

@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    """A seeded, randomly initialised tiny encoder in the real exported format."""
    import torch

    from mtscale.config import ModelConfig, from_dict
    from mtscale.models.encoder import MotionTransformer
    from mtscale.train.checkpoint import encoder_meta, save_encoder

    model = {"size": "tiny", "tokenization": "frame", "dim": 32, "depth": 1, "heads": 2}
    torch.manual_seed(0)
    enc = MotionTransformer.from_config(from_dict(ModelConfig, model), clip_frames=16, num_bodies=2, num_joints=25)
    path = tmp_path_factory.mktemp("slurm_encoder") / "encoder.safetensors"
    meta = encoder_meta({"model": model, "data": {"clip_frames": 16, "num_bodies": 2}}, num_joints=25,
                        layout="ntu25", step=0)
    save_encoder(enc.state_dict(), meta, path)
    return path


def test_tune_runs_sweep_on_job_ray_and_resumes_it_after_usr1_requeue(jobs: Jobs, raw_and_store, encoder,
                                                                       tmp_path: Path):
    import pandas as pd
    import yaml

    _, store = raw_and_store
    log, results = tmp_path / "tune.log", tmp_path / "results"
    exp = results / "slurm"
    env = _job_env(MTSCALE_TUNE_CONFIG=str(ROOT / "configs" / "tune" / "tiny_cpu.yaml"))
    epochs = 4
    args = ["--set", f"overrides.data.store={store}", "--set", f"pretrained={encoder}",
            "--set", f"storage_path={results}", "--set", "name=slurm", "--set", "num_samples=1",
            "--set", f"overrides.epochs={epochs}", "--set", "overrides.val_fraction=0.25", "--set", "plots=false",
            "--set", "overrides.train.batch_size=4", "--set", "max_failures=0", "--set", "scheduler.kind=fifo"]
    job = jobs.submit("tune.sbatch", *args, opts=CPU_OPTS + ["--ntasks-per-node=1", "--cpus-per-task=2",
                      f"--output={log}", "--job-name=mt-tune-test"], env=env, cwd=tmp_path)
    # Once the sweep has saved its state, send what --signal=B:USR1@180 sends before the limit.
    wait_for("the sweep's first trial result", lambda: list(exp.glob("*/result.json")) and
             any(f.stat().st_size for f in exp.glob("*/result.json")), 300, log, every=0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    info = wait_done(job, 360, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", f"{info}\n{text[-5000:]}"
    assert info["Restarts"] == "1", text[-5000:]
    # Ray: one node (this one), ports from the job id, token auth, stopped (no processes, no
    # temp dir) after each run.
    base = 20000 + (int(job) % 60) * 200
    heads = re.findall(r"ray: head \S+ \((\S+):(\d+)\), 1 node\(s\), ports (\d+)-(\d+), 2 CPUs \+ 0 GPUs per node, "
                       r"auth token, tmp (\S+)", text)
    assert len(heads) == 2, text[-5000:]
    for _, port, lo, hi, tmp in heads:
        assert port == lo and int(hi) == int(lo) + 199 and (int(lo) - 20000) % 200 == 0
        assert int(lo) == base or "busy" in text
        assert not Path(tmp).exists()
        leftover = subprocess.run(["pgrep", "-f", tmp], capture_output=True, text=True).stdout.split()
        assert not leftover, f"Ray processes of job {job} still running: {leftover}"
    assert text.count("ray: 1/1 nodes up") == 2 and text.count("ray: stopping") == 2
    assert text.count("ray: 1/1 nodes up, worker processes at nice 0:") == 2  # not Ray's default 15
    # First run: USR1 -> sweep stopped, requeued. Second run: the sweep resumed, not restarted.
    assert "got SIGUSR1: stopping the sweep" in text and f"requeueing job {job} (restart 1)" in text
    assert "exists: resuming it (restart 1)" in text
    trials = pd.read_parquet(exp / "trials.parquet")
    per_epoch = pd.read_parquet(exp / "epochs.parquet")
    assert len(trials) == 2 and (trials["status"] == "TERMINATED").all(), trials
    assert sorted(trials["config/layer_decay"]) == [0.65, 0.85] and (trials["epochs"] == epochs).all()
    for _, g in per_epoch.groupby("trial_id"):
        # Every epoch ran. Tune resumes a trial from the last checkpoint in the experiment state
        # saved at the stop, so an epoch reported after that snapshot runs again (at least once,
        # at most one repeat per trial), never from scratch.
        seen = g["epoch"].tolist()
        assert sorted(set(seen)) == list(range(epochs)), seen
        assert len(seen) - len(set(seen)) <= 1, seen
    best = yaml.safe_load((exp / "best_config.yaml").read_text())
    assert best["pretrained"] == str(encoder) and best["data"]["store"] == str(store)
    assert best["layer_decay"] in (0.65, 0.85) and best["epochs"] == epochs
