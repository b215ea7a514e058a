"""Model benchmarks: training-step throughput / MFU per size and tokenisation, fused SDPA vs
explicit attention, and the small model's FLOP/s relative to this machine's GEMM rate.

    python benchmarks/bench_model.py --quick --json out/bench_model.json          # CPU, ~1-2 min
    python benchmarks/bench_model.py --device cuda --json out/bench_model_h100.json  # bf16 on GPU

Everything is measured side by side in one run (shared, noisy machines): the GEMM rate used
for ``small_flops_over_gemm`` is sampled in windows interleaved with the training steps and the
best window of each is used. Output: a flat JSON object (``--json``) and a markdown table on
stdout. Uses the real model code (mtscale.models), not a copy.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from mtscale.config import ModelConfig, ObjectiveConfig
from mtscale.models import layers
from mtscale.models.flops import measure_cpu_gemm_flops, peak_flops
from mtscale.models.objectives import build_pretrain_model
from mtscale.train.metrics import cpu_model

log = logging.getLogger("bench_model")

# NTU-like clip geometry (MAMP: T=120, M=2, V=25, C=3, patch of 4 frames -> 750 tokens).
T, M, V, C = 120, 2, 25, 3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mem_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB; process peak


def objective_for(tok: str) -> ObjectiveConfig:
    """Frame mode: the Motion-Transformer seed task; patch mode: MAMP."""
    if tok == "frame":
        return ObjectiveConfig(kind="motion_flow", mask_ratio=0.5, masking="random")
    return ObjectiveConfig(kind="masked_motion", mask_ratio=0.9, masking="motion_aware")


class Step:
    """One real training step (forward, backward, AdamW) of a PretrainModel on a fixed batch.

    ``batch`` <= 0 picks the batch from a FLOP budget per step (``flop_budget``).
    """

    def __init__(self, size: str, tok: str, batch: int, device: torch.device, dtype: torch.dtype,
                 compile_: bool = False, qkv_bias: bool = True, flop_budget: float = 6e10):
        torch.manual_seed(0)
        self.model = build_pretrain_model(ModelConfig(size=size, tokenization=tok, qkv_bias=qkv_bias),
                                          objective_for(tok), clip_frames=T, num_bodies=M,
                                          num_joints=V).to(device)
        if batch <= 0:
            batch = int(min(512, max(1, flop_budget // self.model.flops_per_sample())))
        self.fwd = torch.compile(self.model) if compile_ else self.model
        # Fused AdamW (CPU and CUDA): one kernel instead of ~10 foreach passes over the weights.
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        g = torch.Generator().manual_seed(0)
        self.x = (0.3 * torch.randn(batch, T, M, V, C, generator=g)).cumsum(1).mul(0.05).to(device)
        self.mask = torch.ones(batch, T, dtype=torch.bool, device=device)
        self.keys = torch.arange(batch, device=device)
        self.device, self.dtype, self.batch, self.n = device, dtype, batch, 0
        self.autocast = device.type == "cuda" and dtype != torch.float32

    def __call__(self) -> None:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
            loss, _ = self.fwd(self.x, self.mask, self.keys, step=self.n, seed=0)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.n += 1

    def time(self, steps: int, warmup: int = 2) -> float:
        """Best seconds per step over ``steps`` timed steps (after warm-up)."""
        for _ in range(warmup):
            self()
        sync(self.device)
        best = math.inf
        for _ in range(steps):
            t0 = time.perf_counter()
            self()
            sync(self.device)
            best = min(best, time.perf_counter() - t0)
        return best


def bench_train(sizes: list[str], toks: list[str], budget: float, steps: int, device: torch.device,
                dtype: torch.dtype, peak: float | None, compile_: bool) -> tuple[dict, list[str]]:
    out, rows = {}, []
    for size in sizes:
        for tok in toks:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            st = Step(size, tok, 0, device, dtype, compile_, flop_budget=budget)
            sec = st.time(steps)
            m = st.model
            sps = st.batch / sec
            flops = m.flops_per_sample() * sps
            key = f"train_{size}_{tok}"
            out.update({
                f"{key}_samples_per_s": sps,
                f"{key}_tokens_per_s": sps * m.tokens_per_sample(),
                f"{key}_flops_per_s": flops,
                f"{key}_mfu": flops / peak if peak else None,
                f"{key}_peak_mem_bytes": peak_mem_bytes(device),
                f"{key}_batch": st.batch,
                f"{key}_params": sum(p.numel() for p in m.encoder.parameters()),
            })
            rows.append(f"| {size} | {tok} | {m.kind} | {st.batch} | {sps:.1f} | {sps * m.tokens_per_sample():.0f} | "
                        f"{flops / 1e9:.1f} | {'-' if not peak else f'{100 * flops / peak:.1f}%'} | "
                        f"{peak_mem_bytes(device) / 2**20:.0f} |")
            log.info("%s: %.2f samples/s, %.1f GFLOP/s", key, sps, flops / 1e9)
            del st, m
            gc.collect()
    return out, rows


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The un-fused reference: softmax(Q K^T / sqrt(d)) V (materialises the L x L matrix)."""
    att = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    return att.softmax(dim=-1) @ v


