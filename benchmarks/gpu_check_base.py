"""Shared pieces of ``benchmarks/gpu_check.py``: the plan of a run (the GPU check or its CPU dry
run), the context the checks share (work directory, synthetic store, subprocess runner,
measured values) and what a check raises. Makes no CUDA call at import.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PRETRAIN_CONFIG = ROOT / "configs" / "pretrain" / "small.yaml"
FINETUNE_CONFIG = ROOT / "configs" / "finetune" / "tiny_cpu.yaml"


class Skip(Exception):
    """The check cannot run on this machine; the message says why."""


class CheckError(Exception):
    """An expectation of a check did not hold; the message is the one-line reason."""


def expect(ok: bool, msg: str) -> None:
    if not ok:
        raise CheckError(msg)


@dataclass
class Plan:
    """The sizes of one run: the GPU check, or its CI-sized dry run on the CPU."""

    dry: bool
    device: str  # cuda:0 | cpu
    precision: str  # bf16 | fp16 | fp32: mtscale's own choice for the device (resolve_precision "auto")
    nproc: int  # ranks of the launcher runs
    clip_frames: int
    pretrain_sets: dict[str, Any]  # overrides of small.yaml beyond store / run dir / steps
    steps: int  # pre-training steps, then resumed to steps + more_steps
    more_steps: int
    num_samples: int  # synthetic store
    workers: int  # loader processes
    sizes: list[str]  # throughput
    flop_budget: float  # model FLOPs per throughput step (sets the batch)
    bench_steps: int
    timeout_s: float = 600.0  # per subprocess

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @classmethod
    def make(cls, dry: bool, quick: bool) -> Plan:
        import torch

        from mtscale.train.engine import resolve_precision

        if not dry:
            if not torch.cuda.is_available():
                raise SystemExit("gpu_check: no CUDA device visible; use --dry-run for the CPU form")
            return cls(False, "cuda:0", resolve_precision("auto", "cuda"), 1, 120,
                       {"train.batch_size": 64, "train.warmup_steps": 5, "data.num_workers": 2},
                       steps=40, more_steps=10, num_samples=256, workers=2,
                       sizes=["small"] if quick else ["small", "base", "large"], flop_budget=2e13, bench_steps=5)
        return cls(True, "cpu", resolve_precision("auto", "cpu"), 2, 16,  # fp32 unless bf16 GEMMs are fast
                   {"model.size": "tiny", "data.clip_frames": 16, "objective.decoder_dim": 64,
                    "objective.decoder_depth": 1, "objective.decoder_heads": 4, "train.batch_size": 16,
                    "train.warmup_steps": 2, "data.num_workers": 0, "data.shuffle_buffer": 256},
                   steps=10, more_steps=3, num_samples=64, workers=0, sizes=["tiny"], flop_budget=2e9,
                   bench_steps=1, timeout_s=400.0)


@dataclass
class Ctx:
    """What the checks share: the plan, a work directory, measured values, and lazily built
    inputs (a failure to build one fails only the checks that need it)."""

    plan: Plan
    work: Path
    values: dict[str, Any] = field(default_factory=dict)
    _store: str | None = None
    cpu_adam: subprocess.Popen | None = None
    gemm_flops: float | None = None

    @property
    def device(self):
        import torch

        return torch.device(self.plan.device)

    @property
    def dtype(self):
        from mtscale.train.engine import DTYPES

        return DTYPES[self.plan.precision]

    def store(self) -> str:
        """The synthetic store (synth + prepare), made on first use (a complete one left in
        ``--workdir`` by an earlier run of the same plan is reused)."""
        if self._store is None:
            from mtscale.data.prepare import prepare
            from mtscale.data.preprocess import PrepareOptions
            from mtscale.data.store import Store
            from mtscale.data.synthetic import synthesize

            raw, out = self.work / "raw", self.work / "store"
            try:
                if len(Store.open(str(out)).labels) == self.plan.num_samples:
                    self._store = str(out)
                    return self._store
            except Exception:
                pass
            for d in (raw, out):
                shutil.rmtree(d, ignore_errors=True)
            synthesize(str(raw), num_samples=self.plan.num_samples, num_classes=4, seed=3, progress=False)
            prepare("ntu", str(raw), str(out), PrepareOptions(), progress=False)
            self._store = str(out)
        return self._store

    def fresh_dir(self, name: str) -> Path:
        """``<work>/<name>``, emptied (a run dir left by an earlier run would be resumed)."""
        d = self.work / name
        shutil.rmtree(d, ignore_errors=True)
        return d

    def env(self) -> dict[str, str]:
        """Environment of every subprocess: this checkout first on the path, no launcher leftovers."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env.update(PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if not self.plan.cuda:
            env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        return env

    def run(self, name: str, cmd: list[Any], timeout: float | None = None) -> tuple[str, str]:
        """Run ``cmd`` in its own process group (killed whole on timeout); stdout and stderr are
        kept in ``<work>/logs/<name>.out|.err`` and returned. A non-zero exit raises with the
        last error line of the output."""
        logs = self.work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        limit = timeout or self.plan.timeout_s
        with open(logs / f"{name}.out", "w") as fo, open(logs / f"{name}.err", "w") as fe:
            p = subprocess.Popen([str(c) for c in cmd], env=self.env(), cwd=ROOT, stdout=fo, stderr=fe,
                                 start_new_session=True)
            try:
                rc = p.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                raise CheckError(f"{name}: timed out after {limit:.0f} s (logs {logs}/{name}.*)") from None
        out, err = ((logs / f"{name}.{x}").read_text(errors="replace") for x in ("out", "err"))
        if rc != 0:
            raise CheckError(f"{name}: exit {rc}: {last_error_line(out + err)} (logs {logs}/{name}.*)")
        return out, err

    def launcher(self, script: Path, *args: Any) -> list[str]:
        from mtscale.dist import free_port

        return [str(BIN / "deepspeed"), "--num_gpus", str(self.plan.nproc), "--master_port", str(free_port()),
                str(script), *[str(a) for a in args]]


def last_error_line(out: str) -> str:
    """The most telling line of a failed process's output: its last error line, else its last line."""
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"(Error|error:|Exception|FAILED|Traceback)", ln) and not ln.startswith("Traceback"):
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def set_args(sets: dict[str, Any]) -> list[str]:
    return [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]


def metrics_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    expect(path.is_file(), f"{path}: missing")
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
