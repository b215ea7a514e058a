"""Who am I in the job: a small explicit ``World`` read from the launcher's environment, and
the ``torch.distributed`` init that goes with it (gloo on CPU, nccl on CUDA).

Launchers understood, in this order:

- ``deepspeed`` (RANK, LOCAL_RANK, WORLD_SIZE, CROSS_RANK, CROSS_SIZE, LOCAL_SIZE, MASTER_*),
- ``torchrun`` (RANK, LOCAL_RANK, WORLD_SIZE, GROUP_RANK, GROUP_WORLD_SIZE, LOCAL_WORLD_SIZE),
- plain ``srun`` (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_NODEID, SLURM_JOB_NODELIST,
  SLURM_JOB_ID: the master is the first host of the node list, the port derived from the job id),
- none of them: one process.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from mtscale.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class World:
    """This process's place in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    launcher: str = "none"
    """deepspeed | torchrun | env | slurm | none."""

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"RANK: found {self.rank}, expected 0 <= RANK < WORLD_SIZE={self.world_size}")
        if not 0 <= self.node_rank < self.num_nodes:
            raise ConfigError(f"node rank: found {self.node_rank}, expected < number of nodes {self.num_nodes}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, use_scontrol: bool = True) -> World:
        """Read the world from ``env`` (default ``os.environ``); see the module docstring."""
        env = os.environ if env is None else env
        if "RANK" in env and "WORLD_SIZE" in env:
            return _from_torch_env(env)
        if "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
            return _from_slurm_env(env, use_scontrol=use_scontrol)
        return cls(master_port=_int(env, "MASTER_PORT", DEFAULT_PORT), launcher="none")

    def to_env(self) -> dict[str, str]:
        """The torch.distributed / DeepSpeed variables that describe this world."""
        return {
            "RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank), "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size), "LOCAL_SIZE": str(self.local_world_size),
            "CROSS_RANK": str(self.node_rank), "CROSS_SIZE": str(self.num_nodes),
            "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port),
        }


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        if default is None:
            raise ConfigError(f"environment {key}: missing, expected an integer")
        return default
    m = re.match(r"^\s*(\d+)", raw)  # SLURM writes e.g. "2(x3)"
    if not m:
        raise ConfigError(f"environment {key}: found {raw!r}, expected an integer")
    return int(m.group(1))


