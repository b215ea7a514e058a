"""MotionTransformer: shapes, sizes, parameter counts, attention path, padding, drop-path, lr-decay ids."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mtscale.config import ModelConfig
from mtscale.errors import ConfigError
from mtscale.models import layers
from mtscale.models.encoder import (
    SIZES,
    ClassifierHead,
    MotionTransformer,
    count_parameters,
    layer_id_for,
    param_groups_lrd,
    size_table,
)

PKG = Path(__file__).resolve().parents[2] / "mtscale"
N, T, M, V, C = 3, 16, 2, 5, 3


def enc(tok: str = "patch", size: str = "tiny", **kw) -> MotionTransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(size=size, tokenization=tok, patch_frames=4, **kw)
    return MotionTransformer.from_config(cfg, clip_frames=T, num_bodies=M, num_joints=V)


def x_batch(n: int = N, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, T, M, V, C, generator=torch.Generator().manual_seed(seed))


def analytic_params(dim: int, depth: int, mlp_ratio: float, token_dim: int, pos: int) -> int:
    h = int(round(dim * mlp_ratio))
    block = (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (dim * h + h) + (h * dim + dim) + 4 * dim
    return depth * block + token_dim * dim + dim + pos + 2 * dim


@pytest.mark.parametrize("tok", ["frame", "patch"])
def test_shapes_both_tokenisations(tok: str) -> None:
    e = enc(tok)
    x = x_batch()
    h = e(x)
    if tok == "frame":
        assert h.shape == (N, T, 64) and e.token_dim == M * V * C
    else:
        assert h.shape == (N * M, (T // 4) * V, 64) and e.token_dim == 4 * C
    f = e.features(x)
    assert f.shape == (N, 64) and torch.isfinite(f).all()


def test_patch_tokenisation_layout() -> None:
    """Token l = tp * V + v of body m holds frames [4 tp, 4 tp + 4) of joint v, coordinates last."""
    e = enc("patch")
    x = x_batch()
    tok = e.tokenize(x)  # (N*M, Tp*V, p*C)
    n, m, tp, v = 1, 1, 2, 3
    want = x[n, 4 * tp: 4 * tp + 4, m, v, :].reshape(-1)
    assert torch.equal(tok[n * M + m, tp * V + v], want)


def test_features_pool_bodies_back() -> None:
    """Patch mode folds bodies into the batch; features average them back: swapping bodies is a no-op."""
    e = enc("patch").eval()
    x = x_batch()
    with torch.no_grad():
        a = e.features(x)
        b = e.features(x.flip(2))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_built_sizes_match_analytic_count(size: str) -> None:
    s = SIZES[size]
    for tok in ("frame", "patch"):
        e = enc(tok, size)
        built = sum(p.numel() for p in e.parameters())
        pos = T * s.dim if tok == "frame" else (T // 4) * s.dim + V * s.dim
        assert built == analytic_params(s.dim, s.depth, s.mlp_ratio, e.token_dim, pos)
        assert built == count_parameters(size, tok, clip_frames=T, num_bodies=M, num_joints=V, patch_frames=4)
        assert e(x_batch(1)).shape[-1] == s.dim


def test_big_sizes_counted_on_meta() -> None:
    counts = {s: count_parameters(s, "patch") for s in SIZES}
    assert counts["tiny"] < counts["small"] < counts["base"] < counts["large"] < counts["xl"] < counts["huge"]
    assert 5e6 < counts["small"] < 8e6  # MAMP-like encoder
    assert counts["xl"] >= 300e6
    assert counts["huge"] >= 1e9
    s = SIZES["huge"]
    assert counts["huge"] == analytic_params(s.dim, s.depth, s.mlp_ratio, 4 * 3, 30 * s.dim + 25 * s.dim)
    table = size_table()
    assert "| huge | 2048 | 24 |" in table and "1.21 B" in table


def test_overrides_and_errors() -> None:
    e = enc("frame", dim=96, depth=3, heads=6)
    assert (e.dim, e.depth, e.heads) == (96, 3, 6) and len(e.transformer.blocks) == 3
    with pytest.raises(ConfigError, match="model.size"):
        enc("frame", size="gigantic")
    with pytest.raises(ConfigError, match="model.patch_frames"):
        MotionTransformer.from_config(ModelConfig(patch_frames=5), clip_frames=T, num_bodies=M, num_joints=V)
    with pytest.raises(ConfigError, match="model.heads"):
        enc("frame", heads=5)
    with pytest.raises(ConfigError, match=r"expected \(N, T, M, V, C\)"):
        enc("patch")(torch.zeros(2, T, M, V + 1, C))


def test_state_dict_keys_stable() -> None:
    keys = set(enc("patch").state_dict())
    assert {"embed.weight", "pos_t", "pos_v", "transformer.norm.weight", "transformer.blocks.0.attn.qkv.weight",
            "transformer.blocks.1.mlp.fc2.bias"} <= keys
    assert all(re.match(r"^(embed|pos_t|pos_v|transformer)\b", k) for k in keys)
    clf = ClassifierHead(enc("patch"), num_classes=7, drop=0.1)
    missing, unexpected = clf.encoder.load_state_dict(enc("patch").state_dict(), strict=True)
    assert not missing and not unexpected
    assert clf(x_batch()).shape == (N, 7)


def test_joint_pooling_head_keeps_joint_columns(tmp_path: Path) -> None:
    """MAMP's fine-tuning head: mean over time per joint, joints concatenated (V * D), with
    padded frames left out; the classifier saves and loads back with its head."""
    from mtscale.train.classifier import build_classifier, load_classifier, save_classifier

    e = enc("patch").eval()
    x = x_batch()
    mask = torch.ones(N, T, dtype=torch.bool)
    mask[0, 8:] = False  # sample 0: only the first 2 of 4 temporal patches are valid
    with torch.no_grad():
        h = e(x, mask).reshape(N, M, T // 4, V, e.dim)  # (N, M, Lt, Lv, D)
        want = torch.cat([h[:1, :, :2].mean(2), h[1:].mean(2)]).mean(1).reshape(N, V * e.dim)
        got = e.features(x, mask, per_joint=True)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(e.features(x, mask), want.reshape(N, V, e.dim).mean(1))  # mean pool = mean of columns
    clf = build_classifier(e, 7, pool="joint", hidden=32).eval()
    assert clf.fc_norm[0].in_features == V * e.dim and clf(x, mask).shape == (N, 7)
    meta = {"model": {"size": "tiny", "tokenization": "patch", "patch_frames": 4}, "clip_frames": T, "num_bodies": M,
            "num_joints": V, "num_classes": 7, "head": "layernorm", "pool": "joint", "head_hidden": 32}
    save_classifier(clf, meta, tmp_path / "clf")
    back, _ = load_classifier(tmp_path / "clf")
    with torch.no_grad():
        torch.testing.assert_close(back(x, mask), clf(x, mask))
    probe = build_classifier(e, 7, head="linear", pool="joint")  # a linear probe on the joint columns
    assert isinstance(probe.fc_norm, torch.nn.Identity) and probe.head.in_features == V * e.dim
    with pytest.raises(ConfigError, match="pool"):
        build_classifier(enc("frame"), 7, pool="max")


def test_sdpa_is_the_only_attention() -> None:
    """One call site of scaled_dot_product_attention in the package, in layers.py; no hand-made softmax(QK^T)."""
    hits = []
    for p in PKG.rglob("*.py"):
        src = p.read_text()
        hits += [(p.name, m.start()) for m in re.finditer(r"scaled_dot_product_attention\(", src)]
        assert not re.search(r"(q|query)\s*@\s*(k|key)\.transpose", src), p
        assert not re.search(r"\bsoftmax\(.*@", src), p
    assert [h[0] for h in hits] == ["layers.py"]


def test_backends_agree_and_backend_logged(caplog: pytest.LogCaptureFixture) -> None:
    x = x_batch()
    outs = {}
    for backend in ("auto", "math"):
        e = enc("patch", attn_backend=backend).eval()
        with torch.no_grad():
            outs[backend] = e(x)
    torch.testing.assert_close(outs["auto"], outs["math"], rtol=1e-4, atol=1e-4)
    ran = layers.last_attention_backend()
    assert ran["math"] == "math"
    assert ran["auto"] == "flash"  # the fused CPU flash kernel (CUDA picks flash/cudnn/efficient)


def test_padding_mask_isolates_invalid_frames() -> None:
    """Garbage in invalid frames changes neither valid tokens' outputs nor the pooled features."""
    e = enc("frame").eval()
    x = x_batch()
    mask = torch.ones(N, T, dtype=torch.bool)
    mask[0, 10:] = False
    mask[2, 5:] = False
    x2 = x.clone()
    x2[~mask] = 100.0
    with torch.no_grad():
        h1, h2 = e(x, mask), e(x2, mask)
        torch.testing.assert_close(h1[mask], h2[mask], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(e.features(x, mask), e.features(x2, mask), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(e.features(x), e.features(x2))  # without the mask they differ
    assert layers.key_padding_to_attn_mask(torch.ones(2, 4, dtype=torch.bool)) is None  # flash path kept


def test_rel_bias_zero_at_init_and_indexed_by_joint_pair_and_time_offset() -> None:
    a, b = enc("patch", rel_bias=True).eval(), enc("patch").eval()
    assert a.bias_v.shape == (4, V, V) and a.bias_t.shape == (4, 2 * (T // 4) - 1)
    b.load_state_dict({k: v for k, v in a.state_dict().items() if k not in ("bias_v", "bias_t")})
    x = x_batch()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))  # zero bias = the plain encoder
        a.bias_v.normal_(generator=torch.Generator().manual_seed(1))
        a.bias_t.normal_(generator=torch.Generator().manual_seed(2))
        assert not torch.allclose(a(x), b(x), atol=1e-3)
        full = a.attn_bias()[0]  # (H, L, L), token l = tp * V + v
        for h, i, j in [(0, 0, 0), (1, 7, 13), (3, 19, 2)]:
            want = a.bias_v[h, i % V, j % V] + a.bias_t[h, i // V - j // V + T // 4 - 1]
            assert float(full[h, i, j]) == pytest.approx(float(want))
        ids = torch.stack([torch.randperm(20, generator=torch.Generator().manual_seed(s))[:7] for s in range(3)])
        sub = a.attn_bias(ids)
        for n in range(3):
            assert torch.equal(sub[n], full[:, ids[n]][:, :, ids[n]])
    with pytest.raises(ConfigError, match="rel_bias"):
        enc("frame", rel_bias=True)
    assert layer_id_for("encoder.bias_v", 4) == 0
    groups = param_groups_lrd(ClassifierHead(a, 5), depth=2, weight_decay=0.05, layer_decay=0.5)
    assert all(g["weight_decay"] == 0.0 for g in groups for p in g["params"] if p is a.bias_v)


def test_rel_bias_follows_the_visible_tokens_of_a_masked_encoder() -> None:
    """A bias that forbids attention across joints: encoding a random subset of tokens (with
    their ids) equals encoding each joint's visible tokens alone with the plain encoder."""
    a, b = enc("patch", rel_bias=True).eval(), enc("patch").eval()
    b.load_state_dict({k: v for k, v in a.state_dict().items() if k not in ("bias_v", "bias_t")})
    with torch.no_grad():
        a.bias_v.fill_(-1e4).diagonal(dim1=1, dim2=2).zero_()
        h = a.embed_tokens(a.tokenize(x_batch()))  # (B, L, D)
        ids = torch.stack([torch.randperm(20, generator=torch.Generator().manual_seed(s))[:9] for s in range(len(h))])
        vis = torch.gather(h, 1, ids[..., None].expand(-1, -1, h.shape[-1]))
        z = a.encode(vis, None, ids)
        for n in range(len(h)):
            for v in ids[n].remainder(V).unique():
                cols = (ids[n] % V == v).nonzero().flatten()
                torch.testing.assert_close(z[n, cols], b.encode(vis[n:n + 1, cols])[0], rtol=1e-4, atol=1e-4)


def test_drop_path_active_in_train_off_in_eval() -> None:
    e = enc("frame", drop_path=0.5)
    assert e.transformer.blocks[-1].drop_path.p == 0.5 and e.transformer.blocks[0].drop_path.p == 0.0
    x = x_batch(8)
    e.eval()
    with torch.no_grad():
        torch.testing.assert_close(e(x), e(x))
        e.train()
        torch.manual_seed(1)
        a = e(x)
        torch.manual_seed(2)
        b = e(x)
    assert not torch.allclose(a, b)


def test_activation_checkpointing_same_gradients() -> None:
    x = x_batch()
    grads = []
    for ckpt in (False, True):
        e = enc("patch", checkpoint_activations=ckpt)
        e.features(x).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in e.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_layer_ids_for_lr_decay() -> None:
    assert layer_id_for("embed.weight", 8) == 0
    assert layer_id_for("encoder.pos_t", 8) == 0
    assert layer_id_for("encoder.transformer.blocks.0.attn.qkv.weight", 8) == 1
    assert layer_id_for("transformer.blocks.7.mlp.fc1.bias", 8) == 8
    assert layer_id_for("encoder.transformer.norm.weight", 8) == 9
    assert layer_id_for("head.weight", 8) == 9
    clf = ClassifierHead(enc("frame"), 5)
    groups = param_groups_lrd(clf, depth=2, weight_decay=0.05, layer_decay=0.5)
    n = sum(len(g["params"]) for g in groups)
    assert n == len(list(clf.parameters()))
    scales = {g["layer_id"]: g["lr_scale"] for g in groups}
    assert scales[0] == 0.125 and scales[3] == 1.0
    assert all(g["weight_decay"] == 0.0 for g in groups if all(p.ndim == 1 for p in g["params"]))


_ZERO3_SCRIPT = r"""
import os, socket, sys
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import torch, deepspeed
from mtscale.dist import _skip_cpu_shm_comm_build
_skip_cpu_shm_comm_build()  # as mtscale.dist.init_distributed: no JIT build (a stale build lock hung this)
deepspeed.init_distributed(dist_backend="gloo")
from mtscale.config import ModelConfig, ObjectiveConfig
from mtscale.models.objectives import build_pretrain_model
with deepspeed.zero.Init(config_dict_or_path={"train_batch_size": 1, "zero_optimization": {"stage": 3}}):
    m = build_pretrain_model(ModelConfig(size="tiny"), ObjectiveConfig(decoder_dim=32, decoder_depth=1, decoder_heads=4),
                             clip_frames=16, num_bodies=2, num_joints=5)
assert m.encoder.pos_t.numel() == 0 and m.encoder.pos_t.ds_numel == 4 * 64  # partitioned
with deepspeed.zero.GatheredParameters(list(m.parameters())):
    assert 0.01 < m.encoder.pos_t.std().item() < 0.03          # trunc-normal(0.02) ran
    assert 0.01 < m.encoder.embed.weight.std().item() < 0.03
    assert m.encoder.transformer.blocks[0].norm1.weight.eq(1).all()
    assert 0.005 < m.mask_token.std().item() < 0.04
print("ok")
"""


@pytest.mark.slow
def test_constructible_inside_zero3_init() -> None:
    """ZeRO-3 partitions parameters as modules are built; our inits must still run (via apply)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _ZERO3_SCRIPT], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
