"""Model FLOP accounting and peak FLOP/s per device (for throughput / MFU reporting).

Counts are *model* FLOPs from the shapes (as in the PaLM / Megatron MFU convention): every
linear is 2*m*n*k, attention adds QK^T and AV (2 * 2 * L^2 * D per sequence and layer);
norms, softmax and element-wise ops are left out; a training step is 3 x the forward
(backward = 2 x forward); activation-checkpoint recomputation is *not* counted.
"""

from __future__ import annotations

import logging
import re
import time

import torch

log = logging.getLogger(__name__)


def linear_flops(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


def attention_core_flops(seq_len: int, dim: int) -> int:
    """QK^T and AV for one sequence over all heads: 2 matmuls x 2 * L * L * D."""
    return 2 * 2 * seq_len * seq_len * dim


def block_flops(seq_len: int, dim: int, mlp_hidden: int) -> int:
    """One pre-norm transformer block, forward, one sequence of ``seq_len`` tokens."""
    return (
        linear_flops(seq_len, dim, 3 * dim)  # fused qkv
        + attention_core_flops(seq_len, dim)
        + linear_flops(seq_len, dim, dim)  # out proj
        + linear_flops(seq_len, dim, mlp_hidden)
        + linear_flops(seq_len, mlp_hidden, dim)
    )


def transformer_flops(seq_len: int, dim: int, depth: int, mlp_ratio: float) -> int:
    return depth * block_flops(seq_len, dim, int(round(dim * mlp_ratio)))


# --------------------------------------------------------------------------- peak rates

# Dense (no sparsity) peak tensor-core rates, FLOP/s, by (name fragment, dtype class).
# Matched against torch.cuda.get_device_name() in order, as whole words (an "L40" is not an
# "L4", a "GH200" not an "H200"): the first fragment found wins.
_GPU_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    ("H100 PCIE", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),  # SXM
    ("GH200", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    ("B200", {"bf16": 2250e12, "fp16": 2250e12, "tf32": 1100e12, "fp32": 80e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("A10G", {"bf16": 70e12, "fp16": 70e12, "tf32": 35e12, "fp32": 31.2e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("L40", {"bf16": 181e12, "fp16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    ("V100", {"bf16": 0.0, "fp16": 125e12, "tf32": 0.0, "fp32": 15.7e12}),
    ("RTX 4090", {"bf16": 165e12, "fp16": 165e12, "tf32": 82.6e12, "fp32": 82.6e12}),
    ("RTX 3090", {"bf16": 71e12, "fp16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12}),
    ("T4", {"bf16": 0.0, "fp16": 65e12, "tf32": 0.0, "fp32": 8.1e12}),
]

_cpu_gemm_cache: dict[tuple[int, str], float] = {}


def _dtype_class(dtype: torch.dtype) -> str:
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "fp32"


def gpu_peak_flops(name: str, dtype: torch.dtype) -> float | None:
    """Table lookup by device name fragment (case-insensitive); None when unknown."""
    up = name.upper()
    for frag, peaks in _GPU_PEAKS:
        if re.search(rf"(?<![A-Z0-9]){re.escape(frag)}(?![A-Z0-9])", up):
            return peaks.get(_dtype_class(dtype)) or None
    return None


def measure_cpu_gemm_flops(seconds: float = 1.0, n: int = 2048, dtype: torch.dtype = torch.float32) -> float:
    """Measured square-GEMM rate (FLOP/s) on this CPU with torch's current thread count.

    Times ``n x n @ n x n`` matmuls (after one warm-up) for about ``seconds`` and returns the
    best of several short windows (the machine may be shared). The result is remembered per
    (threads, dtype) for :func:`peak_flops`.
    """
    key = (torch.get_num_threads(), str(dtype))
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up
    best, t_end = 0.0, time.perf_counter() + max(seconds, 0.05)
    while True:
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        dt = time.perf_counter() - t0
        best = max(best, 2.0 * n**3 / dt)
        if time.perf_counter() >= t_end:
            break
    _cpu_gemm_cache[key] = best
    log.info("cpu gemm: %.1f GFLOP/s (%s, n=%d, %d threads)", best / 1e9, dtype, n, key[0])
    return best


def peak_flops(device: torch.device | str, dtype: torch.dtype = torch.float32, *, measure_seconds: float = 1.0) -> float | None:
    """Peak FLOP/s for MFU: the vendor dense peak on CUDA (table), the measured GEMM rate on CPU.

    Returns None for an unknown GPU (MFU is then not reported rather than made up).
    """
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name, dtype)
        if peak is None:
            log.warning("peak_flops: unknown GPU %r; MFU will not be reported", name)
        return peak
    if device.type == "cpu":
        dt = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        key = (torch.get_num_threads(), str(dt))
        return _cpu_gemm_cache.get(key) or measure_cpu_gemm_flops(measure_seconds, dtype=dt)
    return None
