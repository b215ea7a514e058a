"""What the tests that run mtscale in subprocesses share (``tests/`` is on pytest's
``pythonpath``: ``from support import ...``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_env(threads: int = 1, **extra: str) -> dict[str, str]:
    """A subprocess's environment on the CPU: DeepSpeed's CPU accelerator, ``threads`` OpenMP
    threads, unbuffered output (logs read while it runs), this checkout first on the import path."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def mtscale_cmd(*args: object) -> list[str]:
    """``python -m mtscale.cli ARGS`` as a command list (items made strings)."""
    return [sys.executable, "-m", "mtscale.cli", *map(str, args)]


def run_ok(cmd: list, *, timeout: float = 600, cwd: Path = ROOT, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess:
    """Run ``cmd`` (items made strings) and assert exit 0, with the command and its output's tails."""
    cmd = [str(c) for c in cmd]
    p = subprocess.run(cmd, env=env or cpu_env(), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)}\nexit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


def cli(*args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m mtscale.cli ARGS`` from the repository root, any exit status (the caller checks)."""
    return subprocess.run(mtscale_cmd(*args), env=cpu_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
