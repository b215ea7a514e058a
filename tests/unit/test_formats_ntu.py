"""NTU RGB+D .skeleton reader: real files, CRLF, metadata/splits, and every bad-input kind."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from mtscale.data.formats import get_reader, ntu, ntu_scan
from mtscale.errors import BadInputError

REAL = {  # name: (frames, bodies)
    "S001C001P001R001A001": (103, 1),
    "S001C001P001R001A011": (82, 1),
    "S001C001P001R001A050": (74, 2),
    "S002C001P003R001A003": (100, 1),
    "S004C002P003R001A017": (124, 1),
}
NAME = "S001C002P003R001A004.skeleton"


def _read(path: Path):
    (s,) = list(ntu.read_unit(str(path)))
    return s


def _joint_line(j: int, base: float = 0.0) -> str:
    return f"{base + 0.01 * j:.7f} {0.1 + 0.02 * j:.7f} 3.5 250.1 200.2 900.5 500.25 0.1 0.2 0.3 0.9 2"


def _make(frames: list[list[str]], v: int = 25) -> str:
    """Text of a file whose frame f holds bodies with the given IDs."""
    out = [str(len(frames))]
    for f, bodies in enumerate(frames):
        out.append(str(len(bodies)))
        for k, bid in enumerate(bodies):
            out.append(f"{bid} 0 1 1 1 1 0 -0.1 0.05 2")
            out.append(str(v))
            out += [_joint_line(j, base=f + 10 * k) for j in range(v)]
    return "\n".join(out) + "\n"


def test_real_files_frames_bodies_and_first_joint(ntu_dir: Path) -> None:
    listing = ntu.list_units(str(ntu_dir))
    assert [Path(u).stem for u in listing.units] == sorted(REAL)
    assert listing.excluded == []
    for u in listing.units:
        s = _read(Path(u))
        frames, bodies = REAL[s.sample_id]
        assert s.x_MTVC.shape == (bodies, frames, 25, 3) and s.x_MTVC.dtype == np.float32
        assert s.fields["num_frames_raw"] == frames and s.fields["num_bodies_raw"] == bodies
        assert s.layout == "ntu25"
        # The first joint of frame 1 equals the text of line 5 (frame count, body count, body line, 25).
        line5 = Path(u).read_bytes().splitlines()[4].split()
        np.testing.assert_array_equal(s.x_MTVC[0, 0, 0], np.array([float(t) for t in line5[:3]], np.float32))
        # the last joint of the last frame of body 0 is the last line of its block
        assert np.abs(s.x_MTVC[0, -1]).sum() > 0
    s = _read(ntu_dir / "S001C001P001R001A001.skeleton")
    np.testing.assert_array_equal(s.x_MTVC[0, 0, 0], np.array([0.2181153, 0.1725972, 3.785547], np.float32))


def test_real_metadata_splits_and_class_names(ntu_dir: Path) -> None:
    s = _read(ntu_dir / "S004C002P003R001A017.skeleton")
    assert s.label == 16
    f = s.fields
    assert (f["setup"], f["camera"], f["performer"], f["replication"], f["action"]) == (4, 2, 3, 1, 17)
    assert f["source_file"] == "S004C002P003R001A017.skeleton"
    # performer 3 is a test subject; camera 2 is a training view; setup 4 is even -> train
    assert (f["split_xsub60"], f["split_xview60"], f["split_xsub120"], f["split_xset120"]) == ("test", "train", "test", "train")
    s = _read(ntu_dir / "S001C001P001R001A001.skeleton")
    assert (s.fields["split_xsub60"], s.fields["split_xview60"], s.fields["split_xset120"]) == ("train", "test", "test")
    names = ntu.list_units(str(ntu_dir)).class_names
    assert len(names) == 120 and names[0] == "drink water" and names[49] == "punching/slapping other person"
    assert names[16] == "take off a shoe" and names[119].startswith("finger-guessing")


def test_ntu120_only_samples_have_no_ntu60_split() -> None:
    m = ntu.parse_name("S018C001P045R002A061.skeleton")
    sp = ntu.split_fields(m)
    assert sp["split_xsub60"] is None and sp["split_xview60"] is None
    assert sp["split_xsub120"] == "train" and sp["split_xset120"] == "train"
    assert ntu.split_fields(ntu.parse_name("S017C003P106R001A120"))["split_xsub60"] is None
    assert ntu.split_fields(ntu.parse_name("S019C003P106R001A001"))["split_xset120"] == "test"


def test_crlf_parses_like_lf(ntu_dir: Path, tmp_path: Path) -> None:
    src = ntu_dir / "S001C001P001R001A001.skeleton"
    raw = src.read_bytes()
    assert b"\r\n" in raw
    lf = tmp_path / src.name
    lf.write_bytes(raw.replace(b"\r\n", b"\n"))
    a, b = _read(src), _read(lf)
    np.testing.assert_array_equal(a.x_MTVC, b.x_MTVC)
    assert a.fields == {**b.fields}


def test_published_missing_samples_are_excluded(tmp_path: Path) -> None:
    missing = ntu.missing_samples()
    assert len(missing) == 535 and sum(int(n[1:4]) <= 17 for n in missing) == 302
    (tmp_path / "S001C002P005R002A008.skeleton").write_text(_make([["1"]]))
    (tmp_path / NAME).write_text(_make([["1"]]))
    listing = get_reader("ntu").list_units(str(tmp_path))
    assert [Path(u).name for u in listing.units] == [NAME]
    assert listing.excluded == ["S001C002P005R002A008"]
    pickle.dumps(listing.units)


def test_zero_body_frames_and_three_tracked_bodies(tmp_path: Path) -> None:
    p = tmp_path / NAME
    p.write_text(_make([["7"], [], ["7", "9"], ["11", "9", "7"]]))
    s = _read(p)
    assert s.x_MTVC.shape == (3, 4, 25, 3) and s.fields["num_bodies_raw"] == 3
    present = np.any(s.x_MTVC != 0, axis=(2, 3))
    np.testing.assert_array_equal(present, [[1, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]])
    # body "9" is the 2nd body in frame 3 (k=1) and the 2nd listed in frame 4 (k=1)
    np.testing.assert_allclose(s.x_MTVC[1, 2, 0, 0], 2 + 10, rtol=1e-6)
    np.testing.assert_allclose(s.x_MTVC[0, 3, 0, 0], 3 + 20, rtol=1e-6)  # "7" listed third in frame 4


def _mutate(tmp_path: Path, lineno: int, new: str | None) -> Path:
    """Valid 2-frame file with line ``lineno`` (1-based) replaced (None: file cut before it)."""
    lines = _make([["5"], ["5"]]).splitlines()
    if new is None:
        lines = lines[: lineno - 1]
    else:
        lines[lineno - 1] = new
    p = tmp_path / NAME
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.mark.parametrize(
    "lineno,new,needle",
    [
        (7, "0.1 0.2 abc 1 2 3 4 5 6 7 8 2", "non-numeric"),
        (9, "0.1 0.2 nan 1 2 3 4 5 6 7 8 2", "non-finite"),
        (12, "0.1 0.2 inf 1 2 3 4 5 6 7 8 2", "non-finite"),
        (8, "0.1 0.2 0.3 1 2 3 4 5 6 7 8", "11 values"),
        (10, "0.1 0.2 0.3 1 2 3 4 5 6 7 8 2 9", "13 values"),
        (4, "24", "found 24 joints"),
        (32, "25x", "integer"),
        (3, "5 0 1 1 1 1 0 -0.1 2", "body line has 9 values"),
        (31, "5 0 1 1 1 1 0 -0.1 oops 2", "non-numeric body line"),
        (1, "two", "integer"),
        (2, "-1", "non-negative"),
    ],
)
def test_bad_inputs_name_the_line(tmp_path: Path, lineno: int, new: str, needle: str) -> None:
    p = _mutate(tmp_path, lineno, new)
    with pytest.raises(BadInputError) as e:
        _read(p)
    assert f"{p}:{lineno}:" in str(e.value) and needle in str(e.value), str(e.value)


def test_truncated_and_trailing_content(tmp_path: Path) -> None:
    p = _mutate(tmp_path, 40, None)  # 2 frames need 1 + 2 * 28 = 57 lines; cut after 39
    with pytest.raises(BadInputError, match=r":40: file ends after 39 lines"):
        _read(p)
    p.write_text(_make([["5"], ["5"]]) + "1\n")
    with pytest.raises(BadInputError, match=r":58: extra content"):
        _read(p)
    p.write_text(_make([["5"], ["5"]]) + "\n\n")  # trailing blank lines are fine
    assert _read(p).x_MTVC.shape == (1, 2, 25, 3)
    p.write_text("")
    with pytest.raises(BadInputError, match=":1: empty file"):
        _read(p)


def test_bad_file_name(tmp_path: Path) -> None:
    p = tmp_path / "walk_01.skeleton"
    p.write_text(_make([["1"]]))
    with pytest.raises(BadInputError, match="does not parse"):
        _read(p)
    with pytest.raises(BadInputError, match="no \\*.skeleton files"):
        ntu.list_units(str(_empty(tmp_path)))
    with pytest.raises(BadInputError, match="no such file"):
        ntu.list_units(str(tmp_path / "nothing_here"))


def _empty(tmp_path: Path) -> Path:
    d = tmp_path / "empty"
    d.mkdir()
    return d


# --------------------------------------------------------------------------- compiled scanner


def _same(a: tuple, b: tuple) -> bool:
    """Equal frames / bodies and bit-identical float32 arrays (so -0.0 != 0.0)."""
    return a[1:] == b[1:] and a[0].shape == b[0].shape and np.array_equal(a[0].view(np.uint32), b[0].view(np.uint32))


def test_scanner_equals_reference_bit_for_bit(ntu_dir: Path, tmp_path: Path) -> None:
    from mtscale.data import synthetic

    synthetic.synthesize(str(tmp_path / "syn"), num_samples=24, num_classes=6, seed=3)
    files = sorted(ntu_dir.glob("*.skeleton")) + sorted((tmp_path / "syn").rglob("*.skeleton"))
    assert len(files) == 29
    for f in files:
        data = f.read_bytes()
        fast = ntu_scan.scan(data)
        assert fast is not None, f"{f}: the scanner refused a well-formed file"
        assert _same(fast, ntu.parse_skeleton_reference(data, str(f))), f
    # CRLF, extra blanks, exponents, signs, trailing blank lines: still the scanner, same values
    text = _make([["7"], [], ["7", "9"]])
    odd = text.replace("\n", "\r\n").replace(" 0.1 0.2 0.3 0.9 ", "  +1e-1\t2.0E-1 .3 9e-1 ") + "\n \n"
    for t in (text, odd):
        fast = ntu_scan.scan(t.encode())
        assert fast is not None and _same(fast, ntu.parse_skeleton_reference(t.encode()))


def test_scanner_never_accepts_what_the_reference_refuses() -> None:
    """Random byte edits of a valid file: wherever the scanner accepts, the reference accepts
    too, with bit-identical values; everything else falls back to the reference."""
    base = bytearray(_make([["72057594037932185"], ["72057594037932185", "5"]]).encode())
    alphabet = b"0123456789.-+eE \t\r\nx"
    rng = np.random.default_rng(0)
    accepted = refused = 0
    for _ in range(1500):
        data = bytearray(base)
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 4))):
            data[pos] = alphabet[rng.integers(len(alphabet))]
        fast = ntu_scan.scan(bytes(data))
        try:
            ref = ntu.parse_skeleton_reference(bytes(data))
        except BadInputError:
            ref = None
        if fast is None:
            refused += 1
            continue
        accepted += 1
        assert ref is not None, bytes(data)
        assert _same(fast, ref), bytes(data)
    assert accepted > 100 and refused > 100  # both sides of the property were exercised
