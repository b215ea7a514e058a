"""Vectorised crop + resample of a batch of variable-length sequences into fixed-length clips.

Pure numpy index arithmetic (no per-sample Python): for N samples of valid lengths ``L``,
compute the frame indices ``i0, i1`` and weights ``w`` of a linear resample of each crop to
``T`` frames, identical to ``F.interpolate(mode="linear", align_corners=False)`` (the MAMP /
CTR-GCN feeders' bilinear resize along time); then gather them from a frame arena.

The gather runs as one fused loop compiled by numba (``_gather_kernel``: read both
interpolation ends, convert float16 bits arithmetically (exact, branch-free, vectorised),
interpolate with ``torch.lerp``'s formula, zero padded frames, write each output value once),
~2x the blocked torch ops below it, which remain the path without numba.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


def crop_windows(
    lengths: np.ndarray,
    *,
    train: bool,
    crop_min: float,
    crop_max: float,
    eval_crop: float,
    u_frac: np.ndarray | None = None,
    u_start: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(start, crop_len) per sample, both (N,) int64, with 1 <= crop_len <= L.

    Training: ``crop_len = floor(L * p)``, ``p = crop_min + u_frac * (crop_max - crop_min)``,
    start uniform over the valid positions (``u_start``). Evaluation: the centre
    ``eval_crop`` fraction, ``bias = int((1 - p) * L / 2)`` frames cut at each end (MAMP)."""
    L = np.maximum(np.asarray(lengths, dtype=np.int64), 1)
    if train:
        p = crop_min + np.asarray(u_frac) * (crop_max - crop_min)
        crop = np.clip(np.floor(L * p).astype(np.int64), 1, L)
        start = np.minimum(np.floor(np.asarray(u_start) * (L - crop + 1)).astype(np.int64), L - crop)
    else:
        bias = ((1.0 - eval_crop) * L / 2).astype(np.int64)
        crop = np.maximum(L - 2 * bias, 1)
        start = np.minimum(bias, L - crop)
    return start, crop


