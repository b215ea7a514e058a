"""Synthetic NTU-format ``.skeleton`` recordings for demos, tests and scale benchmarks.

Each sample is a 25-joint kinematic body (``mtscale.data.body_model``: forward kinematics over
the ``ntu25`` tree) with the performer's bone lengths, performing one of K actions. An action
is a set of 2-4 joint angle trajectories (periodic swings, ramp-and-hold or go-and-return
motions of arms, legs, torso or head) with its own amplitudes, frequencies and phases; every
4th class (label % 4 == 3) has a second person facing the first who approaches or retreats and
moves too. Action definitions depend only on the class id (not on ``seed``), so datasets
written with different seeds share their classes.

Nothing trivial separates the classes: length, speed, amplitude, position, facing and camera
are drawn per sample from the same ranges for every class, and each class's amplitudes are
calibrated so that the mean motion energy is the same for all classes. The class lives in
*which* joints move *how*. By default (``posture="class"``) a class also has its own base
angles on the joints it moves, which a static pose already shows; ``posture="shared"`` draws
every sample's rest pose from one distribution, so only the motion tells classes apart.

Files are ``SsssCcccPpppRrrrAaaa.skeleton`` (label = action - 1), 40 performers, 3 cameras
(-45, 0, +45 degrees), setups with their own camera distance / height, 2 replications, in
exactly the text format ``mtscale.data.formats.ntu`` parses (12 values per joint: xyz,
depth and colour projections, orientation quaternion, tracking state), with fewer digits than
the Kinect SDK writes (6 decimals for metres and quaternions, 3 for pixels).

Speed (~2.5x the first version in CPU time, ~300 samples per CPU-second): samples are
rendered in batches of ``_CHUNK``; forward kinematics runs once per batch over all frames of
all bodies, and the text of the whole batch is one fixed-width byte matrix (one row per
body-frame, each digit column of each field written by one strided integer-arithmetic store),
whose padding bytes are then deleted per file in one ``bytes.translate`` pass.

Output is a pure function of (seed, sample index): a sample's bytes do not depend on the batch
it was rendered in, so they are identical whatever ``workers``.

    mtscale synth --out /tmp/synth --num-samples 1000 --num-classes 10 --workers 2
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from mtscale.data import body_model as bm
from mtscale.files import atomic_write

log = logging.getLogger(__name__)

NUM_PERFORMERS = bm.NUM_PERFORMERS
NUM_CAMERAS = 3
_CHUNK = 32  # samples rendered together (a batching choice only: bytes do not depend on it)
XYZ_DEC, PIX_DEC, QUAT_DEC, LEAN_DEC = 6, 3, 6, 6  # decimals written


def sample_name(i: int, num_classes: int) -> tuple[str, dict[str, int]]:
    """File stem and metadata of sample ``i``: classes cycle fastest, then performers, so any
    prefix of the dataset is class-balanced and spans many performers; names are unique."""
    action = i % num_classes + 1
    j = i // num_classes
    performer = j % NUM_PERFORMERS + 1
    camera = (j % NUM_PERFORMERS + j // NUM_PERFORMERS) % NUM_CAMERAS + 1
    replication = (j // (NUM_PERFORMERS * NUM_CAMERAS)) % 2 + 1
    setup = j // (NUM_PERFORMERS * NUM_CAMERAS * 2) + 1
    meta = dict(setup=setup, camera=camera, performer=performer, replication=replication, action=action)
    return f"S{setup:03d}C{camera:03d}P{performer:03d}R{replication:03d}A{action:03d}", meta


# --------------------------------------------------------------------------- one batch


POSTURES = ("class", "shared")
"""``class``: each class has its own base angles on the DOFs it moves (the others at 0), so a
static pose already tells classes apart; ``shared``: every sample starts from its own random
rest pose (``body_model.rest_posture``, one distribution for all classes), so only the motion
does -- the setting where motion pre-training has something to add (pay-off benchmark)."""


def _plan(i: int, num_classes: int, seed: int, min_frames: int, max_frames: int,
          posture: str = "class") -> dict[str, Any]:
    """Everything random about sample ``i`` (a pure function of its arguments). Rows (axis R)
    are the sample's body-frames in file order: frame-major, body-minor (R = T * M)."""
    stem, meta = sample_name(i, num_classes)
    spec = bm.action_spec(meta["action"] - 1)
    rng = np.random.default_rng([seed, i])
    T = int(rng.integers(min_frames, max_frames + 1))
    M = len(spec["bodies"])
    speed, amp = float(rng.uniform(0.75, 1.35)), float(rng.uniform(0.5, 1.5))
    t = np.arange(T) / bm.FPS * speed
    u = np.clip(np.arange(T) / max(T - 1, 1) + rng.uniform(-0.1, 0.1), 0.0, 1.0)
    cam = bm.setup_camera(meta["setup"], meta["camera"])
    facing = float(rng.uniform(-0.35, 0.35))
    pos = np.array([rng.uniform(-0.7, 0.7), 0.0, rng.uniform(-0.5, 0.5)])
    ang = np.empty((T, M, bm.D))
    x0 = np.empty((T, M, 3))
    bones, rots = [], []
    for b, body in enumerate(spec["bodies"]):
        rest = bm.rest_posture(np.random.default_rng([seed, i, 7, b])) if posture == "shared" else None
        ang[:, b] = bm.angles(body, spec["gain"], t, u, amp, float(rng.uniform(-0.5, 0.5)), rest)
        ang[:, b] += bm.idle_motion(rng, T) * np.sqrt(speed)
        p = meta["performer"] if b == 0 else (meta["performer"] + 17) % NUM_PERFORMERS + 1
        bones.append(bm.performer_bones(p))
        root = np.zeros((T, 3))
        root[:, 1] = 0.01 * np.sin(2 * np.pi * rng.uniform(0.2, 0.5) * t + rng.uniform(0, 6.3))
        if b == 1:  # the partner faces the first person, approaching or retreating
            root[:, 2] = float(rng.uniform(1.1, 1.6)) - spec["approach"] * u * amp
        R, tr = bm.camera_pose(facing + np.pi * b, pos, *cam)
        r = root + bones[-1][bm.ROOT]  # (T, 3) root joint, body frame -> camera frame
        x0[:, b] = r[:, :1] * R[:, 0] + r[:, 1:2] * R[:, 1] + r[:, 2:] * R[:, 2] + tr
        rots.append(R)
    cos, sin = bm.dof_trig(ang.reshape(T * M, bm.D))  # per sample: independent of the batch
    noise = rng.standard_normal((T * M, bm.V, 3), dtype=np.float32) * np.float32(0.004)
    track = 2 - (rng.random((T * M, bm.V), dtype=np.float32) < 0.04).view(np.uint8)
    ids = 72057594037927936 + int(rng.integers(1000, 9999)) + np.arange(M) * int(rng.integers(1, 400))
    heads = [(f"{M}\n" if b == 0 else "") + f"{int(ids[b])} 0 1 1 1 1 0 " for b in range(M)]
    return dict(stem=stem, T=T, M=M, cos=cos, sin=sin, x0=x0.reshape(T * M, 3), noise=noise, track=track,
                bones=np.stack(bones), rots=np.stack(rots), heads=heads)


