"""CTR-GCN .npz and PYSKL .pkl importers: round trips, unit ranges, the safe unpickler."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from mtscale.data.formats import ctrgcn_npz, get_reader, pyskl
from mtscale.errors import BadInputError


def _ctrgcn_arrays(rng: np.random.Generator, n: int, lengths: list[int]) -> np.ndarray:
    x = np.zeros((n, 300, 150), np.float32)
    for i, T in enumerate(lengths):
        x[i, :T, :75] = rng.normal(size=(T, 75))
        if i % 2:
            x[i, :T, 75:] = rng.normal(size=(T, 75))
    return x


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("onehot", [False, True])
def test_ctrgcn_round_trip(tmp_path: Path, monkeypatch, compressed: bool, onehot: bool) -> None:
    rng = np.random.default_rng(0)
    x_tr = _ctrgcn_arrays(rng, 5, [300, 40, 7, 120, 55])
    x_te = _ctrgcn_arrays(rng, 2, [10, 20])
    y_tr, y_te = np.array([3, 0, 59, 1, 2]), np.array([4, 5])
    if onehot:
        y_tr, y_te = np.eye(60)[y_tr], np.eye(60)[y_te]
    p = tmp_path / "NTU60_CS.npz"
    (np.savez_compressed if compressed else np.savez)(p, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    monkeypatch.setattr(ctrgcn_npz, "UNIT_SIZE", 2)
    ctrgcn_npz._labels.cache_clear()
    reader = get_reader("ctrgcn-npz")
    listing = reader.list_units(str(p))
    assert [u[1:4] for u in listing.units] == [("train", 0, 2), ("train", 2, 4), ("train", 4, 5), ("test", 0, 2)]
    pickle.dumps(listing.units)
    samples = [s for u in listing.units for s in reader.read_unit(u)]
    assert [s.sample_id for s in samples] == [f"train_{i:06d}" for i in range(5)] + ["test_000000", "test_000001"]
    assert [s.label for s in samples] == [3, 0, 59, 1, 2, 4, 5]
    s = samples[2]
    assert s.x_MTVC.shape == (2, 7, 25, 3) and s.layout == "ntu25" and s.fields["split_default"] == "train"
    np.testing.assert_array_equal(s.x_MTVC[0], x_tr[2, :7, :75].reshape(7, 25, 3))
    np.testing.assert_array_equal(samples[3].x_MTVC[1], x_tr[3, :120, 75:].reshape(120, 25, 3))
    assert samples[0].x_MTVC.shape[1] == 300 and samples[6].fields["split_default"] == "test"
    assert samples[0].fields["num_bodies_raw"] == 1 and samples[1].fields["num_bodies_raw"] == 2


def test_ctrgcn_bad_inputs(tmp_path: Path) -> None:
    p = tmp_path / "bad.npz"
    np.savez(p, x_train=np.zeros((2, 10, 150)), y_train=np.zeros(2, int))
    with pytest.raises(BadInputError, match="no array 'x_test'"):
        ctrgcn_npz.list_units(str(p))
    np.savez(p, x_train=np.zeros((2, 10, 99)), y_train=np.zeros(2, int), x_test=np.zeros((1, 10, 99)), y_test=np.zeros(1, int))
    with pytest.raises(BadInputError, match="last axis of 99"):
        ctrgcn_npz.list_units(str(p))
    ctrgcn_npz._labels.cache_clear()
    np.savez(p, x_train=np.zeros((2, 10, 150)), y_train=np.array([[1, 1], [0, 1]]), x_test=np.zeros((1, 10, 150)),
             y_test=np.zeros(1, int))
    with pytest.raises(BadInputError, match=r"y_train\[0\] is not one-hot"):
        ctrgcn_npz.list_units(str(p))
    (tmp_path / "x.npz").write_text("hello")
    with pytest.raises(BadInputError, match="not an .npz"):
        ctrgcn_npz.list_units(str(tmp_path / "x.npz"))


def _pyskl(tmp_path: Path, V: int = 25) -> tuple[Path, list[dict]]:
    rng = np.random.default_rng(1)
    anns = [
        dict(frame_dir=f"S001C001P00{i}R001A00{i + 1}", label=i, total_frames=10 + i,
             keypoint=rng.normal(size=(1 + i % 2, 10 + i, V, 3)).astype(np.float32),
             keypoint_score=np.ones((1 + i % 2, 10 + i, V), np.float32))
        for i in range(3)
    ]
    d = dict(split=dict(xsub_train=[a["frame_dir"] for a in anns[:2]], xsub_val=[anns[2]["frame_dir"]],
                        train=[anns[0]["frame_dir"]]), annotations=anns)
    p = tmp_path / f"anno_{V}.pkl"
    p.write_bytes(pickle.dumps(d, protocol=4))
    return p, anns


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pyskl_round_trip(tmp_path: Path, protocol: int) -> None:
    p, anns = _pyskl(tmp_path)
    p.write_bytes(pickle.dumps(pyskl.safe_load(str(p)), protocol=protocol))
    pyskl._load.cache_clear()
    reader = get_reader("pyskl")
    listing = reader.list_units(str(p))
    samples = [s for u in listing.units for s in reader.read_unit(u)]
    assert [s.sample_id for s in samples] == [a["frame_dir"] for a in anns]
    for s, a in zip(samples, anns):
        np.testing.assert_array_equal(s.x_MTVC, a["keypoint"])
        assert s.label == a["label"] and s.layout == "ntu25"
    assert [s.fields["split_xsub"] for s in samples] == ["train", "train", "val"]
    assert [s.fields["split_default"] for s in samples] == ["train", None, None]


def test_pyskl_layout_from_joint_count(tmp_path: Path) -> None:
    p, _ = _pyskl(tmp_path, V=20)
    pyskl._load.cache_clear()
    assert {s.layout for u in pyskl.list_units(str(p)).units for s in pyskl.read_unit(u)} == {"kinect_v1_20"}
    p, _ = _pyskl(tmp_path, V=17)
    pyskl._load.cache_clear()
    # a bad record is yielded (with its index), not raised: the records after it are still read
    items = [s for u in pyskl.list_units(str(p)).units for s in pyskl.read_unit(u)]
    assert [type(s) for s in items] == [BadInputError] * 3 and [s.index for s in items] == [0, 1, 2]
    assert "annotations[0].keypoint has 17 joints" in str(items[0])


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps({"split": {}, "annotations": [evil]}))
    pyskl._load.cache_clear()
    with pytest.raises(BadInputError, match=r"pickle references (posix|os|nt)\.system"):
        pyskl.list_units(str(p))
    assert not marker.exists()
    p.write_bytes(pickle.dumps({"split": {}, "annotations": [Path("x")]}))
    pyskl._load.cache_clear()
    with pytest.raises(BadInputError, match="pickle references pathlib"):
        pyskl.list_units(str(p))
