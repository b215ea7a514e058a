"""Transformer building blocks: attention, MLP, drop-path, pre-norm block.

This module holds the *only* call site of ``torch.nn.functional.scaled_dot_product_attention``
in mtscale (see :func:`attend`); every attention in the encoder and the decoders goes through
it, so the backend choice (``auto|flash|efficient|cudnn|math``) and its logging live in one
place. Shapes: B sequences (batch, possibly with bodies folded in), L tokens, D model width,
H heads, Dh = D / H.

Skeleton-aware options (patch tokens on a (Lt, Lv) grid of temporal patches x joints; each off
by default, each entering through a zero-initialised gate so that a block built with it computes
exactly what the block without it computed until the gate moves, and an encoder pre-trained
without it loads and starts where it was):

* ``temporal_conv`` (k > 0): a depthwise convolution of width k along time over each joint's
  token sequence, in parallel with attention (SkateFormer's / ST-GCN's local temporal path);
  gated per channel (``tconv_gate``).
* ``joint_mix``: a learned (V, V) mixing matrix per head applied to the values of each temporal
  patch, added to the attention output: ``softmax(QK^T) V + a_h * Phi_h V`` (Hyperformer's
  joint-mixing term), ``Phi`` initialised to the identity or to the skeleton's normalised
  adjacency; gated per head (``attn.mix_gate``).
* ``attn_drop``: dropout on the attention weights (training only).

A graph-convolution stem (``GraphStem``, ``model.graph_stem``) is the one skeleton-aware option
outside the blocks: ST-GCN-style blocks on the full-frame-rate clip, pooled to the patch grid and
added to the token embeddings through a zero-initialised projection (see its docstring).

In masked pre-training only the visible tokens exist: both branches then see the grid with the
hidden tokens set to zero (:func:`to_grid`), i.e. they mix visible neighbours only, and their
outputs are read back at the visible positions. This is the same rule that masked convolutions
use; the decoder (plain blocks) never sees a branch.

Key-padding masks: a boolean mask is passed to SDPA only when some token is actually padded
(the loader resamples clips to T frames, so usually none is). On CPU the fused flash kernel
accepts a boolean mask; on CUDA an ``attn_mask`` rules out the flash kernel (SDPA then runs the
memory-efficient or cuDNN kernel), which is why the all-valid case passes ``None``.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

BACKENDS: dict[str, SDPBackend | None] = {
    "auto": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
_BACKEND_NAMES = {
    SDPBackend.MATH: "math",
    SDPBackend.FLASH_ATTENTION: "flash",
    SDPBackend.EFFICIENT_ATTENTION: "efficient",
    SDPBackend.CUDNN_ATTENTION: "cudnn",
}
_seen: set[tuple] = set()
_last_backend: dict[str, str] = {}


def sdpa_backend_context(name: str) -> contextlib.AbstractContextManager:
    """Context manager restricting SDPA to backend ``name`` (``auto`` = no restriction)."""
    if name not in BACKENDS:
        from mtscale.errors import ConfigError

        raise ConfigError(f"model.attn_backend: found {name!r}, expected one of {'|'.join(BACKENDS)}")
    backend = BACKENDS[name]
    return contextlib.nullcontext() if backend is None else sdpa_kernel(backend)


def _chosen_backend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float) -> str:
    """Name of the kernel SDPA dispatches to for these inputs (under the active context)."""
    try:
        choice = torch._fused_sdp_choice(q, k, v, attn_mask, dropout_p, False)
        return _BACKEND_NAMES.get(SDPBackend(choice), str(choice))
    except Exception:  # pragma: no cover - private API moved; logging only
        return "unknown"


def last_attention_backend() -> dict[str, str]:
    """``{requested backend: kernel that ran}`` for the attention calls seen so far (for logs/benchmarks)."""
    return dict(_last_backend)


def attend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
           dropout_p: float = 0.0, backend: str = "auto") -> Tensor:
    """Scaled dot-product attention: the one call site in mtscale.

    q, k, v: (B, H, L, Dh); attn_mask: None or bool (B, 1, 1|L, L) with True = attend.
    Returns (B, H, L, Dh). The kernel that actually runs is looked up once per input signature
    (device, dtype, backend, mask, dropout, grad) and logged when it changes.
    """
    with sdpa_backend_context(backend):
        sig = (q.device.type, q.dtype, backend, attn_mask is not None, dropout_p > 0, q.requires_grad,
               q.shape[-2], q.shape[-1])  # the kernel choice depends on the length and head size too
        if sig not in _seen and not torch.compiler.is_compiling():
            _seen.add(sig)
            ran = _chosen_backend(q, k, v, attn_mask, dropout_p)
            if _last_backend.get(backend) != ran:
                _last_backend[backend] = ran
                log.info("attention: SDPA backend requested=%s ran=%s on %s (%s, Dh=%d, mask=%s)",
                         backend, ran, q.device.type, str(q.dtype).removeprefix("torch."), q.shape[-1],
                         attn_mask is not None)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


def to_grid(x_BLX: Tensor, grid: tuple[int, int], ids_BL: Tensor | None) -> Tensor:
    """Tokens (B, Lk, *X) -> the full token grid (B, Lt, Lv, *X): all L tokens (``ids_BL`` None),
    or the tokens at positions ``ids_BL`` (B, Lk) with every other position zero."""
    B, X = x_BLX.shape[0], x_BLX.shape[2:]
    Lt, Lv = grid
    if ids_BL is None:
        return x_BLX.reshape(B, Lt, Lv, *X)
    flat = x_BLX.reshape(B, x_BLX.shape[1], -1)
    full = flat.new_zeros(B, Lt * Lv, flat.shape[-1])
    full = full.scatter(1, ids_BL[..., None].expand(-1, -1, flat.shape[-1]), flat)
    return full.reshape(B, Lt, Lv, *X)


def from_grid(g_BTVX: Tensor, ids_BL: Tensor | None) -> Tensor:
    """Inverse of :func:`to_grid`: (B, Lt, Lv, *X) -> (B, Lk, *X) at ``ids_BL`` (all L if None)."""
    B, Lt, Lv = g_BTVX.shape[:3]
    X = g_BTVX.shape[3:]
    flat = g_BTVX.reshape(B, Lt * Lv, -1)
    if ids_BL is not None:
        flat = torch.gather(flat, 1, ids_BL[..., None].expand(-1, -1, flat.shape[-1]))
    return flat.reshape(B, flat.shape[1], *X)


def normalized_adjacency(parents: tuple[int, ...]) -> Tensor:
    """D^-1/2 (A + I) D^-1/2 of the kinematic tree ``parents`` (root: -1), (V, V) float32."""
    V = len(parents)
    a = torch.eye(V)
    for j, p in enumerate(parents):
        if p >= 0:
            a[j, p] = a[p, j] = 1.0
    d = a.sum(1).rsqrt()
    return d[:, None] * a * d[None, :]


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection; optionally attention dropout and
    a gated per-head joint mixing of the values (``mix``: (H, V, V), see the module docstring)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, backend: str = "auto",
                 attn_drop: float = 0.0, mix_init: Tensor | None = None):
        super().__init__()
        if dim % heads:
            from mtscale.errors import ConfigError

            raise ConfigError(f"model.heads: found {heads}, expected a divisor of dim={dim}")
        self.heads, self.backend, self.attn_drop = heads, backend, float(attn_drop)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if mix_init is not None:
            self.mix = nn.Parameter(mix_init.detach().float().expand(heads, *mix_init.shape).clone())
            self.mix_gate = nn.Parameter(torch.zeros(heads))
        else:
            self.mix = self.mix_gate = None

    def forward(self, x_BLD: Tensor, attn_mask: Tensor | None = None, grid: tuple[int, int] | None = None,
                ids_BL: Tensor | None = None) -> Tensor:
        B, L, D = x_BLD.shape
        H = self.heads
        # (B, L, 3, H, Dh) -> q, k, v (B, H, L, Dh) as strided views (SDPA takes them as they
        # are). unbind's backward stacks the three grads straight into the (B, L, 3, H, Dh)
        # layout of the fused projection: no zero-filled buffer + copies as with qkv[i] indexing.
        q, k, v = self.qkv(x_BLD).view(B, L, 3, H, D // H).unbind(2)
        p = self.attn_drop if self.training else 0.0
        o_BHLd = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask, p, self.backend)
        # The CPU flash / CUDA kernels return (B, L, H, Dh) memory viewed as (B, H, L, Dh): free reshape.
        o_BLHd = o_BHLd.transpose(1, 2)
        if self.mix is not None:
            v_BTVHd = to_grid(v, grid, ids_BL)  # hidden tokens: zero values
            m_BTVHd = torch.einsum("hvw,btwhd->btvhd", self.mix.to(v.dtype), v_BTVHd)
            o_BLHd = o_BLHd + from_grid(m_BTVHd, ids_BL) * self.mix_gate.to(v.dtype)[:, None]
        return self.proj(o_BLHd.reshape(B, L, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch for a random subset of samples (training only).

    Uses the global torch RNG (seeded by the trainer); identity when ``p == 0`` or in eval.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class TemporalConv(nn.Module):
    """Depthwise convolution of width ``k`` along time over each joint's tokens: (B, Lt, Lv, D) ->
    same, zero padding at the clip's ends."""

    def __init__(self, dim: int, k: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, k, padding=k // 2, groups=dim)

    def forward(self, g_BTVD: Tensor) -> Tensor:
        B, Lt, Lv, D = g_BTVD.shape
        y = self.conv(g_BTVD.permute(0, 2, 3, 1).reshape(B * Lv, D, Lt))  # (B Lv, D, Lt)
        return y.reshape(B, Lv, D, Lt).permute(0, 3, 1, 2)


class GraphStem(nn.Module):
    """ST-GCN-style stem: ``depth`` blocks of (graph convolution over the skeleton with a learned
    (V, V) adjacency, initialised to the layout's normalised adjacency + BatchNorm + ReLU, then a
    width-9 temporal convolution + BatchNorm, residual, ReLU) on every frame of the clip, each
    body separately; then each temporal patch's frames are averaged per joint (valid frames only)
    and projected to the token width by ``proj``, which starts at zero. Padded frames
    (``valid_BT`` False) are held at zero between layers, so a valid frame's features do not
    depend on how much padding follows it (in ``eval()``: those of the clip cut at its last valid
    frame; in training BatchNorm's batch statistics still count the padded zeros, as ST-GCN's do).

    (B, T, V, C) frames -> (B, Lt * V, D) in patch-token order (``l = tp * V + v``), so it adds
    to the patch tokens' embeddings: zero at init (an encoder built without it loads and starts
    exactly where it was), and the gradient reaches the stem through ``proj`` from the first step.

    ``pyramid`` (the reference ST-GCN's shape): instead of ``depth`` blocks of ``width`` at the
    full frame rate, the blocks form log2(``patch_frames``) + 1 stages of widths ``width``,
    2 ``width``, 4 ``width``, ...; each later stage opens with a temporal stride of 2, so the last
    stage runs at one step per temporal patch (its step ``t`` is centred on the patch's first
    frame) and no frames are averaged; a patch counts as valid when its first frame is.

    It sees every frame of the clip, so in masked pre-training it would carry hidden tokens'
    frames into visible tokens: it is a fine-tuning (and from-scratch) option, and the
    pre-training model refuses it. BatchNorm keeps running statistics (``eval()`` uses them)."""

    def __init__(self, in_chans: int, width: int, depth: int, dim: int, num_joints: int, patch_frames: int,
                 adjacency: Tensor | None = None, kernel: int = 9, pyramid: bool = False):
        super().__init__()
        a = torch.eye(num_joints) if adjacency is None else adjacency.float()
        self.patch_frames, self.pyramid = patch_frames, pyramid
        self.data_bn = nn.BatchNorm1d(num_joints * in_chans)
        stages = pyramid_stages(depth, patch_frames) if pyramid else [0] * depth
        widths = [width * 2 ** s for s in stages]
        self.blocks = nn.ModuleList(
            GraphBlock(in_chans if i == 0 else widths[i - 1], widths[i], a, kernel,
                       stride=2 if i and stages[i] > stages[i - 1] else 1)
            for i in range(depth)
        )
        self.proj = nn.Linear(widths[-1], dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x_BTVC: Tensor, valid_BT: Tensor | None = None) -> Tensor:
        B, T, V, C = x_BTVC.shape
        p = self.patch_frames
        h = self.data_bn(x_BTVC.permute(0, 2, 3, 1).reshape(B, V * C, T))  # (B, V C, T)
        h = h.reshape(B, V, C, T).permute(0, 2, 3, 1)  # (B, C, T, V)
        # padded frames are outside the clip: zero after every layer that would give them a value
        # (BatchNorm shift, conv bias), so the temporal convs read zeros there, as at the clip's edge
        keep = None if valid_BT is None else valid_BT.reshape(B, 1, T, 1).to(h.dtype)
        h = h if keep is None else h * keep
        for blk in self.blocks:
            h, keep = blk(h, keep)
        W = h.shape[1]
        if self.pyramid:  # already one step per temporal patch; padded patches are zero
            return self.proj(h.permute(0, 2, 3, 1).reshape(B, (T // p) * V, W))
        h = h.permute(0, 2, 3, 1).reshape(B, T // p, p, V, W)  # (B, Lt, p, V, W)
        if valid_BT is None:
            pooled = h.mean(2)
        else:
            n = valid_BT.reshape(B, T // p, p, 1, 1).to(h.dtype).sum(2)  # padded frames are zero already
            pooled = h.sum(2) / n.clamp_min(1.0)
        return self.proj(pooled.reshape(B, (T // p) * V, W))


def pyramid_stages(depth: int, patch_frames: int) -> list[int]:
    """Stage of each of ``depth`` pyramid stem blocks: log2(``patch_frames``) + 1 stages, blocks
    spread evenly (6 blocks, 4-frame patches: 0, 0, 1, 1, 2, 2); a ConfigError if it cannot be built."""
    from mtscale.errors import ConfigError

    k = patch_frames.bit_length() - 1
    if patch_frames < 1 or 2 ** k != patch_frames or depth < k + 1:
        raise ConfigError(f"model.graph_stem_pyramid: found {depth} blocks over {patch_frames}-frame patches, expected "
                          f"a power-of-two model.patch_frames and model.graph_stem >= log2(patch_frames) + 1")
    return [i * (k + 1) // depth for i in range(depth)]


class GraphBlock(nn.Module):
    """One ST-GCN block of :class:`GraphStem`: (B, C, T, V) -> (B, W, ceil(T / stride), V)."""

    def __init__(self, c_in: int, c_out: int, adjacency: Tensor, kernel: int = 9, stride: int = 1):
        super().__init__()
        self.stride = stride
        self.gcn = nn.Conv2d(c_in, c_out, 1)
        self.adjacency = nn.Parameter(adjacency.detach().clone())
        self.bn1 = nn.BatchNorm2d(c_out)
        self.tcn = nn.Conv2d(c_out, c_out, (kernel, 1), stride=(stride, 1), padding=(kernel // 2, 0))
        self.bn2 = nn.BatchNorm2d(c_out)
        same = c_in == c_out and stride == 1
        self.res = nn.Identity() if same else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=(stride, 1)),
                                                            nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor, keep: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``keep`` (B, 1, T, 1): 1 on valid frames, 0 on padding (set to zero after each step);
        returns the output and its ``keep`` (every ``stride``-th step: padding is at the end)."""
        h = torch.einsum("nctv,vw->nctw", self.gcn(x), self.adjacency.to(x.dtype))
        h = F.relu(self.bn1(h))
        h = h if keep is None else h * keep.to(h.dtype)
        out = F.relu(self.bn2(self.tcn(h)) + self.res(x))
        if keep is None:
            return out, None
        keep = keep[:, :, ::self.stride]
        return out * keep.to(out.dtype), keep


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)) [+ gated temporal conv(ln(x))]; x + mlp(ln(x)).

    ``grid`` (Lt, Lv) is the token grid the skeleton-aware options work on (see the module
    docstring); ``mix_init`` (V, V) turns the joint mixing on, ``temporal_conv`` > 0 the conv."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 qkv_bias: bool = True, backend: str = "auto", *, attn_drop: float = 0.0,
                 grid: tuple[int, int] | None = None, temporal_conv: int = 0, mix_init: Tensor | None = None):
        super().__init__()
        if (temporal_conv or mix_init is not None) and grid is None:
            raise ValueError("temporal_conv / joint mixing need the token grid")
        self.grid = grid
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias=qkv_bias, backend=backend, attn_drop=attn_drop,
                              mix_init=mix_init)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(round(dim * mlp_ratio)))
        self.drop_path = DropPath(drop_path)
        if temporal_conv:
            self.tconv = TemporalConv(dim, temporal_conv)
            self.tconv_gate = nn.Parameter(torch.zeros(dim))
        else:
            self.tconv = self.tconv_gate = None

    def forward(self, x_BLD: Tensor, attn_mask: Tensor | None = None, ids_BL: Tensor | None = None) -> Tensor:
        h_BLD = self.norm1(x_BLD)
        a_BLD = self.attn(h_BLD, attn_mask, self.grid, ids_BL)
        if self.tconv is not None:
            c_BLD = from_grid(self.tconv(to_grid(h_BLD, self.grid, ids_BL)), ids_BL)
            a_BLD = a_BLD + c_BLD * self.tconv_gate.to(c_BLD.dtype)
        x_BLD = x_BLD + self.drop_path(a_BLD)
        return x_BLD + self.drop_path(self.mlp(self.norm2(x_BLD)))


class Transformer(nn.Module):
    """A stack of pre-norm blocks + final LayerNorm, with optional activation checkpointing.
    ``block_kw`` (attn_drop, grid, temporal_conv, mix_init) goes to every block."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 qkv_bias: bool = True, backend: str = "auto", checkpoint_activations: bool = False,
                 **block_kw):
        super().__init__()
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # linear decay rule
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio, rates[i], qkv_bias, backend, **block_kw) for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.checkpoint_activations = checkpoint_activations

    def forward(self, x_BLD: Tensor, attn_mask: Tensor | None = None, ids_BL: Tensor | None = None) -> Tensor:
        """``ids_BL`` (B, Lk): the grid positions of the Lk tokens given (None: all L, in order)."""
        for blk in self.blocks:
            if self.checkpoint_activations and self.training and torch.is_grad_enabled():
                x_BLD = checkpoint(blk, x_BLD, attn_mask, ids_BL, use_reentrant=False)
            else:
                x_BLD = blk(x_BLD, attn_mask, ids_BL)
        return self.norm(x_BLD)


def key_padding_to_attn_mask(valid_BL: Tensor | None) -> Tensor | None:
    """Boolean key-padding mask (B, L), True = real token -> SDPA mask (B, 1, 1, L), or None
    when every token is valid (keeps the flash kernel eligible on CUDA).

    Whether every token is valid is asked of the tensor only on the CPU (free there); on an
    accelerator that question is a host sync per forward, so callers decide it on the host
    (``mtscale.data.loader.model_mask`` gives None for batches without padding) and a mask
    that reaches this point is used as is.

    A row with no valid token would make softmax NaN; such rows attend to everything instead
    (their outputs are ignored by pooling and losses anyway).
    """
    if valid_BL is None:
        return None
    valid_BL = valid_BL.bool()
    if valid_BL.device.type == "cpu" and bool(valid_BL.all()):
        return None
    empty = ~valid_BL.any(dim=1, keepdim=True)
    return (valid_BL | empty)[:, None, None, :]


def init_weights(m: nn.Module) -> None:
    """Standard inits only (ZeRO-3 ``zero.Init`` compatible): trunc-normal linears, unit LayerNorm."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        if m.weight is not None:
            nn.init.ones_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)

