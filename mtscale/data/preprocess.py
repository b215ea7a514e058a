"""Preprocessing of one parsed recording: body selection and denoising, empty-frame removal,
centring, optional view normalisation. Every step is switchable; the options used are
recorded in the store's attributes (``describe``).

The denoising follows the NTU practice of CTR-GCN's ``get_raw_denoised_data.py``: a body
tracked in too few frames is noise; a body whose frames are mostly wider (x-spread) than
tall (y-spread * ``spread_ratio``) is an object mistaken for a person. Then the bodies with
most motion are kept, the main actor first.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mtscale.data.formats import MAX_ABS_COORD, RawSample, bound_text, coordinate_problem
from mtscale.data.layouts import get_layout
from mtscale.errors import BadInputError

log = logging.getLogger(__name__)

PREPROCESS_VERSION = 1


@dataclass
class PrepareOptions:
    max_bodies: int = 2
    """M: keep up to this many bodies, most motion first."""
    dtype: str = "float16"
    """Storage dtype of the frames array."""
    denoise: bool = True
    """Drop bodies that are too short or fail the NTU spread test before selecting."""
    min_body_frames: int = 11
    """Bodies present in fewer frames than this are dropped (with denoise)."""
    spread_ratio: float = 0.8
    """A frame of a body is noisy where x-spread > spread_ratio * y-spread (with denoise)."""
    spread_noise_fraction: float = 0.69754
    """Bodies with at least this fraction of noisy frames are dropped (CTR-GCN's threshold)."""
    drop_empty_frames: bool = True
    center: bool = True
    """Subtract the layout's centre joint of the first valid frame of the main body."""
    view_normalize: bool = False
    """Rotate so hip->spine is +y and right->left shoulder is +x (first valid frame)."""
    layout: str | None = None
    """Layout override (generic format); other formats know their layout."""
    units: str = "m"
    """Units of the raw coordinates (``m``, ``mm``, ``px``), recorded in the store; they set the
    bound on |coordinate| at ingest (``formats.MAX_ABS_COORD``: 100 m, 100,000 mm / px)."""

    def __post_init__(self) -> None:
        from mtscale.errors import ConfigError

        if self.max_bodies < 1:
            raise ConfigError(f"max_bodies: found {self.max_bodies}, expected >= 1")
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"dtype: found {self.dtype!r}, expected 'float16' or 'float32'")
        if self.min_body_frames < 0:
            raise ConfigError(f"min_body_frames: found {self.min_body_frames}, expected >= 0")
        if self.spread_ratio <= 0:
            raise ConfigError(f"spread_ratio: found {self.spread_ratio}, expected > 0")
        if self.units not in MAX_ABS_COORD:
            raise ConfigError(f"units: found {self.units!r}, expected one of {sorted(MAX_ABS_COORD)}")


def describe(options: PrepareOptions) -> dict[str, Any]:
    """JSON-safe record of the preprocessing applied (stored in the store's attributes)."""
    d = asdict(options)
    d["preprocess_version"] = PREPROCESS_VERSION
    d["steps"] = [
        name for name, on in (
            ("denoise", options.denoise), ("select_bodies", True),
            ("drop_empty_frames", options.drop_empty_frames), ("center", options.center),
            ("view_normalize", options.view_normalize),
        ) if on
    ]
    return d


def body_motion(x_MTVC: np.ndarray, present_MT: np.ndarray) -> np.ndarray:
    """(M,) sum over joints and coordinates of the variance over the frames where each body is
    present (NTU practice: the main actor moves most)."""
    out = np.zeros(x_MTVC.shape[0], dtype=np.float64)
    for m in range(x_MTVC.shape[0]):
        xs = x_MTVC[m, present_MT[m]]  # (T_m, V, C)
        if len(xs) > 1:
            out[m] = float(xs.var(axis=0, dtype=np.float64).sum())
    return out


def noisy_spread_fraction(x_MTVC: np.ndarray, present_MT: np.ndarray, ratio: float) -> np.ndarray:
    """(M,) fraction of each body's present frames where x-spread > ratio * y-spread."""
    xs = x_MTVC[..., 0]
    ys = x_MTVC[..., 1]
    x_spread = xs.max(axis=2) - xs.min(axis=2)  # (M, T)
    y_spread = ys.max(axis=2) - ys.min(axis=2)
    noisy = (x_spread > ratio * y_spread) & present_MT
    n = present_MT.sum(axis=1)
    return np.where(n > 0, noisy.sum(axis=1) / np.maximum(n, 1), 1.0)


