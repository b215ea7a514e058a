"""Synthetic NTU-format data: parses, exact text, deterministic, worker- and batch-invariant,
learnable but not trivially separable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mtscale.data import body_model as bm
from mtscale.data.formats import ntu
from mtscale.data.synthetic import format_fields, format_rows, render_chunk, render_sample, synthesize

K = 8
N = 40 * K  # every performer 1..40 performs every class once


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("synth")
    summary = synthesize(str(d), num_samples=N, num_classes=K, seed=0, workers=1, progress=False,
                         min_frames=40, max_frames=80)
    assert summary["num_files"] == N and summary["bytes"] == sum(p.stat().st_size for p in d.iterdir())
    return d


def test_files_parse_with_the_ntu_reader(synth_dir: Path) -> None:
    listing = ntu.list_units(str(synth_dir))
    assert len(listing.units) == N and not list(synth_dir.glob("*.tmp"))
    labels, bodies = [], []
    for u in listing.units[:3 * K]:
        (s,) = ntu.read_unit(u)
        assert 40 <= s.x_MTVC.shape[1] <= 80 and np.isfinite(s.x_MTVC).all()
        assert 2.0 < np.median(s.x_MTVC[0, :, :, 2]) < 5.0  # depth in front of the camera
        labels.append(s.label)
        bodies.append(s.x_MTVC.shape[0])
    assert sorted(set(labels)) == list(range(K))
    assert {lab for lab, b in zip(labels, bodies) if b == 2} == {3, 7}  # every 4th class has two people


def test_same_seed_same_bytes_whatever_workers(synth_dir: Path, tmp_path: Path) -> None:
    n = 70  # two full chunks and a partial one
    synthesize(str(tmp_path / "w2"), num_samples=n, num_classes=K, seed=0, workers=2, progress=False,
               min_frames=40, max_frames=80)
    synthesize(str(tmp_path / "s1"), num_samples=5, num_classes=K, seed=1, workers=1, progress=False,
               min_frames=40, max_frames=80)
    w2 = sorted((tmp_path / "w2").iterdir())
    assert len(w2) == n
    for p in w2:  # the first n files of the 1-worker run
        assert p.read_bytes() == (synth_dir / p.name).read_bytes(), p.name
    for p in sorted((tmp_path / "s1").iterdir()):
        assert p.read_bytes() != (synth_dir / p.name).read_bytes()


def test_format_fields_matches_printf() -> None:
    rng = np.random.default_rng(0)
    v = rng.normal(size=500) * 10.0 ** rng.integers(-5, 4, size=500)
    v[:3] = (0.0, -0.0, -4e-9)  # zero, negative zero, rounds to zero
    for dec in range(0, 8):
        got = format_fields(v, dec).decode()
        want = [f"{x:.{dec}f}" for x in v]
        assert got.endswith(" ") and "  " not in got
        for g, w in zip(got.split(), want, strict=True):
            assert g == w or (float(w) == 0 and g == w.lstrip("-")), (dec, g, w)


def test_format_rows_matches_a_printf_writer() -> None:
    """The vectorised writer against the obvious Python one, on values of every sign and size
    (negative pixels, 4-digit pixels, -0.0000001), two bodies per frame."""
    rng = np.random.default_rng(1)
    T, M, V = 3, 2, 25
    x = rng.normal(size=(T * M, V, 3)) * [0.8, 0.8, 0.3] + [0, 0, 3.0]
    x[0, 0] = (-1e-7, 4.0, 0.2)  # -0.000000 -> 0.000000 and a pixel far off-screen
    q = rng.normal(size=(T * M, V, 4))
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    track = rng.integers(1, 3, size=(T * M, V)).astype(np.uint8)
    heads = [b"2\n72057594037929001 0 1 1 1 1 0 ", b"72057594037929123 0 1 1 1 1 0 "]
    body = np.tile([0, 1], T)
    got = format_rows(x, q, track, heads, body)
    text = got.tobytes().translate(None, b"\0").decode()

    def f(v: float, d: int) -> str:
        s = f"{v:.{d}f}"
        return s.lstrip("-") if float(s) == 0 else s

    want = []
    for n in range(T * M):
        lean = np.clip(x[n, 20, :2] - x[n, 0, :2], -1, 1)
        want.append(heads[body[n]].decode() + f"{f(lean[0], 6)} {f(lean[1], 6)} 2\n25\n")
        for j in range(V):
            xj, yj, zj = x[n, j]
            z = max(zj, 0.1)
            vals = [f(v, 6) for v in (xj, yj, zj)]
            vals += [f(v, 3) for v in (256 + 365.0 * xj / z, 212 - 365.0 * yj / z, 960 + 1081.0 * xj / z, 540 - 1081.0 * yj / z)]
            vals += [f(v, 6) for v in q[n, j]] + [str(track[n, j])]
            want.append(" ".join(vals) + "\n")
    assert text == "".join(want)


def test_sample_bytes_do_not_depend_on_the_batch(synth_dir: Path) -> None:
    """Forward kinematics and formatting are batched: a sample rendered alone, first, last or
    in the middle of a batch has the same bytes as in ``synthesize``'s output."""
    chunk = render_chunk(range(5, 17), K, 0, 40, 80)
    for i in (5, 11, 16):
        stem, data = render_sample(i, K, 0, 40, 80)
        assert chunk[i - 5] == (stem, data)
        assert (synth_dir / f"{stem}.skeleton").read_bytes() == data


