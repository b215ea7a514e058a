"""Batched skeleton augmentations as torch ops on the batch's device.

All per-sample random parameters (angles, scales, shears, swaps, mask starts) are drawn
on the CPU from a ``torch.Generator`` seeded explicitly, then moved to the batch's device,
so CPU and CUDA runs draw identical parameters; only the joint-jitter noise is drawn on the
device (from a device generator seeded from the same CPU generator). Rotation, scaling and
shear are linear, so they are composed into one 3x3 matrix per sample and applied with a
single batched matmul. Absent bodies / padded frames (all-zero joints) stay zero.

On the CPU the 3x3 map and the body swap run as one fused loop (``_affine_cpu``, compiled by
numba, cached on disk): one read and one write of the batch instead of the transpose, bmm,
transpose back and index_select / flip / index_copy passes, each memory-bound (5 ms instead of
18 ms for 256 x 120 x 2 x 25 x 3 on one core; the same float32 operations in the same order,
so the same values). Without numba (or on a GPU) the torch ops run.

Axis letters: N batch, T frames, M bodies, V joints, C coordinates (C = 3).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from mtscale.config import AugmentConfig


def step_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed mixed from ``seed`` and integer keys (epoch, rank, batch position...)."""
    h = (int(seed) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    for k in keys:
        h ^= (int(k) + 0x632BE59BD9B4E019 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def rotation_matrices(angles_N3: torch.Tensor) -> torch.Tensor:
    """(N, 3) angles (radians) about x, y, z -> (N, 3, 3) rotation ``Rz @ Ry @ Rx``."""
    c, s = angles_N3.cos(), angles_N3.sin()
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
    rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], -1).view(-1, 3, 3)
    ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], -1).view(-1, 3, 3)
    rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], -1).view(-1, 3, 3)
    return rz @ ry @ rx


def is_active(cfg: AugmentConfig) -> bool:
    return bool(
        cfg.rotate_deg or cfg.scale or cfg.shear or cfg.jitter_std or cfg.body_swap_p or cfg.time_mask_frames
        or cfg.drop_joint_p or cfg.drop_axis_p
    )


