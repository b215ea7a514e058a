"""Issue 29 ("nothing lost, nothing silent"): a bad record is isolated at the record, absurd
values and labels are refused at ingest and reported, a bad generic file never stops the run,
the NTU reader leaks no NumPy warning, CTR-GCN label -1 is announced."""

from __future__ import annotations

import json
import logging
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from mtscale.data import prepare as P
from mtscale.data.formats import MAX_ABS_COORD, MAX_LABEL, ctrgcn_npz, ntu, pyskl
from mtscale.data.preprocess import PrepareOptions
from mtscale.data.store import Store
from mtscale.data.synthetic import synthesize
from mtscale.errors import BadInputError, ConfigError


def _report(summary: dict) -> list[dict]:
    return [json.loads(line) for line in Path(summary["report"]).read_text().splitlines()]


def _run(fmt: str, src: Path, out: Path, **opts) -> dict:
    return P.prepare(fmt, str(src), str(out), PrepareOptions(**opts), workers=1, progress=False)


# ------------------------------------------------------------------ item 1: isolated records


def _pyskl_file(path: Path, n: int, rng: np.random.Generator) -> list[dict]:
    anns = [dict(frame_dir=f"S001C001P001R001A{i:03d}", label=i % 7, total_frames=12,
                 keypoint=rng.normal(size=(1, 12, 25, 3)).astype(np.float32)) for i in range(n)]
    path.write_bytes(pickle.dumps({"split": {"xsub_train": [a["frame_dir"] for a in anns]}, "annotations": anns}))
    pyskl._load.cache_clear()
    return anns


def test_pyskl_bad_records_keep_every_neighbour(tmp_path: Path) -> None:
    anns = _pyskl_file(tmp_path / "a.pkl", 50, np.random.default_rng(0))
    anns[5]["keypoint"][0, 3, 7, 1] = np.nan  # one NaN record (record 5 of the one 1000-record unit)
    del anns[20]["keypoint"]  # one structurally broken record
    anns[33]["label"] = "walk"  # one bad label
    (tmp_path / "a.pkl").write_bytes(pickle.dumps({"split": {}, "annotations": anns}))
    pyskl._load.cache_clear()
    s = _run("pyskl", tmp_path / "a.pkl", tmp_path / "st")
    bad = {5, 20, 33}
    assert s["num_samples"] == 47 and s["num_skipped"] == 3  # was 5 ingested, 1 skipped
    store = Store.open(tmp_path / "st")
    kept = [a["frame_dir"] for i, a in enumerate(anns) if i not in bad]
    assert store.manifest.column("sample_id").to_pylist() == kept
    rep = _report(s)
    assert [r["index"] for r in rep] == [5, 20, 33]
    assert all(r["file"] == str(tmp_path / "a.pkl") and r["num_records"] == 1 for r in rep)
    assert "annotations[5].keypoint has non-finite values" in rep[0]["message"]
    assert "annotations[20] lacks frame_dir/label/keypoint" in rep[1]["message"]
    assert "annotations[33].label is 'walk'" in rep[2]["message"]
    assert store.attrs["ingest"]["num_skipped"] == 3


def _ctrgcn_file(path: Path, x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray) -> None:
    np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    ctrgcn_npz._labels.cache_clear()


def _ctrgcn_x(rng: np.random.Generator, n: int, T: int = 9) -> np.ndarray:
    x = np.zeros((n, 20, 150), np.float32)
    x[:, :T, :75] = rng.normal(size=(n, T, 75))
    return x


