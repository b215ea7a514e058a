"""NW-UCLA JSON reader: all real sequences, label mapping, view split, bad inputs."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest

from mtscale.data.formats import get_reader, nw_ucla
from mtscale.errors import BadInputError


def test_all_real_sequences(ucla_dir: Path) -> None:
    reader = get_reader("nw-ucla")
    listing = reader.list_units(str(ucla_dir))
    assert len(listing.units) == 1484
    assert listing.class_names[0] == "pick up with one hand" and listing.class_names[9] == "carry"
    labels, views, splits = collections.Counter(), collections.Counter(), collections.Counter()
    for u in listing.units:
        (s,) = reader.read_unit(u)
        assert s.x_MTVC.ndim == 4 and s.x_MTVC.shape[0] == 1 and s.x_MTVC.shape[2:] == (20, 3)
        assert s.layout == "kinect_v1_20"
        labels[s.label] += 1
        views[s.fields["view"]] += 1
        splits[s.fields["split_view"]] += 1
        assert s.fields["split_view"] == ("test" if s.fields["view"] == 3 else "train")
    assert sorted(labels) == list(range(10))
    assert labels[6] == 142 and labels[3] == 173  # a08 donning, a04 walk around
    assert sorted(views) == [1, 2, 3]
    assert (splits["train"], splits["test"]) == (1020, 464)


def test_first_value_and_fields(ucla_dir: Path) -> None:
    p = ucla_dir / "a01_s01_e00_v01.json"
    (s,) = nw_ucla.read_unit(str(p))
    d = json.loads(p.read_text())
    np.testing.assert_array_equal(s.x_MTVC[0, 0, 0], np.array(d["skeletons"][0][0], np.float32))
    assert s.x_MTVC.shape[1] == len(d["skeletons"])
    assert (s.fields["action"], s.fields["subject"], s.fields["environment"], s.fields["view"]) == (1, 1, 0, 1)
    assert s.sample_id == "a01_s01_e00_v01" and s.label == 0


def _write(tmp_path: Path, name: str, sk, label=None) -> str:
    p = tmp_path / f"{name}.json"
    d = {"file_name": name, "skeletons": sk}
    if label is not None:
        d["label"] = label
    p.write_text(json.dumps(d))
    return str(p)


def test_label_mapping_is_explicit(tmp_path: Path) -> None:
    sk = np.ones((4, 20, 3)).tolist()
    for a, lab in ((8, 6), (9, 7), (11, 8), (12, 9)):
        (s,) = nw_ucla.read_unit(_write(tmp_path, f"a{a:02d}_s02_e01_v03", sk, lab + 1))
        assert s.label == lab and s.fields["split_view"] == "test"


@pytest.mark.parametrize(
    "name,sk,label,needle",
    [
        ("a07_s01_e00_v01", np.ones((3, 20, 3)).tolist(), None, "action id a07"),
        ("walk", np.ones((3, 20, 3)).tolist(), None, "does not parse"),
        ("a01_s01_e00_v01", np.ones((3, 19, 3)).tolist(), None, "skeletons[0] has 19 joints"),
        ("a01_s01_e00_v01", [[[1, 2, 3]] * 20, [[1, 2]] * 20], None, "skeletons[1][0]"),
        ("a01_s01_e00_v01", [[["a", 2, 3]] * 20], None, "skeletons[0][0]"),
        ("a01_s01_e00_v01", [], None, "empty"),
        ("a01_s01_e00_v01", np.ones((3, 20, 3)).tolist(), 5, "disagrees"),
    ],
)
def test_bad_inputs(tmp_path: Path, name, sk, label, needle) -> None:
    with pytest.raises(BadInputError) as e:
        list(nw_ucla.read_unit(_write(tmp_path, name, sk, label)))
    assert needle in str(e.value) and str(tmp_path) in str(e.value)


def test_nan_and_invalid_json(tmp_path: Path) -> None:
    p = tmp_path / "a01_s01_e00_v01.json"
    p.write_text('{"file_name": "a01_s01_e00_v01", "skeletons": ['
                 + ",".join(["[" + ",".join(["[1, NaN, 2]"] * 20) + "]"]) + "]}")
    with pytest.raises(BadInputError, match=r"skeletons\[0\]\[0\] is not finite"):
        list(nw_ucla.read_unit(str(p)))
    p.write_text('{"file_name": \n "a01')
    with pytest.raises(BadInputError, match=r"a01_s01_e00_v01.json:2: invalid JSON"):
        list(nw_ucla.read_unit(str(p)))
