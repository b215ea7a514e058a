"""Model benchmarks: training-step throughput / MFU per size and tokenisation, fused SDPA vs
explicit attention (time, and peak memory of forward + backward), and the small model's FLOP/s
relative to this machine's GEMM rate.

    python benchmarks/bench_model.py --quick --json out/bench_model.json          # CPU, ~5-8 min
    python benchmarks/bench_model.py --device cuda --json out/bench_model_h100.json  # bf16 on GPU
    python benchmarks/bench_model.py --quick --skip train,attn,gemm --json m.json  # attention memory only

Attention memory (``sdpa_memory_ratio_L``): peak bytes of forward + backward through the explicit
softmax(QK^T)V over those through mtscale's own call (``layers.attend``, q/k/v laid out as
``layers.Attention`` makes them), batch 2, 8 heads of 32 dims, unmasked and with a boolean
key-padding mask from ``layers.key_padding_to_attn_mask`` (the ratio reported is the worse
of the two); and the longest sequence each form fits in a memory budget (doubling, then
bisection, measuring every point). On CPU every case runs in a fresh subprocess and its peak is
the rise of the process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) over
its RSS before the call; on CUDA ``torch.cuda.max_memory_allocated`` over the allocated bytes
before it. A case predicted (from the measured ones) to exceed 60 % of the free memory is not
run. On a CPU the fused form is too slow to run up to the budget; its fit is then extrapolated
from the measured points (linear fit; the JSON says which).

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
import os
import platform
import resource
import subprocess
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
        # Every frame valid: no mask, as the loader's ``model_mask`` gives the model for unpadded
        # batches (on CUDA a mask that reaches SDPA rules out its flash kernel).
        self.mask = None
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


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The un-fused reference: softmax(Q K^T / sqrt(d)) V (materialises the L x L matrix).

    q, k, v: (B, H, L, Dh); attn_mask: None or bool (B, 1, 1|L, L), True = attend."""
    att = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)  # (B, H, L, L)
    if attn_mask is not None:
        att = att.masked_fill(~attn_mask, float("-inf"))
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


# --------------------------------------------------------------------------- attention memory

ATTN_MEM_LENGTHS = (750, 1500, 3000, 6000)
ATTN_B, ATTN_H, ATTN_DH = 2, 8, 32  # small's attention geometry, batch 2


