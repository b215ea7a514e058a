"""Generic folder-of-.npy reader: round trip, column typing, splits, layouts, bad inputs."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from mtscale.data.formats import get_reader
from mtscale.errors import BadInputError

generic = get_reader("generic")


def _dataset(root: Path, rows: list[str], arrays: dict[str, np.ndarray], header: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "labels.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    for k, a in arrays.items():
        np.save(root / f"{k}.npy", a)
    return root


def _read_all(root: Path, layout=None):
    listing = generic.list_units(str(root), layout)
    pickle.dumps(listing.units)
    return [s for u in listing.units for s in generic.read_unit(u)]


def test_round_trip_fields_and_splits(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 25, 3)).astype(np.float32)
    b = rng.normal(size=(2, 12, 25, 3))
    root = _dataset(tmp_path / "d", ["a,3,7,left,1.5,train", "b,0,12,,2,test"], {"a": a, "b": b},
                    "id,label,subject,view,weight,split_cs")
    (root / "class_names.txt").write_text("zero\none\ntwo\nthree\n")
    listing = generic.list_units(str(root))
    assert listing.class_names == ["zero", "one", "two", "three"]
    sa, sb = _read_all(root)
    assert sa.sample_id == "a" and sa.label == 3 and sa.layout == "ntu25"
    np.testing.assert_array_equal(sa.x_MTVC, a[None])
    np.testing.assert_allclose(sb.x_MTVC, b.astype(np.float32))
    assert sa.fields["subject"] == 7 and isinstance(sa.fields["subject"], int)
    assert sa.fields["weight"] == 1.5 and sb.fields["weight"] == 2.0 and isinstance(sb.fields["weight"], float)
    assert sa.fields["view"] == "left" and sb.fields["view"] is None
    assert (sa.fields["split_cs"], sb.fields["split_cs"]) == ("train", "test")
    assert sb.fields["num_bodies_raw"] == 2 and sb.fields["num_frames_raw"] == 12


def test_layout_argument_column_and_inference(tmp_path: Path) -> None:
    x20 = np.ones((5, 20, 3), np.float32)
    root = _dataset(tmp_path / "d", ["a,0,kinect_v1_20"], {"a": x20}, "id,label,layout")
    assert _read_all(root)[0].layout == "kinect_v1_20"
    root2 = _dataset(tmp_path / "e", ["a,0"], {"a": x20}, "id,label")
    assert _read_all(root2)[0].layout == "kinect_v1_20"  # the only 20-joint layout
    with pytest.raises(BadInputError, match="20 joints .* expected 25 for layout ntu25"):
        _read_all(root2, "ntu25")
    root3 = _dataset(tmp_path / "f", ["a,0"], {"a": np.ones((5, 17, 2))}, "id,label")
    with pytest.raises(BadInputError, match="17 joints and no layout given"):
        _read_all(root3)


@pytest.mark.parametrize(
    "rows,header,arrays,needle",
    [
        (["a,0", "a,1"], "id,label", {"a": np.ones((3, 25, 3))}, "labels.csv:3: duplicate id 'a' (first on line 2)"),
        (["a,x"], "id,label", {"a": np.ones((3, 25, 3))}, "labels.csv:2: label 'x'"),
        (["a,0,1"], "id,label", {"a": np.ones((3, 25, 3))}, "labels.csv:2: 3 cells"),
        (["a,0"], "id,lab", {"a": np.ones((3, 25, 3))}, "labels.csv:1: header"),
        (["a,0,maybe"], "id,label,split_x", {"a": np.ones((3, 25, 3))}, "labels.csv:2: split_x = 'maybe'"),
    ],
)
def test_bad_labels_csv(tmp_path: Path, rows, header, arrays, needle) -> None:
    root = _dataset(tmp_path / "d", rows, arrays, header)
    with pytest.raises(BadInputError) as e:
        _read_all(root)
    assert needle in str(e.value), str(e.value)


def test_bad_arrays_are_per_unit_errors(tmp_path: Path) -> None:
    bad = np.ones((4, 25, 3))
    bad[2, 5, 1] = np.nan
    root = _dataset(tmp_path / "d", ["ok,0", "missing,1", "nan,0", "flat,0", "obj,0"],
                    {"ok": np.ones((3, 25, 3)), "nan": bad, "flat": np.ones((10, 75)), "orphan": np.ones((3, 25, 3))},
                    "id,label")
    np.save(root / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    listing = generic.list_units(str(root))
    errors = {}
    for u in listing.units:
        try:
            list(generic.read_unit(u))
            errors[u.sample_id] = None
        except BadInputError as e:
            errors[u.sample_id] = str(e)
    assert errors["ok"] is None
    assert "labels.csv:3: id 'missing' has no file missing.npy" in errors["missing"]
    assert "nan.npy: non-finite value at body 0 frame 2 joint 5" in errors["nan"]
    assert "flat.npy: shape (10, 75)" in errors["flat"]
    assert "obj.npy: " in errors["obj"]
    assert "orphan.npy: no row for id 'orphan'" in errors["orphan"]
