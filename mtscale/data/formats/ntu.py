"""NTU RGB+D 60 / 120 ``.skeleton`` reader (layout ``ntu25``).

File format (text, LF or CRLF)::

    <number of frames>
    per frame:  <number of bodies>
      per body: <bodyID clipedEdges handLeftConfidence handLeftState handRightConfidence
                 handRightState isRestricted leanX leanY trackingState>
                <number of joints = 25>
                25 x <x y z depthX depthY colorX colorY orientW orientX orientY orientZ trackingState>

File names are ``SsssCcccPpppRrrrAaaa.skeleton`` (setup, camera, performer, replication,
action; label = action - 1). Bodies are tracked by bodyID across frames into
``x_MTVC`` (M_raw, T, 25, 3) with zeros where a body is absent.

Speed: a well-formed file is read in one compiled pass (``ntu_scan``, numba). Anything that
pass does not take goes through the reference parser here: the file is split into lines once,
the small header structure (frame / body / joint-count lines) is walked in Python, and all
joint lines are converted in one vectorised C parse (pandas' CSV tokenizer). Only when that
fails is the file re-parsed line by line to name the exact bad line.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from mtscale.data.formats import MAX_ABS_COORD, Listing, RawSample, bound_text, ntu_scan
from mtscale.errors import BadInputError

LAYOUT = "ntu25"
UNITS = "m"
NUM_COORDS = 3
MAX_ABS = MAX_ABS_COORD[UNITS]
"""Joint x, y, z beyond this (100 m) are refused naming their line (``formats`` module doc)."""
NUM_JOINTS = 25
_JOINT_FIELDS = 12
_BODY_FIELDS = 10
_NAME_RE = re.compile(r"^S(\d{3})C(\d{3})P(\d{3})R(\d{3})A(\d{3})$")

NTU60_XSUB_TRAIN = frozenset(
    (1, 2, 4, 5, 8, 9, 13, 14, 15, 16, 17, 18, 19, 25, 27, 28, 31, 34, 35, 38)
)
NTU60_XVIEW_TRAIN = frozenset((2, 3))
NTU120_XSUB_TRAIN = NTU60_XSUB_TRAIN | frozenset(
    (45, 46, 47, 49, 50, 52, 53, 54, 55, 56, 57, 58, 59, 70, 74, 78, 80, 81, 82, 83, 84,
     85, 86, 89, 91, 92, 93, 94, 95, 97, 98, 100, 103)
)

CLASS_NAMES: tuple[str, ...] = (
    "drink water", "eat meal/snack", "brushing teeth", "brushing hair", "drop", "pickup",
    "throw", "sitting down", "standing up (from sitting position)", "clapping", "reading",
    "writing", "tear up paper", "wear jacket", "take off jacket", "wear a shoe",
    "take off a shoe", "wear on glasses", "take off glasses", "put on a hat/cap",
    "take off a hat/cap", "cheer up", "hand waving", "kicking something",
    "reach into pocket", "hopping (one foot jumping)", "jump up",
    "make a phone call/answer phone", "playing with phone/tablet", "typing on a keyboard",
    "pointing to something with finger", "taking a selfie", "check time (from watch)",
    "rub two hands together", "nod head/bow", "shake head", "wipe face", "salute",
    "put the palms together", "cross hands in front (say stop)", "sneeze/cough",
    "staggering", "falling", "touch head (headache)", "touch chest (stomachache/heart pain)",
    "touch back (backache)", "touch neck (neckache)", "nausea or vomiting condition",
    "use a fan (with hand or paper)/feeling warm", "punching/slapping other person",
    "kicking other person", "pushing other person", "pat on back of other person",
    "point finger at the other person", "hugging other person",
    "giving something to other person", "touch other person's pocket", "handshaking",
    "walking towards each other", "walking apart from each other",
    # NTU RGB+D 120 additions (A061..A120)
    "put on headphone", "take off headphone", "shoot at the basket", "bounce ball",
    "tennis bat swing", "juggling table tennis balls", "hush (quite)", "flick hair",
    "thumb up", "thumb down", "make ok sign", "make victory sign", "staple book",
    "counting money", "cutting nails", "cutting paper (using scissors)", "snapping fingers",
    "open bottle", "sniff (smell)", "squat down", "toss a coin", "fold paper",
    "ball up paper", "play magic cube", "apply cream on face", "apply cream on hand back",
    "put on a bag", "take off a bag", "put something into a bag",
    "take something out of a bag", "open a box", "move heavy objects", "shake fist",
    "throw up cap/hat", "hands up (both hands)", "cross arms", "arm circles", "arm swings",
    "running on the spot", "butt kicks (kick backward)", "cross toe touch", "side kick",
    "yawn", "stretch oneself", "blow nose", "hit other person with something",
    "wield knife towards other person", "knock over other person (hit with body)",
    "grab other person's stuff", "shoot at other person with a gun", "step on foot",
    "high-five", "cheers and drink", "carry something with other person",
    "take a photo of other person", "follow other person",
    "whisper in other person's ear", "exchange things with other person",
    "support somebody with hand", "finger-guessing game (playing rock-paper-scissors)",
)
assert len(CLASS_NAMES) == 120

PRELOAD = ("mtscale.data.formats.ntu_scan_warm",)
"""Modules ``prepare --workers N`` imports in its forkserver: the workers forked from it
inherit the loaded scanner instead of each loading it (~0.9 CPU-s per worker)."""


@lru_cache(maxsize=1)
def missing_samples() -> frozenset[str]:
    """The 535 published NTU-120 sample names with missing skeletons (NTU-60's 302 are the
    ones with setup <= 17)."""
    text = (Path(__file__).with_name("ntu_missing.txt")).read_text()
    return frozenset(s.strip() for s in text.split() if s.strip())


def parse_name(path: str) -> dict[str, int]:
    """``SsssCcccPpppRrrrAaaa`` -> {setup, camera, performer, replication, action}."""
    stem = Path(path).name.split(".")[0]
    m = _NAME_RE.match(stem)
    if m is None:
        raise BadInputError(path, None, f"file name {stem!r} does not parse",
                            "SsssCcccPpppRrrrAaaa.skeleton (e.g. S001C002P003R002A013.skeleton)")
    s, c, p, r, a = (int(g) for g in m.groups())
    if a < 1:
        raise BadInputError(path, None, f"file name {stem!r} has action id {a}", "an action id >= 1")
    return {"setup": s, "camera": c, "performer": p, "replication": r, "action": a}


def split_fields(meta: dict[str, int]) -> dict[str, str | None]:
    """The standard NTU-60 (xsub, xview) and NTU-120 (xsub, xset) protocols."""
    s, c, p, a = meta["setup"], meta["camera"], meta["performer"], meta["action"]
    is60 = a <= 60 and s <= 17
    tt = lambda train: "train" if train else "test"
    return {
        "split_xsub60": tt(p in NTU60_XSUB_TRAIN) if is60 else None,
        "split_xview60": tt(c in NTU60_XVIEW_TRAIN) if is60 else None,
        "split_xsub120": tt(p in NTU120_XSUB_TRAIN),
        "split_xset120": tt(s % 2 == 0),
    }


def list_units(input_path: str, layout: str | None = None) -> Listing:
    """All ``*.skeleton`` files under ``input_path`` (a file or a folder, searched
    recursively), sorted; published missing-skeleton samples are returned as excluded."""
    if layout not in (None, LAYOUT):
        raise BadInputError(input_path, None, f"layout {layout!r} requested", f"{LAYOUT!r} for NTU RGB+D")
    root = Path(input_path)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(root.rglob("*.skeleton"))
    else:
        raise BadInputError(input_path, None, "no such file or folder", "a .skeleton file or a folder of them")
    if not files:
        raise BadInputError(input_path, None, "no *.skeleton files found", "NTU RGB+D .skeleton files")
    missing = missing_samples()
    units, excluded = [], []
    for f in files:
        name = f.name.split(".")[0]
        (excluded if name in missing else units).append(str(f))
    excluded = [Path(e).name.split(".")[0] for e in excluded]
    return Listing(units=units, excluded=excluded, class_names=list(CLASS_NAMES))


def read_unit(unit: str) -> Iterator[RawSample]:
    """Parse one ``.skeleton`` file into one RawSample."""
    meta = parse_name(unit)
    with open(unit, "rb") as fh:
        data = fh.read()
    x_MTVC, num_frames, num_bodies = parse_skeleton(data, unit)
    fields: dict = dict(meta)
    fields.update(num_bodies_raw=num_bodies, num_frames_raw=num_frames, source_file=Path(unit).name)
    fields.update(split_fields(meta))
    yield RawSample(
        sample_id=Path(unit).name.split(".")[0], x_MTVC=x_MTVC, label=meta["action"] - 1,
        layout=LAYOUT, fields=fields, source=unit,
    )


# --------------------------------------------------------------------------- parsing


def _int_line(lines: list[bytes], i: int, path: str, what: str) -> int:
    if i >= len(lines):
        raise BadInputError(path, i + 1, f"file ends after {len(lines)} lines", f"a line with {what}")
    try:
        v = int(lines[i])
    except ValueError:
        raise BadInputError(path, i + 1, f"found {lines[i].strip()[:40]!r}", f"an integer ({what})") from None
    if v < 0:
        raise BadInputError(path, i + 1, f"found {v}", f"a non-negative integer ({what})")
    return v


def _check_body_line(line: bytes, lineno: int, path: str) -> bytes:
    toks = line.split()
    if len(toks) != _BODY_FIELDS:
        raise BadInputError(path, lineno, f"body line has {len(toks)} values", f"{_BODY_FIELDS} (bodyID ... trackingState)")
    try:
        int(toks[0])
        vals = [float(t) for t in toks[1:]]
    except ValueError:
        raise BadInputError(path, lineno, f"non-numeric body line {line.strip()[:60]!r}", "10 numbers") from None
    if not all(math.isfinite(v) for v in vals):
        raise BadInputError(path, lineno, "non-finite value in body line", "finite numbers")
    return toks[0]


def parse_skeleton(data: bytes, path: str = "<bytes>") -> tuple[np.ndarray, int, int]:
    """Parse the bytes of one ``.skeleton`` file.

    Returns (x_MTVC float32 (M_raw, T, 25, 3), number of frames, number of distinct bodies).
    Raises BadInputError naming the line of the first problem.

    A well-formed file is read by the compiled one-pass scanner (``ntu_scan``); anything it
    does not take (also a joint x, y, z beyond ``MAX_ABS``) runs through the reference parser
    below, which accepts or names the line.
    """
    fast = ntu_scan.scan(data)
    if fast is not None:
        return fast
    return parse_skeleton_reference(data, path)


def parse_skeleton_reference(data: bytes, path: str = "<bytes>") -> tuple[np.ndarray, int, int]:
    """The reference parser (see ``parse_skeleton``): Python header walk + pandas joint lines."""
    lines = data.split(b"\n")
    n_lines = len(lines)
    while n_lines and not lines[n_lines - 1].strip():
        n_lines -= 1  # trailing blank lines / final newline
    del lines[n_lines:]
    try:
        num_frames, body_lines, starts, frame_of = _walk_fast(lines)
    except (ValueError, IndexError):
        num_frames, body_lines, starts, frame_of = _walk_checked(lines, path)
    _check_body_lines(lines, body_lines, path)

    body_ids: dict[bytes, int] = {}
    body_of = [body_ids.setdefault(lines[k].split(None, 1)[0], len(body_ids)) for k in body_lines]
    x_MTVC = np.zeros((len(body_ids), num_frames, NUM_JOINTS, 3), dtype=np.float32)
    if starts:
        vals = _parse_joint_lines(lines, starts, path)  # (blocks, V, 12)
        x_MTVC[np.asarray(body_of), np.asarray(frame_of)] = vals[:, :, :3]
    return x_MTVC, num_frames, len(body_ids)


def _walk_fast(lines: list[bytes]) -> tuple[int, list[int], list[int], list[int]]:
    """Header structure of a well-formed file: (frames, body-line indices, first joint line of
    each body block, frame of each block). Raises ValueError/IndexError on anything odd."""
    num_frames = int(lines[0])
    n_lines = len(lines)
    body_lines: list[int] = []
    frame_of: list[int] = []
    i = 1
    for f in range(num_frames):
        nb = int(lines[i])
        if nb < 0:
            raise ValueError
        i += 1
        for _ in range(nb):
            body_lines.append(i)
            frame_of.append(f)
            if int(lines[i + 1]) != NUM_JOINTS:
                raise ValueError
            i += 2 + NUM_JOINTS
    if num_frames < 0 or i != n_lines:
        raise ValueError
    return num_frames, body_lines, [k + 2 for k in body_lines], frame_of


def _walk_checked(lines: list[bytes], path: str) -> tuple[int, list[int], list[int], list[int]]:
    """Same as ``_walk_fast`` but raises BadInputError at the first problem."""
    n_lines = len(lines)
    if not n_lines:
        raise BadInputError(path, 1, "empty file", "a frame count")
    num_frames = _int_line(lines, 0, path, "the number of frames")
    body_lines: list[int] = []
    frame_of: list[int] = []
    i = 1
    for f in range(num_frames):
        nb = _int_line(lines, i, path, f"the number of bodies of frame {f + 1}")
        i += 1
        for _ in range(nb):
            if i >= n_lines:
                raise BadInputError(path, i + 1, f"file ends after {n_lines} lines",
                                    f"a body line (frame {f + 1} of {num_frames})")
            body_lines.append(i)
            frame_of.append(f)
            i += 1
            nj = _int_line(lines, i, path, "the number of joints")
            if nj != NUM_JOINTS:
                raise BadInputError(path, i + 1, f"found {nj} joints", f"{NUM_JOINTS}")
            i += 1
            if i + NUM_JOINTS > n_lines:
                raise BadInputError(path, n_lines + 1, f"file ends after {n_lines} lines",
                                    f"{NUM_JOINTS} joint lines from line {i + 1} (frame {f + 1} of {num_frames})")
            i += NUM_JOINTS
    if i < n_lines:
        raise BadInputError(path, i + 1, f"extra content {lines[i].strip()[:40]!r} after the last declared frame",
                            f"end of file after {num_frames} frames")
    return num_frames, body_lines, [k + 2 for k in body_lines], frame_of


def _check_body_lines(lines: list[bytes], body_lines: list[int], path: str) -> None:
    """Every body line has 10 finite numbers (bodyID an integer); vectorised, with a per-line
    pass only to name the bad line."""
    if not body_lines:
        return
    sel = [lines[k] for k in body_lines]
    toks = b" ".join(sel).split()
    if len(toks) == _BODY_FIELDS * len(sel):
        try:
            vals = np.array(toks, dtype=np.float64)
            if np.isfinite(vals).all() and all(b"." not in t for t in toks[::_BODY_FIELDS]):
                return
        except ValueError:
            pass
    for k in body_lines:
        _check_body_line(lines[k], k + 1, path)


def _parse_joint_lines(lines: list[bytes], starts: list[int], path: str) -> np.ndarray:
    """All joint lines of all blocks -> (blocks, 25, 12) float64, fully validated."""
    block = [ln for s in starts for ln in lines[s:s + NUM_JOINTS]]
    n = len(block)
    try:
        arr = pd.read_csv(
            io.BytesIO(b"\n".join(block)), sep=" ", header=None, dtype=np.float64, engine="c",
            na_filter=False, skip_blank_lines=False,
        ).to_numpy()
        ok = (arr.shape == (n, _JOINT_FIELDS) and bool(np.isfinite(arr).all())
              and bool((np.abs(arr[:, :3]) <= MAX_ABS).all()))
    except ValueError:  # includes pandas' ParserError / EmptyDataError
        ok = False
    if not ok:  # slow path: find the exact line (or accept odd but valid whitespace)
        arr = _parse_joint_lines_slow(lines, starts, path)
    return arr.reshape(len(starts), NUM_JOINTS, _JOINT_FIELDS)


def _parse_joint_lines_slow(lines: list[bytes], starts: list[int], path: str) -> np.ndarray:
    out = np.empty((len(starts) * NUM_JOINTS, _JOINT_FIELDS), dtype=np.float64)
    k = 0
    for s in starts:
        for i in range(s, s + NUM_JOINTS):
            toks = lines[i].split()
            if len(toks) != _JOINT_FIELDS:
                raise BadInputError(path, i + 1, f"joint line has {len(toks)} values",
                                    f"{_JOINT_FIELDS} (x y z depthX depthY colorX colorY orientW..Z trackingState)")
            try:
                row = [float(t) for t in toks]
            except ValueError:
                raise BadInputError(path, i + 1, f"non-numeric joint line {lines[i].strip()[:60]!r}",
                                    f"{_JOINT_FIELDS} numbers") from None
            if not all(math.isfinite(v) for v in row):
                raise BadInputError(path, i + 1, f"non-finite value in joint line {lines[i].strip()[:60]!r}", "finite numbers")
            far = next((v for v in row[:3] if abs(v) > MAX_ABS), None)
            if far is not None:  # refused here: as float32 it would be stored as is, or overflow
                raise BadInputError(path, i + 1, f"joint coordinate {far:g}", bound_text(UNITS, hint=False))
            out[k] = row
            k += 1
    return out