def render_chunk(indices: range, num_classes: int, seed: int, min_frames: int, max_frames: int,
                 posture: str = "class") -> list[tuple[str, bytes]]:
    """(file stem, file bytes) of each sample; each a pure function of (i, num_classes, seed,
    frame range), whichever other samples share the batch. Forward kinematics and text
    formatting run once for all body-frames (rows, axis N) of the batch."""
    plans = [_plan(i, num_classes, seed, min_frames, max_frames, posture) for i in indices]
    body_of_row = np.concatenate([np.repeat(np.arange(p["M"]), p["T"]).reshape(p["M"], p["T"]).T.ravel()
                                  + k for p, k in zip(plans, np.cumsum([0] + [p["M"] for p in plans]))])
    bones_BV3 = np.concatenate([p["bones"] for p in plans])  # (B, V, 3), B = bodies of the batch
    rots_B33 = np.concatenate([p["rots"] for p in plans])
    x_V3N, R_V33N = bm.forward(
        np.concatenate([p["cos"] for p in plans], axis=1), np.concatenate([p["sin"] for p in plans], axis=1),
        bones_BV3[body_of_row].transpose(1, 2, 0), rots_B33[body_of_row].transpose(1, 2, 0),
        np.concatenate([p["x0"] for p in plans]).T)
    x_NVC = x_V3N.transpose(2, 0, 1) + np.concatenate([p["noise"] for p in plans])
    q_NV4 = bm.quaternion(R_V33N).transpose(2, 0, 1)
    heads = [h.encode() for p in plans for h in p["heads"]]
    text_NW = format_rows(x_NVC, q_NV4, np.concatenate([p["track"] for p in plans]), heads, body_of_row)
    out, r0 = [], 0
    for p in plans:
        r1 = r0 + p["T"] * p["M"]
        out.append((p["stem"], b"%d\n" % p["T"] + text_NW[r0:r1].tobytes().translate(None, b"\0")))
        r0 = r1
    return out


