"""One reader module per raw source format.

Every reader module exposes the same two functions, so ``prepare`` can run any of them in
parallel worker processes:

- ``list_units(input_path: str, layout: str | None = None) -> Listing``: the work units in a
  deterministic order (each unit is picklable, usually a file path; container formats such as
  ``.npz`` use (path, split, start, stop) ranges), plus the sample names excluded on purpose
  (e.g. NTU's published samples with missing skeletons).
- ``read_unit(unit) -> Iterator[RawSample]``: parse one unit. A bad unit raises
  ``BadInputError`` naming file, line, what was found and what was expected.

Optionally ``PRELOAD``: modules ``prepare``'s forkserver imports before forking workers
(e.g. ``ntu_scan_warm``, which loads a compiled kernel once instead of once per worker).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from mtscale.errors import ConfigError

_MODULES = {
    "ntu": "mtscale.data.formats.ntu",
    "nw-ucla": "mtscale.data.formats.nw_ucla",
    "generic": "mtscale.data.formats.generic",
    "ctrgcn-npz": "mtscale.data.formats.ctrgcn_npz",
    "pyskl": "mtscale.data.formats.pyskl",
}


@dataclass
class RawSample:
    """One recording as parsed, before preprocessing.

    ``x_MTVC`` holds every body the source gives, (M_raw, T, V, C) float32, zeros where a
    body is absent in a frame. ``label`` is the 0-based class id (-1 if unknown). ``fields``
    are the source's metadata (scalars: int, float, str, bool, None); split membership is
    given as fields named ``split_<name>`` with values ``"train"`` / ``"test"`` / ``"val"`` or
    None where the sample is not part of that protocol.
    """

    sample_id: str
    x_MTVC: np.ndarray
    label: int
    layout: str
    fields: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    """File the sample came from (for error messages and the manifest)."""


@dataclass
class Listing:
    units: list[Any]
    excluded: list[str] = field(default_factory=list)
    """Sample names skipped on purpose (not errors), counted in prepare's summary."""
    class_names: list[str] | None = None
    """Class names by label id, where the format knows them."""


def get_reader(fmt: str) -> ModuleType:
    try:
        return importlib.import_module(_MODULES[fmt])
    except KeyError:
        raise ConfigError(f"--format: found {fmt!r}, expected one of {sorted(_MODULES)}") from None
