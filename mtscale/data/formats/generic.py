"""Generic reader: a folder of NumPy arrays plus a CSV of labels and metadata.

Folder layout::

    my_dataset/
      labels.csv          required
      class_names.txt     optional: one class name per line, line i = label i
      walk_017.npy        one array per sample, named <id>.npy
      ...

``<id>.npy`` holds one sample as float or integer numbers, shape (T, V, C) for one body or
(M, T, V, C) for M bodies (zeros where a body is absent). C is usually 3 (x, y, z); 2 works
for 2-D keypoints (without view normalisation). Arrays are loaded with
``allow_pickle=False``.

``labels.csv`` (UTF-8, comma-separated, with a header row) has one row per sample:

- ``id`` (required): the file name without ``.npy``.
- ``label`` (required): the 0-based integer class id, below 100,000 (``MAX_LABEL``), or -1
  (unknown / unlabelled).
- ``layout`` (optional): the joint layout of that row (e.g. ``ntu25``, ``kinect_v1_20``).
  ``--layout`` (``prepare --layout``) overrides it. Without either, the layout is the one
  whose joint count equals V, where exactly one does.
- ``split_<name>`` (optional, any number): membership in protocol ``<name>``: ``train``,
  ``test``, ``val`` or empty (not part of that protocol).
- any other column (``subject``, ``view``, ``camera``, ...) becomes a manifest field. A
  column whose every non-empty cell is an integer is stored as int, else where every cell
  is a number as float, else as text; empty cells are None.

Errors name the file and the line. A ``labels.csv`` that cannot be read as a table (no header
``id,label``, a row with another number of cells, a duplicate or malformed id) stops
``prepare`` before any work. Everything else skips that one sample and is reported (one line
in ``report.jsonl``, with the file or ``labels.csv:line``): a bad value in its row (a label
that is not an integer, below -1 or >= 100,000; an unknown layout; a split value other than
train / test / val / empty), a listed id without its ``.npy``, an ``.npy`` without a row, an
unreadable ``.npy`` (empty, truncated, pickled objects), an array that is not 3-D / 4-D, a
wrong joint count for the layout, non-finite values or values beyond the coordinate bound
(``formats.MAX_ABS_COORD``), or another number of coordinates C than the first readable
sample has.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mtscale.data.formats import LABEL_RULE, MAX_LABEL, Listing, RawSample
from mtscale.data.layouts import LAYOUTS
from mtscale.errors import BadInputError

LAYOUT = None
LABELS = "labels.csv"
_SPLIT_VALUES = ("train", "test", "val")


@dataclass(frozen=True)
class GenericUnit:
    npy_path: str
    sample_id: str
    label: int = -1
    layout: str | None = None
    fields: dict[str, Any] = field(default_factory=dict, hash=False)
    csv_line: int | None = None
    """Line of the sample's row in labels.csv; None for an .npy without a row."""
    problem: tuple[str, str] | None = None
    """(found, expected) of a bad value in the row: the sample is reported, not read."""


def _convert_column(values: list[str]) -> list[Any]:
    cells = [v.strip() for v in values]
    present = [v for v in cells if v != ""]
    for cast in (int, float):
        try:
            [cast(v) for v in present]
        except ValueError:
            continue
        return [cast(v) if v != "" else None for v in cells]
    return [v if v != "" else None for v in cells]


