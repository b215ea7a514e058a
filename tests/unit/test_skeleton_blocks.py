"""Skeleton-aware block options (issue 26): temporal conv, joint mixing, attention dropout, and
the graph-convolution stem (``model.graph_stem``).

Zero-gate equivalence (a block with the new branches at their initial gates computes what the
plain block computes), the grid rule under masking, parameter counts, weight-decay groups, and
loading an encoder pre-trained without the branches into a model with them."""

from __future__ import annotations

import pytest
import torch

from mtscale.config import FinetuneConfig, ModelConfig
from mtscale.data.layouts import get_layout
from mtscale.errors import BadInputError, ConfigError
from mtscale.models.encoder import MotionTransformer, no_weight_decay, param_groups_lrd
from mtscale.models.layers import from_grid, normalized_adjacency, to_grid
from mtscale.train.classifier import load_encoder_state

N, T, M, C = 2, 16, 1, 3
LAYOUT = get_layout("kinect_v1_20")
V = LAYOUT.num_joints


def enc(**kw) -> MotionTransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(size="tiny", tokenization="patch", patch_frames=4, **kw)
    return MotionTransformer.from_config(cfg, clip_frames=T, num_bodies=M, num_joints=V, parents=LAYOUT.parents)


def x_batch() -> torch.Tensor:
    return torch.randn(N, T, M, V, C, generator=torch.Generator().manual_seed(1))


def test_zero_gates_reproduce_the_plain_encoder() -> None:
    """Same seed -> the plain encoder's weights are a subset; with the gates at 0 the output is equal."""
    plain, rich = enc(), enc(temporal_conv=3, joint_mix="adjacency", attn_drop=0.5)
    missing = sorted(set(rich.state_dict()) - set(plain.state_dict()))
    assert missing and all(".tconv." in k or k.endswith(("tconv_gate", "attn.mix", "attn.mix_gate")) for k in missing)
    rich.load_state_dict(plain.state_dict(), strict=False)
    plain.eval(), rich.eval()
    x = x_batch()
    torch.testing.assert_close(rich(x), plain(x), rtol=1e-5, atol=1e-6)
    # gates open: the output changes (the branches are wired in)
    with torch.no_grad():
        for b in rich.transformer.blocks:
            b.tconv_gate.fill_(0.5)
            b.attn.mix_gate.fill_(0.5)
    assert (rich(x) - plain(x)).abs().max() > 1e-3


def test_parameter_counts() -> None:
    plain = sum(p.numel() for p in enc().parameters())
    rich = sum(p.numel() for p in enc(temporal_conv=5, joint_mix="identity").parameters())
    D, H, depth = 64, 4, 2
    per_block = (D * 5 + D) + D + (H * V * V + H)  # conv weight + bias, conv gate, mix + mix gate
    assert rich - plain == depth * per_block


def test_joint_mix_init_and_math() -> None:
    a = normalized_adjacency(LAYOUT.parents)
    assert torch.allclose(a, a.T) and (a.diagonal() > 0).all()
    assert a[1, 0] > 0 and a[0, 7] == 0  # spine-hip linked, hip-hand not
    e = enc(joint_mix="adjacency")
    assert torch.equal(e.transformer.blocks[0].attn.mix[2], a)
    assert torch.equal(enc(joint_mix="identity").transformer.blocks[1].attn.mix[0], torch.eye(V))


