"""The run-time set-up of a training or evaluation process: its place in the world (from the
launcher's environment), its device and precision, rank-aware logging, and a process group
only when there is more than one rank (a one-process run -- e.g. a Ray Tune trial -- needs no
port at all). Pre-training builds the same pieces through DeepSpeed (``mtscale.dist``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mtscale.dist import World, init_distributed, select_device
from mtscale.train.engine import resolve_precision

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    world: World
    device: torch.device
    precision: str  # fp32 | bf16 | fp16

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)


def setup_runtime(device: str = "auto", precision: str = "auto", run_dir: Path | None = None) -> Runtime:
    """World from the environment (deepspeed / torchrun / SLURM / none), the device, a gloo
    (CPU) or nccl (CUDA) process group when world size > 1, and the precision (``run_precision``)."""
    world = World.from_env()
    dev = select_device(world, device)
    if world.world_size > 1 and not dist.is_initialized():
        init_distributed(world, dev, with_deepspeed=False)
    return Runtime(world, dev, run_precision(precision, dev, run_dir))


def run_precision(requested: str, device: torch.device, run_dir: Path | None = None) -> str:
    """The precision of this run, the same on every rank and for the whole run.

    An explicit precision is used as given (``resolve_precision`` checks it). ``auto`` on a CPU
    is a timing measurement, so near its threshold two processes can decide differently: ranks
    agree on fp32 if any of them measured bf16 slow, and a resumed run (``run_dir`` recorded it
    in its mark, ``rundir.run_facts``) keeps the precision it started with."""
    from mtscale.dist import all_reduce_flag
    from mtscale.train.rundir import run_facts

    if requested != "auto":
        return resolve_precision(requested, device.type)
    facts = run_facts(run_dir) if run_dir is not None else {}
    if facts.get("precision") and facts.get("device_type") == device.type:
        log.info("precision auto -> %s (as this run started: %s)", facts["precision"], run_dir)
        return str(facts["precision"])
    chosen = resolve_precision("auto", device.type)
    if all_reduce_flag(chosen == "fp32", device) and chosen != "fp32":
        log.info("precision auto -> fp32 (another rank measured bf16 slower than needed)")
        chosen = "fp32"
    return chosen


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (just ``[obj]`` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out



def setup_logging(world: World, level: int = logging.INFO) -> None:
    """Rank-prefixed log lines on stderr; INFO on rank 0, WARNING elsewhere."""
    fmt = f"%(asctime)s [rank {world.rank}] %(levelname)s %(name)s: %(message)s"
    root = logging.getLogger("mtscale")
    for h in list(root.handlers):
        if getattr(h, "_mtscale", False):
            root.removeHandler(h)
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
    h._mtscale = True  # type: ignore[attr-defined]
    root.addHandler(h)
    root.setLevel(level if world.is_main else max(level, logging.WARNING))
    root.propagate = False


