"""Reference point for issue 7, not part of mtscale: a small ST-GCN trained on NW-UCLA with a
re-implementation of CTR-GCN's ``feeder_ucla.py``, read straight from the JSON files.

It answers "how far does the data pipeline alone take a graph network on this CPU?", next to
mtscale's transformer (README results table). The feeder, as in CTR-GCN:

* centre every sequence on joint 1 (spine) of its first frame;
* training: random rotation about x and y, integer degrees in [-60, 60] (CTR-GCN also draws a
  scale in [0.5, 1.5], which the min-max step below cancels, so it is left out);
* each coordinate axis mapped to [-1, 1] over the whole sequence (min-max), train and test;
* training: T frames drawn with replacement from the whole sequence, sorted; test: T frames
  evenly spaced (``np.linspace``).

``--mode`` switches the rotation and min-max off to measure what they are worth. The network is
6 blocks of (learned-adjacency graph conv + 9-frame temporal conv), width ``--width`` to 4x,
SGD 0.1 (Nesterov, one-cycle cosine), batch 16, label smoothing 0.1. The test view is scored
every 5 epochs for the log; the figure to quote is the last epoch.

    python benchmarks/ref_gcn_nw_ucla.py --data ../shared/data/nw_ucla/all_sqe --epochs 50

Measured 2026-12-03 on the 2-core dev VM (one thread, ~16 min): 91.2 % with rotation and
min-max, 80.0 % without (``--mode none``); benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

V = 20  # Kinect v1 joints
PARENTS = (-1, 0, 1, 2, 2, 4, 5, 6, 2, 8, 9, 10, 0, 12, 13, 14, 0, 16, 17, 18)  # mtscale's kinect_v1_20


def load(path: str) -> tuple[np.ndarray, int]:
    with open(path) as f:
        d = json.load(f)
    return np.asarray(d["skeletons"], dtype=np.float64), int(d["label"]) - 1


def rotate(x: np.ndarray, deg_x: float, deg_y: float) -> np.ndarray:
    ax, ay = math.radians(deg_x), math.radians(deg_y)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), math.sin(ax)], [0, -math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, -math.sin(ay)], [0, 1, 0], [math.sin(ay), 0, math.cos(ay)]])
    return (x.reshape(-1, 3) @ (ry @ rx)).reshape(x.shape)


def clip(x: np.ndarray, frames: int, train: bool, mode: str, rng: random.Random) -> np.ndarray:
    """(L, V, 3) sequence -> (frames, V, 3) clip, CTR-GCN's feeder_ucla semantics."""
    x = x - x[0, 1]
    if train and mode == "rot_minmax":
        x = rotate(x, rng.randint(-60, 60), rng.randint(-60, 60))
    if mode == "rot_minmax":
        flat = x.reshape(-1, 3)
        x = ((flat - flat.min(0)) / (flat.max(0) - flat.min(0)) * 2 - 1).reshape(x.shape)
    n = len(x)
    idx = sorted(rng.sample(list(range(n)) * 100, frames)) if train else np.linspace(0, n - 1, frames).astype(int)
    return x[idx]


def adjacency() -> torch.Tensor:
    a = torch.eye(V)
    for c, p in enumerate(PARENTS):
        if p >= 0:
            a[c, p] = a[p, c] = 1
    return a / a.sum(1, keepdim=True)


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.gcn = nn.Conv2d(c_in, c_out, 1)
        self.A = nn.Parameter(adjacency())
        self.bn1 = nn.BatchNorm2d(c_out)
        self.tcn = nn.Conv2d(c_out, c_out, (9, 1), (stride, 1), (4, 0))
        self.bn2 = nn.BatchNorm2d(c_out)
        same = c_in == c_out and stride == 1
        self.res = nn.Identity() if same else nn.Sequential(nn.Conv2d(c_in, c_out, 1, (stride, 1)), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, T, V)
        h = F.relu(self.bn1(torch.einsum("nctv,vw->nctw", self.gcn(x), self.A)))
        return F.relu(self.bn2(self.tcn(h)) + self.res(x))


class STGCN(nn.Module):
    def __init__(self, width: int, num_classes: int = 10):
        super().__init__()
        w = width
        self.data_bn = nn.BatchNorm1d(3 * V)
        self.blocks = nn.Sequential(Block(3, w), Block(w, w), Block(w, 2 * w, 2), Block(2 * w, 2 * w),
                                    Block(2 * w, 4 * w, 2), Block(4 * w, 4 * w))
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, V, 3)
        n, t = x.shape[:2]
        x = self.data_bn(x.permute(0, 2, 3, 1).reshape(n, 3 * V, t)).reshape(n, V, 3, t).permute(0, 2, 3, 1)
        return self.fc(self.blocks(x).mean((2, 3)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = os.environ.get("MTSCALE_NW_UCLA", os.path.join(os.path.dirname(__file__), "../../shared/data/nw_ucla/all_sqe"))
    ap.add_argument("--data", default=default, help="folder of NW-UCLA .json files (env MTSCALE_NW_UCLA)")
    ap.add_argument("--mode", choices=("rot_minmax", "none"), default="rot_minmax")
    ap.add_argument("--frames", type=int, default=52)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 epochs, 16 frames, width 8")
    ap.add_argument("--json", help="write the result (last-epoch test top-1, CPU-s, settings) to this file")
    a = ap.parse_args()
    if a.quick:
        a.epochs, a.frames, a.width = 2, 16, 8
    files = sorted(glob.glob(os.path.join(a.data, "*.json")))
    if not files:
        raise SystemExit(f"--data: found no .json files in {a.data!r}, expected NW-UCLA's all_sqe folder")
    torch.set_num_threads(1)
    rng = random.Random(a.seed)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)
    train = [load(f) for f in files if "_v03" not in f]  # views 1, 2
    test = [load(f) for f in files if "_v03" in f]  # view 3
    print(f"{len(train)} train / {len(test)} test sequences, mode {a.mode}", flush=True)
    net = STGCN(a.width)
    batch = 16
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=4e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=a.epochs * math.ceil(len(train) / batch),
                                                pct_start=0.05, anneal_strategy="cos")

    def accuracy() -> float:
        net.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(test), 64):
                part = test[i:i + 64]
                x = torch.tensor(np.stack([clip(s, a.frames, False, a.mode, rng) for s, _ in part]), dtype=torch.float32)
                correct += int((net(x).argmax(1) == torch.tensor([y for _, y in part])).sum())
        net.train()
        return 100.0 * correct / len(test)

    t0, c0 = time.time(), time.process_time()
    top1 = float("nan")
    for epoch in range(a.epochs):
        order = np.random.permutation(len(train))
        for i in range(0, len(order), batch):
            part = [train[j] for j in order[i:i + batch]]
            x = torch.tensor(np.stack([clip(s, a.frames, True, a.mode, rng) for s, _ in part]), dtype=torch.float32)
            loss = F.cross_entropy(net(x), torch.tensor([y for _, y in part]), label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if epoch % 5 == 4 or epoch == a.epochs - 1:
            top1 = accuracy()
            print(f"epoch {epoch + 1}/{a.epochs} loss {loss.item():.3f} test top-1 {top1:.1f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    if a.json:
        out = {"test_top1_last_epoch": top1, "mode": a.mode, "epochs": a.epochs, "frames": a.frames,
               "width": a.width, "seed": a.seed, "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0,
               "torch": torch.__version__, "cpu_count": os.cpu_count()}
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
