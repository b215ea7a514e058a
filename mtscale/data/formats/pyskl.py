"""PYSKL ``.pkl`` importer (e.g. ``ntu60_3danno.pkl``).

The pickle holds ``{"split": {name: [frame_dir, ...]}, "annotations": [{"frame_dir": str,
"label": int, "keypoint": (M, T, V, C) float array, "total_frames": int,
"keypoint_score": optional (M, T, V)}, ...]}``.

Pickle can run arbitrary code, so it is read with a restricted unpickler that only
constructs builtin containers / scalars and NumPy arrays, dtypes and scalars; any other
class is refused with an error naming it.

Split names become fields: ``xsub_train`` / ``xsub_val`` -> ``split_xsub`` = ``train`` /
``val`` (suffixes ``_train``, ``_test``, ``_val``); plain ``train`` / ``test`` / ``val`` ->
``split_default``; any other name ``n`` -> ``split_n`` = ``train`` for members. V decides the
layout (25 -> ``ntu25``, 20 -> ``kinect_v1_20``; COCO-17 2-D keypoints have no layout yet).
Units are (path, start, stop) ranges of annotations. A bad annotation is reported with its
index and skipped; the others of its range are kept.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from mtscale.data.formats import Listing, RawSample
from mtscale.data.layouts import LAYOUTS
from mtscale.errors import BadInputError

LAYOUT = None
UNIT_SIZE = 1000
_PARTS = ("train", "test", "val")

_ALLOWED: set[tuple[str, str]] = {
    ("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray",
                              "int", "float", "bool", "complex", "slice")
} | {("collections", "OrderedDict"), ("copyreg", "_reconstructor"), ("_codecs", "encode")} | {
    (mod, name)
    for core in ("numpy.core", "numpy._core")
    for mod, name in ((f"{core}.multiarray", "_reconstruct"), (f"{core}.multiarray", "scalar"),
                      (f"{core}.numeric", "_frombuffer"))
} | {("numpy", n) for n in ("ndarray", "dtype", "bool_", "int8", "int16", "int32", "int64", "uint8", "uint16",
                             "uint32", "uint64", "float16", "float32", "float64", "complex64", "complex128")} | {
    ("numpy.dtypes", n) for n in ("Float16DType", "Float32DType", "Float64DType", "Int8DType", "Int16DType",
                                  "Int32DType", "Int64DType", "UInt8DType", "UInt16DType", "UInt32DType",
                                  "UInt64DType", "BoolDType")
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only builds containers, scalars and NumPy arrays."""

    def __init__(self, file: Any, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise BadInputError(self.path, None, f"pickle references {module}.{name}",
                            "only builtin containers and NumPy arrays (refused for safety)")


def safe_load(path: str) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler`."""
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        return RestrictedUnpickler(io.BytesIO(data), path).load()
    except BadInputError:
        raise
    except Exception as e:
        raise BadInputError(path, None, f"unreadable pickle ({type(e).__name__}: {e})", "a PYSKL annotation pickle") from None


def _load(path: str) -> tuple[list[dict], dict[str, dict[str, Any]]]:
    """(annotations, fields by frame_dir), loaded once per process (keyed on the mtime)."""
    return _load_cached(path, Path(path).stat().st_mtime_ns)


_load.cache_clear = lambda: _load_cached.cache_clear()  # type: ignore[attr-defined]


@lru_cache(maxsize=1)
def _load_cached(path: str, mtime_ns: int) -> tuple[list[dict], dict[str, dict[str, Any]]]:
    d = safe_load(path)
    if not isinstance(d, dict) or not isinstance(d.get("annotations"), list):
        raise BadInputError(path, None, "no 'annotations' list", "{'split': {...}, 'annotations': [...]}")
    split = d.get("split", {})
    if not isinstance(split, dict):
        raise BadInputError(path, None, f"'split' is {type(split).__name__}", "a dict name -> list of frame_dir")
    fields: dict[str, dict[str, Any]] = {}
    columns = []
    for name, members in split.items():
        name = str(name)
        col, val = _split_column(name)
        columns.append(col)
        for fd in members:
            fields.setdefault(str(fd), {})[col] = val
    for fd in fields.values():
        for col in columns:
            fd.setdefault(col, None)
    return d["annotations"], {"__columns__": dict.fromkeys(columns), **fields}


def _split_column(name: str) -> tuple[str, str]:
    if name in _PARTS:
        return "split_default", name
    for part in _PARTS:
        if name.endswith("_" + part):
            return f"split_{name[: -len(part) - 1]}", part
    return f"split_{name}", "train"


def list_units(input_path: str, layout: str | None = None) -> Listing:
    path = str(input_path)
    if not Path(path).is_file():
        raise BadInputError(path, None, "file not found", "a PYSKL .pkl file")
    anns, _ = _load(path)
    n = len(anns)
    return Listing(units=[(path, s, min(s + UNIT_SIZE, n), layout) for s in range(0, n, UNIT_SIZE)])


def unit_records(unit: tuple) -> int:
    return unit[2] - unit[1]


def unit_bytes(unit: tuple) -> int:
    """The unit's share of the pickle's size (by annotations)."""
    path, start, stop, _ = unit
    try:
        return Path(path).stat().st_size * (stop - start) // max(1, len(_load(path)[0]))
    except OSError:
        return 0


def read_unit(unit: tuple) -> Iterator[RawSample | BadInputError]:
    """The annotations [start, stop) of the pickle; a bad one is yielded as ``BadInputError``
    (with its index) and the next ones are still read."""
    path, start, stop, layout = unit
    anns, fields_by_dir = _load(path)
    columns = fields_by_dir["__columns__"]
    for i in range(start, stop):
        try:
            yield _record(path, i, anns[i], layout, columns, fields_by_dir)
        except BadInputError as e:
            e.index = i
            yield e


def _record(path: str, i: int, a: Any, layout: str | None, columns: dict, fields_by_dir: dict) -> RawSample:
    where = f"annotations[{i}]"
    if not isinstance(a, dict) or not {"frame_dir", "label", "keypoint"} <= set(a):
        raise BadInputError(path, None, f"{where} lacks frame_dir/label/keypoint", "a PYSKL annotation dict")
    kp = a["keypoint"]
    if not isinstance(kp, np.ndarray) or kp.ndim != 4 or kp.dtype.kind not in "fiu":
        raise BadInputError(path, None, f"{where}.keypoint is {getattr(kp, 'shape', type(kp).__name__)}",
                            "a float array (M, T, V, C)")
    V = kp.shape[2]
    lay = layout or {lay.num_joints: name for name, lay in LAYOUTS.items()}.get(V)
    if lay is None or LAYOUTS[lay].num_joints != V:
        raise BadInputError(path, None, f"{where}.keypoint has {V} joints",
                            f"a known layout ({', '.join(f'{n}: {lo.num_joints}' for n, lo in LAYOUTS.items())})")
    if not np.isfinite(kp).all():
        raise BadInputError(path, None, f"{where}.keypoint has non-finite values", "finite coordinates")
    fd = str(a["frame_dir"])
    fields = dict(columns)
    fields.update(fields_by_dir.get(fd, {}))
    try:
        label = int(a["label"])
    except (TypeError, ValueError):
        raise BadInputError(path, None, f"{where}.label is {a['label']!r}", "an integer class id") from None
    try:
        num_frames = int(a.get("total_frames", kp.shape[1]))
    except (TypeError, ValueError):
        raise BadInputError(path, None, f"{where}.total_frames is {a['total_frames']!r}", "an integer") from None
    fields.update(num_frames_raw=num_frames, num_bodies_raw=int(kp.shape[0]), source_file=Path(path).name)
    # kept in its own dtype: preprocess checks the bound before casting
    return RawSample(fd, kp, label, lay, fields, source=f"{path}:{where}", index=i)
