"""Joint layouts: names, bones, centre joint and left/right pairs.

Nothing downstream hard-codes a joint count: code asks the store for its layout name and
looks it up here. Indices are 0-based.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mtscale.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    name: str
    joint_names: tuple[str, ...]
    parents: tuple[int, ...]
    """Kinematic tree: ``parents[j]`` is the parent joint of ``j``; the root has -1."""
    center: int
    """Joint the sequence is centred on (NTU / NW-UCLA practice: middle of the spine)."""
    vertical: tuple[int, int]
    """(bottom, top) joints made parallel to +y by view normalisation (hip -> spine)."""
    horizontal: tuple[int, int]
    """(right, left) joints made parallel to +x by view normalisation (shoulders)."""
    left_right: tuple[tuple[int, int], ...] = field(default=())
    """(left, right) joint pairs, for mirroring augmentations."""

    @property
    def num_joints(self) -> int:
        return len(self.joint_names)

    @property
    def bones(self) -> tuple[tuple[int, int], ...]:
        """(child, parent) pairs of the kinematic tree."""
        return tuple((j, p) for j, p in enumerate(self.parents) if p >= 0)

    def index(self, joint_name: str) -> int:
        return self.joint_names.index(joint_name)


_NTU25_NAMES = (
    "spine_base", "spine_mid", "neck", "head",
    "shoulder_left", "elbow_left", "wrist_left", "hand_left",
    "shoulder_right", "elbow_right", "wrist_right", "hand_right",
    "hip_left", "knee_left", "ankle_left", "foot_left",
    "hip_right", "knee_right", "ankle_right", "foot_right",
    "spine_shoulder", "handtip_left", "thumb_left", "handtip_right", "thumb_right",
)
# 1-based parents as in the Kinect v2 SDK hierarchy, rooted at spine_base.
_NTU25_PARENTS_1 = (0, 1, 21, 3, 21, 5, 6, 7, 21, 9, 10, 11, 1, 13, 14, 15, 1, 17, 18, 19, 2, 8, 8, 12, 12)

_K1_20_NAMES = (
    "hip_center", "spine", "shoulder_center", "head",
    "shoulder_left", "elbow_left", "wrist_left", "hand_left",
    "shoulder_right", "elbow_right", "wrist_right", "hand_right",
    "hip_left", "knee_left", "ankle_left", "foot_left",
    "hip_right", "knee_right", "ankle_right", "foot_right",
)
_K1_20_PARENTS_1 = (0, 1, 2, 3, 3, 5, 6, 7, 3, 9, 10, 11, 1, 13, 14, 15, 1, 17, 18, 19)

_LIMB_PAIRS = ((4, 8), (5, 9), (6, 10), (7, 11), (12, 16), (13, 17), (14, 18), (15, 19))

LAYOUTS: dict[str, Layout] = {
    "ntu25": Layout(
        name="ntu25",
        joint_names=_NTU25_NAMES,
        parents=tuple(p - 1 for p in _NTU25_PARENTS_1),
        center=1,
        vertical=(0, 1),
        horizontal=(8, 4),
        left_right=_LIMB_PAIRS + ((21, 23), (22, 24)),
    ),
    "kinect_v1_20": Layout(
        name="kinect_v1_20",
        joint_names=_K1_20_NAMES,
        parents=tuple(p - 1 for p in _K1_20_PARENTS_1),
        center=1,
        vertical=(0, 1),
        horizontal=(8, 4),
        left_right=_LIMB_PAIRS,
    ),
}


def get_layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ConfigError(f"layout: found {name!r}, expected one of {sorted(LAYOUTS)}") from None
