"""Ingest throughput: ``mtscale prepare`` on NTU ``.skeleton`` text vs the research scripts' parse.

    python benchmarks/bench_ingest.py --quick --json /tmp/ingest.json   # < 1 min
    python benchmarks/bench_ingest.py --num-files 2000 --workers 1,2    # README figures
    python benchmarks/bench_ingest.py --input /data/nturgbd_skeletons   # your files

Each prepare runs in a fresh subprocess, so peak RSS (``ru_maxrss`` of the run and of its
worker processes) is per run. Reported side by side in one run (this machine is shared):
files/s and MB/s of raw text per worker for 1..n workers, the bare line-by-line parse of
CTR-GCN's ``read_skeleton_filter`` + ``read_xyz`` (no validation, no store) on the same files,
an in-process breakdown of where prepare's time goes, and peak RSS for N and 4N files (it must
not grow with the dataset).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def read_skeleton_filter(file: str) -> dict:
    """CTR-GCN ``data_gen/ntu_gendata.py`` (verbatim logic): the reference parse."""
    with open(file) as f:
        seq = {"numFrame": int(f.readline()), "frameInfo": []}
        for _ in range(seq["numFrame"]):
            frame = {"numBody": int(f.readline()), "bodyInfo": []}
            for _ in range(frame["numBody"]):
                keys = ["bodyID", "clipedEdges", "handLeftConfidence", "handLeftState", "handRightConfidence",
                        "handRightState", "isResticted", "leanX", "leanY", "trackingState"]
                body = {k: float(v) for k, v in zip(keys, f.readline().split())}
                body["numJoint"] = int(f.readline())
                body["jointInfo"] = []
                for _ in range(body["numJoint"]):
                    jkeys = ["x", "y", "z", "depthX", "depthY", "colorX", "colorY", "orientationW",
                             "orientationX", "orientationY", "orientationZ", "trackingState"]
                    body["jointInfo"].append({k: float(v) for k, v in zip(jkeys, f.readline().split())})
                frame["bodyInfo"].append(body)
            seq["frameInfo"].append(frame)
    return seq


def read_xyz(file: str, max_body: int = 4, num_joint: int = 25) -> np.ndarray:
    seq = read_skeleton_filter(file)
    data = np.zeros((max_body, seq["numFrame"], num_joint, 3), dtype=np.float32)
    for n, f in enumerate(seq["frameInfo"]):
        for m, b in enumerate(f["bodyInfo"]):
            for j, v in enumerate(b["jointInfo"]):
                if m < max_body and j < num_joint:
                    data[m, n, j, :] = [v["x"], v["y"], v["z"]]
    return data


def _proc_tree_kb(root: int) -> dict[int, tuple[int, int, float]]:
    """{pid: (VmRSS kB, VmHWM kB, CPU s)} of ``root`` and all its descendants (Linux /proc)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent[int(d)] = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier += kids
    out = {}
    for p in tree:
        try:
            st = dict(line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines() if ":" in line)
            ticks = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            cpu = (int(ticks[11]) + int(ticks[12])) / os.sysconf("SC_CLK_TCK")
            out[p] = (int(st["VmRSS"].split()[0]), int(st["VmHWM"].split()[0]), cpu)
        except (OSError, KeyError, ValueError):
            pass
    return out


def _run_one(input_dir: str, out: str, workers: int) -> None:
    """Child mode: one prepare, then print its figures as JSON. A sampler thread tracks the
    RSS of the whole process tree (the pool's workers are grandchildren via the forkserver,
    which ``RUSAGE_CHILDREN`` does not see)."""
    import threading

    sys.path.insert(0, str(ROOT))
    from mtscale.data.prepare import PrepareOptions, prepare

    peak = {"tree_kb": 0, "worker_hwm_kb": 0}
    worker_cpu: dict[int, float] = {}
    done = threading.Event()

    def sample() -> None:
        me = os.getpid()
        while not done.is_set():
            tree = _proc_tree_kb(me)
            peak["tree_kb"] = max(peak["tree_kb"], sum(r for r, _, _ in tree.values()))
            peak["worker_hwm_kb"] = max([peak["worker_hwm_kb"]] + [h for p, (_, h, _) in tree.items() if p != me])
            worker_cpu.update({p: c for p, (_, _, c) in tree.items() if p != me})
            done.wait(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t, c0 = time.perf_counter(), time.process_time()
    s = prepare("ntu", input_dir, out, PrepareOptions(), workers=workers, progress=False)
    cpu = time.process_time() - c0 + sum(worker_cpu.values())
    wall = time.perf_counter() - t
    done.set()
    th.join()
    rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"wall_s": wall, "num_samples": s["num_samples"], "input_bytes": s["input_bytes"],
                      "rss_parent_mb": rss_self, "cpu_s": cpu, "rss_max_worker_mb": peak["worker_hwm_kb"] / 1024,
                      "rss_tree_mb": max(peak["tree_kb"] / 1024, rss_self)}))