def render_sample(i: int, num_classes: int, seed: int, min_frames: int = 40, max_frames: int = 120,
                  posture: str = "class") -> tuple[str, bytes]:
    """(file stem, file bytes) of sample ``i`` alone (the same bytes ``synthesize`` writes)."""
    return render_chunk(range(i, i + 1), num_classes, seed, min_frames, max_frames, posture)[0]


# --------------------------------------------------------------------------- text


def format_rows(x_NVC: np.ndarray, q_NV4: np.ndarray, track_NV: np.ndarray, heads: list[bytes],
                body_of_row: np.ndarray) -> np.ndarray:
    """NTU text of N body-frames (rows) as an (N, W) uint8 matrix with zero padding bytes:
    the text of rows a..b is ``m[a:b].tobytes().translate(None, b"\\0")``.

    Row n is ``heads[body_of_row[n]]`` (the frame's body count on the first body of a frame,
    bodyID and the constant body fields), leanX leanY, the tracking state, ``25``, then the
    25 joint lines. Each row is V + 1 fixed-width "lines": the joint lines 1..V, and line 0
    holding the body header, so that one digit column of one field over all lines of all
    rows is a single strided 1-D store. Bytes are written as (ASCII - 48) mod 256 (digits are
    their values, padding is 208) and 48 is added to the whole matrix at the end.
    """
    N, V, _ = x_NVC.shape
    vals = np.zeros((11, N, V + 1))  # fields x line; line 0's values are overwritten
    vals[0:3, :, 1:] = x_NVC.transpose(2, 0, 1)
    xz = x_NVC[..., 0] / np.maximum(x_NVC[..., 2], 0.1)
    yz = x_NVC[..., 1] / np.maximum(x_NVC[..., 2], 0.1)
    vals[3, :, 1:] = 256 + 365.0 * xz  # depthX depthY colourX colourY (Kinect v2 intrinsics)
    vals[4, :, 1:] = 212 - 365.0 * yz
    vals[5, :, 1:] = 960 + 1081.0 * xz
    vals[6, :, 1:] = 540 - 1081.0 * yz
    vals[7:11, :, 1:] = q_NV4.transpose(2, 0, 1)
    R = N * (V + 1)
    vals = vals.reshape(11, R)
    gx, gp, gq = _Fixed(vals[0:3], XYZ_DEC), _Fixed(vals[3:7], PIX_DEC), _Fixed(vals[7:11], QUAT_DEC)
    gl = _Fixed(np.clip(x_NVC[:, 20, :2] - x_NVC[:, 0, :2], -1, 1).T, LEAN_DEC)  # lean (2, N)
    head_w = max(len(h) for h in heads)
    tail = _raw(b"2\n25\n")  # trackingState, joint count
    joint_w = 3 * gx.width + 4 * gp.width + 4 * gq.width + 2  # + tracking state and "\n"
    LW = max(joint_w, head_w + 2 * gl.width + len(tail))
    template = np.full(LW, _PAD, dtype=np.uint8)  # a joint line without its digits
    o = 0
    for g in (gx, gp, gq):
        for _ in range(len(g.f)):
            template[o:o + g.width] = g.template
            o += g.width
    template[o + 1] = _raw(b"\n")[0]
    canvas = np.empty((N, (V + 1) * LW), dtype=np.uint8)
    lines = canvas.reshape(R, LW, copy=False)
    lines[...] = template
    o = 0
    for g in (gx, gp, gq):
        k = len(g.f)
        g.write(lines[:, o:o + k * g.width].reshape(R, k, g.width, copy=False), fill=False)
        o += k * g.width
    lines[:, o] = np.pad(track_NV, ((0, 0), (1, 0))).ravel()  # a digit
    head = canvas[:, :LW]  # (N, LW) line 0 of every row
    table = np.full((len(heads), head_w), _PAD, dtype=np.uint8)
    for k, h in enumerate(heads):  # right-aligned: the padding on the left is deleted
        table[k, head_w - len(h):] = _raw(h)
    head[:, :head_w] = table[body_of_row]
    o = head_w + 2 * gl.width
    gl.write(head[:, head_w:o].reshape(N, 2, gl.width, copy=False))
    head[:, o:o + len(tail)] = tail
    head[:, o + len(tail):] = _PAD
    canvas += 48
    return canvas


