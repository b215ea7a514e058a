"""Northwestern-UCLA Multiview Action3D reader (layout ``kinect_v1_20``).

One JSON file per sequence, as distributed with CTR-GCN / PYSKL preprocessing::

    {"file_name": "aAA_sSS_eEE_vVV", "skeletons": [T][20][3], "label": 1..10}

File names encode action (a01..a06, a08, a09, a11, a12), subject, environment/episode and
view (v01..v03). Action ids are mapped to 10 contiguous classes explicitly; the common
protocol (``split_view``) trains on views 1 and 2 and tests on view 3. Coordinates are in
metres (Kinect v1, camera frame).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mtscale.data.formats import MAX_ABS_COORD, Listing, RawSample, bound_text
from mtscale.errors import BadInputError

LAYOUT = "kinect_v1_20"
UNITS = "m"
NUM_COORDS = 3
NUM_JOINTS = 20
ACTION_TO_LABEL = {1: 0, 2: 1, 3: 2, 4: 3, 5: 4, 6: 5, 8: 6, 9: 7, 11: 8, 12: 9}
CLASS_NAMES = [
    "pick up with one hand", "pick up with two hands", "drop trash", "walk around",
    "sit down", "stand up", "donning", "doffing", "throw", "carry",
]
_NAME_RE = re.compile(r"^a(\d+)_s(\d+)_e(\d+)_v(\d+)$")


def parse_name(name: str, where: str) -> dict[str, int]:
    m = _NAME_RE.match(name)
    if m is None:
        raise BadInputError(where, None, f"file_name {name!r} does not parse", "aAA_sSS_eEE_vVV (e.g. a01_s01_e00_v01)")
    a, s, e, v = (int(g) for g in m.groups())
    if a not in ACTION_TO_LABEL:
        raise BadInputError(where, None, f"action id a{a:02d} in {name!r}",
                            f"one of {[f'a{k:02d}' for k in ACTION_TO_LABEL]}")
    return {"action": a, "subject": s, "environment": e, "view": v}


def list_units(input_path: str, layout: str | None = None) -> Listing:
    """All ``*.json`` files under ``input_path`` (file or folder, recursive), sorted."""
    if layout not in (None, LAYOUT):
        raise BadInputError(input_path, None, f"layout {layout!r} requested", f"{LAYOUT!r} for NW-UCLA")
    root = Path(input_path)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(root.rglob("*.json"))
    else:
        raise BadInputError(input_path, None, "no such file or folder", "a NW-UCLA .json file or a folder of them")
    if not files:
        raise BadInputError(input_path, None, "no *.json files found", "NW-UCLA sequences (aAA_sSS_eEE_vVV.json)")
    return Listing(units=[str(f) for f in files], class_names=list(CLASS_NAMES))


def read_unit(unit: str) -> Iterator[RawSample]:
    try:
        with open(unit, "rb") as fh:
            d = json.load(fh)
    except json.JSONDecodeError as e:
        raise BadInputError(unit, e.lineno, f"invalid JSON ({e.msg})", "a JSON object") from None
    if not isinstance(d, dict) or "skeletons" not in d:
        raise BadInputError(unit, None, "no 'skeletons' key", '{"file_name", "skeletons": [T][20][3], "label"}')
    name = str(d.get("file_name", Path(unit).stem))
    meta = parse_name(name, unit)
    label = ACTION_TO_LABEL[meta["action"]]
    if "label" in d and d["label"] not in (label + 1,):
        raise BadInputError(unit, None, f"label {d['label']!r} disagrees with file_name {name!r}",
                            f"{label + 1} (1-based label of action a{meta['action']:02d})")
    x_TVC = _to_array(d["skeletons"], unit)
    fields = dict(meta)
    fields.update(num_frames_raw=int(x_TVC.shape[0]), source_file=Path(unit).name,
                  split_view="test" if meta["view"] == 3 else "train")
    yield RawSample(sample_id=name, x_MTVC=x_TVC[None], label=label, layout=LAYOUT, fields=fields, source=unit)


def _to_array(sk: object, unit: str) -> np.ndarray:
    """[T][20][3] -> (T, 20, 3) float32, naming the first bad frame / joint on failure (also a
    value beyond ``MAX_ABS_COORD["m"]``, checked before the cast: refused, not warned about)."""
    try:
        x = np.asarray(sk, dtype=np.float64)
        ok = x.ndim == 3 and x.shape[1:] == (NUM_JOINTS, 3)
    except (ValueError, TypeError):
        ok = False
    if not ok:
        if isinstance(sk, list) and not sk:
            raise BadInputError(unit, None, "skeletons is empty", "at least one frame")
        if not isinstance(sk, list):
            raise BadInputError(unit, None, f"skeletons is {type(sk).__name__}", "a list [T][20][3]")
        for t, frame in enumerate(sk):
            if not isinstance(frame, list) or len(frame) != NUM_JOINTS:
                n = len(frame) if isinstance(frame, list) else type(frame).__name__
                raise BadInputError(unit, None, f"skeletons[{t}] has {n} joints", f"{NUM_JOINTS}")
            for j, p in enumerate(frame):
                if not isinstance(p, list) or len(p) != 3 or not all(isinstance(c, (int, float)) for c in p):
                    raise BadInputError(unit, None, f"skeletons[{t}][{j}] is {str(p)[:40]}", "3 numbers (x, y, z)")
        raise BadInputError(unit, None, "skeletons has an unexpected shape", f"[T][{NUM_JOINTS}][3]")
    if x.shape[0] == 0:
        raise BadInputError(unit, None, "skeletons is empty", "at least one frame")
    bad = ~np.isfinite(x)
    if bad.any():
        t, j, _ = np.argwhere(bad)[0]
        raise BadInputError(unit, None, f"skeletons[{t}][{j}] is not finite", "finite coordinates")
    far = np.abs(x) > MAX_ABS_COORD[UNITS]
    if far.any():
        t, j, c = np.argwhere(far)[0]
        raise BadInputError(unit, None, f"skeletons[{t}][{j}] has coordinate {x[t, j, c]:g}",
                            bound_text(UNITS, hint=False))
    return x.astype(np.float32)