def test_temporal_conv_is_local_in_time() -> None:
    """With only the conv branch open, token (t, v) depends on tokens (t +- 1, v) and nothing else
    of the first block's input; checked on the gradient of one output."""
    e = enc(temporal_conv=3)
    blk = e.transformer.blocks[0]
    with torch.no_grad():
        blk.tconv_gate.fill_(1.0)
    Lt = T // 4
    h = torch.randn(1, Lt * V, 64, requires_grad=True)
    c = from_grid(blk.tconv(to_grid(blk.norm1(h), e.grid, None)), None)
    t, v = 2, 5
    c[0, t * V + v].sum().backward()
    nz = (h.grad[0].abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert nz == [(t - 1) * V + v, t * V + v, (t + 1) * V + v]


def test_masked_tokens_enter_the_branches_as_zeros() -> None:
    """Visible-token encoding equals encoding the full grid with hidden tokens zeroed, for the
    conv branch (the rule documented in layers.py)."""
    e = enc(temporal_conv=3).eval()
    blk = e.transformer.blocks[0]
    with torch.no_grad():
        blk.tconv_gate.fill_(1.0)
    L = e.num_tokens
    h = torch.randn(2, L, 64)
    ids = torch.stack([torch.randperm(L, generator=torch.Generator().manual_seed(s))[:30].sort().values
                       for s in range(2)])
    vis = torch.gather(h, 1, ids[..., None].expand(-1, -1, 64))
    got = from_grid(blk.tconv(to_grid(blk.norm1(vis), e.grid, ids)), ids)
    hz = blk.norm1(h) * torch.zeros(2, L, 1).scatter(1, ids[..., None], 1.0)
    want = torch.gather(from_grid(blk.tconv(to_grid(hz, e.grid, None)), None), 1, ids[..., None].expand(-1, -1, 64))
    torch.testing.assert_close(got, want)


def test_attention_dropout_only_in_training() -> None:
    e = enc(attn_drop=0.5)
    x = x_batch()
    e.eval()
    assert torch.equal(e(x), e(x))
    e.train()
    torch.manual_seed(0)
    a = e(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, e(x))


def test_weight_decay_and_layer_groups() -> None:
    e = enc(temporal_conv=3, joint_mix="adjacency")
    names = dict(e.named_parameters())
    assert no_weight_decay("transformer.blocks.0.attn.mix", names["transformer.blocks.0.attn.mix"])
    assert no_weight_decay("transformer.blocks.0.tconv_gate", names["transformer.blocks.0.tconv_gate"])
    assert not no_weight_decay("transformer.blocks.0.tconv.conv.weight", names["transformer.blocks.0.tconv.conv.weight"])
    groups = param_groups_lrd(e, e.depth, 0.05, 0.9)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(names["transformer.blocks.1.attn.mix"])]["layer_id"] == 2


def test_zero3_partition_shape_decides_weight_decay() -> None:
    """Under ZeRO-3 a parameter is an empty (0,) partition with its real shape in ds_shape: the
    rule must read ds_shape (issue 25, item 1)."""
    w = torch.nn.Parameter(torch.empty(0))
    w.ds_shape = torch.Size([64, 64])
    assert not no_weight_decay("transformer.blocks.0.mlp.fc1.weight", w)
    b = torch.nn.Parameter(torch.empty(0))
    b.ds_shape = torch.Size([64])
    assert no_weight_decay("transformer.blocks.0.norm1.weight", b)


def test_old_encoder_loads_into_new_branches() -> None:
    plain, rich = enc(), enc(temporal_conv=3, joint_mix="adjacency")
    before = {k: v.clone() for k, v in rich.state_dict().items()}
    load_encoder_state(rich, plain.state_dict(), "old.safetensors", ["temporal_conv=3", "joint_mix='adjacency'"])
    for k, v in plain.state_dict().items():
        assert torch.equal(rich.state_dict()[k], v)
    assert torch.equal(rich.state_dict()["transformer.blocks.0.attn.mix"], before["transformer.blocks.0.attn.mix"])
    # a key missing that is not a new branch, or nothing added: refused
    sd = dict(plain.state_dict())
    sd.pop("embed.weight")
    with pytest.raises(BadInputError, match="embed.weight"):
        load_encoder_state(rich, sd, "bad.safetensors", ["temporal_conv=3"])
    with pytest.raises(BadInputError):
        load_encoder_state(rich, plain.state_dict(), "old.safetensors", [])


@pytest.mark.parametrize("kw,match", [
    (dict(temporal_conv=4), "odd"), (dict(temporal_conv=-1), "odd"), (dict(joint_mix="graph"), "joint_mix"),
    (dict(attn_drop=1.0), "attn_drop"),
])
def test_config_errors(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**kw)


def test_joint_mix_needs_patch_tokens() -> None:
    with pytest.raises(ConfigError, match="patch"):
        MotionTransformer.from_config(ModelConfig(tokenization="frame", joint_mix="identity"),
                                      clip_frames=T, num_bodies=M, num_joints=V)


def test_masked_pretraining_runs_with_branches() -> None:
    from mtscale.config import ObjectiveConfig
    from mtscale.models.objectives import build_pretrain_model

    m = build_pretrain_model(ModelConfig(size="tiny", temporal_conv=3, joint_mix="adjacency"),
                             ObjectiveConfig(decoder_dim=32, decoder_depth=1, decoder_heads=4, mask_ratio=0.75),
                             clip_frames=T, num_bodies=M, num_joints=V, parents=LAYOUT.parents)
    loss, _ = m(x_batch(), None, torch.arange(N), step=0, seed=0)
    loss.backward()
    gates = [b.tconv_gate.grad for b in m.encoder.transformer.blocks]
    assert torch.isfinite(loss) and all(g is not None and g.abs().sum() > 0 for g in gates)


