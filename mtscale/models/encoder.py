"""MotionTransformer encoder, its size registry, classifier head and layer-wise lr decay ids.

Axis letters: N batch, T frames, M bodies, V joints, C coordinates; B = sequences seen by the
transformer (N in frame mode, N*M in patch mode), L tokens, D width, K token input features.

Two tokenisations:

* ``frame`` (the original Motion-Transformer view): one token per frame, all joints of all
  bodies embedded together: (N, T, M*V*C) -> L = T tokens.
* ``patch`` (MAMP): one token per (temporal patch of p frames x joint) with separate learned
  temporal and joint position embeddings. Bodies are folded into the batch as MAMP does
  (B = N*M, L = T/p * V, K = p*C); ``features`` pools over tokens and then averages the M
  bodies back into one vector per sample (absent bodies are zeros in the store, as in MAMP).

Token order in patch mode is temporal-patch-major: token ``l = tp * V + v``.

Print the size table with ``python -m mtscale.models.encoder --table``.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mtscale.config import ModelConfig
from mtscale.errors import ConfigError
from mtscale.models.layers import GraphStem, Transformer, init_weights, key_padding_to_attn_mask, normalized_adjacency

TIME_FREQS = 16
"""Sinusoid frequencies of ``model.time_index`` (periods 2 .. 512 frames, geometric)."""


@dataclass(frozen=True)
class Size:
    dim: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0


SIZES: dict[str, Size] = {
    "tiny": Size(64, 2, 4),  # tests and CPU demos
    "small": Size(256, 8, 8),  # ~ MAMP's encoder (8 layers, 256 wide, 8 heads)
    "base": Size(512, 12, 8),
    "large": Size(768, 24, 12),
    "xl": Size(1024, 24, 16),  # >= 300M parameters: ZeRO-3 territory
    "huge": Size(2048, 24, 16),  # >= 1B parameters: ZeRO-3 (+ offload) only
}


def resolve_size(cfg: ModelConfig) -> Size:
    """The registry row named by ``cfg.size`` with any explicit dim/depth/heads/mlp_ratio applied."""
    if cfg.size not in SIZES:
        raise ConfigError(f"model.size: found {cfg.size!r}, expected one of {'|'.join(SIZES)}")
    base = SIZES[cfg.size]
    return Size(
        dim=cfg.dim if cfg.dim is not None else base.dim,
        depth=cfg.depth if cfg.depth is not None else base.depth,
        heads=cfg.heads if cfg.heads is not None else base.heads,
        mlp_ratio=cfg.mlp_ratio if cfg.mlp_ratio is not None else base.mlp_ratio,
    )


class MotionTransformer(nn.Module):
    """Transformer encoder over skeleton clips (N, T, M, V, C).

    Submodules (stable state-dict keys, exported as-is): ``embed`` (token -> D linear),
    ``pos_t`` / ``pos_v`` (position embeddings), ``transformer.blocks.{i}``, ``transformer.norm``.
    """

    def __init__(self, *, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0,
                 tokenization: str = "patch", clip_frames: int = 120, num_bodies: int = 2,
                 num_joints: int = 25, in_chans: int = 3, patch_frames: int = 4,
                 drop_path: float = 0.0, qkv_bias: bool = True, attn_backend: str = "auto",
                 checkpoint_activations: bool = False, rel_bias: bool = False, temporal_conv: int = 0,
                 joint_mix: str = "none", attn_drop: float = 0.0, attention: str = "global",
                 time_index: bool = False, graph_stem: int = 0, graph_stem_width: int = 64,
                 graph_stem_pyramid: bool = False, parents: tuple[int, ...] | None = None):
        super().__init__()
        if tokenization not in ("frame", "patch"):
            raise ConfigError(f"model.tokenization: found {tokenization!r}, expected 'frame' or 'patch'")
        if tokenization == "patch" and (patch_frames < 1 or clip_frames % patch_frames):
            raise ConfigError(
                f"model.patch_frames: found {patch_frames}, expected a divisor of data.clip_frames={clip_frames}"
            )
        self.dim, self.depth, self.heads, self.mlp_ratio = dim, depth, heads, mlp_ratio
        self.tokenization, self.patch_frames = tokenization, patch_frames
        self.T, self.M, self.V, self.C = clip_frames, num_bodies, num_joints, in_chans
        if tokenization == "frame":
            self.grid = (clip_frames, 1)  # (Lt, Lv)
            self.token_dim = num_bodies * num_joints * in_chans
        else:
            self.grid = (clip_frames // patch_frames, num_joints)
            self.token_dim = patch_frames * in_chans
        self.num_tokens = self.grid[0] * self.grid[1]
        self.embed = nn.Linear(self.token_dim, dim)
        self.pos_t = nn.Parameter(torch.empty(1, self.grid[0], 1, dim))
        self.pos_v = nn.Parameter(torch.empty(1, 1, self.grid[1], dim)) if tokenization == "patch" else None
        if joint_mix != "none" and tokenization != "patch":
            raise ConfigError(f"model.joint_mix: found {joint_mix!r} with tokenization 'frame', expected patch tokens")
        mix_init = None
        if joint_mix == "adjacency" and parents is not None:
            if len(parents) != num_joints:
                raise ConfigError(f"model.joint_mix: the layout has {len(parents)} joints, expected {num_joints}")
            mix_init = normalized_adjacency(tuple(parents))
        elif joint_mix != "none":  # identity, or adjacency rebuilt for loading (weights overwrite it)
            mix_init = torch.eye(num_joints)
        if graph_stem < 0 or (graph_stem and graph_stem_width < 1):
            raise ConfigError(f"model.graph_stem / graph_stem_width: found {graph_stem} / {graph_stem_width}, "
                              "expected graph_stem >= 0 blocks and graph_stem_width >= 1")
        if graph_stem and tokenization != "patch":
            raise ConfigError(f"model.graph_stem: found {graph_stem} with tokenization 'frame', expected patch tokens")
        if graph_stem and parents is not None and len(parents) != num_joints:
            raise ConfigError(f"model.graph_stem: the layout has {len(parents)} joints, expected {num_joints}")
        # ST-GCN stem on the full-rate clip, added to the token embeddings (zero at init); without
        # the layout's tree (a model about to load its weights) its adjacency starts as the identity
        self.graph_stem, self.graph_stem_width = graph_stem, graph_stem_width
        self.stem = GraphStem(in_chans, graph_stem_width, graph_stem, dim, num_joints, patch_frames,
                              normalized_adjacency(tuple(parents)) if parents is not None else None,
                              pyramid=graph_stem_pyramid) if graph_stem else None
        if attention not in ("global", "spatial"):
            raise ConfigError(f"model.attention: found {attention!r}, expected global|spatial")
        if attention != "global" and tokenization != "patch":
            raise ConfigError(f"model.attention: found {attention!r} with tokenization 'frame', expected patch tokens")
        self.temporal_conv, self.joint_mix, self.attn_drop = temporal_conv, joint_mix, attn_drop
        self.attention = attention
        self.transformer = Transformer(dim, depth, heads, mlp_ratio, drop_path, qkv_bias, attn_backend,
                                       checkpoint_activations, attn_drop=attn_drop, grid=self.grid,
                                       temporal_conv=temporal_conv, mix_init=mix_init)
        if rel_bias and tokenization != "patch":
            raise ConfigError("model.rel_bias: found true with tokenization 'frame', expected patch tokens")
        # relative attention bias (model.rel_bias): (H, V, V) joint pairs, (H, 2 Lt - 1) time offsets
        self.bias_v = nn.Parameter(torch.zeros(heads, num_joints, num_joints)) if rel_bias else None
        self.bias_t = nn.Parameter(torch.zeros(heads, 2 * self.grid[0] - 1)) if rel_bias else None
        # time in the recording (model.time_index): sin / cos features -> D, zero at init
        self.time_proj = nn.Linear(2 * TIME_FREQS, dim) if time_index else None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        init_weights(m)
        if isinstance(m, MotionTransformer):
            nn.init.trunc_normal_(m.pos_t, std=0.02)
            if m.pos_v is not None:
                nn.init.trunc_normal_(m.pos_v, std=0.02)
            if m.time_proj is not None:
                nn.init.zeros_(m.time_proj.weight)
                nn.init.zeros_(m.time_proj.bias)
            if m.stem is not None:  # apply() re-drew its projection as a linear: back to zero
                nn.init.zeros_(m.stem.proj.weight)
                nn.init.zeros_(m.stem.proj.bias)

    @classmethod
    def from_config(cls, cfg: ModelConfig, *, clip_frames: int, num_bodies: int, num_joints: int,
                    in_chans: int = 3, parents: tuple[int, ...] | None = None) -> MotionTransformer:
        """``parents`` (the layout's kinematic tree) initialises ``joint_mix: adjacency``; without
        it (a model about to load its weights) that matrix starts as the identity."""
        s = resolve_size(cfg)
        return cls(dim=s.dim, depth=s.depth, heads=s.heads, mlp_ratio=s.mlp_ratio,
                   tokenization=cfg.tokenization, clip_frames=clip_frames, num_bodies=num_bodies,
                   num_joints=num_joints, in_chans=in_chans, patch_frames=cfg.patch_frames,
                   drop_path=cfg.drop_path, qkv_bias=getattr(cfg, "qkv_bias", True),
                   attn_backend=cfg.attn_backend, checkpoint_activations=cfg.checkpoint_activations,
                   rel_bias=cfg.rel_bias, temporal_conv=cfg.temporal_conv, joint_mix=cfg.joint_mix,
                   attn_drop=cfg.attn_drop, attention=cfg.attention, time_index=cfg.time_index,
                   graph_stem=cfg.graph_stem, graph_stem_width=cfg.graph_stem_width,
                   graph_stem_pyramid=cfg.graph_stem_pyramid, parents=parents)

    # ------------------------------------------------------------------ tokens
    @property
    def bodies_folded(self) -> int:
        """Sequences per sample: M in patch mode (bodies folded into the batch), 1 in frame mode."""
        return self.M if self.tokenization == "patch" else 1

    def check_input(self, x_NTMVC: Tensor) -> None:
        want = (self.T, self.M, self.V, self.C)
        if x_NTMVC.ndim != 5 or tuple(x_NTMVC.shape[1:]) != want:
            raise ConfigError(
                f"encoder input: found shape {tuple(x_NTMVC.shape)}, expected (N, T, M, V, C) = (N, {want[0]}, "
                f"{want[1]}, {want[2]}, {want[3]}) from data.clip_frames / data.num_bodies / the layout"
            )

    def tokenize(self, x_NTMVC: Tensor) -> Tensor:
        """(N, T, M, V, C) -> tokens (B, L, K)."""
        self.check_input(x_NTMVC)
        N, T, M, V, C = x_NTMVC.shape
        if self.tokenization == "frame":
            return x_NTMVC.reshape(N, T, M * V * C)
        p = self.patch_frames
        x = x_NTMVC.reshape(N, T // p, p, M, V, C).permute(0, 3, 1, 4, 2, 5)  # (N, M, Tp, V, p, C)
        return x.reshape(N * M, (T // p) * V, p * C)

    def token_valid(self, mask_NT: Tensor | None) -> Tensor | None:
        """Valid-frame mask (N, T) -> valid-token mask (B, L); a patch is valid if any frame is."""
        if mask_NT is None:
            return None
        mask_NT = mask_NT.bool()
        if self.tokenization == "frame":
            return mask_NT
        return self.per_token(mask_NT.reshape(mask_NT.shape[0], -1, self.patch_frames).any(dim=2))

    def per_token(self, v_NTp: Tensor) -> Tensor:
        """Patch mode: a value per temporal patch (N, Tp) -> the same value for each of its tokens
        (every body and joint of that patch), (B, L) in token order."""
        N, (Tp, V) = v_NTp.shape[0], self.grid
        return v_NTp[:, None, :, None].expand(N, self.M, Tp, V).reshape(N * self.M, Tp * V)

    def pos_embed(self, time_NT: Tensor | None = None) -> Tensor:
        """Position embedding (temporal + joint in patch mode), (1, L, D); with ``time_index``
        plus each token's embedded time in the recording, (B, L, D)."""
        pos = self.pos_t if self.pos_v is None else self.pos_t + self.pos_v  # (1, Lt, Lv, D)
        pos = pos.reshape(1, self.num_tokens, self.dim)
        if self.time_proj is None:
            return pos
        if time_NT is None:
            raise ConfigError("model.time_index: this encoder embeds each token's time in the recording, but no "
                              "time was given; expected the clips' batch['time'] (mtscale's loader and predict give it)")
        return pos + self.time_proj(self.time_features(time_NT).to(self.time_proj.weight.dtype))

    def time_features(self, time_NT: Tensor) -> Tensor:
        """(N, T) frame times -> (B, L, 2 x TIME_FREQS) sin / cos features of each token's time
        (a patch's: the mean of its frames'), periods from 2 to 512 frames, computed in fp32."""
        t = time_NT.float()
        if self.tokenization == "patch":
            t = self.per_token(t.reshape(t.shape[0], -1, self.patch_frames).mean(-1))
        k = torch.arange(TIME_FREQS, device=t.device, dtype=torch.float32)
        omega = 2 * math.pi / (2.0 * 256.0 ** (k / (TIME_FREQS - 1)))  # periods 2 .. 512 frames
        ang = t[..., None] * omega
        return torch.cat([ang.sin(), ang.cos()], dim=-1)

    def embed_tokens(self, tokens_BLK: Tensor, time_NT: Tensor | None = None) -> Tensor:
        """Linear token embedding + position embedding: (B, L, K) -> (B, L, D)."""
        return self.embed(tokens_BLK) + self.pos_embed(time_NT)

    def attn_bias(self, ids_BL: Tensor | None = None) -> Tensor | None:
        """The relative attention bias (``model.rel_bias``) of all L tokens, (1, H, L, L), or of
        the tokens ``ids_BL`` (B, Lk) (indices into L, e.g. a masked encoder's visible ones),
        (B, H, Lk, Lk); None without it."""
        if self.bias_v is None:
            return None
        Lt, Lv = self.grid
        ids = torch.arange(self.num_tokens, device=self.bias_v.device)[None] if ids_BL is None else ids_BL
        tv, tt = ids % Lv, ids // Lv  # token l = tp * V + v
        bias_HBLL = (self.bias_v[:, tv[:, :, None], tv[:, None, :]]
                     + self.bias_t[:, tt[:, :, None] - tt[:, None, :] + Lt - 1])
        return bias_HBLL.transpose(0, 1)

    def spatial_mask(self, ids_BL: Tensor | None, device: torch.device) -> Tensor | None:
        """``attention: spatial``: True where two tokens share a temporal patch, (1, 1, L, L) for
        all L tokens or (B, 1, Lk, Lk) for the tokens ``ids_BL``; None with global attention."""
        if self.attention == "global":
            return None
        ids = torch.arange(self.num_tokens, device=device)[None] if ids_BL is None else ids_BL
        tt = ids // self.grid[1]  # token l = tp * V + v
        return (tt[:, :, None] == tt[:, None, :])[:, None]

    def encode(self, h_BLD: Tensor, valid_BL: Tensor | None = None, ids_BL: Tensor | None = None) -> Tensor:
        """Run the transformer (blocks + final norm) on embedded tokens: all L of them, or the
        subset ``ids_BL`` (B, Lk) (``rel_bias``, ``temporal_conv``, ``joint_mix`` and
        ``attention: spatial`` depend on the tokens' positions)."""
        mask = key_padding_to_attn_mask(valid_BL)
        same_t = self.spatial_mask(ids_BL, h_BLD.device)
        if same_t is not None:
            allowed = same_t if mask is None else same_t & mask
            # a query whose whole temporal patch is padding keeps its patch (output ignored, never NaN)
            mask = allowed | (same_t & ~allowed.any(-1, keepdim=True))
        bias = self.attn_bias(ids_BL)
        if bias is not None:
            bias = bias.to(h_BLD.dtype)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        return self.transformer(h_BLD, mask, ids_BL)

    # ------------------------------------------------------------------ public
    def forward(self, x_NTMVC: Tensor, mask_NT: Tensor | None = None, time_NT: Tensor | None = None) -> Tensor:
        """Token features (B, L, D). ``time_NT``: each frame's time in the recording (``time_index``)."""
        h_BLD = self.embed_tokens(self.tokenize(x_NTMVC), time_NT)
        if self.stem is not None:
            h_BLD = h_BLD + self.stem_tokens(x_NTMVC, mask_NT).to(h_BLD.dtype)
        return self.encode(h_BLD, self.token_valid(mask_NT))

    def stem_tokens(self, x_NTMVC: Tensor, mask_NT: Tensor | None = None) -> Tensor:
        """``graph_stem``: the stem's term of each patch token, (B, L, D), bodies folded as tokens are."""
        N, T, M, V, C = x_NTMVC.shape
        x_BTVC = x_NTMVC.permute(0, 2, 1, 3, 4).reshape(N * M, T, V, C)
        valid_BT = None if mask_NT is None else mask_NT.bool()[:, None].expand(N, M, T).reshape(N * M, T)
        return self.stem(x_BTVC.to(self.stem.proj.weight.dtype), valid_BT)

    def features(self, x_NTMVC: Tensor, mask_NT: Tensor | None = None, time_NT: Tensor | None = None, *,
                 per_joint: bool = False) -> Tensor:
        """Pooled representation: mean over valid tokens, then over folded bodies -> (N, D).

        ``per_joint`` (MAMP's fine-tuning head): mean over valid temporal positions only, the
        joint columns concatenated -> (N, Lv * D) (Lv = V in patch mode, 1 in frame mode)."""
        N = x_NTMVC.shape[0]
        h_BLD = self(x_NTMVC, mask_NT, time_NT)
        Lt, Lv = self.grid
        h = h_BLD.reshape(h_BLD.shape[0], Lt, Lv, self.dim)  # (B, Lt, Lv, D)
        valid = self.token_valid(mask_NT)
        if valid is None:
            pooled = h.mean(dim=1) if per_joint else h.mean(dim=(1, 2))
        else:
            w = valid.reshape(-1, Lt, Lv, 1).to(h.dtype)  # (B, Lt, Lv, 1)
            dims = (1,) if per_joint else (1, 2)
            pooled = (h * w).sum(dims) / w.sum(dims).clamp_min(1.0)
        return pooled.reshape(N, self.bodies_folded, -1).mean(dim=1)


class ClassifierHead(nn.Module):
    """Encoder + pooled features -> classifier. ``head`` keys are separate from ``encoder.*``
    so a pre-trained encoder loads exactly.

    Features (``pool``): ``mean`` over all valid tokens (D), or ``joint`` -- MAMP's fine-tuning
    head -- the mean over time per joint column, the columns concatenated (Lv * D), which keeps
    which joint carries which feature. Head (``head``):

    - ``layernorm``: LayerNorm (``fc_norm``) -> dropout -> linear (``pool=mean``), or, with
      ``pool=joint``, dropout -> ``fc_norm`` = linear to ``hidden`` + BatchNorm + ReLU -> linear
      (MAMP's ``ActionHeadFinetune``);
    - ``linear``: one linear layer on the features (linear probe; ``fc_norm`` is the identity).
    """

    def __init__(self, encoder: MotionTransformer, num_classes: int, drop: float = 0.0, pool: str = "mean",
                 hidden: int = 2048, head: str = "layernorm"):
        super().__init__()
        if pool not in ("mean", "joint"):
            raise ConfigError(f"pool: found {pool!r}, expected 'mean' or 'joint'")
        if head not in ("layernorm", "linear"):
            raise ConfigError(f"head: found {head!r}, expected 'layernorm' or 'linear'")
        self.encoder, self.pool = encoder, pool
        self.drop = nn.Dropout(drop)
        width = encoder.dim if pool == "mean" else encoder.grid[1] * encoder.dim
        if head == "linear":
            self.fc_norm: nn.Module = nn.Identity()
        elif pool == "mean":
            self.fc_norm = nn.LayerNorm(width, eps=1e-6)
        else:
            self.fc_norm = nn.Sequential(nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
            width = hidden
        self.head = nn.Linear(width, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE fine-tuning init
        nn.init.zeros_(self.head.bias)

    def features(self, x_NTMVC: Tensor, mask_NT: Tensor | None = None, time_NT: Tensor | None = None) -> Tensor:
        """The pooled encoder features this head reads: (N, D) or (N, Lv * D)."""
        return self.encoder.features(x_NTMVC, mask_NT, time_NT, per_joint=self.pool == "joint")

    def forward(self, x_NTMVC: Tensor, mask_NT: Tensor | None = None, time_NT: Tensor | None = None) -> Tensor:
        """Logits (N, num_classes). ``time_NT``: each frame's time in the recording (``time_index``)."""
        f = self.features(x_NTMVC, mask_NT, time_NT)
        if isinstance(self.fc_norm, nn.LayerNorm):
            return self.head(self.drop(self.fc_norm(f)))
        return self.head(self.fc_norm(self.drop(f)))


_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def layer_id_for(name: str, depth: int) -> int:
    """Layer id for layer-wise lr decay (BEiT/MAE): embeddings (token, position, time) and the
    relative attention bias (shared by all blocks) 0, block i -> i + 1, rest depth + 1 -- the
    graph stem (``stem.*``) included: it is a new branch learning from its init, like the head.

    lr scale for a parameter = decay ** (depth + 1 - layer_id_for(name, depth)).
    Works with or without an ``encoder.`` prefix.
    """
    leaf = name.removeprefix("encoder.")
    if leaf.startswith("stem."):  # its own blocks are not the transformer's
        return depth + 1
    m = _BLOCK_RE.search(name)
    if m:
        return int(m.group(1)) + 1
    if leaf.startswith(("embed.", "pos_t", "pos_v", "time_proj.", "bias_v", "bias_t", "mask_token")):
        return 0
    return depth + 1


NO_DECAY_SUFFIXES = ("bias", "_token", "pos_t", "pos_v", "bias_v", "bias_t", "attn.mix", ".adjacency")
"""Parameter-name endings kept out of weight decay: biases, learned tokens, position embeddings,
the relative attention biases (``bias_v`` / ``bias_t``), the joint-mixing matrices and the graph
stem's adjacencies (decay would pull an adjacency initialisation to zero); every vector (LayerNorm, gates) too."""


def full_shape(p: nn.Parameter) -> tuple[int, ...]:
    """A parameter's true shape, also under ZeRO-3, where ``p`` itself is an empty partition
    (shape ``(0,)``) and DeepSpeed keeps the real shape in ``ds_shape``."""
    return tuple(getattr(p, "ds_shape", p.shape))


def no_weight_decay(name: str, p: nn.Parameter) -> bool:
    """The one rule for which parameters AdamW leaves undecayed (pre-training and fine-tuning);
    it reads the full shape, so it decides the same under ZeRO-3 partitioning."""
    return len(full_shape(p)) < 2 or name.endswith(NO_DECAY_SUFFIXES)


def param_groups_lrd(model: nn.Module, depth: int, weight_decay: float, layer_decay: float) -> list[dict]:
    """Parameter groups with per-layer ``lr_scale`` and no weight decay on biases/norms/embeddings."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = no_weight_decay(name, p)
        lid = layer_id_for(name, depth)
        g = groups.setdefault((lid, no_wd), {
            "params": [], "weight_decay": 0.0 if no_wd else weight_decay,
            "lr_scale": layer_decay ** (depth + 1 - lid), "layer_id": lid,
        })
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def count_parameters(size: str, tokenization: str = "patch", *, clip_frames: int = 120, num_bodies: int = 2,
                     num_joints: int = 25, patch_frames: int = 4) -> int:
    """Encoder parameter count, built on the meta device (no memory, any size)."""
    cfg = ModelConfig(size=size, tokenization=tokenization, patch_frames=patch_frames)
    with torch.device("meta"):
        enc = MotionTransformer.from_config(cfg, clip_frames=clip_frames, num_bodies=num_bodies,
                                            num_joints=num_joints)
    return sum(p.numel() for p in enc.parameters())


def size_table(clip_frames: int = 120, num_bodies: int = 2, num_joints: int = 25, patch_frames: int = 4) -> str:
    """Markdown table of the registry with encoder parameter counts for both tokenisations."""
    rows = ["| size | dim | depth | heads | mlp_ratio | params (patch) | params (frame) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in SIZES.items():
        kw = dict(clip_frames=clip_frames, num_bodies=num_bodies, num_joints=num_joints, patch_frames=patch_frames)
        pp, pf = count_parameters(name, "patch", **kw), count_parameters(name, "frame", **kw)
        rows.append(f"| {name} | {s.dim} | {s.depth} | {s.heads} | {s.mlp_ratio:g} | {_human(pp)} | {_human(pf)} |")
    return "\n".join(rows)


def _human(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    return f"{n / 1e3:.0f} k"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="MotionTransformer size registry")
    ap.add_argument("--table", action="store_true", help="print the markdown size table")
    ap.add_argument("--clip-frames", type=int, default=120)
    ap.add_argument("--num-bodies", type=int, default=2)
    ap.add_argument("--num-joints", type=int, default=25)
    ap.add_argument("--patch-frames", type=int, default=4)
    a = ap.parse_args(argv)
    print(size_table(a.clip_frames, a.num_bodies, a.num_joints, a.patch_frames))  # CLI output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
