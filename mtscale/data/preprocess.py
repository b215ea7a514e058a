"""Preprocessing of one parsed recording: body selection and denoising, empty-frame removal,
centring, optional view normalisation. Every step is switchable; the options used are
recorded in the store's attributes."""

from __future__ import annotations

from dataclasses import dataclass


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
    """Bodies whose x-spread / y-spread exceeds this are dropped as noise (with denoise)."""
    drop_empty_frames: bool = True
    center: bool = True
    """Subtract the layout's centre joint of the first valid frame of the main body."""
    view_normalize: bool = False
    """Rotate so hip->spine is +y and right->left shoulder is +x (first valid frame)."""
    layout: str | None = None
    """Layout override (generic format); other formats know their layout."""
