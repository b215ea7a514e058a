"""The kinematic body and action trajectories behind ``mtscale.data.synthetic``.

A 25-joint body over the ``ntu25`` tree: rest bone offsets scaled per performer, 21 joint-angle
degrees of freedom (DOFs) with limits, and forward kinematics batched over any number of
frames ("rows", axis N: the frames of all bodies of many samples, flattened). Rotations are
kept component-major, ``(V, 3, 3, N)``, so that every array operation runs over the long
contiguous N axis; the tree is walked one depth level at a time (8 levels, not 25 joints).

An action (class) is 2-4 DOF trajectories (periodic swings, ramp-and-hold, go-and-return)
whose parameters depend only on the class id, calibrated to a common motion energy.

Every result is a function of its row's inputs alone (elementwise IEEE arithmetic, no
reductions over N), so a sample's numbers do not depend on which other samples share the batch.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np

from mtscale.data.layouts import get_layout

FPS = 30.0
TARGET_ENERGY = 4e-4  # mean squared joint displacement per frame (m^2), per sample
NUM_PERFORMERS = 40

PARENTS: tuple[int, ...] = get_layout("ntu25").parents
V = len(PARENTS)
# Rest offsets of each joint from its parent (m), body frame: +x left, +y up, -z forward.
REST = np.array([
    (0, 0.95, 0), (0, 0.28, 0), (0, 0.08, 0), (0, 0.12, 0),  # spine_base (from ground), spine_mid, neck, head
    (0.17, -0.03, 0), (0, -0.28, 0), (0, -0.25, 0), (0, -0.08, 0),  # left arm
    (-0.17, -0.03, 0), (0, -0.28, 0), (0, -0.25, 0), (0, -0.08, 0),  # right arm
    (0.09, -0.02, 0), (0, -0.42, 0), (0, -0.40, 0), (0, -0.05, -0.1),  # left leg
    (-0.09, -0.02, 0), (0, -0.42, 0), (0, -0.40, 0), (0, -0.05, -0.1),  # right leg
    (0, 0.22, 0), (0, -0.07, 0), (0.03, -0.04, -0.02), (0, -0.07, 0), (-0.03, -0.04, -0.02),
])
# Degrees of freedom (joint, axis 0=x flex / 1=y twist / 2=z abduct) and limits (rad).
DOFS = (
    (4, 0), (4, 2), (4, 1), (5, 0), (6, 0),  # left shoulder, elbow, wrist
    (8, 0), (8, 2), (8, 1), (9, 0), (10, 0),  # right
    (12, 0), (12, 2), (13, 0),  # left hip, knee
    (16, 0), (16, 2), (17, 0),  # right
    (1, 0), (1, 2), (1, 1),  # torso bend, side bend, twist
    (2, 0), (2, 1),  # head nod, shake
)
D = len(DOFS)
DOF_LIMITS = np.array([
    (-0.6, 3.0), (0.0, 2.6), (-1.0, 1.0), (0.0, 2.5), (-0.8, 0.8),
    (-0.6, 3.0), (-2.6, 0.0), (-1.0, 1.0), (0.0, 2.5), (-0.8, 0.8),
    (-0.4, 1.6), (0.0, 0.8), (-2.2, 0.0),
    (-0.4, 1.6), (-0.8, 0.0), (-2.2, 0.0),
    (-1.0, 0.3), (-0.4, 0.4), (-0.7, 0.7),
    (-0.6, 0.5), (-0.9, 0.9),
])
DOF_GROUPS = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9), (0, 3, 5, 8), (1, 6, 2, 7), (10, 11, 12, 13, 14, 15),
              (16, 17, 18), (19, 20, 16), (10, 12, 0, 5), (3, 8, 19, 18))

DOF_JOINTS: tuple[int, ...] = tuple(sorted({j for j, _ in DOFS}))  # joints with a local rotation
# _AXIS_DOF[a, k]: the DOF turning DOF_JOINTS[k] about axis a, or D (none: angle 0)
_AXIS_DOF = np.full((3, len(DOF_JOINTS)), D)
for _d, (_j, _a) in enumerate(DOFS):
    _AXIS_DOF[_a, DOF_JOINTS.index(_j)] = _d


def _levels() -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per tree depth >= 1: (joints, their parents, which of them have a DOF, their DOF slot)."""
    depth = [0] * V
    for j in range(V):
        k, p = 0, PARENTS[j]
        while p >= 0:
            k, p = k + 1, PARENTS[p]
        depth[j] = k
    out = []
    for d in range(1, max(depth) + 1):
        J = np.array([j for j in range(V) if depth[j] == d])
        has = np.array([j in DOF_JOINTS for j in J])
        slot = np.array([DOF_JOINTS.index(j) for j in J if j in DOF_JOINTS], dtype=np.intp)
        out.append((J, np.array([PARENTS[j] for j in J]), has, slot))
    return out


