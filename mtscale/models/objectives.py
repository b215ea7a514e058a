"""Self-supervised objectives on top of :class:`MotionTransformer`; loss on hidden tokens only.

* ``motion_flow`` (Motion-Transformer seed task, BERT-style): every token enters the encoder,
  hidden ones replaced by a learned mask token; a linear head predicts the motion flow
  x[t+1] - x[t] of the hidden frames / patches.
* ``masked_motion`` (MAMP): MAE-style encoder on the visible tokens only, a light transformer
  decoder with mask tokens, ~90 % masking (random or motion-aware), target = the temporal
  difference of each masked patch, normalised per patch.
* ``masked_recon``: the same encoder/decoder, target = the coordinates of each masked token.

All three work with both tokenisations (a frame token's features are its M*V*C coordinates, a
patch token's its p*C coordinates). Masking is a pure function of (seed, step, sample key) —
see masking.py — so results do not depend on rank count, batch position or resumption.

Shapes: N samples, F = sequences per sample (M in patch mode, 1 in frame mode), B = N*F,
L tokens, K token features, D encoder width, E decoder width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtscale.config import ModelConfig, ObjectiveConfig
from mtscale.errors import ConfigError
from mtscale.models import flops as fl
from mtscale.models.encoder import MotionTransformer
from mtscale.models.layers import Transformer, init_weights, key_padding_to_attn_mask
from mtscale.models.masking import mask_scores, num_masked, split_tokens, token_uniform


def motion_of(x_NTMVC: Tensor, mask_NT: Tensor | None = None) -> Tensor:
    """Motion flow (N, T, M, V, C): x[t+1] - x[t]; the last frame repeats the one before (as
    MAMP). Differences touching an invalid (padding) frame are zero."""
    d = x_NTMVC[:, 1:] - x_NTMVC[:, :-1]  # (N, T-1, M, V, C)
    if mask_NT is not None:
        pair = (mask_NT[:, 1:] & mask_NT[:, :-1]).to(d.dtype)[:, :, None, None, None]
        d = d * pair
    return torch.cat([d, d[:, -1:]], dim=1)


def normalise_tokens(t_BLK: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-token target normalisation (MAE norm_pix / MAMP): mean 0, unit variance over K."""
    mean = t_BLK.mean(dim=-1, keepdim=True)
    var = t_BLK.var(dim=-1, keepdim=True, unbiased=True) if t_BLK.shape[-1] > 1 else torch.zeros_like(mean)
    return (t_BLK - mean) / (var + eps).sqrt()


def body_present(x_NTMVC: Tensor, mask_NT: Tensor | None, bodies_folded: int) -> Tensor:
    """(B,) bool: the sequence has a non-zero coordinate in a valid frame. Absent bodies are all
    zeros in the store (MAMP convention); their tokens carry no target and are left out of the
    loss (else ~40 % of a single-person batch is trivially-zero loss diluting the rest)."""
    a_NTM = x_NTMVC.detach().abs().amax(dim=(3, 4))
    if mask_NT is not None:
        a_NTM = a_NTM * mask_NT[:, :, None].to(a_NTM.dtype)
    present_NM = a_NTM.amax(dim=1) > 0
    if bodies_folded == 1:
        return present_NM.any(dim=1)
    return present_NM.reshape(-1)


