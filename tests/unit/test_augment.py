"""Batched augmentations: values, reproducibility, devices."""

from __future__ import annotations

import math

import pytest
import torch

from mtscale.config import AugmentConfig
from mtscale.data.augment import BatchAugment, rotation_matrices, step_seed
from mtscale.errors import ConfigError


def _batch(n: int = 6, t: int = 10, m: int = 2, v: int = 25, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, m, v, 3, generator=g)
    x[0, :, 1] = 0  # an absent second body
    return x


def test_rotation_matrices_are_proper_rotations_and_match_axes():
    angles = torch.tensor([[0.3, -0.2, 1.1], [0.0, 0.0, math.pi / 2]])
    r = rotation_matrices(angles)
    torch.testing.assert_close(r @ r.transpose(1, 2), torch.eye(3).expand(2, 3, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(r[1] @ torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 1, 0]), atol=1e-6, rtol=0)


def test_rotation_preserves_lengths_and_stays_within_angle():
    x = _batch()
    y = BatchAugment(AugmentConfig(rotate_deg=30))(x, seed=1)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y, x)
    # angle between a vector and its image <= the composed bound of 3 rotations of <= 30 degrees
    cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(1e-9)
    assert float(cos[x.norm(dim=-1) > 0].min()) > math.cos(math.radians(90))
    assert bool((y[0, :, 1] == 0).all())  # absent body stays zero


def test_rotate_axes_leaves_the_other_axes_alone():
    gen = torch.Generator().manual_seed(0)
    full = BatchAugment(AugmentConfig(rotate_deg=60)).linear_params(400, gen.manual_seed(0))
    xy = BatchAugment(AugmentConfig(rotate_deg=60, rotate_axes="xy")).linear_params(400, gen.manual_seed(0))
    y_only = BatchAugment(AugmentConfig(rotate_deg=60, rotate_axes="y")).linear_params(400, gen.manual_seed(0))
    # about y only: the vertical axis is fixed and the horizontal plane turns by up to 60 degrees
    torch.testing.assert_close(y_only[:, :, 1], torch.tensor([0.0, 1, 0]).expand(400, 3), atol=1e-6, rtol=0)
    turn = torch.rad2deg(torch.atan2(y_only[:, 0, 2], y_only[:, 0, 0]))
    assert float(turn.abs().max()) <= 60 + 1e-4 and float(turn.abs().max()) > 55
    # x and y only: Ry @ Rx keeps the x axis in the horizontal plane (no roll about z)
    assert float(xy[:, 1, 0].abs().max()) < 1e-6
    assert float(full[:, 1, 0].abs().max()) > 0.5  # about all three axes it does not
    with pytest.raises(ConfigError, match="rotate_axes"):
        AugmentConfig(rotate_deg=30, rotate_axes="xw")


def test_scale_and_shear_ranges():
    x = _batch()
    x[0, :, 1] = 1.0  # every joint present
    y = BatchAugment(AugmentConfig(scale=0.2))(x, seed=3)
    ratio = (y.norm(dim=-1) / x.norm(dim=-1)).view(6, -1)
    # one isotropic factor per sample, inside [0.8, 1.2]
    assert float((ratio.max(1).values - ratio.min(1).values).max()) < 1e-4
    assert float(ratio.min()) >= 0.8 - 1e-5 and float(ratio.max()) <= 1.2 + 1e-5
    sh = BatchAugment(AugmentConfig(shear=0.3)).linear_params(500, torch.Generator().manual_seed(0))
    diag = sh[:, [0, 1, 2], [0, 1, 2]]
    off = sh[:, [0, 0, 1, 1, 2, 2], [1, 2, 0, 2, 0, 1]]
    assert bool((diag == 1).all()) and float(off.abs().max()) <= 0.3 and float(off.abs().max()) > 0.25


def test_same_seed_same_result_different_seed_differs_input_untouched():
    cfg = AugmentConfig(rotate_deg=15, scale=0.1, shear=0.1, jitter_std=0.01, body_swap_p=0.5, time_mask_frames=3)
    aug, x = BatchAugment(cfg), _batch()
    x0 = x.clone()
    a, b, c = aug(x, seed=step_seed(0, 1, 0, 64)), aug(x, seed=step_seed(0, 1, 0, 64)), aug(x, seed=step_seed(0, 1, 0, 128))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    torch.testing.assert_close(x, x0)
    assert step_seed(0, 1) != step_seed(0, 2) != step_seed(1, 1)


def test_body_swap_exchanges_the_two_bodies():
    x = _batch()
    y = BatchAugment(AugmentConfig(body_swap_p=1.0))(x, seed=0)
    torch.testing.assert_close(y, x.flip(2))
    z = BatchAugment(AugmentConfig(body_swap_p=0.5))(_batch(n=400, t=2, v=3), seed=0)
    x2 = _batch(n=400, t=2, v=3)
    swapped = (z[:, :, 0] == x2[:, :, 1]).flatten(1).all(1)
    same = (z == x2).flatten(1).all(1)
    assert bool((swapped | same).all()) and 150 < int(swapped.sum()) < 250