def bench_attention(lengths: list[int], tokens_budget: int, device: torch.device, dtype: torch.dtype,
                    reps: int) -> tuple[dict, list[str]]:
    """Forward + backward of attention only, small's geometry (8 heads x 32 dims)."""
    H, Dh = 8, 32
    out, rows = {}, []
    for L in lengths:
        B = max(1, tokens_budget // L)
        g = torch.Generator().manual_seed(L)
        qkv = [torch.randn(B, H, L, Dh, generator=g).to(device, dtype).requires_grad_(True) for _ in range(3)]
        times = {}
        for name, fn in (("fused", lambda q, k, v: layers.attend(q, k, v)), ("explicit", explicit_attention)):
            best = math.inf
            for i in range(reps + 1):
                sync(device)
                t0 = time.perf_counter()
                fn(*qkv).sum().backward()
                sync(device)
                if i:
                    best = min(best, time.perf_counter() - t0)
            times[name] = best
        ratio = times["explicit"] / times["fused"]
        out[f"attn_{L}_fused_ms"] = 1e3 * times["fused"]
        out[f"attn_{L}_explicit_ms"] = 1e3 * times["explicit"]
        out[f"sdpa_speedup_{L}"] = ratio
        rows.append(f"| {L} | {B} | {1e3 * times['fused']:.1f} | {1e3 * times['explicit']:.1f} | {ratio:.2f} |")
    return out, rows


def bench_gemm_ratio(budget: float, device: torch.device, rounds: int, steps: int, compile_: bool) -> dict:
    """small x patch (MAMP) training FLOP/s over the fp32 GEMM rate, interleaved windows."""
    st = Step("small", "patch", 0, device, torch.float32, compile_, flop_budget=budget)
    batch = st.batch
    st.time(1, warmup=2)
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    best_step, best_gemm, cpu_step, cpu_gemm = math.inf, 0.0, math.inf, math.inf
    for _ in range(rounds):
        best_gemm = max(best_gemm, measure_cpu_gemm_flops(seconds=1.0, n=n))
        c0 = time.process_time()  # CPU seconds of this process: robust to other jobs on the machine
        for _ in range(3):
            torch.mm(a, b)
        cpu_gemm = min(cpu_gemm, (time.process_time() - c0) / 3)
        c0 = time.process_time()
        best_step = min(best_step, st.time(steps, warmup=0))
        cpu_step = min(cpu_step, (time.process_time() - c0) / steps)
    flops = st.model.flops_per_sample() * batch / best_step
    gemm_per_cpu_s = 2.0 * n**3 / cpu_gemm
    step_per_cpu_s = st.model.flops_per_sample() * batch / cpu_step
    return {"small_train_flops_per_s": flops, "cpu_gemm_flops_per_s": best_gemm,
            "small_flops_over_gemm": flops / best_gemm, "small_gemm_batch": batch,
            "small_flops_over_gemm_cpu_time": step_per_cpu_s / gemm_per_cpu_s}


def hardware(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "threads": torch.get_num_threads(), "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = cpu_model()
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny+small, few steps (~1-2 min on 2 CPU cores)")
    ap.add_argument("--json", default=None, help="write a flat JSON object here")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"), help="auto: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--sizes", default=None, help="comma list (default: quick tiny,small; full adds base[,large on GPU])")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model for the training steps")
    ap.add_argument("--flop-budget", type=float, default=None,
                    help="model FLOPs per training step; sets each batch size (default 6e10 CPU, 2e13 CUDA)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: train,attn,gemm")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(a.dtype) or (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    gpu = device.type == "cuda"
    sizes = a.sizes.split(",") if a.sizes else (["tiny", "small"] if a.quick else
                                               ["tiny", "small", "base"] + (["large"] if gpu else []))
    budget = a.flop_budget or (2e13 if gpu else 6e10)  # model FLOPs per training step -> batch size
    skip = set(filter(None, a.skip.split(",")))
    steps = 2 if a.quick else 6
    t_start = time.perf_counter()

    result: dict = {f"hw_{k}": v for k, v in hardware(device).items()}
    result.update({"dtype": str(dtype).removeprefix("torch."), "quick": a.quick, "compile": a.compile,
                   "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))})
    peak = peak_flops(device, dtype, measure_seconds=1.0)
    result["peak_flops_per_s"] = peak
    md = []
    if "gemm" not in skip and not gpu:
        result.update(bench_gemm_ratio(budget, device, rounds=2 if a.quick else 4, steps=steps,
                                       compile_=a.compile))
        peak = max(peak or 0.0, result["cpu_gemm_flops_per_s"])
        result["peak_flops_per_s"] = peak
    if "train" not in skip:
        r, rows = bench_train(sizes, ["frame", "patch"], budget, steps, device, dtype, peak, a.compile)
        result.update(r)
        md += ["| size | tokens | objective | batch | samples/s | tokens/s | GFLOP/s | MFU | peak mem MiB |",
               "|---|---|---|---:|---:|---:|---:|---:|---:|"] + rows + [""]
    if "attn" not in skip:
        lengths = [120, 250, 500, 750, 1000, 1500]
        r, rows = bench_attention(lengths, tokens_budget=(1 << 16) if gpu else 3000, device=device, dtype=dtype,
                                  reps=5 if gpu else (2 if a.quick else 4))
        result.update(r)
        result["attn_backend_ran"] = layers.last_attention_backend().get("auto", "unknown")
        md += ["| tokens L | sequences B | fused SDPA ms | explicit ms | speed-up |", "|---:|---:|---:|---:|---:|"] + rows
    result["wall_s"] = time.perf_counter() - t_start
    print("\n".join(md))  # benchmark report on stdout
    keys = ("small_flops_over_gemm", "small_flops_over_gemm_cpu_time", "sdpa_speedup_750", "cpu_gemm_flops_per_s", "small_train_flops_per_s")
    print(json.dumps({k: result.get(k) for k in keys}))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