def list_units(input_path: str, layout: str | None = None) -> Listing:
    """Read ``labels.csv`` and pair its rows with the ``.npy`` files of the folder."""
    root = Path(input_path)
    csv_path = root / LABELS
    if not root.is_dir():
        raise BadInputError(input_path, None, "not a folder", f"a folder with {LABELS} and <id>.npy files")
    if not csv_path.is_file():
        raise BadInputError(str(csv_path), None, "file not found", f"{LABELS} with header id,label[,...]")
    if layout is not None and layout not in LAYOUTS:
        raise BadInputError(input_path, None, f"layout {layout!r}", f"one of {sorted(LAYOUTS)}")
    raw = csv_path.read_bytes()
    try:  # UTF-8, with or without the byte-order mark spreadsheet programs write
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise BadInputError(str(csv_path), line, f"byte 0x{raw[e.start]:02x}, which is not UTF-8 text (Latin-1 or "
                            "another legacy encoding?)", "UTF-8 (re-save the file as UTF-8)") from None
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows:
        raise BadInputError(str(csv_path), 1, "empty file", "a header row id,label[,...]")
    header = [h.strip() for h in rows[0]]
    for req in ("id", "label"):
        if req not in header:
            raise BadInputError(str(csv_path), 1, f"header {header}", f"a column named {req!r}")
    if len(set(header)) != len(header):
        raise BadInputError(str(csv_path), 1, f"duplicate column names in {header}", "unique names")
    body = [(i + 2, r) for i, r in enumerate(rows[1:]) if any(c.strip() for c in r)]
    for line, r in body:
        if len(r) != len(header):
            raise BadInputError(str(csv_path), line, f"{len(r)} cells", f"{len(header)} (as in the header)")
    cols = {h: [r[k] for _, r in body] for k, h in enumerate(header)}
    extra = {h: _convert_column(v) for h, v in cols.items() if h not in ("id", "label", "layout") and not h.startswith("split_")}

    units: list[GenericUnit] = []
    seen: dict[str, int] = {}
    for n, (line, _r) in enumerate(body):
        sid = cols["id"][n].strip()
        if not sid or "/" in sid or "\\" in sid:
            raise BadInputError(str(csv_path), line, f"id {sid!r}", "a file name without folders")
        if sid in seen:
            raise BadInputError(str(csv_path), line, f"duplicate id {sid!r} (first on line {seen[sid]})", "unique ids")
        seen[sid] = line
        problem: tuple[str, str] | None = None
        try:
            label = int(cols["label"][n])
        except ValueError:
            label, problem = -1, (f"label {cols['label'][n]!r}", f"an integer class id: {LABEL_RULE}")
        if not -1 <= label < MAX_LABEL:
            label, problem = -1, (f"label {label}", LABEL_RULE)
        row_layout = layout or (cols["layout"][n].strip() or None if "layout" in cols else None)
        if row_layout is not None and row_layout not in LAYOUTS:
            row_layout, problem = None, problem or (f"layout {row_layout!r}", f"one of {sorted(LAYOUTS)}")
        fields: dict[str, Any] = {h: v[n] for h, v in extra.items()}
        for h in header:
            if h.startswith("split_"):
                v = cols[h][n].strip().lower()
                if v not in _SPLIT_VALUES + ("",):
                    v, problem = "", problem or (f"{h} = {cols[h][n]!r}", "train, test, val or empty")
                fields[h] = v or None
        units.append(GenericUnit(str(root / f"{sid}.npy"), sid, label, row_layout, fields, line, problem))
    for npy in sorted(root.glob("*.npy")):
        if npy.stem not in seen:
            units.append(GenericUnit(str(npy), npy.stem))
    if not units:
        raise BadInputError(str(csv_path), None, "no samples listed", "one row per <id>.npy")
    names_file = root / "class_names.txt"
    class_names = [s.strip() for s in names_file.read_text().splitlines() if s.strip()] if names_file.is_file() else None
    return Listing(units=units, class_names=class_names)


def _layout_for(V: int, unit: GenericUnit) -> str:
    if unit.layout is not None:
        want = LAYOUTS[unit.layout].num_joints
        if V != want:
            raise BadInputError(unit.npy_path, None, f"{V} joints (shape axis -2)", f"{want} for layout {unit.layout}")
        return unit.layout
    matches = [name for name, lay in LAYOUTS.items() if lay.num_joints == V]
    if len(matches) != 1:
        raise BadInputError(unit.npy_path, None, f"{V} joints and no layout given",
                            f"--layout or a layout column (layouts: {sorted(LAYOUTS)})")
    return matches[0]


def unit_bytes(unit: GenericUnit) -> int:
    try:
        return Path(unit.npy_path).stat().st_size
    except OSError:
        return 0


def read_unit(unit: GenericUnit) -> Iterator[RawSample]:
    path = Path(unit.npy_path)
    if unit.problem is not None:
        raise BadInputError(str(path.parent / LABELS), unit.csv_line, *unit.problem)
    if unit.csv_line is None:
        raise BadInputError(unit.npy_path, None, f"no row for id {unit.sample_id!r} in {LABELS}", "a labels row for every .npy")
    if not path.is_file():
        raise BadInputError(str(path.parent / LABELS), unit.csv_line, f"id {unit.sample_id!r} has no file {path.name}",
                            "an .npy per listed id")
    with open(path, "rb") as f:
        head = f.read(6)
    if head != b"\x93NUMPY":  # np.load would call any other file "pickled (object) data"
        raise BadInputError(str(path), None, f"not an .npy file ({f'starts with {head!r}' if head else 'empty'})",
                            "a NumPy .npy file (np.save)")
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:  # pickled objects, empty, truncated, unreadable
        msg = " ".join(str(e).split())  # one line
        raise BadInputError(str(path), None, f"unreadable array ({type(e).__name__}: {msg})",
                            "a numeric .npy without pickled objects") from None
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "fiu":
        raise BadInputError(str(path), None, f"dtype {getattr(x, 'dtype', type(x))}", "a float or integer array")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise BadInputError(str(path), None, f"shape {x.shape}", "(T, V, C) or (M, T, V, C)")
    layout = _layout_for(x.shape[2], unit)
    if not np.isfinite(x).all():  # in its own dtype: preprocess checks the bound before casting
        m, t, v, _ = np.argwhere(~np.isfinite(x))[0]
        raise BadInputError(str(path), None, f"non-finite value at body {m} frame {t} joint {v}", "finite coordinates")
    fields = dict(unit.fields)
    fields.update(num_frames_raw=int(x.shape[1]), num_bodies_raw=int(x.shape[0]), source_file=path.name)
    yield RawSample(unit.sample_id, x, unit.label, layout, fields, source=str(path))