def test_ctrgcn_bad_record_keeps_every_neighbour(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x_tr, x_te = _ctrgcn_x(rng, 60), _ctrgcn_x(rng, 4)
    x_tr[15, 2, 4] = np.inf
    _ctrgcn_file(tmp_path / "d.npz", x_tr, np.arange(60) % 5, x_te, np.arange(4))
    s = _run("ctrgcn-npz", tmp_path / "d.npz", tmp_path / "st", dtype="float32")
    assert s["num_samples"] == 63 and s["num_skipped"] == 1  # was 15 + 4 ingested
    ids = Store.open(tmp_path / "st").manifest.column("sample_id").to_pylist()
    assert ids == [f"train_{i:06d}" for i in range(60) if i != 15] + [f"test_{i:06d}" for i in range(4)]
    (r,) = _report(s)
    assert r["index"] == 15 and "x_train[15] has non-finite values" in r["message"]


def test_unreadable_range_unit_counts_its_records(tmp_path: Path, monkeypatch) -> None:
    """A unit that fails as a whole (here: a truncated member) counts every record it held."""
    rng = np.random.default_rng(2)
    _ctrgcn_file(tmp_path / "d.npz", _ctrgcn_x(rng, 6), np.arange(6), _ctrgcn_x(rng, 3), np.arange(3))
    monkeypatch.setattr(ctrgcn_npz, "UNIT_SIZE", 4)
    real = ctrgcn_npz._read_rows

    def flaky(path, key, start, stop):
        if (key, start) == ("x_train", 4):
            raise BadInputError(path, None, f"array {key!r} is truncated", "6 rows")
        return real(path, key, start, stop)

    monkeypatch.setattr(ctrgcn_npz, "_read_rows", flaky)
    s = _run("ctrgcn-npz", tmp_path / "d.npz", tmp_path / "st")
    assert s["num_samples"] == 4 + 3 and s["num_skipped"] == 2  # train rows 4 and 5
    (r,) = _report(s)
    assert r["num_records"] == 2 and r["index"] is None and "is truncated" in r["message"]


# ------------------------------------------------------------------ item 2: absurd values


def _generic(root: Path, arrays: dict[str, np.ndarray], rows: list[str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = rows if rows is not None else [f"{k},{i % 3}" for i, k in enumerate(arrays)]
    (root / "labels.csv").write_text("id,label\n" + "\n".join(rows) + "\n")
    for k, a in arrays.items():
        np.save(root / f"{k}.npy", a)
    return root


def test_bound_is_documented_and_generous_for_metres() -> None:
    assert MAX_ABS_COORD["m"] == 100.0 and MAX_ABS_COORD["px"] == MAX_ABS_COORD["mm"] == 100_000.0
    assert MAX_LABEL == 100_000


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_absurd_coordinate_refused_in_every_dtype(tmp_path: Path, dtype: str) -> None:
    rng = np.random.default_rng(3)
    arrays = {k: rng.normal(size=(8, 25, 3)).astype(np.float32) for k in ("a", "b", "c", "d")}
    arrays["b"][4, 2, 0] = 1e30
    arrays["c"][1, 0, 2] = -101.0  # just past the metre bound
    arrays["d"][0, 0, 0] = 99.0  # far, but within: kept
    s = _run("generic", _generic(tmp_path / "in", arrays), tmp_path / "st", dtype=dtype, center=False)
    store = Store.open(tmp_path / "st")
    assert store.manifest.column("sample_id").to_pylist() == ["a", "d"] and s["num_skipped"] == 2
    assert store.attrs["units"] == "m"
    by = {Path(r["file"]).name: r["message"] for r in _report(s)}
    assert "coordinate 1e+30 at body 0 frame 4 joint 2" in by["b.npy"]
    assert "expected |coordinate| <= 100 m" in by["b.npy"]
    assert "coordinate -101 at body 0 frame 1 joint 0" in by["c.npy"]
    assert float(store.read_sample(1)[0, 0, 0, 0]) == 99.0


def test_pixel_units_take_a_larger_bound(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    arrays = {k: rng.uniform(0, 1920, size=(6, 25, 2)).astype(np.float32) for k in ("a", "b")}
    arrays["b"][2, 3, 1] = 3e5
    root = _generic(tmp_path / "in", arrays)
    s = _run("generic", root, tmp_path / "px", dtype="float32", units="px", center=False, denoise=False)
    store = Store.open(tmp_path / "px")
    assert store.attrs["units"] == "px" and store.attrs["preprocessing"]["units"] == "px"
    assert store.manifest.column("sample_id").to_pylist() == ["a"]
    assert "expected |coordinate| <= 100000 px (other units: prepare --units m|mm)" in _report(s)[0]["message"]
    np.testing.assert_array_equal(store.read_sample(0)[:, 0], arrays["a"])
    # the same pixels read as metres are refused, with the way out named
    with pytest.raises(BadInputError, match="no sample could be ingested.*<= 100 m.*--units"):
        _run("generic", root, tmp_path / "m", dtype="float32")
    with pytest.raises(ConfigError, match="--units: found 'px', expected 'm' for format ntu"):
        _run("ntu", root, tmp_path / "ntu", units="px")
    with pytest.raises(ConfigError, match="units: found 'inch'"):
        PrepareOptions(units="inch")


def _ntu_files(tmp_path: Path) -> list[Path]:
    d = tmp_path / "raw"
    synthesize(str(d), num_samples=3, num_classes=3, seed=5, workers=1, progress=False, min_frames=12, max_frames=14)
    return sorted(d.glob("*.skeleton"))


@pytest.mark.parametrize("value", ["1e30", "1e40", "250.0"])
def test_ntu_absurd_value_refused_with_its_line_and_no_warning(tmp_path: Path, value: str) -> None:
    files = _ntu_files(tmp_path)
    lines = files[1].read_text().splitlines()
    toks = lines[6].split()
    toks[1] = value  # y of the 3rd joint of frame 1
    lines[6] = " ".join(toks)
    files[1].write_text("\n".join(lines) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # was: RuntimeWarning 'overflow encountered in cast' for 1e40
        want = f"{files[1].name}:7: joint coordinate {float(value):g}, expected |coordinate| <= 100 m"
        with pytest.raises(BadInputError, match=re.escape(want)):
            list(ntu.read_unit(str(files[1])))
        s = _run("ntu", tmp_path / "raw", tmp_path / "st", dtype="float32")
    assert s["num_samples"] == 2 and s["num_skipped"] == 1
    (r,) = _report(s)
    assert r["line"] == 7 and "expected |coordinate| <= 100 m" in r["message"]


# ------------------------------------------------------------------ item 3: generic bad files


def test_generic_bad_files_are_skipped_not_fatal(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    arrays = {k: rng.normal(size=(7, 25, 3)).astype(np.float32) for k in ("a", "c2", "e", "huge", "neg", "z", "g", "t")}
    arrays["c2"] = rng.normal(size=(7, 25, 2)).astype(np.float32)  # C differs from the first sample
    rows = ["a,1", "c2,0", "e,2", "huge,3000000", "neg,-2", "txt,x", "z,4", "g,0", "t,0"]
    root = _generic(tmp_path / "in", arrays, rows)
    (root / "e.npy").write_bytes(b"")  # empty file: was EOFError
    (root / "g.npy").write_bytes(b"garbage, not an array")  # was "contains pickled (object) data"
    (root / "t.npy").write_bytes((root / "t.npy").read_bytes()[:200])  # truncated after the header
    s = _run("generic", root, tmp_path / "st")
    store = Store.open(tmp_path / "st")
    assert store.manifest.column("sample_id").to_pylist() == ["a", "z"]
    assert store.num_classes == 5  # labels 1 and 4: not 3,000,001 classes
    assert s["num_skipped"] == 7 and s["input_bytes"] == sum(p.stat().st_size for p in root.glob("*.npy"))
    rep = _report(s)
    msgs = [r["message"] for r in rep]
    assert all("\n" not in m for m in msgs)
    assert f"c2.npy: 2 coordinates per joint, expected 3 like the first sample ({root / 'a.npy'})" in msgs[0]
    assert "e.npy: not an .npy file (empty), expected a NumPy .npy file (np.save)" in msgs[1]
    bad = {Path(r["file"]).name: r["message"] for r in rep if r["file"].endswith(("g.npy", "t.npy"))}
    assert "not an .npy file (starts with b'garbag'), expected a NumPy .npy file (np.save)" in bad["g.npy"]
    assert "unreadable array (ValueError: Failed to read" in bad["t.npy"] and "not fully written" in bad["t.npy"]
    msgs = [m for m in msgs if not m.split(":")[0].endswith(("g.npy", "t.npy"))]
    assert msgs[2].endswith(f"labels.csv:5: label 3000000, expected -1 (unlabelled) or a class id 0..{MAX_LABEL - 1}")
    assert "labels.csv:6: label -2, expected -1 (unlabelled) or a class id" in msgs[3]
    assert "labels.csv:7: label 'x', expected an integer class id" in msgs[4]
    assert [r["line"] for r in rep if not r["file"].endswith(("g.npy", "t.npy"))] == [None, None, 5, 6, 7]
    assert s["mb_per_s"] > 0


def test_generic_listing_errors_stay_fatal_and_one_line(tmp_path: Path) -> None:
    """A labels.csv that cannot be read as a table stops before any work (nothing to skip to)."""
    root = _generic(tmp_path / "in", {"a": np.ones((3, 25, 3))}, ["a,0,1"])
    with pytest.raises(BadInputError, match=r"labels.csv:2: 3 cells, expected 2"):
        _run("generic", root, tmp_path / "st")


# ------------------------------------------------------------------ item 4: CTR-GCN negative labels


def test_ctrgcn_label_minus_one_warned_below_refused(tmp_path: Path, caplog) -> None:
    rng = np.random.default_rng(7)
    y_tr = np.array([0, -1, 2, -1, -4, 1])
    _ctrgcn_file(tmp_path / "d.npz", _ctrgcn_x(rng, 6), y_tr, _ctrgcn_x(rng, 2), np.array([-1, 3]))
    with caplog.at_level(logging.WARNING, logger="mtscale.data.formats.ctrgcn_npz"):
        s = _run("ctrgcn-npz", tmp_path / "d.npz", tmp_path / "st")
    warned = [r.getMessage() for r in caplog.records if r.name == "mtscale.data.formats.ctrgcn_npz"]
    assert len(warned) == 1 and "3 samples have label -1 (y_train 2, y_test 1)" in warned[0], warned
    store = Store.open(tmp_path / "st")
    assert store.labels.tolist() == [0, -1, 2, -1, 1, -1, 3]
    (r,) = _report(s)
    assert r["index"] == 4 and "label -4, expected -1 (unlabelled) or a class id" in r["message"]


def test_predict_raises_a_yielded_bad_record(tmp_path: Path) -> None:
    """``predict`` reads the same readers: a bad record of a many-record file is an error there
    (it classifies what it is given), not a silently shorter table."""
    from mtscale.train.predict import iter_samples

    anns = _pyskl_file(tmp_path / "a.pkl", 3, np.random.default_rng(8))
    anns[1]["keypoint"][0, 0, 0, 0] = np.inf
    (tmp_path / "a.pkl").write_bytes(pickle.dumps({"split": {}, "annotations": anns}))
    pyskl._load.cache_clear()
    got = []
    with pytest.raises(BadInputError, match=r"annotations\[1\].keypoint has non-finite values"):
        for _, s in iter_samples([str(tmp_path / "a.pkl")], "pyskl", {}):
            got.append(s.sample_id)
    assert got == [anns[0]["frame_dir"]]
