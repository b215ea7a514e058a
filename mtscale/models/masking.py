"""Token masking as a pure function of (seed, step, sample key): no global RNG.

A counter-based hash (splitmix64, computed with int64 torch ops on any device) turns
(seed, step, key, token) into uniform noise, so a sample's mask does not depend on which rank
or which batch position it lands on, nor on how many steps ran before a resume. The number of
masked tokens per sequence is exactly ``round(ratio * L)``.

Shapes: B sequences, L tokens per sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor

_U64 = 1 << 64


def _s64(c: int) -> int:
    """Unsigned 64-bit constant -> the int64 with the same bits."""
    return c - _U64 if c >= 1 << 63 else c


_GOLDEN = _s64(0x9E3779B97F4A7C15)
_M1 = _s64(0xBF58476D1CE4E5B9)
_M2 = _s64(0x94D049BB133111EB)
_LOW = {s: (1 << (64 - s)) - 1 for s in (30, 27, 31, 11)}


def _srl(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (z >> s) & _LOW[s]


def splitmix64(z: Tensor) -> Tensor:
    """splitmix64 finaliser on int64 tensors (wrapping arithmetic), bit-exact with the C original."""
    z = z + _GOLDEN
    z = (z ^ _srl(z, 30)) * _M1
    z = (z ^ _srl(z, 27)) * _M2
    return z ^ _srl(z, 31)


def token_uniform(seed: int, step: int, keys_B: Tensor, num_tokens: int) -> Tensor:
    """Uniform noise in [0, 1), float64 (B, L), a pure function of (seed, step, key, token)."""
    keys_B = keys_B.to(torch.int64)
    dev = keys_B.device
    s = splitmix64(torch.tensor([seed], dtype=torch.int64, device=dev))
    s = splitmix64(s ^ int(step))  # (1,)
    h_B = splitmix64(s ^ keys_B)  # (B,)
    j_L = torch.arange(1, num_tokens + 1, dtype=torch.int64, device=dev) * _GOLDEN
    h_BL = splitmix64(h_B[:, None] ^ j_L[None, :])
    return _srl(h_BL, 11).to(torch.float64) * (1.0 / (1 << 53))


def num_masked(ratio: float, num_tokens: int) -> int:
    """Masked tokens per sequence: round(ratio * L), at least 1 and at most L - 1."""
    return min(max(int(round(ratio * num_tokens)), 1), num_tokens - 1)


def gumbel(u: Tensor) -> Tensor:
    """Standard Gumbel noise from uniforms in [0, 1)."""
    tiny = torch.finfo(u.dtype).tiny
    return -torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-16)))


def mask_scores(u_BL: Tensor, motion_BL: Tensor | None = None, tau: float = 0.75) -> Tensor:
    """Scores whose top-k are masked. Random masking: the uniforms themselves. Motion-aware
    (MAMP): log softmax(motion / tau) + Gumbel noise, i.e. Gumbel-top-k sampling without
    replacement with probability proportional to softmax(motion / tau), so high-motion tokens
    are masked more often.

    The motion is first divided by its per-sequence mean, so ``tau`` is scale-free: raw
    skeleton motion in metres per frame is ~1e-2, and softmax(motion / 0.75) of that is uniform,
    which silently turned motion-aware masking into random masking on real-scale data."""
    if motion_BL is None:
        return u_BL
    m = motion_BL.to(torch.float64)
    m = m / m.mean(dim=-1, keepdim=True).clamp_min(1e-12)
    logp = torch.log_softmax(m / tau, dim=-1)
    return logp + gumbel(u_BL)


def split_tokens(scores_BL: Tensor, n_mask: int) -> tuple[Tensor, Tensor, Tensor]:
    """Order tokens by score: the ``n_mask`` highest are masked.

    Returns ids_keep (B, L - n_mask), ids_restore (B, L) (position of each token in the
    keep-then-mask order) and mask_BL (bool, True = masked).
    """
    B, L = scores_BL.shape
    ids_shuffle = torch.argsort(scores_BL, dim=1, stable=True)  # ascending: low scores kept
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    ids_keep = ids_shuffle[:, : L - n_mask]
    mask_BL = ids_restore >= (L - n_mask)
    return ids_keep, ids_restore, mask_BL
