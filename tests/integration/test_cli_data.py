"""The data verbs through the real CLI: synth -> prepare -> info -> verify -> merge, on
synthetic and real recordings, and the one-line errors on damaged stores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import cli, mtscale_cmd, run_ok

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    return cli(*args, timeout=900)


def mtscale(*args: str) -> subprocess.CompletedProcess:
    return run_ok(mtscale_cmd(*args), timeout=900)


def test_synth_prepare_info_verify_merge(tmp_path: Path):
    mtscale("synth", "--out", str(tmp_path / "raw"), "--num-samples", "40", "--num-classes", "5", "--seed", "3", "--quiet")
    p = mtscale("prepare", "--format", "ntu", "--input", str(tmp_path / "raw"), "--out", str(tmp_path / "st"),
                "--workers", "2", "--json", "--quiet")
    summary = json.loads(p.stdout)
    assert summary["num_samples"] == 40 and summary["num_skipped"] == 0 and summary["report"] is None
    info = json.loads(mtscale("info", str(tmp_path / "st"), "--json").stdout)
    assert info["num_samples"] == 40 and info["num_frames"] == summary["num_frames"] > 40
    assert info["layout"] == "ntu25" and info["dtype"] == "float16" and info["format"] == "ntu"
    assert sum(info["label_counts"].values()) == 40 and set(info["label_counts"]) <= {str(i) for i in range(5)}
    assert sum(info["splits"]["xsub60"].values()) == 40
    v = mtscale("verify", str(tmp_path / "st"), "--quiet")
    assert v.stdout.strip().endswith(": ok")
    # prepared again in two parts, merged: the same store
    for i in range(2):
        mtscale("prepare", "--format", "ntu", "--input", str(tmp_path / "raw"), "--out", str(tmp_path / f"p{i}"),
                "--part-index", str(i), "--num-parts", "2", "--quiet")
    m = mtscale("merge", str(tmp_path / "p0"), str(tmp_path / "p1"), "--out", str(tmp_path / "merged"), "--quiet")
    assert "40 samples" in m.stdout
    from mtscale.data.store import Store

    merged = Store.open(tmp_path / "merged").info()
    assert merged["num_frames"] == info["num_frames"] and merged["label_counts"] == info["label_counts"]
    # an existing store is never overwritten
    again = _run("prepare", "--format", "ntu", "--input", str(tmp_path / "raw"), "--out", str(tmp_path / "st"), "--quiet")
    assert again.returncode == 2 and "already exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1


def test_damaged_store_errors(tmp_path: Path):
    mtscale("synth", "--out", str(tmp_path / "raw"), "--num-samples", "6", "--num-classes", "3", "--quiet")
    mtscale("prepare", "--format", "ntu", "--input", str(tmp_path / "raw"), "--out", str(tmp_path / "st"), "--quiet")
    shard = next(p for p in (tmp_path / "st" / "frames" / "c").rglob("*") if p.is_file())
    data = bytearray(shard.read_bytes())
    for j in range(len(data) // 3, len(data) // 3 + 64):
        data[j] ^= 0xFF
    shard.write_bytes(bytes(data))
    v = _run("verify", str(tmp_path / "st"), "--quiet")
    assert v.returncode == 1 and "problem(s) found" in v.stderr and v.stdout.strip()
    meta = tmp_path / "st" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["schema_version"] = 7
    meta.write_text(json.dumps(doc))
    for verb in ("info", "verify"):
        p = _run(verb, str(tmp_path / "st"))
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert "schema_version 7, expected 1" in p.stderr
    p = _run("info", str(tmp_path / "missing"))
    assert p.returncode == 2 and "no store found" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_prepare_real_ntu(ntu_dir: Path, tmp_path: Path):
    p = mtscale("prepare", "--format", "ntu", "--input", str(ntu_dir), "--out", str(tmp_path / "ntu"), "--json", "--quiet")
    s = json.loads(p.stdout)
    files = sorted(ntu_dir.glob("*.skeleton"))
    assert s["num_samples"] == len(files) == 5 and s["num_skipped"] == 0
    text = mtscale("info", str(tmp_path / "ntu")).stdout
    assert "samples      5" in text and "drink water" in text
    info = json.loads(mtscale("info", str(tmp_path / "ntu"), "--json").stdout)
    want = {}
    for f in files:
        label = str(int(f.name[17:20]) - 1)
        want[label] = want.get(label, 0) + 1
    assert info["label_counts"] == want and info["num_classes"] == max(int(k) for k in want) + 1  # A050 -> 50
    assert mtscale("verify", str(tmp_path / "ntu"), "--quiet").returncode == 0


def test_prepare_real_nw_ucla(ucla_dir: Path, tmp_path: Path):
    pytest.importorskip("mtscale.data.formats.nw_ucla", reason="NW-UCLA reader not written yet")
    p = mtscale("prepare", "--format", "nw-ucla", "--input", str(ucla_dir), "--out", str(tmp_path / "ucla"),
                "--workers", "2", "--json", "--quiet")
    s = json.loads(p.stdout)
    assert s["num_samples"] == 1484 and s["num_skipped"] == 0
    info = json.loads(mtscale("info", str(tmp_path / "ucla"), "--json").stdout)
    assert info["layout"] == "kinect_v1_20" and info["num_samples"] == 1484
    assert info["splits"]["view"] == {"test": 464, "train": 1020}
    assert info["num_classes"] == 10 and sum(info["label_counts"].values()) == 1484
    assert mtscale("verify", str(tmp_path / "ucla"), "--quiet").returncode == 0


def test_bad_record_counted_as_record_and_info_into_a_closed_pipe(tmp_path: Path):
    """Issue 29: one bad annotation of a PYSKL file costs one record, said so in records; `info`
    whose reader has gone (`mtscale info STORE | head`) ends quietly like a Unix tool."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    anns = [dict(frame_dir=f"S001C001P001R001A{i:03d}", label=i % 3, total_frames=10,
                 keypoint=rng.normal(size=(1, 10, 25, 3)).astype(np.float32)) for i in range(12)]
    anns[4]["keypoint"][0, 0, 0, 0] = np.nan
    (tmp_path / "a.pkl").write_bytes(pickle.dumps({"split": {}, "annotations": anns}))
    p = mtscale("prepare", "--format", "pyskl", "--input", str(tmp_path / "a.pkl"), "--out", str(tmp_path / "st"),
                "--quiet")
    assert p.stdout.startswith("prepared 11 samples") and "skipped 1 bad records" in p.stdout, p.stdout
    skipped = [line for line in p.stderr.splitlines() if line.startswith("skipped: ")]
    assert len(skipped) == 1 and "annotations[4].keypoint has non-finite values" in skipped[0], p.stderr
    # the reader closes the pipe before mtscale writes a byte (the imports alone take longer)
    proc = subprocess.Popen(mtscale_cmd("info", str(tmp_path / "st")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141 and err == "", err  # was: a BrokenPipeError traceback
    shell = subprocess.run(f"'{sys.executable}' -m mtscale.cli info --json '{tmp_path / 'st'}' | head -n 1",
                           shell=True, capture_output=True, text=True, timeout=300)
    assert shell.stdout == "{\n" and shell.stderr == "", shell.stderr


def _mount_tmpfs(where: Path, opts: str) -> bool:
    import shutil as _sh

    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not _sh.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True).returncode == 0


def test_read_only_and_full_disks_are_one_line_errors(tmp_path: Path) -> None:
    """Issue 29, item 8: a read-only output and a full disk were tracebacks; now one line naming
    the path and what to do, exit 2. (Real tmpfs mounts: needs root, as CI runs.)"""
    raw = tmp_path / "raw"
    r = _run("synth", "--out", str(raw), "--num-samples", "8", "--num-classes", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    ro, full = tmp_path / "ro", tmp_path / "full"
    if not (_mount_tmpfs(ro, "ro,size=1m") and _mount_tmpfs(full, "size=64k")):
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        for where, needle in ((ro, "Read-only file system, expected a writable location"),
                              (full, "No space left on device, expected free disk space")):
            r = _run("prepare", "--format", "ntu", "--input", str(raw), "--out", str(where / "store"), "--quiet")
            assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)
        subprocess.run(["umount", str(full)], capture_output=True)


def test_damaged_model_files_and_legacy_csv_are_one_line_errors(tmp_path: Path) -> None:
    """Issue 29, item 8: a truncated / foreign --pretrained file, a garbled meta.json and a
    Latin-1 labels.csv were tracebacks; a BOM labels.csv (spreadsheet export) failed on its header."""
    import numpy as np

    for name, enc in (("latin", "latin-1"), ("bom", "utf-8-sig")):
        d = tmp_path / name
        d.mkdir()
        np.save(d / "a.npy", np.zeros((12, 25, 3), np.float32) + 0.1)
        (d / "labels.csv").write_bytes("id,label,note\na,1,caf\xe9\n".encode(enc))
    r = _run("prepare", "--format", "generic", "--input", str(tmp_path / "latin"), "--layout", "ntu25",
             "--out", str(tmp_path / "s1"), "--quiet")
    assert r.returncode == 2 and "labels.csv:2: byte 0xe9, which is not UTF-8" in r.stderr, r.stderr[-2000:]
    r = _run("prepare", "--format", "generic", "--input", str(tmp_path / "bom"), "--layout", "ntu25",
             "--out", str(tmp_path / "s2"), "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    (tmp_path / "bad.safetensors").write_text("garbage")
    fin = tmp_path / "fin"
    fin.mkdir()
    (fin / "meta.json").write_text("{bad")
    (fin / "model.safetensors").write_text("x")
    cfg = ROOT / "configs" / "finetune" / "tiny_cpu.yaml"
    r = _run("finetune", "--config", str(cfg), "--set", f"data.store={tmp_path / 's2'}", "--set", "data.split=null",
             "--set", f"run.dir={tmp_path / 'run'}", "--pretrained", str(tmp_path / "bad.safetensors"))
    assert r.returncode == 2 and "bad.safetensors: not a readable safetensors file" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # nothing half-written
    r = _run("evaluate", "--checkpoint", str(fin), "--store", str(tmp_path / "s2"))
    assert r.returncode == 2 and "meta.json: metadata that is not JSON" in r.stderr, r.stderr[-2000:]
    r = _run("finetune", "--config", str(cfg), "--set", f"data.store={tmp_path / 's2'}", "--set", "train.lr=-1",
             "--protocol", "scratch", "--set", f"run.dir={tmp_path / 'run2'}")
    assert r.returncode == 2 and "train.lr: found -1.0, expected > 0" in r.stderr, r.stderr[-2000:]