def test_time_mask_zeroes_one_block_of_k_frames():
    x = _batch(n=20, t=30) + 5.0  # no zero joints
    y = BatchAugment(AugmentConfig(time_mask_frames=7))(x, seed=2)
    zero = (y == 0).flatten(2).all(-1)  # (N, T)
    assert bool((zero.sum(1) == 7).all())
    first = zero.float().argmax(1)
    for i in range(20):
        assert bool(zero[i, first[i]:first[i] + 7].all())
    torch.testing.assert_close(y[~zero], x[~zero])


def test_jitter_std_and_only_on_present_joints():
    x = _batch(n=8, t=50)
    y = BatchAugment(AugmentConfig(jitter_std=0.05))(x, seed=4)
    d = (y - x)[x != 0]
    assert abs(float(d.std()) - 0.05) < 0.005 and abs(float(d.mean())) < 0.005
    assert bool((y[0, :, 1] == 0).all())


def test_inactive_config_is_identity_and_bad_shape_is_error():
    aug = BatchAugment(AugmentConfig())
    assert not aug.active
    x = _batch()
    torch.testing.assert_close(aug(x, seed=0), x)
    with pytest.raises(ValueError, match="expected \\(N, T, M, V, 3\\)"):
        aug(torch.zeros(2, 3, 4), seed=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_parameters():
    cfg = AugmentConfig(rotate_deg=20, scale=0.1, shear=0.1, body_swap_p=0.5, time_mask_frames=2)
    x = _batch()
    cpu = BatchAugment(cfg)(x, seed=7)
    gpu = BatchAugment(cfg)(x.cuda(), seed=7)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-5)
    j = BatchAugment(AugmentConfig(jitter_std=0.1))
    torch.testing.assert_close(j(x.cuda(), seed=1), j(x.cuda(), seed=1))


@pytest.mark.parametrize("bodies", [1, 2, 3])
def test_fused_cpu_kernel_equals_the_torch_ops(monkeypatch, bodies):
    """The numba loop (rotation, scale, shear and body swap in one pass) gives the values of
    the transpose / bmm / flip path, for 1, 2 (exchange) and 3 (permutation) bodies."""
    from mtscale.data import augment as A

    assert A._affine_cpu() is not None, "numba is a dependency: the fused kernel must be available"
    cfg = AugmentConfig(rotate_deg=30, scale=0.2, shear=0.1, body_swap_p=0.5, jitter_std=0.01, time_mask_frames=3)
    x = torch.randn(16, 12, bodies, 25, 3)
    x[3, :, -1] = 0  # an absent body stays absent
    fused = BatchAugment(cfg)(x, seed=11)
    monkeypatch.setattr(A, "_affine_cpu", lambda: None)
    ref = BatchAugment(cfg)(x, seed=11)
    torch.testing.assert_close(fused, ref, rtol=0, atol=1e-6)
    assert not torch.equal(fused, x)
    for swap_only in (AugmentConfig(body_swap_p=1.0), AugmentConfig(rotate_deg=10)):
        monkeypatch.undo()
        a = BatchAugment(swap_only)(x, seed=2)
        monkeypatch.setattr(A, "_affine_cpu", lambda: None)
        torch.testing.assert_close(a, BatchAugment(swap_only)(x, seed=2), rtol=0, atol=1e-6)


def test_drop_joint_and_drop_axis():
    """Issue 26 recipe options: whole joints (every frame and body) and whole axes are zeroed,
    at about the configured rates, deterministically per seed; the rest is untouched."""
    from mtscale.config import AugmentConfig
    from mtscale.data.augment import BatchAugment

    x = torch.randn(400, 6, 2, 20, 3, generator=torch.Generator().manual_seed(0))
    y = BatchAugment(AugmentConfig(drop_joint_p=0.25))(x, seed=7)
    zero_j = (y == 0).all(dim=(1, 2, 4))  # (N, V)
    assert 0.2 < zero_j.float().mean() < 0.3
    kept = ~zero_j[:, None, None, :, None].expand_as(x)
    assert torch.equal(y[kept], x[kept])  # nothing else changed
    assert torch.equal(y, BatchAugment(AugmentConfig(drop_joint_p=0.25))(x, seed=7))
    z = BatchAugment(AugmentConfig(drop_axis_p=0.5))(x, seed=7)
    zero_c = (z == 0).all(dim=(1, 2, 3))  # (N, C)
    assert (zero_c.sum(1) <= 1).all() and 0.4 < zero_c.any(1).float().mean() < 0.6
    assert zero_c.any(0).all()  # each of x, y, z is dropped somewhere
    keep = ~zero_c[:, None, None, None, :].expand_as(x)
    assert torch.equal(z[keep], x[keep])
    with pytest.raises(Exception, match="drop_joint_p"):
        AugmentConfig(drop_joint_p=1.0)