def test_finetune_config_accepts_the_options() -> None:
    cfg = FinetuneConfig()
    assert cfg.model.temporal_conv == 0 and cfg.model.joint_mix == "none" and cfg.model.attn_drop == 0.0


def test_spatial_attention_keeps_each_temporal_patch_to_itself() -> None:
    """attention: spatial (no conv): changing the frames of one temporal patch changes the tokens of
    that patch only; with global attention every token moves. Same weights (no new parameters)."""
    glob, spat = enc(), enc(attention="spatial")
    assert set(glob.state_dict()) == set(spat.state_dict())
    spat.load_state_dict(glob.state_dict())
    glob.eval(), spat.eval()
    x = x_batch()
    x2 = x.clone()
    x2[:, 8:12] += 0.5  # frames of temporal patch 2 (patch_frames 4)
    Lt = T // 4
    for model, moved in ((spat, [2]), (glob, list(range(Lt)))):
        d = (model(x2) - model(x)).abs().reshape(N, Lt, V, -1).amax(dim=(0, 2, 3))
        assert (d > 1e-4).nonzero().flatten().tolist() == moved


def test_spatial_attention_on_visible_tokens_and_padding() -> None:
    """The masked encoder's path (visible ids) computes what the full path computes when every
    token is visible; a padded temporal patch gives finite outputs and leaves the others unchanged."""
    e = enc(attention="spatial", temporal_conv=3).eval()
    with torch.no_grad():
        for b in e.transformer.blocks:
            b.tconv_gate.fill_(0.5)
    x = x_batch()
    h = e.embed_tokens(e.tokenize(x))
    ids = torch.arange(e.num_tokens).expand(h.shape[0], -1)
    torch.testing.assert_close(e.encode(h, None, ids), e.encode(h, None, None))
    mask = torch.ones(N, T, dtype=torch.bool)
    mask[:, 12:] = False  # the last temporal patch is padding
    out = e(x, mask).reshape(N, T // 4, V, -1)
    assert torch.isfinite(out).all()
    m = e.spatial_mask(ids[:1, :2 * V], torch.device("cpu"))
    assert m.shape == (1, 1, 2 * V, 2 * V) and m[0, 0, 0, V - 1] and not m[0, 0, 0, V]


def test_spatial_attention_is_recorded_and_old_files_read_as_global() -> None:
    from dataclasses import asdict

    assert ModelConfig().attention == "global"
    d = asdict(ModelConfig(attention="spatial"))
    assert ModelConfig(**d).attention == "spatial"
    old = {k: v for k, v in d.items() if k != "attention"}  # an encoder.json written before the option
    assert ModelConfig(**old).attention == "global"
    with pytest.raises(ConfigError, match="attention"):
        ModelConfig(attention="local")
    with pytest.raises(ConfigError, match="patch"):
        MotionTransformer.from_config(ModelConfig(tokenization="frame", attention="spatial"),
                                      clip_frames=T, num_bodies=M, num_joints=V)


# ---------------------------------------------------------------- model.time_index


def times(n: int = N, scale: float = 1.0) -> torch.Tensor:
    """(N, T) increasing frame times, clip k spread over its own length."""
    return torch.stack([torch.linspace(0, scale * (10 + 20 * k), T) for k in range(n)])


def test_time_index_starts_at_zero_and_then_reads_the_time() -> None:
    """Zero-initialised: the output equals the encoder without it (loaded weights), whatever the
    times; once trained (projection non-zero) the same clip at another speed gives another output;
    tokens of one temporal patch share their patch's mean time."""
    plain, timed = enc(), enc(time_index=True)
    missing = sorted(set(timed.state_dict()) - set(plain.state_dict()))
    assert missing == ["time_proj.bias", "time_proj.weight"]
    assert sum(p.numel() for p in timed.parameters()) - sum(p.numel() for p in plain.parameters()) == (32 + 1) * 64
    load_encoder_state(timed, plain.state_dict(), "old.safetensors", ["time_index=True"])
    plain.eval(), timed.eval()
    x = x_batch()
    torch.testing.assert_close(timed(x, None, times()), plain(x), rtol=0, atol=0)
    with torch.no_grad():
        timed.time_proj.weight.normal_(0, 0.1)
    assert (timed(x, None, times()) - timed(x, None, times(scale=2.0))).abs().max() > 1e-3
    f = timed.time_features(times())  # (B, L, 32), token l = tp * V + v
    assert f.shape == (N * M, (T // 4) * V, 32)
    torch.testing.assert_close(f[:, 0], f[:, V - 1])  # same patch, same time
    t0 = times()[:, :4].mean(1)  # patch 0's mean time -> sin of the slowest frequency
    omega = 2 * torch.pi / 512.0
    torch.testing.assert_close(f[:, 0, 15], torch.sin(t0 * omega))
    with pytest.raises(ConfigError, match="model.time_index: .*no time was given"):
        timed(x)


def test_time_index_in_masked_pretraining_and_frame_tokens() -> None:
    from mtscale.config import ObjectiveConfig
    from mtscale.models.objectives import build_pretrain_model

    for tok in ("patch", "frame"):
        m = build_pretrain_model(ModelConfig(size="tiny", tokenization=tok, time_index=True),
                                 ObjectiveConfig(decoder_dim=32, decoder_depth=1, decoder_heads=4, mask_ratio=0.75),
                                 clip_frames=T, num_bodies=M, num_joints=V)
        loss, _ = m(x_batch(), None, torch.arange(N), step=0, seed=0, time_NT=times())
        loss.backward()
        assert torch.isfinite(loss) and m.encoder.time_proj.weight.grad.abs().sum() > 0
        # the decoder sees the hidden tokens' times too: zero at init, then trained
        assert m.decoder_time_proj.weight.abs().sum() == 0 and m.decoder_time_proj.weight.grad.abs().sum() > 0


def test_decoder_time_term_starts_at_zero_and_then_reads_the_time() -> None:
    """At init the masked-motion loss equals the same model without the decoder's time term; with
    the encoder's time term kept at zero, other times change the loss only through the decoder
    (the hidden tokens' times reach it), and only once its term is non-zero."""
    from mtscale.config import ObjectiveConfig
    from mtscale.models.objectives import build_pretrain_model

    torch.manual_seed(0)
    m = build_pretrain_model(ModelConfig(size="tiny", time_index=True),
                             ObjectiveConfig(decoder_dim=32, decoder_depth=1, decoder_heads=4, mask_ratio=0.75),
                             clip_frames=T, num_bodies=M, num_joints=V).eval()
    x, args = x_batch(), (None, torch.arange(N), 0, 0)
    loss0, _ = m(x, *args, time_NT=times())
    assert m(x, *args, time_NT=times(scale=3.0))[0] == loss0  # both time terms zero: times unused
    proj, m.decoder_time_proj = m.decoder_time_proj, None
    assert m(x, *args, time_NT=times())[0] == loss0  # the zero term is the old decoder exactly
    m.decoder_time_proj = proj
    with torch.no_grad():
        proj.weight.normal_(0, 0.5)
    assert m.encoder.time_proj.weight.abs().sum() == 0
    assert (m(x, *args, time_NT=times(scale=3.0))[0] - m(x, *args, time_NT=times())[0]).abs() > 1e-6


# ---------------------------------------------------------------------------- graph stem


def test_graph_stem_starts_at_zero_and_loads_an_old_encoder() -> None:
    """model.graph_stem over an encoder built without it: its parameters (and BatchNorm buffers)
    are the only new keys, the old weights load exactly, and the output equals the old encoder's
    in training and eval mode (the projection starts at zero) until the projection moves."""
    plain, stem = enc(), enc(graph_stem=2, graph_stem_width=16)
    missing = sorted(set(stem.state_dict()) - set(plain.state_dict()))
    assert missing and all(k.startswith("stem.") for k in missing)
    load_encoder_state(stem, plain.state_dict(), "old.safetensors", ["graph_stem=2"])
    x = x_batch()
    for mode in (True, False):
        plain.train(mode), stem.train(mode)
        torch.manual_seed(3)
        a = plain(x)
        torch.manual_seed(3)
        torch.testing.assert_close(stem(x), a, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        stem.stem.proj.weight.normal_()
    assert (stem(x) - plain(x)).abs().max() > 1e-3
    # its adjacency starts as the layout's normalised adjacency, kept out of weight decay
    assert torch.equal(stem.stem.blocks[1].adjacency, normalized_adjacency(LAYOUT.parents))
    assert no_weight_decay("encoder.stem.blocks.1.adjacency", stem.stem.blocks[1].adjacency)


def test_graph_stem_parameter_count() -> None:
    W, D, K = 16, 64, 9
    first = (C * W + W) + V * V + 2 * W + (K * W * W + W) + 2 * W + (C * W + W) + 2 * W  # + residual conv + bn
    later = (W * W + W) + V * V + 2 * W + (K * W * W + W) + 2 * W
    extra = 2 * V * C + first + later + (W * D + D)  # data BN, blocks, projection
    plain = sum(p.numel() for p in enc().parameters())
    assert sum(p.numel() for p in enc(graph_stem=2, graph_stem_width=W).parameters()) - plain == extra


def test_graph_stem_is_local_on_the_skeleton_and_in_time() -> None:
    """One stem block: a change to joint j at frame 0 reaches joint j and its skeleton neighbours
    only (one graph hop), and frames 0..4 only (a width-9 temporal conv), i.e. the tokens of
    temporal patches 0 and 1 (4 frames each), in token order l = tp * V + v."""
    e = enc(graph_stem=1, graph_stem_width=8).eval()
    with torch.no_grad():
        e.stem.proj.weight.normal_()
    j = 2
    x = x_batch()
    x2 = x.clone()
    x2[:, 0, :, j] += 1.0
    d = (e.stem_tokens(x2) - e.stem_tokens(x)).abs().amax(dim=(0, 2)).reshape(T // 4, V)  # (Lt, V)
    near = {j} | {c for c, p in enumerate(LAYOUT.parents) if p == j} | {LAYOUT.parents[j]}
    moved = {(int(t), int(v)) for t, v in (d > 1e-6).nonzero()}
    assert moved == {(t, v) for t in (0, 1) for v in near}


def stem_in_eval(**kw) -> MotionTransformer:
    """An encoder with a stem in ``eval()``, its projection and BatchNorm shifts non-trivial
    (the shifts are what gave padded frames a value)."""
    e = enc(**kw).eval()
    with torch.no_grad():
        e.stem.proj.weight.normal_()
        e.stem.proj.bias.normal_()
        for m in e.stem.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.normal_()
    return e


def stem_features(e: MotionTransformer, x: torch.Tensor, n_valid: int) -> torch.Tensor:
    """The stem blocks' output on x's first ``n_valid`` frames alone (body 0): (N, steps, V, W)."""
    h = e.stem.data_bn(x[:, :n_valid, 0].permute(0, 2, 3, 1).reshape(N, V * C, n_valid))
    h = h.reshape(N, V, C, n_valid).permute(0, 2, 3, 1)
    for blk in e.stem.blocks:
        h, _ = blk(h)
    return h.permute(0, 2, 3, 1)


def test_graph_stem_pools_valid_frames_only() -> None:
    """With a frame mask, the stem computes what it computes on the clip cut at its last valid
    frame (padding is outside the clip, whatever it holds, as at the clip's edge), and a temporal
    patch's stem term is the mean over its valid frames; a patch with no valid frame gets ``proj``'s
    bias alone."""
    e = stem_in_eval(graph_stem=2, graph_stem_width=8)
    x = x_batch()

    for n_valid, in_patch in ((14, (12, 14)), (12, None)):
        mask = torch.zeros(N, T, dtype=torch.bool)
        mask[:, :n_valid] = True
        xp = x.clone()
        xp[:, n_valid:] = 7.0  # whatever the padding holds
        got = e.stem_tokens(xp, mask).reshape(N, T // 4, V, -1)
        f = stem_features(e, x, n_valid)
        for tp in range(3):
            torch.testing.assert_close(got[:, tp], e.stem.proj(f[:, 4 * tp:4 * tp + 4].mean(1)), rtol=1e-5, atol=1e-5)
        if in_patch is None:
            torch.testing.assert_close(got[:, 3], e.stem.proj.bias.expand(N, V, -1))
        else:
            a, b = in_patch
            torch.testing.assert_close(got[:, 3], e.stem.proj(f[:, a:b].mean(1)), rtol=1e-5, atol=1e-5)


def test_graph_stem_gets_full_lr_and_is_refused_in_pretraining() -> None:
    from mtscale.config import ObjectiveConfig
    from mtscale.models.encoder import layer_id_for
    from mtscale.models.objectives import build_pretrain_model

    assert layer_id_for("encoder.stem.blocks.0.gcn.weight", 4) == 5  # not transformer block 0
    assert layer_id_for("encoder.transformer.blocks.0.attn.qkv.weight", 4) == 1
    with pytest.raises(ConfigError, match="model.graph_stem: found 2 in pre-training"):
        build_pretrain_model(ModelConfig(size="tiny", graph_stem=2), ObjectiveConfig(decoder_dim=32, decoder_depth=1,
                             decoder_heads=4), clip_frames=T, num_bodies=M, num_joints=V, parents=LAYOUT.parents)
    for kw in (dict(graph_stem=-1), dict(graph_stem=2, graph_stem_width=0)):
        with pytest.raises(ConfigError, match="graph_stem"):
            ModelConfig(**kw)
    with pytest.raises(ConfigError, match="patch"):
        MotionTransformer.from_config(ModelConfig(tokenization="frame", graph_stem=1), clip_frames=T, num_bodies=M,
                                      num_joints=V)


def test_graph_stem_pyramid_shape_and_parameter_count() -> None:
    """``graph_stem_pyramid``: 6 blocks over 4-frame patches are stages 0, 0, 1, 1, 2, 2 of widths
    W, 2W, 4W, the stride 2 opening stages 1 and 2 (strided residual conv); the stem's steps are
    the temporal patches."""
    from mtscale.models.layers import pyramid_stages

    assert pyramid_stages(6, 4) == [0, 0, 1, 1, 2, 2] and pyramid_stages(3, 4) == [0, 1, 2]
    assert pyramid_stages(2, 1) == [0, 0] and pyramid_stages(4, 2) == [0, 0, 1, 1]
    W, D, K = 8, 64, 9
    e = enc(graph_stem=6, graph_stem_width=W, graph_stem_pyramid=True)
    assert [b.stride for b in e.stem.blocks] == [1, 1, 2, 1, 2, 1]
    assert [b.gcn.out_channels for b in e.stem.blocks] == [W, W, 2 * W, 2 * W, 4 * W, 4 * W]

    def block(ci: int, co: int, res: bool) -> int:
        return (ci * co + co) + V * V + 2 * co + (K * co * co + co) + 2 * co + ((ci * co + co) + 2 * co if res else 0)

    blocks = (block(C, W, True) + block(W, W, False) + block(W, 2 * W, True) + block(2 * W, 2 * W, False)
              + block(2 * W, 4 * W, True) + block(4 * W, 4 * W, False))
    plain = sum(p.numel() for p in enc().parameters())
    assert sum(p.numel() for p in e.parameters()) - plain == 2 * V * C + blocks + (4 * W * D + D)
    assert e.stem_tokens(x_batch()).shape == (N * M, (T // 4) * V, D)
    with pytest.raises(ConfigError, match="graph_stem_pyramid: found true with graph_stem 0"):
        ModelConfig(graph_stem_pyramid=True)
    for bad in (dict(graph_stem=2), dict(graph_stem=3, patch_frames=3)):
        with pytest.raises(ConfigError, match="graph_stem_pyramid"):
            pf = bad.pop("patch_frames", 4)
            MotionTransformer.from_config(ModelConfig(size="tiny", patch_frames=pf, graph_stem_width=W,
                                                      graph_stem_pyramid=True, **bad),
                                          clip_frames=12, num_bodies=M, num_joints=V, parents=LAYOUT.parents)


def test_graph_stem_pyramid_ignores_padding() -> None:
    """With a frame mask (``eval()``), the pyramid stem's patch terms equal those of the clip cut at
    its last valid frame, whatever the padding holds; a patch whose first frame is padding gets
    ``proj``'s bias alone."""
    e = stem_in_eval(graph_stem=3, graph_stem_width=8, graph_stem_pyramid=True)
    x = x_batch()

    for n_valid in (14, 9, 12):
        mask = torch.zeros(N, T, dtype=torch.bool)
        mask[:, :n_valid] = True
        xp = x.clone()
        xp[:, n_valid:] = 7.0
        got = e.stem_tokens(xp, mask).reshape(N, T // 4, V, -1)
        want = e.stem.proj(stem_features(e, x, n_valid))
        n_steps = want.shape[1]
        assert n_steps == -(-n_valid // 4)
        torch.testing.assert_close(got[:, :n_steps], want, rtol=1e-5, atol=1e-5)
        for tp in range(n_steps, T // 4):
            torch.testing.assert_close(got[:, tp], e.stem.proj.bias.expand(N, V, -1))