class PretrainModel(nn.Module):
    """Encoder + objective head. ``forward`` returns (scalar loss, metrics).

    ``encoder`` is the :class:`MotionTransformer` whose ``state_dict()`` is what gets exported.
    """

    def __init__(self, encoder: MotionTransformer, cfg: ObjectiveConfig, *, attn_backend: str = "auto",
                 checkpoint_activations: bool = False):
        super().__init__()
        if encoder.stem is not None:
            raise ConfigError(f"model.graph_stem: found {encoder.graph_stem} in pre-training, expected 0: the stem "
                              "sees every frame, so it would carry hidden tokens into visible ones; add it at "
                              "fine-tuning (--set model.graph_stem=N over the pre-trained encoder)")
        self.encoder, self.cfg, self.kind = encoder, cfg, cfg.kind
        D, K = encoder.dim, encoder.token_dim
        self.n_mask = num_masked(cfg.mask_ratio, encoder.num_tokens)
        if self.kind == "motion_flow":
            self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
            self.head = nn.Linear(D, K)
        else:
            E = cfg.decoder_dim
            if E % cfg.decoder_heads:
                raise ConfigError(f"objective.decoder_heads: found {cfg.decoder_heads}, expected a divisor of "
                                  f"objective.decoder_dim={E}")
            Lt, Lv = encoder.grid
            self.decoder_embed = nn.Linear(D, E)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, E))
            self.decoder_pos_t = nn.Parameter(torch.zeros(1, Lt, 1, E))
            self.decoder_pos_v = nn.Parameter(torch.zeros(1, 1, Lv, E))
            # the hidden tokens' time in the recording (model.time_index), as the encoder embeds it
            self.decoder_time_proj = nn.Linear(encoder.time_proj.in_features, E) if encoder.time_proj is not None else None
            self.decoder = Transformer(E, cfg.decoder_depth, cfg.decoder_heads, 4.0, 0.0, True, attn_backend,
                                       checkpoint_activations)
            self.decoder_pred = nn.Linear(E, K)
        self._init_weights()

    def _init_weights(self) -> None:
        """The objective's own modules; the encoder keeps its constructor's init (``self.apply``
        would re-draw its linears, the zero-initialised time projection among them)."""
        for child in self.children():
            if child is not self.encoder:
                child.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)
        if self.kind != "motion_flow":
            nn.init.trunc_normal_(self.decoder_pos_t, std=0.02)
            nn.init.trunc_normal_(self.decoder_pos_v, std=0.02)
            if self.decoder_time_proj is not None:  # zero at init, as the encoder's
                nn.init.zeros_(self.decoder_time_proj.weight)
                nn.init.zeros_(self.decoder_time_proj.bias)

    # ------------------------------------------------------------------ pieces
    def sequence_keys(self, sample_keys_N: Tensor) -> Tensor:
        """Per-sequence keys (B,): sample key x F + body, distinct across samples and bodies."""
        Fb = self.encoder.bodies_folded
        k = sample_keys_N.to(torch.int64)
        return (k[:, None] * Fb + torch.arange(Fb, device=k.device)).reshape(-1)

    def targets(self, x_NTMVC: Tensor, mask_NT: Tensor | None) -> tuple[Tensor, Tensor]:
        """Raw targets (B, L, K) and per-token motion magnitude (B, L) for motion-aware masking."""
        enc = self.encoder
        motion_BLK = enc.tokenize(motion_of(x_NTMVC, mask_NT))
        target = x_NTMVC if self.kind == "masked_recon" else None
        target_BLK = motion_BLK if target is None else enc.tokenize(target)
        return target_BLK, motion_BLK.abs().mean(dim=-1)

    @torch.no_grad()
    def compute_mask(self, x_NTMVC: Tensor, mask_NT: Tensor | None, sample_keys_N: Tensor, step: int,
                     seed: int) -> tuple[Tensor, Tensor, Tensor]:
        """(ids_keep (B, L-n), ids_restore (B, L), masked (B, L) bool) for this batch."""
        _, motion_BL = self.targets(x_NTMVC, mask_NT)
        return self._mask(motion_BL, sample_keys_N, step, seed)

    def _mask(self, motion_BL: Tensor, sample_keys_N: Tensor, step: int, seed: int):
        u_BL = token_uniform(seed, step, self.sequence_keys(sample_keys_N).to(motion_BL.device),
                             self.encoder.num_tokens)
        aware = self.cfg.masking == "motion_aware"
        scores = mask_scores(u_BL, motion_BL.detach() if aware else None, self.cfg.motion_aware_tau)
        return split_tokens(scores, self.n_mask)

    # ------------------------------------------------------------------ forward
    def forward(self, x_NTMVC: Tensor, mask_NT: Tensor | None, sample_keys_N: Tensor, step: int, seed: int,
                per_sample: bool = False, time_NT: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss on hidden tokens. Returns (scalar loss, metrics); metrics are detached scalars,
        plus ``per_sample_loss`` (N,) when ``per_sample``. ``time_NT``: each frame's time in the
        recording (the encoder's ``time_index``).

        The loss is the mean over samples of each sample's mean over its hidden valid tokens of
        present (not all-zero) bodies, so it is additive over batch splits (a 2-rank mean equals
        the 1-rank mean)."""
        enc = self.encoder
        N = x_NTMVC.shape[0]
        tokens_BLK = enc.tokenize(x_NTMVC)
        valid_BL = enc.token_valid(mask_NT)
        target_BLK, motion_BL = self.targets(x_NTMVC, mask_NT)
        ids_keep, ids_restore, masked_BL = self._mask(motion_BL, sample_keys_N, step, seed)

        # Targets and masking scores above come from the input as given (fp32 from the job);
        # only the tokens entering the network take the compute dtype (bf16 params under
        # DeepSpeed's bf16 mode; fp32 params under autocast, which then casts per op).
        h_BLD = enc.embed(tokens_BLK.to(enc.embed.weight.dtype))
        if self.kind == "motion_flow":
            h_BLD = torch.where(masked_BL[..., None], self.mask_token.to(h_BLD.dtype), h_BLD) + enc.pos_embed(time_NT)
            pred_BLK = self.head(enc.encode(h_BLD, valid_BL))
        else:
            pred_BLK = self._mae(h_BLD + enc.pos_embed(time_NT), valid_BL, ids_keep, ids_restore, time_NT)

        w_BL = masked_BL if valid_BL is None else masked_BL & valid_BL
        w_BL = w_BL & body_present(x_NTMVC, mask_NT, enc.bodies_folded)[:, None]
        if self.cfg.norm_target == "token":
            target_BLK = normalise_tokens(target_BLK)
        elif self.cfg.norm_target == "global":  # one scale: the RMS over the loss tokens
            wf = w_BL[..., None].to(target_BLK.dtype)
            ms = (target_BLK.detach().square() * wf).sum() / (wf.sum() * target_BLK.shape[-1]).clamp_min(1.0)
            target_BLK = target_BLK / (ms + 1e-12).sqrt()
        err_BL = F.mse_loss(pred_BLK.float(), target_BLK.float(), reduction="none").mean(dim=-1)
        w_NX = w_BL.reshape(N, -1).to(err_BL.dtype)
        loss_N = (err_BL.reshape(N, -1) * w_NX).sum(1) / w_NX.sum(1).clamp_min(1.0)
        loss = loss_N.mean()
        metrics = {"loss": loss.detach(), "mask_ratio": masked_BL.float().mean().detach()}
        if per_sample:
            metrics["per_sample_loss"] = loss_N.detach()
        return loss, metrics

    def _mae(self, h_BLD: Tensor, valid_BL: Tensor | None, ids_keep: Tensor, ids_restore: Tensor,
             time_NT: Tensor | None = None) -> Tensor:
        """Encode visible tokens, decode all: (B, L, D) -> predictions (B, L, K). With the
        encoder's ``time_index`` the decoder's position embedding also carries every token's time
        (hidden tokens included: their time is known, only their motion is hidden)."""
        B, L, D = h_BLD.shape
        Lk = ids_keep.shape[1]
        vis_BkD = torch.gather(h_BLD, 1, ids_keep[..., None].expand(B, Lk, D))
        vis_valid = None if valid_BL is None else torch.gather(valid_BL, 1, ids_keep)
        z_BkD = self.encoder.encode(vis_BkD, vis_valid, ids_keep)
        d_BkE = self.decoder_embed(z_BkD)
        E = d_BkE.shape[-1]
        d_BLE = torch.cat([d_BkE, self.mask_token.to(d_BkE.dtype).expand(B, L - Lk, E)], dim=1)
        d_BLE = torch.gather(d_BLE, 1, ids_restore[..., None].expand(B, L, E))  # unshuffle
        d_BLE = d_BLE + (self.decoder_pos_t + self.decoder_pos_v).reshape(1, L, E)
        if self.decoder_time_proj is not None:  # time_NT is not None: pos_embed above required it
            tf = self.encoder.time_features(time_NT).to(self.decoder_time_proj.weight.dtype)
            d_BLE = d_BLE + self.decoder_time_proj(tf)
        d_BLE = self.decoder(d_BLE, key_padding_to_attn_mask(valid_BL))
        return self.decoder_pred(d_BLE)

    # ------------------------------------------------------------------ accounting
    def flops_per_sample(self, training: bool = True) -> int:
        """Model FLOPs per sample (x3 for a training step), from the shapes; see flops.py."""
        enc = self.encoder
        L, K, D = enc.num_tokens, enc.token_dim, enc.dim
        if self.kind == "motion_flow":
            f = fl.linear_flops(L, K, D) + fl.transformer_flops(L, D, enc.depth, enc.mlp_ratio) + fl.linear_flops(L, D, K)
        else:
            Lk, E = L - self.n_mask, self.cfg.decoder_dim
            f = (fl.linear_flops(L, K, D) + fl.transformer_flops(Lk, D, enc.depth, enc.mlp_ratio)
                 + fl.linear_flops(Lk, D, E) + fl.transformer_flops(L, E, self.cfg.decoder_depth, 4.0)
                 + fl.linear_flops(L, E, K))
        f *= enc.bodies_folded
        return 3 * f if training else f

    def tokens_per_sample(self) -> int:
        """Tokens the encoder sees per sample (visible ones only for the MAE-style objectives)."""
        L = self.encoder.num_tokens
        seen = L if self.kind == "motion_flow" else L - self.n_mask
        return seen * self.encoder.bodies_folded


def build_pretrain_model(model_cfg: ModelConfig, objective_cfg: ObjectiveConfig, *, clip_frames: int,
                         num_bodies: int, num_joints: int, in_chans: int = 3,
                         parents: tuple[int, ...] | None = None) -> PretrainModel:
    """Encoder (from the size registry + overrides) + objective. ``model_cfg.compile`` is left to
    the caller (compile the returned module, or use the engine's compile) so that state-dict
    keys stay un-prefixed."""
    enc = MotionTransformer.from_config(model_cfg, clip_frames=clip_frames, num_bodies=num_bodies,
                                        num_joints=num_joints, in_chans=in_chans, parents=parents)
    return PretrainModel(enc, objective_cfg, attn_backend=model_cfg.attn_backend,
                         checkpoint_activations=model_cfg.checkpoint_activations)