def resample_indices(
    crop_len: np.ndarray, clip_frames: int, pad_short: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Linear-resample plan of crops of ``crop_len`` (N,) frames to ``T = clip_frames``.

    Returns ``i0, i1`` (N, T) int64 (indices within the crop), ``w`` (N, T) float32 and
    ``mask`` (N, T) bool; frame t = ``(1 - w) * crop[i0] + w * crop[i1]``, valid where mask.
    With ``pad_short``, crops shorter than T are copied frame for frame and padded
    (mask False, w = 0) instead of stretched."""
    n = np.asarray(crop_len, dtype=np.int64)[:, None]  # (N, 1)
    t = np.arange(clip_frames, dtype=np.float64)[None, :]  # (1, T)
    src = np.maximum((t + 0.5) * (n / clip_frames) - 0.5, 0.0)  # (N, T)
    i0 = np.minimum(src.astype(np.int64), n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    w = (src - i0).astype(np.float32)
    w[i0 == i1] = 0.0
    mask = np.ones(src.shape, dtype=bool)
    if pad_short:
        short = n[:, 0] < clip_frames
        if short.any():
            tt = np.broadcast_to(np.arange(clip_frames), (int(short.sum()), clip_frames))
            ns = n[short]
            i0[short] = np.minimum(tt, ns - 1)
            i1[short] = i0[short]
            w[short] = 0.0
            mask[short] = tt < ns
    return i0, i1, w, mask


def sample_indices(
    crop_len: np.ndarray, clip_frames: int, u_NT: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random-sampling plan (``data.sampling: random``, CTR-GCN's NW-UCLA training feeder): T
    frames of each crop drawn uniformly **with replacement** and kept in time order, so a clip
    repeats some frames and skips others instead of being a smooth linear resample.

    ``u_NT`` (N, T) uniforms in [0, 1) pick the frames; returns the same ``i0, i1, w, mask`` as
    :func:`resample_indices` (``i0 == i1``, ``w = 0``, every frame valid)."""
    n = np.maximum(np.asarray(crop_len, dtype=np.int64), 1)[:, None]  # (N, 1)
    i0 = np.sort(np.minimum((np.asarray(u_NT) * n).astype(np.int64), n - 1), axis=1)
    return i0, i0.copy(), np.zeros(i0.shape, dtype=np.float32), np.ones(i0.shape, dtype=bool)


def frame_times(start: np.ndarray, i0: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(N, T) float32: each clip frame's time in the recording, in frames from its first valid
    one (crop start + resample position; a drawn frame's own index), for ``model.time_index``."""
    return (np.asarray(start, dtype=np.float64)[:, None] + i0 + w).astype(np.float32)


GATHER_BLOCK = 16
"""Samples gathered, cast and interpolated together (a cache-sized block)."""


def gather_clips(
    arena_FMVC: np.ndarray,
    base: np.ndarray,
    i0: np.ndarray,
    i1: np.ndarray,
    w: np.ndarray,
    mask: np.ndarray,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gather clips (N, T, M, V, C) float32 from a frame arena (F, M, V, C) of any float dtype.

    ``base`` (N,) is each sample's crop start in the arena; ``i0, i1, w, mask`` come from
    :func:`resample_indices`. Frames where mask is False are zero."""
    n, t = i0.shape
    f = arena_FMVC.shape[0]
    tail = arena_FMVC.shape[1:]
    base = np.asarray(base, dtype=np.int64)[:, None]
    rows, rows1 = (base + i0).reshape(-1), (base + i1).reshape(-1)  # (N*T,) both interpolation ends
    w_flat = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
    x = torch.empty((n * t, int(np.prod(tail))), dtype=torch.float32) if out is None else out.view(n * t, -1)
    kernel = _gather_kernel()
    dt = arena_FMVC.dtype
    if kernel is not None and dt in (np.float16, np.float32) and arena_FMVC.flags.c_contiguous and x.is_contiguous():
        flat_np = arena_FMVC.reshape(f, -1)
        kernel(flat_np.view(np.uint16) if dt == np.float16 else flat_np, rows, rows1, w_flat,
               np.ascontiguousarray(mask).reshape(-1), x.numpy())
        return x.view(n, t, *tail)
    flat = torch.from_numpy(arena_FMVC.reshape(f, -1))  # (F, M*V*C), no copy
    if bool((w > 0).any()):
        w_t = torch.from_numpy(w_flat.reshape(-1, 1))
        # per block of samples: one gather of both interpolation ends, one cast to float32, one
        # lerp into the output -- the block's intermediates stay in cache (~1.4x over whole-batch
        # passes, which are memory-bound)
        step = GATHER_BLOCK * t
        for a in range(0, n * t, step):
            b = min(a + step, n * t)
            idx = torch.from_numpy(np.concatenate([rows[a:b], rows1[a:b]]))
            g = flat.index_select(0, idx)
            g = g.to(torch.float32) if g.dtype != torch.float32 else g
            torch.lerp(g[: b - a], g[b - a :], w_t[a:b], out=x[a:b])
    else:
        for a in range(0, n * t, GATHER_BLOCK * t):
            b = min(a + GATHER_BLOCK * t, n * t)
            x[a:b] = flat.index_select(0, torch.from_numpy(rows[a:b]))  # copy_ casts
    if not mask.all():
        x.mul_(torch.from_numpy(mask.reshape(-1, 1)))
    return x.view(n, t, *tail)


def normalize_clips(x_NTMVC: torch.Tensor, mask_NT: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-clip coordinate normalisation (``DataConfig.normalize``), on the batch's device.

    ``minmax``: each coordinate axis of each clip mapped to [-1, 1] by its min and max over the
    present joints (any coordinate non-zero) of valid frames; absent joints and padded frames
    stay zero. The result does not depend on the clip's position or (positive) scale."""
    if mode == "none":
        return x_NTMVC
    if mode != "minmax":
        raise ValueError(f"normalize_clips: found mode {mode!r}, expected none|minmax")
    present = (x_NTMVC != 0).any(-1, keepdim=True) & mask_NT.to(x_NTMVC.device)[:, :, None, None, None]
    big = torch.finfo(x_NTMVC.dtype).max
    lo = torch.where(present, x_NTMVC, big).amin(dim=(1, 2, 3), keepdim=True)  # (N, 1, 1, 1, C)
    hi = torch.where(present, x_NTMVC, -big).amax(dim=(1, 2, 3), keepdim=True)
    y = (x_NTMVC - lo) / (hi - lo).clamp_min(1e-6) * 2 - 1
    return torch.where(present, y, torch.zeros((), dtype=y.dtype, device=y.device))


def _half_bits_to_float(h):
    """float16 bits (uint16) -> float32, exact for finite values (a store holds no inf / nan).

    Branch-free, so the loops that call it vectorise: the 15 exponent + mantissa bits moved
    to float32's position read as a float32 of exponent e - 127 + 15 too small, so one exact
    multiply by 2**112 rebiases normals, and float16 subnormals (m * 2**-24) come out of the
    float32 subnormal m * 2**-136 the same way; then the sign bit. ~2x faster than the
    branching version for the gather (4.8 -> 2.2 ms per 256 x 120 clips)."""
    u = np.uint32(h)
    mag = np.float32(np.uint32((u & np.uint32(0x7FFF)) << np.uint32(13)).view(np.float32) * np.float32(2.0**112))
    return np.uint32(mag.view(np.uint32) | ((u & np.uint32(0x8000)) << np.uint32(16))).view(np.float32)


try:  # compiled at module level so the kernels below can call it and still be cached on disk
    from numba import njit as _njit

    _half = _njit(cache=True, nogil=True, inline="always")(_half_bits_to_float)
except ImportError:  # pragma: no cover - numba is a dependency; the torch path still works
    _half = None


@functools.cache
def _gather_kernel():
    """The fused gather ``(flat, rows0, rows1, w, mask, out)``, or None without numba.
    ``flat`` (F, D) is float32, or float16 bits as uint16 (numba has no float16 on the CPU;
    ``_half`` converts the bits without a branch: ~2.5x faster than the 65,536-entry table
    that came first, which was a gather per value; same values)."""
    if _half is None:
        return None
    from numba import njit

    # Two near-copies on purpose: one loop over both element types was 1.2-1.5x slower (the
    # type branch stays in the inner loop), and a factory of closures is not cached on disk by
    # numba (~1.8 s of compiling in every process and loader worker instead of ~0.4 s of loading).
    @njit(cache=True, nogil=True)
    def gather_half(flat, rows0, rows1, w, mask, out):
        one, half_ = np.float32(1.0), np.float32(0.5)
        for r in range(rows0.size):
            o = out[r]
            if not mask[r]:
                o[:] = 0.0
                continue
            a, b, wt = flat[rows0[r]], flat[rows1[r]], w[r]
            if wt == 0:
                for d in range(o.size):
                    o[d] = _half(a[d])
            elif wt < half_:  # torch.lerp's two-sided formula
                for d in range(o.size):
                    s = _half(a[d])
                    o[d] = s + wt * (_half(b[d]) - s)
            else:
                for d in range(o.size):
                    e = _half(b[d])
                    o[d] = e - (e - _half(a[d])) * (one - wt)

    @njit(cache=True, nogil=True)
    def gather_float(flat, rows0, rows1, w, mask, out):
        one, half = np.float32(1.0), np.float32(0.5)
        for r in range(rows0.size):
            o = out[r]
            if not mask[r]:
                o[:] = 0.0
                continue
            a, b, wt = flat[rows0[r]], flat[rows1[r]], w[r]
            if wt == 0:
                for d in range(o.size):
                    o[d] = a[d]
            elif wt < half:
                for d in range(o.size):
                    o[d] = a[d] + wt * (b[d] - a[d])
            else:
                for d in range(o.size):
                    o[d] = b[d] - (b[d] - a[d]) * (one - wt)

    def gather(flat, rows0, rows1, w, mask, out):
        (gather_half if flat.dtype == np.uint16 else gather_float)(flat, rows0, rows1, w, mask, out)

    return gather
