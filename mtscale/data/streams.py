"""Input streams (skeleton modalities): joint, bone, joint motion, bone motion, and their
concatenation on the C axis.

    x_NTMVC = apply_stream(x_NTMVC, mask_NT, layout.parents, "joint+bone")   # C: 3 -> 6

Runs on the training device after augmentation and ``normalize_clips``, in the one place
batches are finalised (``StatefulLoader.__iter__``) and in prediction's ``eval_clip``, so
pre-training, fine-tuning, linear probe, evaluation and prediction see the same input. The
stream is recorded in the pre-trained encoder's meta and the classifier's ``meta.json``.

Definitions (CTR-GCN / MS-G3D practice), per sample and body:

- ``joint``: the coordinates as they are;
- ``bone``: ``x[v] - x[parents[v]]`` (the layout's kinematic tree); the root's bone is 0;
- ``joint_motion``: ``x[t + 1] - x[t]`` where frames ``t`` and ``t + 1`` are both valid
  (``mask_NT``) and the body is present in both (a non-zero coordinate); else 0, so the last
  valid frame, padding and frames a body enters or leaves are 0;
- ``bone_motion``: ``joint_motion`` of the bone stream.

Absent bodies (all-zero, as the store holds them) and padded frames stay zero in every
stream. ``joint`` alone returns ``x`` itself (no copy).

Axis letters: N batch, T frames, M bodies, V joints, C coordinates.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from mtscale.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where used: the config validates streams without it
    import torch
    from torch import Tensor

STREAMS = ("joint", "bone", "joint_motion", "bone_motion")
"""The single streams; a multi-stream input joins them with ``+`` (e.g. ``joint+bone``)."""
COORDS = 3
"""Coordinates per joint of every stream (the stores hold x, y, z)."""


def parse_stream(spec: str, field: str = "data.stream") -> tuple[str, ...]:
    """``"joint+bone"`` -> ``("joint", "bone")``; an unknown, empty or repeated name is a
    ConfigError naming ``field``."""
    names = tuple(str(spec).split("+"))  # no spaces: the name is compared as written (checkpoints, runs)
    bad = [s for s in names if s not in STREAMS]
    if bad or len(set(names)) != len(names):
        what = f"unknown stream {bad[0]!r}" if bad else "a repeated stream"
        raise ConfigError(f"{field}: found {spec!r} ({what}), expected one of {'|'.join(STREAMS)} or several "
                          "distinct ones joined by '+' (e.g. joint+bone)")
    return names


def stream_channels(spec: str) -> int:
    """Channels the encoder reads for ``spec``: 3 per stream (the encoder's ``in_chans``)."""
    return COORDS * len(parse_stream(spec))


@functools.lru_cache(maxsize=16)
def _parent_index(parents: tuple[int, ...], device: torch.device) -> Tensor:
    """(V,) int64 on ``device``: each joint's parent, the root its own. Cached: a host-to-device
    copy per batch would wait for the GPU's queued work."""
    import torch

    return torch.tensor([p if p >= 0 else v for v, p in enumerate(parents)], device=device)


def bones(x_NTMVC: Tensor, parents: tuple[int, ...] | list[int]) -> Tensor:
    """``x[..., v, :] - x[..., parents[v], :]``; 0 for the root (parent -1)."""
    V = x_NTMVC.shape[3]
    if len(parents) != V:
        raise ConfigError(f"stream bone: the layout has {len(parents)} joints, the clip {V}; expected the same")
    return x_NTMVC - x_NTMVC.index_select(3, _parent_index(tuple(parents), x_NTMVC.device))  # root - root: 0


def motion(x_NTMVC: Tensor, mask_NT: Tensor, present_NTM: Tensor) -> Tensor:
    """``x[t + 1] - x[t]`` where both frames are valid and the body present in both, else 0."""
    import torch

    ok_NTM = present_NTM & mask_NT.to(x_NTMVC.device)[:, :, None]
    pair = (ok_NTM[:, 1:] & ok_NTM[:, :-1])[..., None, None]  # (N, T-1, M, 1, 1)
    out = torch.zeros_like(x_NTMVC)
    out[:, :-1] = torch.where(pair, x_NTMVC[:, 1:] - x_NTMVC[:, :-1], 0.0)
    return out


def apply_stream(x_NTMVC: Tensor, mask_NT: Tensor, parents: tuple[int, ...] | list[int] | None,
                 stream: str) -> Tensor:
    """The ``stream`` input of joint coordinates ``x_NTMVC`` (N, T, M, V, 3): (N, T, M, V, 3 x
    streams), the streams concatenated on C in the order named. ``mask_NT`` (N, T) marks valid
    frames; ``parents`` is the layout's tree (needed by the bone streams)."""
    names = parse_stream(stream)
    if names == ("joint",):
        return x_NTMVC
    if x_NTMVC.shape[-1] != COORDS:
        raise ConfigError(f"data.stream {stream!r}: found {x_NTMVC.shape[-1]} channels, expected the {COORDS} "
                          "joint coordinates")
    if parents is None and any(n.startswith("bone") for n in names):
        raise ConfigError(f"data.stream {stream!r}: the bone streams need the layout's parents, none given")
    present_NTM = (x_NTMVC != 0).any(dim=(3, 4))  # (N, T, M): the body has a non-zero joint
    cache: dict[str, Tensor] = {"joint": x_NTMVC}

    def get(name: str) -> Tensor:
        if name not in cache:
            if name == "bone":
                cache[name] = bones(x_NTMVC, parents)  # type: ignore[arg-type]
            else:  # joint_motion / bone_motion
                cache[name] = motion(get(name[: -len("_motion")]), mask_NT, present_NTM)
        return cache[name]

    parts = [get(n) for n in names]
    if len(parts) == 1:
        return parts[0]
    import torch

    return torch.cat(parts, dim=-1)
