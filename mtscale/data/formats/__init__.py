"""One reader module per raw source format.

Every reader module exposes the same two functions, so ``prepare`` can run any of them in
parallel worker processes:

- ``list_units(input_path: str, layout: str | None = None) -> Listing``: the work units in a
  deterministic order (each unit is picklable, usually a file path; container formats such as
  ``.npz`` use (path, split, start, stop) ranges), plus the sample names excluded on purpose
  (e.g. NTU's published samples with missing skeletons).
- ``read_unit(unit) -> Iterator[RawSample | BadInputError]``: parse one unit. A unit that
  cannot be read at all raises ``BadInputError`` naming file, line, what was found and what
  was expected. A unit holding many records (a range of a ``.pkl`` / ``.npz``) *yields* a
  ``BadInputError`` (with ``index``) in place of each bad record instead of raising, so the
  records after it are still read: ``prepare`` reports it and keeps every good neighbour.

Optionally ``PRELOAD``: modules ``prepare``'s forkserver imports before forking workers
(e.g. ``ntu_scan_warm``, which loads a compiled kernel once instead of once per worker);
``UNITS``: the coordinate units the format always has (``prepare --units`` must agree);
``NUM_COORDS``: the coordinates per joint it always has (else the first readable sample
decides); ``unit_records(unit)``: how many records a unit holds (default 1), counted as
skipped when the whole unit fails; ``unit_bytes(unit)``: its input bytes, for the progress
rate (default: the size of the unit where it is a path).

Sanity rules applied to every format at ingest (``prepare``, and ``predict`` through
``preprocess``):

- coordinates: finite, and ``|coordinate| <= MAX_ABS_COORD[units]`` for the raw values as
  read (before centring): 100 m for metres (Kinect / NTU / NW-UCLA / CTR-GCN / PYSKL 3-D
  data: a Kinect sees ~0.5-8 m, so 100 m only refuses corrupt values such as 1e30, which
  float32 would otherwise store as they are), 100,000 for millimetres and pixels (float16
  holds up to 65,504: such data wants ``--dtype float32``).
- labels: -1 (unlabelled) or a class id ``0 <= label < MAX_LABEL`` (100,000: far above any
  action dataset's class count; a larger id is a corrupt value that would otherwise make a
  store of millions of empty classes).

A sample breaking either rule is skipped and reported like any other bad record.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from mtscale.errors import ConfigError

MAX_ABS_COORD: dict[str, float] = {"m": 100.0, "mm": 100_000.0, "px": 100_000.0}
"""Largest |coordinate| accepted at ingest, by the units recorded in the store (``units``
attribute, ``prepare --units``); see the module doc."""
MAX_LABEL = 100_000
"""Labels must be -1 (unlabelled) or 0 <= label < MAX_LABEL; see the module doc."""
LABEL_RULE = f"-1 (unlabelled) or a class id 0..{MAX_LABEL - 1}"

_MODULES = {
    "ntu": "mtscale.data.formats.ntu",
    "nw-ucla": "mtscale.data.formats.nw_ucla",
    "generic": "mtscale.data.formats.generic",
    "ctrgcn-npz": "mtscale.data.formats.ctrgcn_npz",
    "pyskl": "mtscale.data.formats.pyskl",
}
FORMATS = tuple(_MODULES)
"""The ``--format`` names of prepare, predict and quickstart."""


@dataclass
class RawSample:
    """One recording as parsed, before preprocessing.

    ``x_MTVC`` holds every body the source gives, (M_raw, T, V, C), zeros where a body is
    absent in a frame: float32, or the source's own numeric dtype (``preprocess`` checks the
    values against ``MAX_ABS_COORD`` before casting, so nothing overflows on the way).
    ``label`` is the 0-based class id (-1 if unknown). ``fields`` are the source's metadata
    (scalars: int, float, str, bool, None); split membership is given as fields named
    ``split_<name>`` with values ``"train"`` / ``"test"`` / ``"val"`` or None where the sample
    is not part of that protocol.
    """

    sample_id: str
    x_MTVC: np.ndarray
    label: int
    layout: str
    fields: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    """File the sample came from (for error messages and the manifest)."""
    index: int | None = None
    """Position of the record in a file holding many (for the skip report); None otherwise."""


@dataclass
class Listing:
    units: list[Any]
    excluded: list[str] = field(default_factory=list)
    """Sample names skipped on purpose (not errors), counted in prepare's summary."""
    class_names: list[str] | None = None
    """Class names by label id, where the format knows them."""


def label_problem(label: Any) -> str | None:
    """None for a valid label (see ``MAX_LABEL``), else what was found (for ``BadInputError``,
    expected ``LABEL_RULE``)."""
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
        return f"label {label!r}"
    return None if -1 <= label < MAX_LABEL else f"label {int(label)}"


def coordinate_problem(x: np.ndarray, max_abs: float) -> str | None:
    """None where every value of ``x`` (M, T, V, C) or (T, V, C), in its own dtype, is finite
    and within ``max_abs``; else the first bad one and where: "coordinate 1e+30 at body 0
    frame 4 joint 2" (checked before any cast, so a float64 value too large for float32 is
    named instead of warned about and turned into inf)."""
    if x.size == 0 or np.abs(x).max() <= max_abs:  # a NaN makes the max NaN: not <=
        return None
    with np.errstate(invalid="ignore"):
        bad = ~(np.abs(x) <= max_abs)  # NaN compares False: bad
    pos = np.argwhere(bad)[0]
    v = x[tuple(pos)]
    where = (f"body {pos[0]} frame {pos[1]} joint {pos[2]}" if x.ndim == 4 else f"frame {pos[0]} joint {pos[1]}")
    return f"coordinate {float(v):g} at {where}" if np.isfinite(v) else f"non-finite value at {where}"


def bound_text(units: str, hint: bool = True) -> str:
    """The 'expected' part of a coordinate-bound error (``hint``: name ``--units``)."""
    others = "|".join(u for u in MAX_ABS_COORD if u != units)
    text = f"|coordinate| <= {MAX_ABS_COORD[units]:.0f} {units}"
    return text + (f" (other units: prepare --units {others})" if hint else "")


def get_reader(fmt: str) -> ModuleType:
    try:
        return importlib.import_module(_MODULES[fmt])
    except KeyError:
        raise ConfigError(f"--format: found {fmt!r}, expected one of {sorted(_MODULES)}") from None
