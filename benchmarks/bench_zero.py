"""Per-rank memory of parameters + optimizer state under ZeRO stages 0-3, 2 ranks, real
DeepSpeed on CPU (gloo), the real pre-training model.

    python benchmarks/bench_zero.py --quick --json runs/bench_zero.json

For each stage the script launches ``deepspeed --num_gpus 2 benchmarks/bench_zero.py --worker``,
which builds the model exactly as ``mtscale pretrain`` does (``build_engine``: ZeRO-3 under
``deepspeed.zero.Init``), runs one optimizer step (so Adam state exists), and counts on each
rank the bytes of every distinct tensor storage that holds parameters (module parameters, or
their ZeRO-3 partitions), fp32 master copies and optimizer state. Gradients and activations
are not counted. Headline: ``zero3_over_zero0`` = stage-3 / stage-0 bytes per rank (target <= 0.55).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _storages(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared storage counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total


def _param_tensors(model):
    for p in model.parameters():
        yield p.ds_tensor if hasattr(p, "ds_tensor") else p


def _optimizer_tensors(engine):
    import torch

    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    for st in base.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                yield v
    for g in base.param_groups:  # the fp32 master partitions the base optimizer steps on
        yield from g["params"]
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
        yield from getattr(opt, name, None) or []


def worker(stage: int, size: str, depth: int | None, out_dir: Path) -> None:
    import torch

    from mtscale.config import ModelConfig, ObjectiveConfig, PretrainTrainConfig
    from mtscale.dist import World, init_distributed
    from mtscale.models.objectives import build_pretrain_model
    from mtscale.train.engine import build_engine, deepspeed_config

    world = World.from_env()
    device = torch.device("cpu")
    init_distributed(world, device)
    tr = PretrainTrainConfig(batch_size=2 * world.world_size, zero_stage=stage, max_steps=10, warmup_steps=1,
                     zero3_param_persistence_threshold=0)
    ds = deepspeed_config(tr, world_size=world.world_size, device_type="cpu")
    mcfg = ModelConfig(size=size, depth=depth)
    ocfg = ObjectiveConfig(decoder_dim=128, decoder_depth=1, decoder_heads=4)
    torch.manual_seed(0)
    engine, model = build_engine(lambda: build_pretrain_model(mcfg, ocfg, clip_frames=16, num_bodies=2, num_joints=25),
                                 tr, ds)
    g = torch.Generator().manual_seed(world.rank)
    x = torch.randn(2, 16, 2, 25, 3, generator=g)
    loss, _ = engine(x, torch.ones(2, 16, dtype=torch.bool), torch.arange(2) + 2 * world.rank, step=0, seed=0)
    engine.backward(loss)
    engine.step()
    num_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    param_bytes = _storages(_param_tensors(model))
    total = _storages(list(_param_tensors(model)) + list(_optimizer_tensors(engine)))
    opt = engine.optimizer
    masters = [t for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")
               for t in (getattr(opt, name, None) or [])]
    breakdown = {"params": param_bytes, "masters": _storages(masters),
                 "adam_state": _storages(t for st in getattr(opt, "optimizer", opt).state.values()
                                         for t in st.values() if torch.is_tensor(t) and t.numel() > 1),
                 "bit16_flat": _storages(getattr(opt, "fp16_partitioned_groups_flat", None) or [])}
    row = {"breakdown": breakdown, "stage": stage, "rank": world.rank, "world_size": world.world_size,
           "num_params": int(num_params), "param_bytes": param_bytes, "optimizer_bytes": total - param_bytes,
           "total_bytes": total}
    (out_dir / f"stage{stage}_rank{world.rank}.json").write_text(json.dumps(row))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2-layer 'small' encoder instead of the full 8 layers")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--size", default="small")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--depth", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.stage, a.size, a.depth, a.out)
        return 0

    import deepspeed
    import torch

    from mtscale.dist import free_port

    depth = 2 if a.quick else None
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for stage in (0, 1, 2, 3):
            cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                   str(Path(__file__).resolve()), "--worker", "--stage", str(stage), "--size", a.size, "--out", tmp]
            if depth is not None:
                cmd += ["--depth", str(depth)]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if p.returncode != 0:
                print(p.stdout[-2000:], p.stderr[-4000:], file=sys.stderr)
                return 1
            rows += [json.loads(f.read_text()) for f in sorted(Path(tmp).glob(f"stage{stage}_rank*.json"))]
    per_stage = {s: max(r["total_bytes"] for r in rows if r["stage"] == s) for s in (0, 1, 2, 3)}
    result = {
        "benchmark": "bench_zero", "world_size": 2, "size": a.size, "depth": depth, "quick": a.quick,
        "num_params": rows[0]["num_params"], "rows": rows,
        **{f"zero{s}_bytes_per_rank": b for s, b in per_stage.items()},
        "zero3_over_zero0": per_stage[3] / per_stage[0], "target": 0.55,
        "hardware": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "python": platform.python_version()},
        "precision": "fp32", "seconds": round(time.time() - t0, 1),
    }
    print("| stage | params MB/rank | optimizer MB/rank | total MB/rank | vs ZeRO-0 |")
    print("|---:|---:|---:|---:|---:|")
    for s in (0, 1, 2, 3):
        r = max((r for r in rows if r["stage"] == s), key=lambda r: r["total_bytes"])
        print(f"| {s} | {r['param_bytes'] / 2**20:.2f} | {r['optimizer_bytes'] / 2**20:.2f} | "
              f"{r['total_bytes'] / 2**20:.2f} | {r['total_bytes'] / per_stage[0]:.3f} |")
    print(f"zero3_over_zero0 = {result['zero3_over_zero0']:.3f} (target <= 0.55), {result['num_params']} parameters")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