class BatchAugment:
    """Applies ``cfg``'s augmentations to a batch ``x`` (N, T, M, V, 3).

    >>> aug = BatchAugment(AugmentConfig(rotate_deg=30))
    >>> y = aug(torch.zeros(2, 4, 1, 5, 3), seed=step_seed(0, 1))
    """

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg

    @property
    def active(self) -> bool:
        return is_active(self.cfg)

    def linear_params(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """(n, 3, 3) per-sample matrix = scale * shear @ rotation (CPU, float32)."""
        cfg = self.cfg
        a = torch.eye(3).expand(n, 3, 3).clone()
        if cfg.rotate_deg:
            r = math.radians(cfg.rotate_deg)
            angles = (torch.rand(n, 3, generator=gen) * 2 - 1) * r
            angles *= torch.tensor([float(ax in cfg.rotate_axes) for ax in "xyz"])
            a = rotation_matrices(angles)
        if cfg.shear:
            off = (torch.rand(n, 6, generator=gen) * 2 - 1) * cfg.shear
            sh = torch.eye(3).expand(n, 3, 3).clone()
            sh[:, [0, 0, 1, 1, 2, 2], [1, 2, 0, 2, 0, 1]] = off
            a = sh @ a
        if cfg.scale:
            s = 1 + (torch.rand(n, generator=gen) * 2 - 1) * cfg.scale
            a = a * s[:, None, None]
        return a

    def draw_map(self, n: int, m: int, gen: torch.Generator) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The first draws of a batch: per-sample 3x3 map ``a`` (N, 3, 3) float32 (None: no
        rotation / scale / shear) and body sources ``src`` (N, M) int64 (output body b of
        sample i is input body ``src[i, b]``; None: no swap drawn)."""
        cfg = self.cfg
        a = self.linear_params(n, gen).numpy() if (cfg.rotate_deg or cfg.shear or cfg.scale) else None
        src = None
        if cfg.body_swap_p and m > 1:
            swap = (torch.rand(n, generator=gen) < cfg.body_swap_p).numpy()  # (N,)
            # M == 2: exchange the bodies; M > 2: a random permutation of them
            perm = np.array([[1, 0]]) if m == 2 else torch.argsort(torch.rand(n, m, generator=gen), dim=1).numpy()
            src = np.where(swap[:, None], perm, np.arange(m)[None, :]).astype(np.int64)
        return a, src

    def finish(self, out: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The draws after ``draw_map``, applied to the mapped batch: jitter, time mask, joint
        drop, axis drop (each drawn only when on, so turning one on leaves the others' draws)."""
        cfg = self.cfg
        n, t = out.shape[:2]
        dev = out.device
        if cfg.jitter_std:
            dev_gen = torch.Generator(device=dev).manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
            noise = torch.randn(out.shape, generator=dev_gen, device=dev, dtype=out.dtype)
            present = (out != 0).any(-1, keepdim=True)  # (N, T, M, V, 1): joint exists
            out = out + noise.mul_(cfg.jitter_std) * present
        if cfg.time_mask_frames:
            k = min(cfg.time_mask_frames, t)
            start = torch.randint(0, t - k + 1, (n,), generator=gen).to(dev)  # (N,)
            tt = torch.arange(t, device=dev)
            hide = (tt[None] >= start[:, None]) & (tt[None] < start[:, None] + k)  # (N, T)
            out = out.masked_fill(hide[:, :, None, None, None], 0.0)
        v, c = out.shape[3], out.shape[4]
        if cfg.drop_joint_p:  # (N, V): the joint is zeroed in every frame and body of the sample
            drop = (torch.rand(n, v, generator=gen) < cfg.drop_joint_p).to(dev)
            out = out.masked_fill(drop[:, None, None, :, None], 0.0)
        if cfg.drop_axis_p:  # (N,) which samples lose an axis, (N,) which one
            hit = torch.rand(n, generator=gen) < cfg.drop_axis_p
            axis = torch.randint(0, c, (n,), generator=gen)
            keep = torch.ones(n, c)
            keep[hit, axis[hit]] = 0.0
            out = out * keep.to(device=dev, dtype=out.dtype)[:, None, None, None, :]
        return out

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, *, seed: int) -> torch.Tensor:
        """Return the augmented batch (a new tensor; ``x`` (N, T, M, V, 3) is not modified)."""
        if x.dim() != 5 or x.shape[-1] != 3:
            raise ValueError(f"BatchAugment: found x of shape {tuple(x.shape)}, expected (N, T, M, V, 3)")
        n, t, m, v, c = x.shape
        gen = torch.Generator().manual_seed(int(seed))
        dev = x.device
        a, src = self.draw_map(n, m, gen)
        out = x
        kernel = _affine_cpu() if dev.type == "cpu" and x.dtype == torch.float32 else None
        if kernel is not None and (a is not None or src is not None):  # one fused pass (module doc)
            out = torch.empty_like(x, memory_format=torch.contiguous_format)
            if a is None:  # body swap only: identity maps
                a = np.ascontiguousarray(np.broadcast_to(np.eye(3, dtype=np.float32), (n, 3, 3)))
            kernel(x.contiguous().numpy(), a,
                   np.ascontiguousarray(np.broadcast_to(np.arange(m), (n, m))) if src is None else src, out.numpy())
        else:
            if a is not None:
                a_t = torch.from_numpy(a).to(device=dev, dtype=x.dtype)
                # A @ X^T with the long axis last is a far faster bmm on CPU than X @ A^T
                xt = x.reshape(n, t * m * v, c).transpose(1, 2).contiguous()  # (N, 3, P)
                out = torch.bmm(a_t, xt).transpose(1, 2).reshape(n, t, m, v, c)
            if src is not None:
                rows = np.flatnonzero((src != np.arange(m)).any(1))
                if rows.size:
                    if out is x:
                        out = x.clone()
                    rows_d = torch.from_numpy(rows).to(dev)
                    idx = torch.from_numpy(src[rows]).to(dev)[:, None, :, None, None].expand(-1, t, m, v, c)
                    out.index_copy_(0, rows_d, torch.gather(out.index_select(0, rows_d), 2, idx))
        out = self.finish(out, gen)
        if out is x:
            out = x.clone()
        return out


@functools.cache
def _affine_cpu():
    """The fused CPU kernel ``(x, a, src, out)``: ``out[i, :, b] = a[i] @ x[i, :, src[i, b]]``
    per joint, or None without numba."""
    try:
        from numba import njit
    except ImportError:
        return None

    @njit(cache=True, nogil=True)
    def affine(x, a, src, out):  # x, out (N, T, M, V, 3) float32; a (N, 3, 3); src (N, M) int64
        n, t, m, v, _ = x.shape
        for i in range(n):
            a00, a01, a02 = a[i, 0, 0], a[i, 0, 1], a[i, 0, 2]
            a10, a11, a12 = a[i, 1, 0], a[i, 1, 1], a[i, 1, 2]
            a20, a21, a22 = a[i, 2, 0], a[i, 2, 1], a[i, 2, 2]
            for j in range(t):
                for b in range(m):
                    s = src[i, b]
                    for k in range(v):
                        p0, p1, p2 = x[i, j, s, k, 0], x[i, j, s, k, 1], x[i, j, s, k, 2]
                        out[i, j, b, k, 0] = a00 * p0 + a01 * p1 + a02 * p2
                        out[i, j, b, k, 1] = a10 * p0 + a11 * p1 + a12 * p2
                        out[i, j, b, k, 2] = a20 * p0 + a21 * p1 + a22 * p2

    return affine