_PAD = 208  # raw padding byte: (208 + 48) % 256 == 0
_BLOCK = 16384  # values per digit-extraction block (keeps the uint32 temporaries in cache)


def _raw(text: bytes) -> np.ndarray:
    return (np.frombuffer(text, dtype=np.uint8) - np.uint8(48)).astype(np.uint8)


class _Fixed:
    """``"%.{dec}f"`` of k fields x R values (k, R) in a fixed-width raw byte layout (see
    ``format_rows``): ``width`` bytes per value = sign slot, integer digits (as many as the
    largest value needs), ".", ``dec`` digits, separator " ". Unused sign / leading-digit
    slots are padding."""

    def __init__(self, v_KR: np.ndarray, dec: int):
        f = np.rint(np.abs(v_KR) * 10.0**dec)
        top = float(f.max(initial=0.0))
        if not top < 2**53:  # also NaN; exact integers in float64
            raise ValueError(f"format: |value| = {top / 10**dec:g}, expected a finite value < {2**53 / 10**dec:g}")
        self.f = f.astype(np.uint32 if top < 2**32 else np.uint64)  # uint32 divides ~4x faster
        self.sign = ((v_KR < 0) & (f > 0)).view(np.uint8) * np.uint8(45) + np.uint8(_PAD)  # raw "-" or pad
        self.dec = dec
        self.int_digits = len(str(int(top) // 10**dec))
        self.width = 1 + self.int_digits + (1 + dec if dec else 0) + 1
        self.template = np.full(self.width, _PAD, dtype=np.uint8)  # the bytes that never change
        self.template[-1] = _raw(b" ")[0]
        if dec:
            self.template[self.int_digits + 1] = _raw(b".")[0]

    def write(self, out_RKW: np.ndarray, fill: bool = True) -> None:
        """Fill ``out`` (R, k, width), a uint8 (strided) view; digit p of all values is the
        (k, R) view ``out[:, :, p].T``, written in cache-sized blocks of values. ``fill=False``:
        ``out`` already holds ``self.template``."""
        W, ni, dec = self.width, self.int_digits, self.dec
        col = [out_RKW[:, :, p].T for p in range(W)]  # (k, R) views
        col[0][...] = self.sign
        if fill:
            col[W - 1][...] = self.template[-1]
            if dec:
                col[ni + 1][...] = self.template[ni + 1]
        k, R = self.f.shape
        ten = self.f.dtype.type(10)
        q = np.empty((k, min(R, _BLOCK)), self.f.dtype)
        t = np.empty_like(q)
        for b0 in range(0, R, _BLOCK):  # cache-sized blocks
            sl = slice(b0, b0 + _BLOCK)
            rem = self.f[:, sl].copy()
            qb, tb = q[:, :rem.shape[1]], t[:, :rem.shape[1]]
            for j in range(dec):
                np.floor_divide(rem, ten, out=qb)
                np.multiply(qb, ten, out=tb)
                np.subtract(rem, tb, out=col[W - 2 - j][:, sl], casting="unsafe")
                rem, qb = qb, rem
            for i in range(ni):  # integer digits, right to left; leading zeros are padding
                np.floor_divide(rem, ten, out=qb)
                np.multiply(qb, ten, out=tb)
                np.subtract(rem, tb, out=tb)
                if i:
                    tb += (rem == 0) * self.f.dtype.type(_PAD)
                np.copyto(col[ni - i][:, sl], tb, casting="unsafe")
                rem, qb = qb, rem


def format_fields(v: np.ndarray, dec: int) -> bytes:
    """``" ".join("%.{dec}f" % x for x in v) + " "``, vectorised (|v| * 10**dec < 2**53); "-0"
    is written "0"."""
    g = _Fixed(np.asarray(v, dtype=np.float64)[None], dec)
    out = np.empty((len(v), 1, g.width), dtype=np.uint8)
    g.write(out)
    out += 48
    return out.tobytes().translate(None, b"\0")


# --------------------------------------------------------------------------- driver


def _write_range(args: tuple) -> tuple[int, int]:
    out_dir, start, stop, num_classes, seed, min_frames, max_frames, posture = args
    n_bytes = 0
    for stem, data in render_chunk(range(start, stop), num_classes, seed, min_frames, max_frames, posture):
        path = os.path.join(out_dir, stem + ".skeleton")
        atomic_write(path, data)
        n_bytes += len(data)
    return stop - start, n_bytes


def synthesize(out_dir: str, num_samples: int, num_classes: int, seed: int, workers: int = 1,
               progress: bool = True, min_frames: int = 40, max_frames: int = 120,
               posture: str = "class") -> dict[str, Any]:
    """Write ``num_samples`` synthetic NTU ``.skeleton`` files into ``out_dir`` (``posture``:
    see ``POSTURES``).

    Returns {num_files, bytes, num_classes, seed, out_dir, min_frames, max_frames, posture}.
    """
    from mtscale.errors import ConfigError

    if num_samples < 1:
        raise ConfigError(f"num_samples: found {num_samples}, expected >= 1")
    if not 1 <= num_classes <= 120:
        raise ConfigError(f"num_classes: found {num_classes}, expected 1..120 (NTU action ids)")
    if not 2 <= min_frames <= max_frames:
        raise ConfigError(f"min_frames/max_frames: found {min_frames}/{max_frames}, expected 2 <= min <= max")
    if workers < 1:
        raise ConfigError(f"workers: found {workers}, expected >= 1")
    if posture not in POSTURES:
        raise ConfigError(f"posture: found {posture!r}, expected one of {', '.join(POSTURES)}")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    jobs = [(str(out_dir), s, min(s + _CHUNK, num_samples), num_classes, seed, min_frames, max_frames, posture)
            for s in range(0, num_samples, _CHUNK)]
    from tqdm import tqdm

    bar = tqdm(total=num_samples, unit="file", desc="synth", disable=not progress)
    n_files = n_bytes = 0
    if workers == 1:
        results = map(_write_range, jobs)
        pool = None
    else:
        import multiprocessing

        # forkserver: safe even when the caller has threads (torch, tqdm monitors) running
        gains = bm.calibrated_gains(range(min(num_classes, num_samples)))  # once, not once per worker
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("forkserver"),
                                   initializer=bm.preset_gains, initargs=(gains,))
        results = pool.map(_write_range, jobs)
    try:
        for n, b in results:
            n_files += n
            n_bytes += b
            bar.update(n)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    log.info("wrote %d synthetic files (%.1f MB) to %s", n_files, n_bytes / 1e6, out_dir)
    return dict(num_files=n_files, bytes=n_bytes, num_classes=num_classes, seed=seed,
                out_dir=str(out_dir), min_frames=min_frames, max_frames=max_frames, posture=posture)