def attention_case(L: int, masked: bool, device: torch.device, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """Inputs of one attention call as training makes them: a leaf ``qkv`` (B, L, 3, H, Dh) (the
    fused projection's output), q, k, v (B, H, L, Dh) as the strided views ``layers.Attention``
    passes, and with ``masked`` the bool (B, 1, 1, L) mask of ``key_padding_to_attn_mask`` for
    a batch whose second sequence has its last 10 % of tokens padded (else None)."""
    g = torch.Generator().manual_seed(L)
    qkv = torch.randn(ATTN_B, L, 3, ATTN_H, ATTN_DH, generator=g).to(device, dtype).requires_grad_(True)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    mask = None
    if masked:
        valid_BL = torch.ones(ATTN_B, L, dtype=torch.bool, device=device)
        valid_BL[1, L - max(1, L // 10):] = False
        mask = layers.key_padding_to_attn_mask(valid_BL)
    return qkv, (q, k, v), mask


def attention_call(form: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None) -> torch.Tensor:
    """``fused``: mtscale's ``layers.attend``; ``explicit``: :func:`explicit_attention`."""
    return layers.attend(q, k, v, mask) if form == "fused" else explicit_attention(q, k, v, mask)


def _proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status: no {key}")


def attention_peak_here(form: str, L: int, masked: bool, device: torch.device, dtype: torch.dtype) -> dict:
    """Peak bytes of forward + backward of one attention call, measured in this process (on CPU
    meaningful only in a fresh process: see :func:`attention_peak`)."""
    qkv, (q, k, v), mask = attention_case(L, masked, device, dtype)
    small = attention_case(64, masked, device, dtype)  # warm-up: kernels, thread pools
    attention_call(form, *small[1], small[2]).float().sum().backward()
    del small
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _proc_status_bytes("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the peak RSS) to the current RSS
            how = "VmHWM"
        except OSError:
            how = "ru_maxrss"  # process peak so far: an under-estimate if start-up peaked higher
    t0 = time.perf_counter()
    attention_call(form, q, k, v, mask).float().sum().backward()
    sync(device)
    sec = time.perf_counter() - t0
    if device.type == "cuda":
        peak, how = torch.cuda.max_memory_allocated(device) - base, "cuda.max_memory_allocated"
    elif how == "VmHWM":
        peak = _proc_status_bytes("VmHWM") - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    kernel = layers.last_attention_backend().get("auto", "unknown") if form == "fused" else "explicit"
    del qkv, q, k, v
    return {"peak_bytes": int(peak), "seconds": sec, "kernel": kernel, "how": how}


def attention_peak(form: str, L: int, masked: bool, device: torch.device, dtype: torch.dtype) -> dict:
    """:func:`attention_peak_here` in this process on CUDA, in a fresh subprocess on CPU."""
    if device.type == "cuda":
        out = attention_peak_here(form, L, masked, device, dtype)
        torch.cuda.empty_cache()
        return out
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()),
               PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--attn-mem-case",
           f"{form},{L},{int(masked)},{str(dtype).removeprefix('torch.')}"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"attention memory case {form} L={L} masked={masked}: exit {p.returncode}: "
                           f"{(p.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 8 << 30


def _predict(points: dict[int, int], L: int, form: str) -> float:
    """Peak bytes at L from measured ``points`` {L: bytes}: the nearest point scaled by L^2
    (explicit) or L (fused); generous for a safety check (both forms grow no faster)."""
    if not points:
        return 0.0
    L0 = min(points, key=lambda x: abs(x - L))
    return points[L0] * (L / L0) ** (2 if form == "explicit" else 1)


def _linear_fit_tokens(points: dict[int, int], budget: int) -> int:
    """Longest L with a + b L <= budget, (a, b) the least-squares line through ``points``."""
    xs = sorted(points)
    n, sx, sy = len(xs), sum(xs), sum(points[x] for x in xs)
    sxx, sxy = sum(x * x for x in xs), sum(x * points[x] for x in xs)
    b = (n * sxy - sx * sy) / max(n * sxx - sx * sx, 1e-9)
    a = (sy - b * sx) / n
    return int((budget - a) / b) if b > 0 else -1


def fits_in_budget(form: str, masked: bool, points: dict[int, int], budget: int, device: torch.device,
                   dtype: torch.dtype, max_case_s: float, tol: float) -> tuple[int, str]:
    """Longest sequence length whose forward + backward peak is <= ``budget`` bytes: doubling
    from the measured ``points`` (updated in place) until a length exceeds it, then bisection to
    a relative width ``tol``. A case slower than ``max_case_s`` (a CPU running the fused form)
    ends the doubling; the answer is then a linear fit of the points. Returns (L, method)."""
    cap = 0.6 * _free_bytes(device)
    last_s = 0.0
    while all(v <= budget for v in points.values()):
        L = 2 * max(points)
        if last_s > max_case_s or _predict(points, L, form) > cap:
            return _linear_fit_tokens({k: v for k, v in points.items() if k >= 1500} or points, budget), \
                f"extrapolated: linear fit of peaks measured at {sorted(points)} tokens"
        r = attention_peak(form, L, masked, device, dtype)
        points[L], last_s = r["peak_bytes"], r["seconds"]
    while min(points.values()) > budget and min(points) > 16:
        L = min(points) // 2
        points[L] = attention_peak(form, L, masked, device, dtype)["peak_bytes"]
    lo = max((x for x, v in points.items() if v <= budget), default=0)
    hi = min(x for x, v in points.items() if v > budget)
    while lo and hi / lo > 1 + tol and _predict(points, (lo + hi) // 2, form) <= cap:
        mid = (lo + hi) // 2
        points[mid] = attention_peak(form, mid, masked, device, dtype)["peak_bytes"]
        lo, hi = (mid, hi) if points[mid] <= budget else (lo, mid)
    return lo, f"measured: bisection to within {100 * tol:.0f} % (fits {lo}, exceeds {hi})"


def bench_attention_memory(lengths: tuple[int, ...], budget: int, device: torch.device, dtype: torch.dtype,
                           quick: bool) -> tuple[dict, list[str]]:
    """Peak memory of explicit vs fused attention (forward + backward), unmasked and key-padding
    masked, at ``lengths``; ``sdpa_memory_ratio_L`` = explicit / fused, the worse (smaller) of the
    two mask cases; and the longest sequence each form fits in ``budget`` bytes."""
    out: dict = {"attn_mem_batch": ATTN_B, "attn_mem_heads": ATTN_H, "attn_mem_head_dim": ATTN_DH,
                 "attn_mem_budget_bytes": budget}
    points: dict[tuple[str, bool], dict[int, int]] = {}
    rows = []
    for L in lengths:
        peaks: dict[tuple[str, bool], int | None] = {}
        for masked in (False, True):
            for form in ("explicit", "fused"):
                pts = points.setdefault((form, masked), {})
                key = f"attn_mem_{form}_{L}_{'masked' if masked else 'unmasked'}"
                if _predict(pts, L, form) > 0.6 * _free_bytes(device):
                    peaks[form, masked] = None
                    out[key + "_bytes"] = None
                    out[key + "_skipped"] = "predicted to exceed 60 % of the free memory"
                    continue
                r = attention_peak(form, L, masked, device, dtype)
                pts[L] = peaks[form, masked] = r["peak_bytes"]
                out[key + "_bytes"], out[key + "_s"] = r["peak_bytes"], r["seconds"]
                if form == "fused":
                    out[key + "_kernel"] = r["kernel"]
                out["attn_mem_measured_with"] = r["how"]
            e, f = peaks.get(("explicit", masked)), peaks.get(("fused", masked))
            ratio = e / f if e and f else None
            out[f"sdpa_memory_ratio_{L}_{'masked' if masked else 'unmasked'}"] = ratio
        both = [out[f"sdpa_memory_ratio_{L}_{m}"] for m in ("unmasked", "masked")]
        out[f"sdpa_memory_ratio_{L}"] = min(both) if all(x is not None for x in both) else None

        def mb(x: int | None) -> str:
            return "-" if x is None else f"{x / 2**20:,.0f}"

        def rt(x: float | None) -> str:
            return "-" if x is None else f"{x:.1f}"

        rows.append(f"| {L} | {mb(peaks.get(('explicit', False)))} | {mb(peaks.get(('fused', False)))} | "
                    f"{rt(both[0])} | {mb(peaks.get(('explicit', True)))} | {mb(peaks.get(('fused', True)))} | "
                    f"{rt(both[1])} | {out.get(f'attn_mem_fused_{L}_masked_kernel', '-')} |")
    ref, fit_rows = max(lengths), []
    for form in ("explicit", "fused"):  # the mask case with the larger peak (the worse one)
        masked = (points[form, True].get(ref) or 0) >= (points[form, False].get(ref) or 0)
        L, how = fits_in_budget(form, masked, points[form, masked], budget, device, dtype,
                                max_case_s=20.0 if quick else 120.0, tol=0.05)
        out[f"attn_fits_budget_tokens_{form}"], out[f"attn_fits_budget_method_{form}"] = L, how
        out[f"attn_fits_budget_masked_{form}"] = masked
        for Lx, v in sorted(points[form, masked].items()):  # the search's own measurements too
            out.setdefault(f"attn_mem_{form}_{Lx}_{'masked' if masked else 'unmasked'}_bytes", v)
        fit_rows.append(f"| {form} | {'masked' if masked else 'unmasked'} | {L:,} | {how} |")
    rows += ["", f"| form | mask | longest L within {budget / 2**30:g} GiB | how |", "|---|---|---:|---|"] + fit_rows
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


CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
"""The /proc/cpuinfo flags that decide which CPU kernels (and which bf16 speed) torch gets."""


def cpu_flags() -> dict[str, bool]:
    """{flag: present} for :data:`CPU_FLAGS` (all False where /proc/cpuinfo is unreadable)."""
    have: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {f: f in have for f in CPU_FLAGS}


def hardware(device: torch.device) -> dict:
    """Versions, device, CPU model, core count and the CPU flags of :data:`CPU_FLAGS`."""
    flags = cpu_flags()
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "threads": torch.get_num_threads(), "platform": platform.platform(), "cpu": cpu_model(),
            "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu_flags": " ".join(f for f, on in flags.items() if on),
            "avx512": flags["avx512f"], "amx": flags["amx_tile"]}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
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
    ap.add_argument("--skip", default="", help="comma list of parts to skip: train,attn,attnmem,gemm")
    ap.add_argument("--attn-mem-budget-gb", type=float, default=2.0,
                    help="memory budget (GiB) for the longest sequence each attention form fits")
    ap.add_argument("--attn-mem-case", default=None, help=argparse.SUPPRESS)  # form,L,masked,dtype: one case
    a = ap.parse_args(argv)
    if a.attn_mem_case:  # a fresh subprocess of attention_peak: one case, one JSON line
        form, L, masked, dt = a.attn_mem_case.split(",")
        print(json.dumps(attention_peak_here(form, int(L), masked == "1", torch.device("cpu"), getattr(torch, dt))))
        return 0
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
    if "attnmem" not in skip:
        r, rows = bench_attention_memory(ATTN_MEM_LENGTHS, int(a.attn_mem_budget_gb * 2**30), device, dtype, a.quick)
        result.update(r)
        md += ["", f"Attention forward + backward peak memory (MiB), B={ATTN_B}, H={ATTN_H}, Dh={ATTN_DH}, "
               f"{str(dtype).removeprefix('torch.')}, measured with {r.get('attn_mem_measured_with')}:", "",
               "| tokens L | explicit | fused | ratio | explicit, masked | fused, masked | ratio, masked | kernel (masked) |",
               "|---:|---:|---:|---:|---:|---:|---:|---|"] + rows
    result["wall_s"] = time.perf_counter() - t_start
    print("\n".join(md))  # benchmark report on stdout
    keys = ("small_flops_over_gemm", "small_flops_over_gemm_cpu_time", "sdpa_speedup_750", "sdpa_memory_ratio_3000",
            "cpu_gemm_flops_per_s", "small_train_flops_per_s")
    print(json.dumps({k: result.get(k) for k in keys}))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