def select_bodies(x_MTVC: np.ndarray, options: PrepareOptions) -> np.ndarray:
    """Indices of the bodies kept, most motion first (at most ``max_bodies``; at least one
    where the sample has any body)."""
    present_MT = np.any(x_MTVC != 0, axis=(2, 3))
    motion = body_motion(x_MTVC, present_MT)
    candidates = np.flatnonzero(present_MT.any(axis=1))
    if options.denoise and len(candidates) > 1:
        keep = present_MT[candidates].sum(axis=1) >= options.min_body_frames
        if x_MTVC.shape[-1] >= 2:
            frac = noisy_spread_fraction(x_MTVC[candidates], present_MT[candidates], options.spread_ratio)
            keep &= frac < options.spread_noise_fraction
        if keep.any():
            candidates = candidates[keep]
        else:  # never drop the last body: keep the one with most motion
            candidates = candidates[[int(np.argmax(motion[candidates]))]]
    order = candidates[np.argsort(-motion[candidates], kind="stable")]
    return order[: options.max_bodies]


def _rotation(x_VC: np.ndarray, vertical: tuple[int, int], horizontal: tuple[int, int]) -> np.ndarray | None:
    """(3, 3) rotation R with R @ (top - bottom) along +y and R @ (left - right) in the x-y
    plane along +x; None where the frame is degenerate."""
    y = x_VC[vertical[1]] - x_VC[vertical[0]]
    h = x_VC[horizontal[1]] - x_VC[horizontal[0]]
    ny = np.linalg.norm(y)
    if ny < 1e-8:
        return None
    y = y / ny
    x = h - (h @ y) * y
    nx = np.linalg.norm(x)
    if nx < 1e-8:
        return None
    x = x / nx
    z = np.cross(x, y)
    return np.stack([x, y, z])  # rows: new axes in old coordinates


def preprocess(sample: RawSample, options: PrepareOptions) -> np.ndarray:
    """RawSample -> x_TMVC float32 (T', M=options.max_bodies, V, C).

    Steps (each switchable): denoise + body selection (most motion first), drop frames where
    every kept body is absent, centre on the layout's centre joint of the main body's first
    valid frame, view normalisation. Absent bodies stay exactly zero. First the raw values are
    checked, in their own dtype: finite and within ``MAX_ABS_COORD[options.units]``.
    """
    x_raw = np.asarray(sample.x_MTVC)
    where = sample.source or sample.sample_id
    if x_raw.ndim != 4 or x_raw.dtype.kind not in "fiu":
        raise BadInputError(where, None, f"sample {sample.sample_id} has shape {x_raw.shape} dtype {x_raw.dtype}",
                            "(M, T, V, C) numbers")
    problem = coordinate_problem(x_raw, MAX_ABS_COORD[options.units])
    if problem is not None:
        raise BadInputError(where, None, f"sample {sample.sample_id} has a {problem}", bound_text(options.units))
    x_MTVC = x_raw.astype(np.float32)  # within the bound: no overflow
    layout = get_layout(sample.layout)
    M_raw, T, V, C = x_MTVC.shape
    if V != layout.num_joints:
        raise BadInputError(where, None, f"sample {sample.sample_id} has {V} joints",
                            f"{layout.num_joints} for layout {layout.name}")
    if M_raw == 0 or T == 0:
        raise BadInputError(where, None, f"sample {sample.sample_id} has no frames with a body",
                            "at least one frame with a body")

    kept = select_bodies(x_MTVC, options)
    if len(kept) == 0:
        raise BadInputError(where, None, f"sample {sample.sample_id} has no frames with a body",
                            "at least one frame with a body")
    M = options.max_bodies
    x_TMVC = np.zeros((T, M, V, C), dtype=np.float32)
    x_TMVC[:, : len(kept)] = x_MTVC[kept].transpose(1, 0, 2, 3)
    present_TM = np.any(x_TMVC != 0, axis=(2, 3))

    if options.drop_empty_frames:
        keep_T = present_TM.any(axis=1)
        x_TMVC, present_TM = x_TMVC[keep_T], present_TM[keep_T]
        if len(x_TMVC) == 0:
            raise BadInputError(where, None, f"sample {sample.sample_id} has no frames left after dropping empty frames",
                                "at least one frame with a body")

    main_valid = np.flatnonzero(present_TM[:, 0])
    if len(main_valid) == 0:
        return x_TMVC
    first = x_TMVC[main_valid[0], 0]  # (V, C)
    mask_TM11 = present_TM[:, :, None, None]
    if options.center:
        origin = first[layout.center].copy()  # (C,)
        x_TMVC = np.where(mask_TM11, x_TMVC - origin, 0.0).astype(np.float32, copy=False)
        first = x_TMVC[main_valid[0], 0]
    if options.view_normalize:
        if C != 3:
            raise BadInputError(where, None, f"sample {sample.sample_id} has {C} coordinates", "3 for view normalisation")
        R = _rotation(first.astype(np.float64), layout.vertical, layout.horizontal)
        if R is None:
            log.debug("%s: degenerate first frame, view normalisation skipped", sample.sample_id)
        else:
            x_TMVC = (x_TMVC @ R.T.astype(np.float32)).astype(np.float32, copy=False)
            x_TMVC[~present_TM] = 0.0
    return np.ascontiguousarray(x_TMVC, dtype=np.float32)