ROOT = PARENTS.index(-1)
LEVELS = _levels()


def bone_offsets(scale_V: np.ndarray) -> np.ndarray:
    """(V, 3) bone offsets of a body whose bones are ``scale_V`` times the rest lengths."""
    return REST * np.asarray(scale_V)[:, None]


@cache
def performer_bones(p: int) -> np.ndarray:
    """(V, 3) bone offsets of performer ``p`` (fixed per performer id)."""
    rng = np.random.default_rng([4242, p])
    scale = rng.uniform(0.86, 1.1) * rng.uniform(0.95, 1.05, size=V)
    return bone_offsets(scale)


@cache
def setup_camera(s: int, c: int) -> tuple[float, float, float]:
    """(yaw, distance, height) of camera ``c`` (1..3: -45, 0, +45 degrees) in setup ``s``."""
    rng = np.random.default_rng([777, s])
    yaw = np.deg2rad((c - 2) * 45.0)
    return float(yaw), float(rng.uniform(2.6, 3.6)), float(rng.uniform(0.6, 1.1))


def rot_y(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def camera_pose(yaw: float, pos: np.ndarray, yaw_cam: float, dist: float, height: float) -> tuple[np.ndarray, np.ndarray]:
    """Body frame -> camera frame as (R (3, 3), t (3,)): turn by ``yaw``, move to ``pos``, view
    from the camera; x_cam = R @ x_body + t."""
    Rc = rot_y(yaw_cam)
    return Rc @ rot_y(yaw), Rc @ pos + np.array([0.0, -height, dist])


def idle_motion(rng: np.random.Generator, T: int) -> np.ndarray:
    """(T, D) small smooth angle noise so that no joint is perfectly still."""
    t = np.arange(T)[:, None] / FPS
    return rng.uniform(0.02, 0.06, D) * np.sin(2 * np.pi * rng.uniform(0.1, 0.5, D) * t + rng.uniform(0, 6.3, D))


def dof_trig(ang_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DOF angles (N, D) -> (cos, sin), each (D + 1, N); row D is the angle 0 (1, 0)."""
    c = np.ones((D + 1, len(ang_ND)))
    s = np.zeros((D + 1, len(ang_ND)))
    np.cos(ang_ND.T, out=c[:D])
    np.sin(ang_ND.T, out=s[:D])
    return c, s


def forward(cos_DN: np.ndarray, sin_DN: np.ndarray, bones_V3N: np.ndarray, R0_33N: np.ndarray,
            x0_3N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Forward kinematics of N rows -> joints (V, 3, N) and global rotations (V, 3, 3, N).

    ``cos`` / ``sin`` come from ``dof_trig`` (D + 1, N). Local rotations are Rz(abduct) @
    Rx(flex) @ Ry(twist) for the DOF joints; the others share their parent's global rotation.
    ``R0`` / ``x0`` are the root's global rotation / position (camera frame); ``bones`` may
    have N = 1 (broadcast)."""
    cx, cy, cz = cos_DN[_AXIS_DOF]  # (J, N) each
    sx, sy, sz = sin_DN[_AXIS_DOF]
    J, N = cx.shape
    L = np.empty((J, 3, 3, N))  # closed form of Rz @ Rx @ Ry
    sxsy, sxcy = sx * sy, sx * cy
    L[:, 0, 0] = cz * cy - sz * sxsy
    L[:, 0, 1] = -sz * cx
    L[:, 0, 2] = cz * sy + sz * sxcy
    L[:, 1, 0] = sz * cy + cz * sxsy
    L[:, 1, 1] = cz * cx
    L[:, 1, 2] = sz * sy - cz * sxcy
    L[:, 2, 0] = -cx * sy
    L[:, 2, 1] = sx
    L[:, 2, 2] = cx * cy
    Rg = np.empty((V, 3, 3, N))
    x = np.empty((V, 3, N))
    Rg[ROOT] = R0_33N if ROOT not in DOF_JOINTS else _matmul(R0_33N[None], L[[DOF_JOINTS.index(ROOT)]])[0]
    x[ROOT] = x0_3N
    for Jl, Pl, has, slot in LEVELS:
        A = Rg[Pl]  # (k, 3, 3, N) parents' global rotations
        b = bones_V3N[Jl]  # (k, 3, N|1)
        x[Jl] = x[Pl] + (A[:, :, 0] * b[:, None, 0] + A[:, :, 1] * b[:, None, 1] + A[:, :, 2] * b[:, None, 2])
        if has.all():
            Rg[Jl] = _matmul(A, L[slot])
        else:
            Rg[Jl[~has]] = A[~has]
            if has.any():
                Rg[Jl[has]] = _matmul(A[has], L[slot])
    return x, Rg


def _matmul(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """(k, 3, 3, N) @ (k, 3, 3, N) per row, as explicit sums (fixed order, N innermost)."""
    return A[:, :, 0, None] * B[:, None, 0] + A[:, :, 1, None] * B[:, None, 1] + A[:, :, 2, None] * B[:, None, 2]


def quaternion(R: np.ndarray) -> np.ndarray:
    """(..., 3, 3, N) rotations -> (..., 4, N) unit quaternions (w, x, y, z)."""
    m00, m11, m22 = R[..., 0, 0, :], R[..., 1, 1, :], R[..., 2, 2, :]
    w = np.sqrt(np.maximum(0, 1 + m00 + m11 + m22)) / 2
    qx = np.copysign(np.sqrt(np.maximum(0, 1 + m00 - m11 - m22)) / 2, R[..., 2, 1, :] - R[..., 1, 2, :])
    qy = np.copysign(np.sqrt(np.maximum(0, 1 - m00 + m11 - m22)) / 2, R[..., 0, 2, :] - R[..., 2, 0, :])
    qz = np.copysign(np.sqrt(np.maximum(0, 1 - m00 - m11 + m22)) / 2, R[..., 1, 0, :] - R[..., 0, 1, :])
    return np.stack([w, qx, qy, qz], -2)


def forward_body(ang_TD: np.ndarray, bones_V3: np.ndarray, root_T3: np.ndarray) -> np.ndarray:
    """Joints (T, V, 3) of one body in its own frame (identity root rotation)."""
    c, s = dof_trig(ang_TD)
    T = len(ang_TD)
    x0 = (root_T3 + bones_V3[ROOT]).T  # (3, T)
    R0 = np.broadcast_to(np.eye(3)[:, :, None], (3, 3, T))
    x, _ = forward(c, s, bones_V3[:, :, None], R0, x0)
    return x.transpose(2, 0, 1)


# --------------------------------------------------------------------------- actions


GAINS: dict[int, float] = {}  # calibrated gain per class, filled on first use (or preset)


def calibrated_gains(labels: range) -> dict[int, float]:
    """{label: gain}, calibrating the classes not seen yet (pool workers get this from the
    parent instead of each calibrating every class again)."""
    return {k: action_spec(k)["gain"] for k in labels}


def preset_gains(gains: dict[int, float]) -> None:
    """Use these calibrated gains (from ``calibrated_gains`` in another process)."""
    GAINS.update(gains)


@cache
def action_spec(label: int) -> dict[str, Any]:
    """The class's motion: per body, the DOFs moved and their trajectory parameters."""
    rng = np.random.default_rng([20240611, label])
    two_person = label % 4 == 3
    bodies = []
    for _ in range(2 if two_person else 1):
        group = DOF_GROUPS[int(rng.integers(len(DOF_GROUPS)))]
        n = int(rng.integers(2, 5))
        dofs = list(rng.choice(group, size=min(n, len(group)), replace=False))
        if rng.random() < 0.4:  # a secondary DOF elsewhere in the body
            dofs.append(int(rng.integers(D)))
        dofs = sorted(set(int(d) for d in dofs))
        lo, hi = DOF_LIMITS[dofs, 0], DOF_LIMITS[dofs, 1]
        bodies.append(dict(
            dofs=np.array(dofs),
            kind=rng.integers(0, 3, size=len(dofs)),  # 0 periodic, 1 ramp-and-hold, 2 go-and-return
            base=lo + (hi - lo) * rng.uniform(0.2, 0.5, size=len(dofs)),
            amp=rng.uniform(0.4, 1.0, size=len(dofs)) * (hi - lo) * rng.choice([-1, 1], size=len(dofs)),
            freq=rng.uniform(0.5, 1.6, size=len(dofs)),  # Hz, periodic
            phase=rng.uniform(0, 2 * np.pi, size=len(dofs)),
            t0=rng.uniform(0.1, 0.5, size=len(dofs)),  # normalised start (ramp / bump)
            width=rng.uniform(0.2, 0.45, size=len(dofs)),
        ))
    approach = float(rng.choice([-0.6, 0.6])) if two_person else 0.0  # metres over the clip
    spec = dict(bodies=bodies, approach=approach, gain=1.0)
    if label not in GAINS:
        GAINS[label] = _calibrate(spec)
    spec["gain"] = GAINS[label]
    return spec


def rest_posture(rng: np.random.Generator) -> np.ndarray:
    """(D,) a performer's own resting angles, every DOF drawn from the range the classes' base
    angles come from, whatever the class (``synthesize(posture="shared")``)."""
    lo, hi = DOF_LIMITS[:, 0], DOF_LIMITS[:, 1]
    return lo + (hi - lo) * rng.uniform(0.2, 0.5, size=D)


def angles(body: dict, gain: float, t_T: np.ndarray, u_T: np.ndarray, amp: float, phase: float,
           rest: np.ndarray | None = None) -> np.ndarray:
    """(T, D) joint angles of one body for times t (s) and normalised times u. The moved DOFs
    swing around the class's base angles, the others stay at 0; with ``rest`` (D,) every DOF
    starts from ``rest`` instead (the class shows only in the motion)."""
    if rest is not None:
        body = dict(body, base=rest[body["dofs"]])
    ang = np.zeros((len(t_T), D)) if rest is None else np.repeat(rest[None, :], len(t_T), axis=0)
    a = body["amp"] * gain * amp  # (d,)
    per = np.sin(2 * np.pi * body["freq"] * t_T[:, None] + body["phase"] + phase)
    s = np.clip((u_T[:, None] - body["t0"]) / body["width"], 0.0, 1.0)
    ramp = s * s * (3 - 2 * s)
    bump = np.sin(np.pi * s) ** 2
    shape = np.where(body["kind"] == 0, per, np.where(body["kind"] == 1, ramp, bump))
    ang[:, body["dofs"]] = body["base"] + a * shape
    return np.clip(ang, DOF_LIMITS[:, 0], DOF_LIMITS[:, 1])


def energy(x_MTVC: np.ndarray) -> float:
    """Mean (over frames and joints) squared displacement per frame, summed over bodies."""
    return float(np.square(np.diff(x_MTVC, axis=1)).sum(axis=(0, 3)).mean())


def _calibrate(spec: dict) -> float:
    """Amplitude gain giving the class the common mean motion energy (averaged over nominal
    samples of 50, 80 and 110 frames; one-shot motions are faster in short clips)."""
    gain = 1.0
    bones = bone_offsets(np.ones(V))
    lengths = (50, 80, 110)
    rows = []  # (t, u, root) of every (length, body), run through one forward pass per step
    for T in lengths:
        t = np.arange(T) / FPS
        u = t / t[-1]
        for b in range(len(spec["bodies"])):
            root = np.zeros((T, 3))
            if b == 1:
                root[:, 2] = 1.3 - spec["approach"] * u
            rows.append((t, u, root))
    root = np.concatenate([r for _, _, r in rows])
    ends = np.cumsum([len(t) for t, _, _ in rows])
    M = len(spec["bodies"])
    for _ in range(6):
        ang = np.concatenate([angles(spec["bodies"][k % M], gain, t, u, 1.0, 0.0) for k, (t, u, _) in enumerate(rows)])
        x = np.split(forward_body(ang, bones, root), ends[:-1])
        e = sum(energy(np.stack(x[i * M:(i + 1) * M])) for i in range(len(lengths))) / len(lengths)
        gain *= float(np.clip((TARGET_ENERGY / (e + 1e-12)) ** 0.5, 0.5, 2.0))
    return float(np.clip(gain, 0.1, 4.0))