def _from_torch_env(env: Mapping[str, str]) -> World:
    world_size = _int(env, "WORLD_SIZE")
    if "CROSS_RANK" in env or "CROSS_SIZE" in env:
        launcher, node_rank, num_nodes = "deepspeed", _int(env, "CROSS_RANK", 0), _int(env, "CROSS_SIZE", 1)
        local_ws = _int(env, "LOCAL_SIZE", _int(env, "LOCAL_WORLD_SIZE", world_size // max(num_nodes, 1)))
    elif "GROUP_RANK" in env or "TORCHELASTIC_RUN_ID" in env:
        launcher = "torchrun"
        local_ws = _int(env, "LOCAL_WORLD_SIZE", world_size)
        node_rank = _int(env, "GROUP_RANK", 0)
        num_nodes = _int(env, "GROUP_WORLD_SIZE", max(world_size // max(local_ws, 1), 1))
    else:
        launcher = "env"
        local_ws = _int(env, "LOCAL_WORLD_SIZE", world_size)
        num_nodes = max(world_size // max(local_ws, 1), 1)
        node_rank = _int(env, "RANK") // max(local_ws, 1)
    return World(
        rank=_int(env, "RANK"), local_rank=_int(env, "LOCAL_RANK", 0), world_size=world_size,
        local_world_size=local_ws, node_rank=node_rank, num_nodes=num_nodes,
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=_int(env, "MASTER_PORT", DEFAULT_PORT),
        launcher=launcher,
    )


def _from_slurm_env(env: Mapping[str, str], *, use_scontrol: bool) -> World:
    # Inside ``srun`` the step's task count is the world; SLURM_NTASKS is the allocation's.
    world_size = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 1))
    num_nodes = _int(env, "SLURM_STEP_NUM_NODES", _int(env, "SLURM_JOB_NUM_NODES", _int(env, "SLURM_NNODES", 1)))
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    local_ws = _int({"x": per_node}, "x") if per_node else max(world_size // max(num_nodes, 1), 1)
    if "MASTER_ADDR" in env:
        addr = env["MASTER_ADDR"]
    else:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = first_host(nodelist, use_scontrol=use_scontrol) if nodelist else "127.0.0.1"
    port = _int(env, "MASTER_PORT", port_from_job_id(env.get("SLURM_JOB_ID")))
    return World(
        rank=_int(env, "SLURM_PROCID"), local_rank=_int(env, "SLURM_LOCALID", 0), world_size=world_size,
        local_world_size=local_ws, node_rank=_int(env, "SLURM_NODEID", 0), num_nodes=num_nodes,
        master_addr=addr, master_port=port, launcher="slurm",
    )


def port_from_job_id(job_id: str | None) -> int:
    """A master port in [15000, 35000) derived from the SLURM job id, so that jobs sharing a
    node do not collide (and every task of one job agrees without talking)."""
    if not job_id:
        return DEFAULT_PORT
    digits = re.sub(r"\D", "", str(job_id))
    return 15000 + int(digits or 0) % 20000


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list: ``"gpu[01-03,7],login-a"`` -> gpu01 gpu02 gpu03
    gpu7 login-a; several bracket groups in one name give their product."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_one(item))
    return hosts


def _split_top_level(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"SLURM node list {s!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise ConfigError(f"SLURM node list {s!r}: unbalanced '['")
    parts.append(cur)
    return [p for p in parts if p]


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if not m:
        return [item]
    head, tail = item[: m.start()], item[m.end():]
    out = []
    for rng in m.group(1).split(","):
        if "-" in rng:
            lo, hi = rng.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ConfigError(f"SLURM node list {item!r}: bad range {rng!r}, expected e.g. 01-04")
            out += [f"{head}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
        else:
            out.append(head + rng)
    return [h + t for h in out for t in _expand_one(tail)] if "[" in tail else [h + tail for h in out]


def first_host(nodelist: str, *, use_scontrol: bool = True) -> str:
    """First host of a SLURM node list: ``scontrol show hostnames`` where available, else our parser."""
    if use_scontrol and shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError) as e:  # fall back to the parser
            log.warning("scontrol show hostnames %s failed (%s); parsing the node list", nodelist, e)
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise ConfigError(f"SLURM node list {nodelist!r}: empty, expected at least one host")
    return hosts[0]


def free_port() -> int:
    """An unused local TCP port (for one-process runs, so parallel runs do not collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_index(local_rank: int, local_world_size: int, device_count: int) -> int:
    """The one rule for which visible GPU a process uses (select_device, and the LOCAL_RANK that
    DeepSpeed is given, which it passes to ``set_device``):

    - one GPU visible (sites that bind one GPU per task, e.g. ``srun --gpus-per-task=1`` or
      ``--gpu-bind``): GPU 0, whatever the local rank;
    - at least as many GPUs visible as local ranks: GPU ``local_rank``;
    - anything else (e.g. 8 ranks on a node showing 4 GPUs): an error, not two ranks on one GPU.
    """
    if device_count < 1:
        raise ConfigError("CUDA: no device visible, expected at least one (or train.device=cpu)")
    if device_count == 1:
        return 0
    if local_rank < device_count and local_world_size <= device_count:
        return local_rank
    raise ConfigError(f"LOCAL_RANK: found local rank {local_rank} of {local_world_size} on a node showing "
                      f"{device_count} GPUs; expected one GPU per task or at least {local_world_size} GPUs visible")


def select_device(world: World, requested: str = "auto") -> torch.device:  # noqa: F821
    """cuda:``device_index(...)`` when CUDA is available (or requested), else cpu."""
    import torch

    if requested not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device: found {requested!r}, expected auto|cpu|cuda")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: found 'cuda', but no CUDA device is visible")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    idx = device_index(world.local_rank, world.local_world_size, torch.cuda.device_count())
    torch.cuda.set_device(idx)
    return torch.device("cuda", idx)


def deepspeed_env(world: World, device: torch.device) -> dict[str, str]:  # noqa: F821
    """The environment DeepSpeed reads: ``world.to_env()`` with LOCAL_RANK set to the index of
    the GPU this process uses (DeepSpeed calls ``set_device(LOCAL_RANK)``), so both agree."""
    env = world.to_env()
    if device.type == "cuda":
        env["LOCAL_RANK"] = str(device.index)
    return env


def init_distributed(world: World, device: torch.device, timeout_s: float = 1800.0,  # noqa: F821
                     with_deepspeed: bool = True) -> str:
    """The one process-group set-up of mtscale: torch.distributed (gloo on CPU, nccl on CUDA;
    also for one process when ``with_deepspeed``: DeepSpeed needs a group) and, with
    ``with_deepspeed``, DeepSpeed's comm layer on top of it. Returns the backend name."""
    import torch.distributed as dist

    if world.world_size == 1 and world.launcher == "none":
        world = World(master_port=free_port(), launcher="none")
    os.environ.update(deepspeed_env(world, device))  # DeepSpeed reads these
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, init_method=f"tcp://{world.master_addr}:{world.master_port}",
            rank=world.rank, world_size=world.world_size, timeout=timedelta(seconds=timeout_s),
        )
    if not with_deepspeed:
        log.info("rank %d/%d via %s: %s on %s", world.rank, world.world_size, world.launcher, backend, device)
        return backend
    import deepspeed

    if device.type == "cpu":
        _skip_cpu_shm_comm_build()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    log.info("rank %d/%d (node %d/%d, local %d) via %s: backend %s on %s, master %s:%d",
             world.rank, world.world_size, world.node_rank, world.num_nodes, world.local_rank,
             world.launcher, backend, device, world.master_addr, world.master_port)
    return backend


def _skip_cpu_shm_comm_build() -> None:
    """DeepSpeed's CPU comm layer JIT-compiles its ``deepspeed_shm_comm`` op (tens of seconds
    the first time) only to speed up *inference* all-reduce; training collectives go through
    gloo either way. Mark it unavailable so it is not built (DeepSpeed reads this dict)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def all_reduce_flag(flag: bool, device: torch.device) -> bool:  # noqa: F821
    """True on every rank if ``flag`` is true on any rank (a no-op without a process group)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Destroy the process group if we made one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
