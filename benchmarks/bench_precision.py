"""Is ``precision: auto`` right on this CPU? Training-step throughput of a real pre-training model
in fp32 against bf16 autocast (what ``auto`` runs when it picks bf16 under ZeRO-0), side by side
in one process, next to the 256 x 256 GEMM ratio (which ``auto`` decided from until 2026-12-06:
on an AMX Xeon it reads 4.3x while the step runs at 0.83x, so ``auto`` is now fp32 on every CPU).

    python benchmarks/bench_precision.py --config configs/pretrain/nw_ucla.yaml --threads 1 --json out.json

Rounds alternate fp32 / bf16 so that load from other processes falls on both alike; the ratio
is the median over rounds. Prints one JSON object (CPU model and flags recorded with it).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from mtscale.config import PretrainConfig, load_config
from mtscale.models.objectives import build_pretrain_model
from mtscale.train.engine import cpu_bf16_speedup, resolve_precision


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    text = Path("/proc/cpuinfo").read_text()
    return [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in text]


def steps_per_s(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, bf16: bool, steps: int) -> float:
    mask, keys = torch.ones(x.shape[:2], dtype=torch.bool), torch.arange(x.shape[0])
    t0 = time.perf_counter()
    for step in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = model(x, mask, keys, step=step, seed=0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/pretrain/nw_ucla.yaml")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--joints", type=int, default=20, help="V of the store the config is for (NW-UCLA: 20)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per round and precision")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(PretrainConfig, a.config, ["data.store=unused"])
    torch.manual_seed(0)
    model = build_pretrain_model(cfg.model, cfg.objective, clip_frames=cfg.data.clip_frames,
                                 num_bodies=cfg.data.num_bodies, num_joints=a.joints)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(a.batch, cfg.data.clip_frames, cfg.data.num_bodies, a.joints, 3)
    for bf16 in (False, True):  # warm-up (oneDNN kernel selection)
        steps_per_s(model, opt, x, bf16, 2)
    rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(a.rounds):
        for name in ("fp32", "bf16"):
            rates[name].append(steps_per_s(model, opt, x, name == "bf16", a.steps))
    ratios = [b / f for f, b in zip(rates["fp32"], rates["bf16"])]
    gemm = cpu_bf16_speedup()
    out = {
        "cpu": cpu_model(), "flags": cpu_flags(), "torch": torch.__version__, "threads": a.threads,
        "config": a.config, "batch": a.batch,
        "fp32_samples_per_s": statistics.median(rates["fp32"]) * a.batch,
        "bf16_autocast_samples_per_s": statistics.median(rates["bf16"]) * a.batch,
        "bf16_over_fp32_train_step": statistics.median(ratios),
        "gemm256_bf16_over_fp32": gemm, "auto_picks": resolve_precision("auto", "cpu"),
    }
    out["auto_is_right"] = (out["auto_picks"] == "bf16") == (out["bf16_over_fp32_train_step"] > 1.0)
    text = json.dumps(out, indent=2)
    print(text)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