def run_prepare(input_dir: Path, workers: int, tmp: Path, n_files: int) -> dict:
    out = tmp / f"store_w{workers}_{n_files}_{time.monotonic_ns()}"
    p = subprocess.run([sys.executable, __file__, "--_run", str(input_dir), str(out), str(workers)],
                       capture_output=True, text=True, check=True)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    mb = r["input_bytes"] / 1e6
    r.update(workers=workers, num_files=n_files, files_per_s=n_files / r["wall_s"], mb_per_s=mb / r["wall_s"],
             mb_per_s_per_worker=mb / r["wall_s"] / workers, mb_per_cpu_s=mb / r["cpu_s"])
    return r


def breakdown(files: list[Path]) -> dict:
    """Single-process split of prepare's per-file work (seconds per MB of text)."""
    from mtscale.data.formats import ntu
    from mtscale.data.manifest import checksum_bytes
    from mtscale.data.preprocess import PrepareOptions, preprocess

    opts, t = PrepareOptions(), {"read_parse_validate": 0.0, "preprocess": 0.0, "cast_checksum": 0.0}
    mb = sum(f.stat().st_size for f in files) / 1e6
    clock = time.process_time  # CPU time: robust on a shared machine
    for f in files:
        t0 = clock()
        raws = list(ntu.read_unit(str(f)))
        t1 = clock()
        xs = [preprocess(r, opts) for r in raws]
        t2 = clock()
        for x in xs:
            checksum_bytes(x.astype(np.float16))
        t3 = clock()
        t["read_parse_validate"] += t1 - t0
        t["preprocess"] += t2 - t1
        t["cast_checksum"] += t3 - t2
    return {f"{k}_mb_per_cpu_s": mb / max(v, 1e-9) for k, v in t.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run, < 1 min")
    ap.add_argument("--json", default=None, help="write the flat JSON result here")
    ap.add_argument("--input", default=None, help="folder of .skeleton files (default: synthetic)")
    ap.add_argument("--num-files", type=int, default=None)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--_run", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._run:
        _run_one(a._run[0], a._run[1], int(a._run[2]))
        return 0
    sys.path.insert(0, str(ROOT))
    from mtscale.data.synthetic import synthesize

    n = a.num_files or (40 if a.quick else 1000)
    workers = [int(w) for w in a.workers.split(",")]
    from mtscale.train.metrics import cpu_model

    res: dict = {"benchmark": "ingest", "quick": a.quick, "python": platform.python_version(),
                 "cpu": cpu_model(), "cores": os.cpu_count(), "load_avg_1m_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmpd:
        tmp = Path(tmpd)
        if a.input:
            src, src4 = Path(a.input), None
        else:
            src, src4 = tmp / "raw_n", tmp / "raw_4n"
            synthesize(str(src), num_samples=n, num_classes=60, seed=0, workers=max(workers), progress=False)
            synthesize(str(src4), num_samples=4 * n, num_classes=60, seed=1, workers=max(workers), progress=False)
        files = sorted(src.rglob("*.skeleton"))
        mb = sum(f.stat().st_size for f in files) / 1e6
        res.update(num_files=len(files), input_mb=round(mb, 2), mean_file_kb=round(mb * 1e3 / len(files), 1))
        t, c = time.perf_counter(), time.process_time()
        for f in files:
            read_xyz(str(f))
        ref, ref_cpu = time.perf_counter() - t, time.process_time() - c
        res.update(ctrgcn_parse_mb_per_s=mb / ref, ctrgcn_parse_mb_per_cpu_s=mb / ref_cpu,
                   ctrgcn_parse_files_per_s=len(files) / ref)
        res.update(breakdown(files[: min(len(files), 100)]))
        for w in workers:
            r = run_prepare(src, w, tmp, len(files))
            for k in ("wall_s", "cpu_s", "mb_per_cpu_s", "files_per_s", "mb_per_s", "mb_per_s_per_worker",
                      "rss_parent_mb", "rss_max_worker_mb", "rss_tree_mb"):
                res[f"prepare_w{w}_{k}"] = round(r[k], 2)
        if len(workers) > 1:
            res[f"scaling_w{workers[-1]}_over_w1"] = round(
                res[f"prepare_w{workers[-1]}_mb_per_s"] / res["prepare_w1_mb_per_s"], 2)
        if src4 is not None:
            r4 = run_prepare(src4, 1, tmp, 4 * n)
            r4w = run_prepare(src4, max(workers), tmp, 4 * n)
            w = max(workers)
            res.update(prepare_4n_w1_rss_parent_mb=round(r4["rss_parent_mb"], 1),
                       prepare_4n_w1_mb_per_s=round(r4["mb_per_s"], 2),
                       prepare_4n_w1_mb_per_cpu_s=round(r4["mb_per_cpu_s"], 2),
                       **{f"prepare_4n_w{w}_mb_per_s": round(r4w["mb_per_s"], 2),
                          f"scaling_4n_w{w}_over_w1": round(r4w["mb_per_s"] / r4["mb_per_s"], 2)},
                       rss_growth_4n_over_n_w1=round(r4["rss_parent_mb"] / res["prepare_w1_rss_parent_mb"], 3),
                       **{f"prepare_4n_w{w}_rss_tree_mb": round(r4w["rss_tree_mb"], 1),
                          f"rss_growth_4n_over_n_w{w}": round(r4w["rss_tree_mb"] / res[f"prepare_w{w}_rss_tree_mb"], 3)})
    res["load_avg_1m_end"] = os.getloadavg()[0]
    res = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in res.items()}
    for k, v in res.items():
        print(f"{k:40s} {v}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