def test_forward_kinematics_keeps_bone_lengths_and_rotations() -> None:
    rng = np.random.default_rng(2)
    n = 7
    c, s = bm.dof_trig(rng.uniform(-1.5, 1.5, size=(n, bm.D)))
    R0 = np.stack([bm.rot_y(a) for a in rng.uniform(-3, 3, n)], -1)  # (3, 3, n)
    bones = bm.performer_bones(5)
    x, R = bm.forward(c, s, bones[:, :, None], R0, rng.normal(size=(3, n)))
    for j, p in enumerate(bm.PARENTS):
        if p >= 0:
            np.testing.assert_allclose(np.linalg.norm(x[j] - x[p], axis=0), np.linalg.norm(bones[j]), rtol=1e-12)
    RtR = np.einsum("vjin,vjkn->vikn", R, R)
    np.testing.assert_allclose(RtR, np.broadcast_to(np.eye(3)[None, :, :, None], RtR.shape), atol=1e-12)
    q = bm.quaternion(R)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-9)


def _features(synth_dir: Path):
    feats, trivial, y, performer = [], [], [], []
    for u in ntu.list_units(str(synth_dir)).units:
        (s,) = ntu.read_unit(u)
        x = s.x_MTVC.astype(np.float64)
        rel = x[0] - x[0, :, :1]  # joints relative to spine_base
        speed = np.linalg.norm(np.diff(rel, axis=0), axis=-1)  # (T-1, V)
        dist = np.linalg.norm(rel, axis=-1)
        feats.append(np.concatenate([speed.mean(0), speed.std(0), dist.std(0)]))
        energy = np.square(np.diff(x, axis=1)).sum(axis=(0, 3)).mean()
        trivial.append([x.shape[1], *x[0].mean(axis=(0, 1)), energy])
        y.append(s.label)
        performer.append(s.fields["performer"])
    return np.array(feats), np.array(trivial), np.array(y), np.array(performer)


def _nearest_centroid(F: np.ndarray, y: np.ndarray, train: np.ndarray) -> float:
    F = (F - F[train].mean(0)) / (F[train].std(0) + 1e-9)
    C = np.stack([F[train & (y == k)].mean(0) for k in range(K)])
    pred = np.argmin(((F[~train][:, None] - C[None]) ** 2).sum(-1), axis=1)
    return float((pred == y[~train]).mean())


def test_classes_learnable_from_motion_but_not_trivial_statistics(synth_dir: Path) -> None:
    feats, trivial, y, performer = _features(synth_dir)
    train = performer <= 28  # held-out performers 29..40
    chance = 1.0 / K
    assert _nearest_centroid(feats, y, train) > 5 * chance
    for name, cols in (("length", [0]), ("mean position", [1, 2, 3]), ("motion energy", [4])):
        acc = _nearest_centroid(trivial[:, cols], y, train)
        assert acc < 2 * chance, f"{name} alone separates the classes: {acc:.2f}"


def _pose_ratio(d: Path, out: Path) -> float:
    """Between-class over within-class variance of each sample's mean (centred) pose."""
    from mtscale.data.prepare import prepare
    from mtscale.data.store import Store

    prepare("ntu", str(d), str(out), progress=False)
    s = Store.open(out)
    m = np.array([x.astype(np.float32)[:, 0].mean(0).ravel() for _, x in s.iter_samples()])
    y = np.asarray(s.labels)
    cm = np.array([m[y == k].mean(0) for k in range(y.max() + 1)])
    between = ((cm - m.mean(0)) ** 2).sum(1).mean()
    within = np.mean([((m[y == k] - cm[k]) ** 2).sum(1).mean() for k in range(y.max() + 1)])
    return float(between / within)


def test_shared_posture_hides_the_class_in_the_static_pose(synth_dir: Path, tmp_path: Path) -> None:
    """posture="shared": each sample starts from its own rest pose, so a class's mean pose
    no longer gives it away (between/within variance ~2.0 -> ~0.5 here, measured 1.94 -> 0.50
    on 600 samples)."""
    shared = tmp_path / "shared"
    synthesize(str(shared), num_samples=N, num_classes=K, seed=0, progress=False, min_frames=40, max_frames=80,
               posture="shared")
    a, b = _pose_ratio(synth_dir, tmp_path / "a"), _pose_ratio(shared, tmp_path / "b")
    assert a > 1.2 and b < 0.7, (a, b)
    name = sorted(p.name for p in synth_dir.iterdir())[5]
    assert (shared / name).read_bytes() != (synth_dir / name).read_bytes()
    assert render_sample(5, K, 0, 40, 80)[1] != render_sample(5, K, 0, 40, 80, posture="shared")[1]
    with pytest.raises(Exception, match="posture"):
        synthesize(str(tmp_path / "bad"), num_samples=2, num_classes=K, seed=0, progress=False, posture="nope")
