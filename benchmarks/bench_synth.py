"""Synthetic NTU ``.skeleton`` writer throughput: ``mtscale.data.synthetic.synthesize``.

    python benchmarks/bench_synth.py --quick --json /tmp/synth.json      # < 1 min
    python benchmarks/bench_synth.py --num-samples 4000 --workers 1,2    # README figures
    python benchmarks/bench_synth.py --reference old_synthetic.py        # before / after

Reported side by side in one run (this machine is shared): end-to-end samples/s and MB/s
(wall clock, files written, pool start and per-process class calibration included) for each
worker count, the speed-up of n workers over 1; in-process CPU-time samples/s of rendering
alone (no file writes) and of rendering + writing; with ``--reference PATH`` (an older
``synthetic.py`` exposing ``render_chunk``), the same render-only CPU-time figure for it on
the same samples, and the ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _render_cpu_s(render_chunk, start: int, n: int, num_classes: int, chunk: int) -> tuple[float, int]:
    """CPU seconds and bytes to render samples start..start+n (no writes)."""
    t, nbytes = time.process_time(), 0
    for s in range(start, start + n, chunk):
        for _, data in render_chunk(range(s, min(s + chunk, start + n)), num_classes, 0, 40, 120):
            nbytes += len(data)
    return time.process_time() - t, nbytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run, < 1 min")
    ap.add_argument("--json", default=None, help="write the flat JSON result here")
    ap.add_argument("--num-samples", type=int, default=None, help="per end-to-end run (default 2000, quick 200)")
    ap.add_argument("--num-classes", type=int, default=60)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--reference", default=None, help="path of an older synthetic.py to compare against")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from mtscale.data import synthetic

    n = a.num_samples or (200 if a.quick else 2000)
    workers = [int(w) for w in a.workers.split(",")]
    from mtscale.train.metrics import cpu_model

    res: dict = {"benchmark": "synth", "quick": a.quick, "python": platform.python_version(),
                 "numpy": np.__version__, "cpu": cpu_model(), "cores": os.cpu_count(),
                 "load_avg_1m_start": os.getloadavg()[0], "num_samples": n, "num_classes": a.num_classes,
                 "frames": "40..120", "chunk": synthetic._CHUNK}

    # End to end, wall clock: what a user waits for.
    with tempfile.TemporaryDirectory(prefix="bench_synth_") as tmpd:
        for w in workers:
            out = Path(tmpd) / f"w{w}"
            t = time.perf_counter()
            summary = synthetic.synthesize(str(out), num_samples=n, num_classes=a.num_classes, seed=0,
                                           workers=w, progress=False)
            dt = time.perf_counter() - t
            res[f"w{w}_samples_per_s"] = round(n / dt, 1)
            res[f"w{w}_mb_per_s"] = round(summary["bytes"] / dt / 1e6, 2)
            res[f"w{w}_wall_s"] = round(dt, 2)
            res["mean_file_kb"] = round(summary["bytes"] / n / 1e3, 1)
            for f in out.iterdir():
                f.unlink()
        if 1 in workers:
            for w in workers:
                if w > 1:
                    res[f"speedup_w{w}_over_w1"] = round(res[f"w{w}_samples_per_s"] / res["w1_samples_per_s"], 2)

        # In process, CPU time (robust on a shared machine); class calibration is warm.
        m = max(64, n // 4)
        _render_cpu_s(synthetic.render_chunk, 0, synthetic._CHUNK, a.num_classes, synthetic._CHUNK)
        cpu, nbytes = _render_cpu_s(synthetic.render_chunk, n, m, a.num_classes, synthetic._CHUNK)
        res["render_samples_per_cpu_s"] = round(m / cpu, 1)
        res["render_mb_per_cpu_s"] = round(nbytes / cpu / 1e6, 2)
        out = Path(tmpd) / "inproc"
        out.mkdir()
        t = time.process_time()
        for s in range(n, n + m, synthetic._CHUNK):
            synthetic._write_range((str(out), s, min(s + synthetic._CHUNK, n + m), a.num_classes, 0, 40, 120))
        res["render_write_samples_per_cpu_s"] = round(m / (time.process_time() - t), 1)
        if a.reference:
            spec = importlib.util.spec_from_file_location("synthetic_reference", a.reference)
            ref = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(ref)
            _render_cpu_s(ref.render_chunk, 0, 32, a.num_classes, 32)
            # interleave the two, twice, and keep each one's best: the load varies during the run
            mine, theirs = [], []
            for _ in range(2):
                theirs.append(_render_cpu_s(ref.render_chunk, n, m, a.num_classes, 32)[0])
                mine.append(_render_cpu_s(synthetic.render_chunk, n, m, a.num_classes, synthetic._CHUNK)[0])
            res["reference"] = str(a.reference)
            res["reference_render_samples_per_cpu_s"] = round(m / min(theirs), 1)
            res["render_samples_per_cpu_s"] = round(m / min(mine), 1)
            res["speedup_over_reference"] = round(min(theirs) / min(mine), 2)
    res["load_avg_1m_end"] = os.getloadavg()[0]
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
