"""Preprocessing: denoising, body selection, empty frames, centring, view normalisation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mtscale.data.formats import RawSample, ntu
from mtscale.data.layouts import get_layout
from mtscale.data.preprocess import PrepareOptions, describe, preprocess, select_bodies
from mtscale.errors import BadInputError, ConfigError

LAY = get_layout("ntu25")


def _person(T: int, rng: np.random.Generator, motion: float, x0: float = 0.0) -> np.ndarray:
    """(T, 25, 3) upright-ish body: tall (y spread ~1.6 m), narrow (x spread ~0.4 m)."""
    base = np.zeros((25, 3))
    base[:, 0] = x0 + np.linspace(-0.2, 0.2, 25)
    base[:, 1] = np.linspace(-0.8, 0.8, 25)
    base[:, 2] = 3.0
    base[0] = (x0, -0.1, 3.0)  # spine_base below spine_mid
    base[1] = (x0, 0.2, 3.0)
    base[8] = (x0 - 0.18, 0.5, 3.0)  # shoulder_right
    base[4] = (x0 + 0.18, 0.5, 3.0)  # shoulder_left
    wobble = motion * np.sin(np.linspace(0, 6, T))[:, None, None] * rng.normal(size=(1, 25, 3))
    return (base + wobble).astype(np.float32)


def _sample(x_MTVC: np.ndarray) -> RawSample:
    return RawSample("s", x_MTVC.astype(np.float32), 0, "ntu25", {}, source="mem")


def test_selection_orders_by_motion_and_pads() -> None:
    rng = np.random.default_rng(0)
    x = np.stack([_person(30, rng, 0.01), _person(30, rng, 0.2, 1.0), _person(30, rng, 0.05, -1.0)])
    np.testing.assert_array_equal(select_bodies(x, PrepareOptions()), [1, 2])
    out = preprocess(_sample(x), PrepareOptions(center=False))
    assert out.shape == (30, 2, 25, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 0], x[1])
    np.testing.assert_array_equal(out[:, 1], x[2])
    out3 = preprocess(_sample(x[:1]), PrepareOptions(max_bodies=3, center=False))
    assert out3.shape == (30, 3, 25, 3) and not out3[:, 1:].any()


def test_denoise_drops_short_and_wide_bodies_but_never_the_last() -> None:
    rng = np.random.default_rng(1)
    main = _person(40, rng, 0.02)
    short = np.zeros_like(main)
    short[:5] = _person(5, rng, 0.5, 1.0)  # lots of motion, present 5 < 11 frames
    wide = _person(40, rng, 0.5, -1.0)[:, :, [1, 0, 2]]  # swapped x/y: a lying "object"
    x = np.stack([main, short, wide])
    np.testing.assert_array_equal(select_bodies(x, PrepareOptions()), [0])
    assert set(select_bodies(x, PrepareOptions(denoise=False))) == {1, 2}
    # only noisy bodies: the one with most motion survives
    kept = select_bodies(np.stack([short, wide]), PrepareOptions())
    assert len(kept) == 1


def test_empty_frames_and_centring_keep_absent_bodies_zero() -> None:
    rng = np.random.default_rng(2)
    a = _person(30, rng, 0.1)
    b = _person(30, rng, 0.02, 1.0)
    a[:3] = 0
    b[:3] = 0
    b[20:] = 0  # partner leaves (present 17 >= min_body_frames frames)
    x = np.stack([a, b])
    out = preprocess(_sample(x), PrepareOptions())
    assert out.shape == (27, 2, 25, 3)
    np.testing.assert_allclose(out[0, 0, LAY.center], 0.0, atol=1e-6)
    np.testing.assert_allclose(out[:, 0], a[3:] - a[3, LAY.center], atol=1e-6)
    assert not out[17:, 1].any()  # absent partner stays exactly zero
    np.testing.assert_allclose(out[:17, 1], b[3:20] - a[3, LAY.center], atol=1e-6)
    kept = preprocess(_sample(x), PrepareOptions(drop_empty_frames=False, center=False))
    assert kept.shape == (30, 2, 25, 3) and not kept[:3].any()


def test_view_normalisation_axes() -> None:
    rng = np.random.default_rng(3)
    a = _person(15, rng, 0.05)
    th = 0.7
    R = np.array([[np.cos(th), 0, np.sin(th)], [0, 1, 0], [-np.sin(th), 0, np.cos(th)]])
    R = R @ np.array([[1, 0, 0], [0, np.cos(0.3), -np.sin(0.3)], [0, np.sin(0.3), np.cos(0.3)]])
    x = (a @ R.T)[None].astype(np.float32)
    out = preprocess(_sample(x), PrepareOptions(view_normalize=True))
    f = out[0, 0]
    up = f[LAY.vertical[1]] - f[LAY.vertical[0]]
    side = f[LAY.horizontal[1]] - f[LAY.horizontal[0]]
    np.testing.assert_allclose(up / np.linalg.norm(up), [0, 1, 0], atol=1e-5)
    assert side[0] > 0 and abs(side[2]) < 1e-5
    # rotation preserves distances
    np.testing.assert_allclose(np.linalg.norm(out[:, 0, 3] - out[:, 0, 7], axis=-1),
                               np.linalg.norm(x[0, :, 3] - x[0, :, 7], axis=-1), rtol=1e-4)


def test_empty_sample_and_bad_shapes_raise() -> None:
    with pytest.raises(BadInputError, match="no frames"):
        preprocess(_sample(np.zeros((1, 10, 25, 3))), PrepareOptions())
    with pytest.raises(BadInputError, match="no frames"):
        preprocess(_sample(np.zeros((0, 0, 25, 3))), PrepareOptions())
    with pytest.raises(BadInputError, match="24 joints"):
        preprocess(_sample(np.ones((1, 10, 24, 3))), PrepareOptions())
    with pytest.raises(ConfigError, match="max_bodies"):
        PrepareOptions(max_bodies=0)


def test_describe_is_json_safe() -> None:
    d = describe(PrepareOptions(view_normalize=True))
    assert json.loads(json.dumps(d)) == d
    assert d["steps"] == ["denoise", "select_bodies", "drop_empty_frames", "center", "view_normalize"]
    assert "center" not in describe(PrepareOptions(center=False))["steps"]


def test_real_two_person_sample(ntu_dir: Path) -> None:
    (s,) = ntu.read_unit(str(ntu_dir / "S001C001P001R001A050.skeleton"))
    out = preprocess(s, PrepareOptions())
    assert out.shape == (74, 2, 25, 3)
    assert np.any(out[:, 1] != 0) and np.isfinite(out).all()
    first = np.flatnonzero(np.any(out[:, 0] != 0, axis=(1, 2)))[0]
    np.testing.assert_allclose(out[first, 0, LAY.center], 0.0, atol=1e-6)
