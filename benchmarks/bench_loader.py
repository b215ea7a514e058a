"""Loader throughput: mtscale's streaming loader vs today's feeders vs an in-memory gather.

Measures, on the same synthetic store, the same T and batch size, in one run (single
process, one torch thread, blosc without threads): samples per **CPU-second** of the process
(``time.process_time``: the per-core rate, robust on a shared machine where wall time mostly
measures the other jobs), and samples per wall-second beside it (``*_wall_samples_per_s``):

1. ``mtscale``: ``build_loader`` (train mode: random crop + linear resample, shuffle buffer)
   plus its batched augmentations on the CPU; run in a fresh child process so its peak RSS
   (``peak_rss_mb``) is its own.
2. ``baseline``: the MAMP / CTR-GCN feeder reproduced: the dataset as one padded
   (N, 300, 150) float32 array in memory, per-sample valid-frame count, random crop
   (``valid_crop_resize``: ratio in [0.5, 1], >= 64 frames), ``F.interpolate`` bilinear resize
   to T, ``random_rot`` (per-sample rotation matrix, theta = 0.3), default collate.
   (The padded array of the whole store would not fit in memory: it holds the store's first
   ``--baseline-samples`` samples; the per-sample cost does not depend on N.)
3. ``upper_bound``: gather random batches of pre-cropped (N, T, M, V, C) clips in memory.

    python benchmarks/bench_loader.py --quick                 # < 1 min, small store
    python benchmarks/bench_loader.py --json out.json         # 100k samples (~2.7 GB store)
    python benchmarks/bench_loader.py --store S --compare-zarr  # also (1) reading through zarr

Any existing store can be given with ``--store`` (any blosc codec; ``store_compressor`` in
the output says which); a missing one is written there with the writer's default codec.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

AUG = dict(rotate_deg=17.2, scale=0.1, shear=0.1, body_swap_p=0.5, time_mask_frames=0)
"""Augmentations timed with (1): rotation (0.3 rad, as MAMP's random_rot), scale, shear, body swap."""


# ------------------------------------------------------------------ synthetic store


def synth_samples(n: int, seed: int, min_len: int, max_len: int):
    """Smooth random-walk skeletons (T, 2, 25, 3); a second body in ~30 % of samples."""
    rng = np.random.default_rng(seed)
    pose = rng.normal(0, 0.3, (25, 3)).astype(np.float32)
    for i in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        x = np.zeros((length, 2, 25, 3), np.float32)
        bodies = 2 if rng.random() < 0.3 else 1
        walk = np.cumsum(rng.normal(0, 0.01, (length, bodies, 25, 3)).astype(np.float32), axis=0)
        x[:, :bodies] = pose + walk
        yield f"S{i:07d}", x, int(i % 60), {"split_xsub": "train" if i % 5 else "test"}


def make_store(path: str, n: int, seed: int, min_len: int, max_len: int) -> None:
    from mtscale.data.store_writer import write_store

    write_store(path, synth_samples(n, seed, min_len, max_len), layout="ntu25", num_bodies=2)


def dir_mb(path: str) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


# ------------------------------------------------------------------ (1) mtscale


def warm_page_cache(path: str) -> float:
    """Read every file of the store once (seconds taken): (1) is then timed on the page cache,
    like (2) and (3) on memory. On this VM the host drops a cold 2.8 GB store from the cache
    within minutes; read from disk, (1) spends its CPU in the kernel's I/O path instead
    (2,776 wall / 11,058 CPU samples/s cold against 16,795 / 17,212 warm in back-to-back runs)."""
    t, buf = time.perf_counter(), bytearray(1 << 22)
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
    return time.perf_counter() - t


def single_core() -> None:
    torch.set_num_threads(1)
    try:
        import numcodecs.blosc

        numcodecs.blosc.use_threads = False
    except ImportError:
        pass


def run_mtscale(store: str, batch: int, clip: int, max_samples: int, shuffle_buffer: int,
                zarr_reads: bool = False) -> dict:
    """Child process body: iterate the loader, augment on CPU, report rates and peak RSS."""
    from mtscale.config import AugmentConfig, DataConfig
    from mtscale.data.loader import build_loader
    from mtscale.malloc import tune_malloc

    single_core()
    tune_malloc()  # as in every process mtscale runs (its CLI, entry points and loader workers)
    cfg = DataConfig(store=store, clip_frames=clip, num_workers=0, shuffle_buffer=shuffle_buffer,
                     augment=AugmentConfig(**AUG))
    loader = build_loader(store, cfg, batch_size=batch, seed=0, train=True)
    loader.dataset.store.direct_reads = not zarr_reads
    n, t0, c0 = 0, None, None
    for i, b in enumerate(loader):
        if i == 2:  # after warm-up; later windows are read inside the timed part
            t0, c0, n = time.perf_counter(), time.process_time(), 0
        n += b["x"].shape[0]
        if t0 is not None and n >= max_samples:
            break
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    return {"samples_per_s": n / dc, "wall_samples_per_s": n / dt, "samples": n,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ------------------------------------------------------------------ (2) MAMP / CTR-GCN feeder


def _rot(rot: torch.Tensor) -> torch.Tensor:
    """MAMP feeders/tools.py ``_rot``: (T, 3) angles -> (T, 3, 3)."""
    cos_r, sin_r = rot.cos(), rot.sin()
    zeros = torch.zeros(rot.shape[0], 1)
    ones = torch.ones(rot.shape[0], 1)
    r1 = torch.stack((ones, zeros, zeros), dim=-1)
    rx2 = torch.stack((zeros, cos_r[:, 0:1], sin_r[:, 0:1]), dim=-1)
    rx3 = torch.stack((zeros, -sin_r[:, 0:1], cos_r[:, 0:1]), dim=-1)
    rx = torch.cat((r1, rx2, rx3), dim=1)
    ry1 = torch.stack((cos_r[:, 1:2], zeros, -sin_r[:, 1:2]), dim=-1)
    r2 = torch.stack((zeros, ones, zeros), dim=-1)
    ry3 = torch.stack((sin_r[:, 1:2], zeros, cos_r[:, 1:2]), dim=-1)
    ry = torch.cat((ry1, r2, ry3), dim=1)
    rz1 = torch.stack((cos_r[:, 2:3], sin_r[:, 2:3], zeros), dim=-1)
    r3 = torch.stack((zeros, zeros, ones), dim=-1)
    rz2 = torch.stack((-sin_r[:, 2:3], cos_r[:, 2:3], zeros), dim=-1)
    rz = torch.cat((rz1, rz2, r3), dim=1)
    return rz.matmul(ry).matmul(rx)


def random_rot(data_numpy: np.ndarray, theta: float = 0.3) -> torch.Tensor:
    """MAMP ``random_rot``: data (C, T, V, M), one rotation per sample."""
    data_torch = torch.from_numpy(data_numpy)
    C, T, V, M = data_torch.shape
    data_torch = data_torch.permute(1, 0, 2, 3).contiguous().view(T, C, V * M)
    rot = torch.zeros(3).uniform_(-theta, theta)
    rot = torch.stack([rot] * T, dim=0)
    rot = _rot(rot)
    data_torch = torch.matmul(rot, data_torch)
    return data_torch.view(T, C, V, M).permute(1, 0, 2, 3).contiguous()


def valid_crop_resize(data_numpy: np.ndarray, valid_frame_num: int, p_interval, window: int) -> np.ndarray:
    """MAMP / CTR-GCN ``valid_crop_resize`` (training branch), data (C, T, V, M)."""
    C, T, V, M = data_numpy.shape
    begin, end = 0, valid_frame_num
    valid_size = end - begin
    p = np.random.rand(1) * (p_interval[1] - p_interval[0]) + p_interval[0]
    cropped_length = np.minimum(np.maximum(int(np.floor(valid_size * p[0])), 64), valid_size)
    bias = np.random.randint(0, valid_size - cropped_length + 1)
    data = data_numpy[:, begin + bias : begin + bias + cropped_length, :, :]
    data = torch.tensor(data, dtype=torch.float)
    data = data.permute(0, 2, 3, 1).contiguous().view(C * V * M, cropped_length)
    data = data[None, None, :, :]
    data = F.interpolate(data, size=(C * V * M, window), mode="bilinear", align_corners=False).squeeze()
    return data.contiguous().view(C, V, M, window).permute(0, 3, 1, 2).contiguous().numpy()


class MampFeeder(torch.utils.data.Dataset):
    """MAMP ``Feeder`` (NTU, train): x (N, 300, 150) -> (N, C, T, V, M) view at load time."""

    def __init__(self, x_N300_150: np.ndarray, labels: np.ndarray, window_size: int):
        n, t, _ = x_N300_150.shape
        self.data = x_N300_150.reshape((n, t, 2, 25, 3)).transpose(0, 4, 1, 3, 2)
        self.label, self.window_size, self.p_interval = labels, window_size, [0.5, 1]

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, index: int):
        data_numpy = np.array(self.data[index])
        label = self.label[index]
        valid_frame_num = np.sum(data_numpy.sum(0).sum(-1).sum(-1) != 0)
        data_numpy = valid_crop_resize(data_numpy, valid_frame_num, self.p_interval, self.window_size)
        data_numpy = random_rot(data_numpy)
        return data_numpy, label, index


def padded_array(store, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The store's first ``n`` samples as CTR-GCN's padded (n, 300, 150) float32 array."""
    out = np.zeros((n, 300, 150), np.float32)
    for i in range(n):
        x = store.read_sample(i)[:300]
        out[i, : len(x)] = x.reshape(len(x), -1)
    return out, store.labels[:n].copy()


def run_baseline(x: np.ndarray, labels: np.ndarray, batch: int, clip: int, max_samples: int) -> tuple[float, float]:
    """(samples per CPU-second, samples per wall-second) of the MAMP feeder."""
    single_core()
    np.random.seed(0)
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(MampFeeder(x, labels, clip), batch_size=batch, shuffle=True,
                                         num_workers=0, drop_last=True)
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while n < max_samples:
        for data, _label, _index in loader:
            n += data.shape[0]
            if n >= max_samples:
                break
    return n / (time.process_time() - c0), n / (time.perf_counter() - t0)


# ------------------------------------------------------------------ (3) upper bound


def run_upper_bound(x: np.ndarray, batch: int, clip: int, max_samples: int) -> tuple[float, float]:
    """(samples per CPU-second, samples per wall-second) of a pre-cropped in-memory gather."""
    single_core()
    n = x.shape[0]
    clips = torch.from_numpy(np.ascontiguousarray(x[:, :clip].reshape(n, clip, 2, 25, 3)))
    g = torch.Generator().manual_seed(0)
    done, t0, c0 = 0, time.perf_counter(), time.process_time()
    while done < max_samples:
        idx = torch.randint(0, n, (batch,), generator=g)
        b = clips.index_select(0, idx)  # (N, T, M, V, C)
        done += b.shape[0]
    return done / (time.process_time() - c0), done / (time.perf_counter() - t0)


# ------------------------------------------------------------------ driver


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small store, short runs (< 1 min)")
    p.add_argument("--json", default=None, help="write the results as a flat JSON object")
    p.add_argument("--store", default=None, help="reuse / create the synthetic store here")
    p.add_argument("--num-samples", type=int, default=None, help="store size (default 100000; quick 3000)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--clip-frames", type=int, default=120)
    p.add_argument("--shuffle-buffer", type=int, default=None, help="default 4096 (quick: 512, so windows are read while timed)")
    p.add_argument("--baseline-samples", type=int, default=None)
    p.add_argument("--compare-zarr", action="store_true",
                   help="also time (1) reading through zarr instead of the direct chunk reader")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--zarr-reads", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    num = a.num_samples or (3000 if a.quick else 100_000)
    if a.shuffle_buffer is None:
        a.shuffle_buffer = 512 if a.quick else 4096
    measure = 3000 if a.quick else 60_000

    if a.child:  # (1) in a fresh process
        print(json.dumps(run_mtscale(a.child, a.batch_size, a.clip_frames, int(a.num_samples), a.shuffle_buffer,
                                     zarr_reads=a.zarr_reads)))
        return 0

    from mtscale.malloc import tune_malloc

    tune_malloc()  # the references (2), (3) run under the same process settings as (1)
    tmp = None
    store_path = a.store
    if store_path is None:
        tmp = tempfile.mkdtemp(prefix="mtscale-bench-")
        store_path = os.path.join(tmp, "store")
    from mtscale.data.store import Store, store_exists

    t = time.perf_counter()
    if not store_exists(store_path):
        make_store(store_path, num, seed=0, min_len=32, max_len=300)
    write_s = time.perf_counter() - t
    store = Store.open(store_path)
    warm_s = warm_page_cache(store_path)

    def child(zarr_reads: bool) -> dict:
        out = subprocess.run(
            [sys.executable, __file__, "--child", store_path, "--num-samples", str(min(measure, store.num_samples // 2)),
             "--batch-size", str(a.batch_size), "--clip-frames", str(a.clip_frames),
             "--shuffle-buffer", str(a.shuffle_buffer)] + (["--zarr-reads"] if zarr_reads else []),
            check=True, capture_output=True, text=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    try:
        ours = child(zarr_reads=False)
        k = min(store.num_samples, a.baseline_samples or (1024 if a.quick else 4096))
        x, labels = padded_array(store, k)
        base, base_wall = run_baseline(x, labels, a.batch_size, a.clip_frames, 1024 if a.quick else 8192)
        upper, upper_wall = run_upper_bound(x, a.batch_size, a.clip_frames, 20_000 if a.quick else 200_000)
        via_zarr = child(zarr_reads=True) if a.compare_zarr else None
        res = {
            "mtscale_samples_per_s_per_core": round(ours["samples_per_s"], 1),
            "baseline_samples_per_s_per_core": round(base, 1),
            "upper_bound_samples_per_s_per_core": round(upper, 1),
            "speedup_vs_baseline": round(ours["samples_per_s"] / base, 2),
            "fraction_of_upper_bound": round(ours["samples_per_s"] / upper, 3),
            "mtscale_wall_samples_per_s": round(ours["wall_samples_per_s"], 1),
            "baseline_wall_samples_per_s": round(base_wall, 1),
            "upper_bound_wall_samples_per_s": round(upper_wall, 1),
            "wall_speedup_vs_baseline": round(ours["wall_samples_per_s"] / base_wall, 2),
            "wall_fraction_of_upper_bound": round(ours["wall_samples_per_s"] / upper_wall, 3),
            "mtscale_via_zarr_samples_per_s_per_core": round(via_zarr["samples_per_s"], 1) if via_zarr else None,
            "store_compressor": store.attrs.get("compressor"),
            "load_average_1m": round(os.getloadavg()[0], 1),
            "peak_rss_mb": round(ours["peak_rss_mb"], 1),
            "store_mb": round(dir_mb(store_path), 1),
            "store_samples": store.num_samples,
            "store_frames": store.num_frames,
            "store_write_s": round(write_s, 1),
            "store_warm_read_s": round(warm_s, 1),
            "measured_samples": ours["samples"],
            "batch_size": a.batch_size,
            "clip_frames": a.clip_frames,
            "shuffle_buffer": a.shuffle_buffer,
            "augment": ",".join(f"{k}={v}" for k, v in AUG.items()),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "quick": bool(a.quick),
        }
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    line = json.dumps(res)
    print(line)
    if a.json:
        Path(a.json).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
