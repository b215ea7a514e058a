"""CTR-GCN / MAMP ``.npz`` importer (e.g. ``NTU60_CS.npz``).

Keys ``x_train``, ``y_train``, ``x_test``, ``y_test``. ``x`` is (N, T=300, M*V*C = 2*25*3)
float, zero-padded in time; ``y`` is one-hot (N, classes) or integer ids (N,). The joint
count follows from the last axis (150 -> ``ntu25``, 120 -> ``kinect_v1_20``, with M=2,
C=3) unless a layout is given.

Units are (path, split, start, stop) ranges of ~1000 samples so that ``prepare``
parallelises; each worker reads only its rows: arrays stored uncompressed (``np.savez``)
are read by seeking inside the archive member, compressed ones are streamed.
Trailing all-zero frames are trimmed. Sample ids are ``train_000123`` / ``test_000045``;
the split field is ``split_default``. A bad row is reported with its index and skipped; the
other rows of its range are kept.

Labels: CTR-GCN files are fully labelled. Label -1 is taken as mtscale's "unlabelled" and
kept, with one warning giving the count (``list_units``); a label below -1 is refused at
ingest (skipped and reported, like a label >= 100,000: ``formats.MAX_LABEL``). Coordinates
are in metres.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np

from mtscale.data.formats import Listing, RawSample
from mtscale.data.layouts import LAYOUTS
from mtscale.errors import BadInputError

log = logging.getLogger(__name__)

LAYOUT = None
UNITS = "m"
NUM_COORDS = 3
UNIT_SIZE = 1000
_SPLITS = ("train", "test")
_BY_WIDTH = {2 * 25 * 3: "ntu25", 2 * 20 * 3: "kinect_v1_20"}


def _header(zf: zipfile.ZipFile, key: str, path: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    try:
        with zf.open(key + ".npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
    except KeyError:
        raise BadInputError(path, None, f"no array {key!r} (has {sorted(n[:-4] for n in zf.namelist())})",
                            "keys x_train, y_train, x_test, y_test") from None
    except ValueError as e:
        raise BadInputError(path, None, f"array {key!r} unreadable ({e})", "a numeric .npy member") from None
    if dtype.hasobject:
        raise BadInputError(path, None, f"array {key!r} holds Python objects", "a numeric array")
    return shape, dtype, fortran


def _read_rows(path: str, key: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a C-ordered array member without loading the whole array."""
    with zipfile.ZipFile(path) as zf:
        shape, dtype, fortran = _header(zf, key, path)
        if fortran:
            return np.load(path, allow_pickle=False)[key][start:stop]
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        with zf.open(key + ".npy") as f:
            version = np.lib.format.read_magic(f)
            (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
            f.seek(f.tell() + start * row)
            buf = f.read((stop - start) * row)
    if len(buf) != (stop - start) * row:
        raise BadInputError(path, None, f"array {key!r} is truncated", f"{shape[0]} rows")
    return np.frombuffer(buf, dtype=dtype).reshape((stop - start,) + tuple(shape[1:]))


def _labels(path: str, split: str) -> np.ndarray:
    """Integer labels of a split (cached per process, keyed on the file's mtime)."""
    return _labels_cached(path, split, Path(path).stat().st_mtime_ns)


_labels.cache_clear = lambda: _labels_cached.cache_clear()  # type: ignore[attr-defined]


@lru_cache(maxsize=4)
def _labels_cached(path: str, split: str, mtime_ns: int) -> np.ndarray:
    with np.load(path, allow_pickle=False) as z:
        if f"y_{split}" not in z.files:
            raise BadInputError(path, None, f"no array 'y_{split}'", "keys x_train, y_train, x_test, y_test")
        y = np.asarray(z[f"y_{split}"])
    if y.ndim == 2:
        if not (np.isin(y, (0, 1)).all() and (y.sum(axis=1) == 1).all()):
            bad = int(np.flatnonzero(~(np.isin(y, (0, 1)).all(axis=1) & (y.sum(axis=1) == 1)))[0])
            raise BadInputError(path, None, f"y_{split}[{bad}] is not one-hot", "exactly one 1 per row")
        return y.argmax(axis=1).astype(np.int64)
    if y.ndim == 1 and (y.dtype.kind in "iu" or (y.dtype.kind == "f" and np.all(y == np.round(y)))):
        if y.dtype.kind == "f":  # a float beyond int64 stays absurd (refused at ingest), without a cast warning
            y = np.clip(y, -(2**62), 2**62)
        return y.astype(np.int64)
    raise BadInputError(path, None, f"y_{split} has shape {y.shape} dtype {y.dtype}", "(N, classes) one-hot or (N,) ints")


def list_units(input_path: str, layout: str | None = None) -> Listing:
    path = str(input_path)
    if not Path(path).is_file():
        raise BadInputError(path, None, "file not found", "a CTR-GCN .npz file")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise BadInputError(path, None, "not an .npz (zip) archive", "a CTR-GCN .npz file") from None
    units = []
    unlabelled: dict[str, int] = {}
    with zf:
        for split in _SPLITS:
            shape, dtype, _ = _header(zf, f"x_{split}", path)
            if len(shape) != 3 or dtype.kind not in "fiu":
                raise BadInputError(path, None, f"x_{split} has shape {shape} dtype {dtype}", "(N, T, M*V*C) numbers")
            _layout_of(shape[2], layout, path)
            y = _labels(path, split)
            if len(y) != shape[0]:
                raise BadInputError(path, None, f"y_{split} has {len(y)} rows but x_{split} {shape[0]}", "equal counts")
            units += [(path, split, s, min(s + UNIT_SIZE, shape[0]), layout) for s in range(0, shape[0], UNIT_SIZE)]
            unlabelled[split] = int((y == -1).sum())
    if sum(unlabelled.values()):
        counts = ", ".join(f"y_{k} {n}" for k, n in unlabelled.items() if n)
        log.warning("%s: %d samples have label -1 (%s): ingested as unlabelled (-1); labels below -1 are refused",
                    path, sum(unlabelled.values()), counts)
    return Listing(units=units)


def unit_records(unit: tuple) -> int:
    return unit[3] - unit[2]


def unit_bytes(unit: tuple) -> int:
    """Bytes of the unit's rows of ``x`` (uncompressed)."""
    path, split, start, stop, _ = unit
    try:
        with zipfile.ZipFile(path) as zf:
            shape, dtype, _ = _header(zf, f"x_{split}", path)
    except (OSError, zipfile.BadZipFile, BadInputError):
        return 0
    return (stop - start) * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize


def _layout_of(width: int, layout: str | None, path: str) -> tuple[str, int, int]:
    """(layout, M, V) for a last axis of ``width`` = M * V * 3."""
    if layout is None:
        if width not in _BY_WIDTH:
            raise BadInputError(path, None, f"last axis of {width}", f"one of {sorted(_BY_WIDTH)} (M=2 x V x 3) or --layout")
        layout = _BY_WIDTH[width]
    if layout not in LAYOUTS:
        raise BadInputError(path, None, f"layout {layout!r}", f"one of {sorted(LAYOUTS)}")
    V = LAYOUTS[layout].num_joints
    if width % (V * 3):
        raise BadInputError(path, None, f"last axis of {width}", f"a multiple of {V * 3} for layout {layout}")
    return layout, width // (V * 3), V


def read_unit(unit: tuple) -> Iterator[RawSample | BadInputError]:
    """Rows [start, stop) of a split; a bad row is yielded as ``BadInputError`` (with its index)
    and the next ones are still read."""
    path, split, start, stop, layout = unit
    x = _read_rows(path, f"x_{split}", start, stop)  # (n, T, M*V*C)
    layout, M, V = _layout_of(x.shape[2], layout, path)
    y = _labels(path, split)
    for k in range(stop - start):
        i = start + k
        xt = x[k]  # (T, M*V*C), its own dtype: preprocess checks the bound before casting
        nz = np.flatnonzero(np.any(xt != 0, axis=1))
        T = int(nz[-1]) + 1 if len(nz) else 0
        x_TMVC = xt[:T].reshape(T, M, V, 3)
        if not np.isfinite(x_TMVC).all():
            yield BadInputError(path, None, f"x_{split}[{i}] has non-finite values", "finite coordinates", index=i)
            continue
        fields = dict(split_default=split, index=i, num_frames_raw=T,
                      num_bodies_raw=int(np.any(x_TMVC != 0, axis=(0, 2, 3)).sum()), source_file=Path(path).name)
        yield RawSample(f"{split}_{i:06d}", np.ascontiguousarray(x_TMVC.transpose(1, 0, 2, 3)), int(y[i]),
                        layout, fields, source=f"{path}:x_{split}[{i}]", index=i)
