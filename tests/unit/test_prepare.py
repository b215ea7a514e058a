"""prepare: worker-count independence, bad-input skipping / report / strict, resume after an
interruption (injected failure and a real SIGKILL), argument checks, parts + merge."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mtscale.data import prepare as P
from mtscale.data.preprocess import PrepareOptions
from mtscale.data.store import Store
from mtscale.data.store_merge import merge_stores
from mtscale.data.store_writer import StoreWriter
from mtscale.data.synthetic import synthesize
from mtscale.errors import BadInputError, ConfigError, StoreError

SMALL = dict(chunk_frames=64, shard_chunks=2)  # shard = 128 frames: a commit every ~4 files
NUM_FILES = 24


@pytest.fixture(scope="module")
def syn_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("syn")
    synthesize(str(d), num_samples=NUM_FILES, num_classes=6, seed=1, workers=1, progress=False, min_frames=20, max_frames=45)
    return d


@pytest.fixture(scope="module")
def reference(syn_dir: Path, tmp_path_factory) -> Store:
    out = tmp_path_factory.mktemp("ref") / "ref"
    P.prepare("ntu", str(syn_dir), str(out), PrepareOptions(), workers=1, progress=False, **SMALL)
    return Store.open(out)


def assert_same_store(a: Store, b: Store) -> None:
    assert a.manifest.equals(b.manifest)
    assert a.attrs["preprocessing"] == b.attrs["preprocessing"]
    np.testing.assert_array_equal(a.frames[:], b.frames[:])
    fa = sorted(p for p in Path(a.url, "frames").rglob("*") if p.is_file())
    fb = sorted(p for p in Path(b.url, "frames").rglob("*") if p.is_file())
    assert [p.relative_to(a.url) for p in fa] == [p.relative_to(b.url) for p in fb]
    for x, y in zip(fa, fb):
        assert x.read_bytes() == y.read_bytes(), f"{x} differs"


def test_prepare_synthetic(reference: Store):
    s = reference
    assert s.num_samples == NUM_FILES and s.attrs["format"] == "ntu" and s.layout.name == "ntu25"
    assert s.attrs["shard_frames"] == 128 and s.num_frames > 4 * 128
    assert s.num_classes == 6 and len(s.class_names) == 6  # the classes the data uses, not all 120 NTU names
    assert s.attrs["preprocessing"]["center"] is True and s.attrs["ingest"]["num_skipped"] == 0
    cols = s.manifest.column_names
    for c in ("setup", "camera", "performer", "replication", "action", "split_xsub60", "split_xview60", "source_file"):
        assert c in cols
    assert s.manifest.column("sample_id").to_pylist() == sorted(s.manifest.column("sample_id").to_pylist())
    assert (s.labels == np.asarray(s.manifest.column("action").to_pylist()) - 1).all()
    x = s.read_sample(0)
    assert x.shape[1:] == (2, 25, 3) and np.abs(x).max() < 5
    assert s.verify(progress=False) == []


def test_worker_count_independence(syn_dir: Path, reference: Store, tmp_path: Path):
    summary = P.prepare("ntu", str(syn_dir), str(tmp_path / "w2"), PrepareOptions(), workers=2, progress=False, **SMALL)
    assert summary["num_samples"] == NUM_FILES and summary["input_bytes"] == sum(f.stat().st_size for f in syn_dir.iterdir())
    assert_same_store(Store.open(tmp_path / "w2"), reference)


def _bad_inputs(syn_dir: Path, d: Path) -> list[Path]:
    d.mkdir()
    files = sorted(syn_dir.glob("*.skeleton"))[:6]
    for f in files:
        shutil.copy(f, d / f.name)
    text = files[0].read_text().splitlines()
    trunc = d / "S050C001P001R001A001.skeleton"
    trunc.write_text("\n".join(text[: len(text) // 2]) + "\n")
    nonnum = d / "S050C001P001R001A002.skeleton"
    bad = list(text)
    bad[5] = "0.1 abc 0.3 " + " ".join(bad[5].split()[3:])  # a joint line of frame 1
    nonnum.write_text("\n".join(bad) + "\n")
    (d / "garbage.skeleton").write_text(files[1].read_text())
    return files


def test_bad_inputs_skipped_and_reported(syn_dir: Path, tmp_path: Path):
    good = _bad_inputs(syn_dir, tmp_path / "in")
    s = P.prepare("ntu", str(tmp_path / "in"), str(tmp_path / "out"), PrepareOptions(), workers=1, progress=False, **SMALL)
    assert s["num_samples"] == len(good) and s["num_skipped"] == 3
    store = Store.open(tmp_path / "out")
    assert store.manifest.column("sample_id").to_pylist() == [f.name.split(".")[0] for f in good]
    report = [json.loads(line) for line in Path(s["report"]).read_text().splitlines()]
    by_file = {Path(r["file"]).name: r for r in report}
    assert set(by_file) == {"S050C001P001R001A001.skeleton", "S050C001P001R001A002.skeleton", "garbage.skeleton"}
    assert by_file["S050C001P001R001A002.skeleton"]["line"] == 6
    assert "non-numeric" in by_file["S050C001P001R001A002.skeleton"]["message"]
    assert by_file["S050C001P001R001A001.skeleton"]["line"] is not None
    assert "does not parse" in by_file["garbage.skeleton"]["message"]
    assert store.attrs["ingest"]["num_skipped"] == 3
    # the good files' samples are identical to those prepared without bad neighbours
    clean = P.prepare("ntu", str(tmp_path / "in" / good[2].name), str(tmp_path / "one"), PrepareOptions(), progress=False)
    np.testing.assert_array_equal(Store.open(clean["out"]).read_sample(0), store.read_sample(2))


def test_strict_aborts_without_visible_store_then_resumes(syn_dir: Path, tmp_path: Path):
    _bad_inputs(syn_dir, tmp_path / "in")
    out = tmp_path / "out"
    with pytest.raises(BadInputError, match=r"S050C001P001R001A001\.skeleton:\d+: "):
        P.prepare("ntu", str(tmp_path / "in"), str(out), PrepareOptions(), strict=True, progress=False, **SMALL)
    assert not out.exists() and (tmp_path / "out.partial").is_dir()
    with pytest.raises(StoreError):
        Store.open(out)
    s = P.prepare("ntu", str(tmp_path / "in"), str(out), PrepareOptions(), progress=False, **SMALL)
    assert s["num_samples"] == 6 and s["num_skipped"] == 3 and out.is_dir()


class Interrupt(Exception):
    pass


def test_resume_after_interruption(syn_dir: Path, reference: Store, tmp_path: Path, monkeypatch):
    out = tmp_path / "st"
    real_commit = StoreWriter._commit
    commits = []

    def failing_commit(self):
        real_commit(self)
        commits.append(1)
        if len(commits) == 3:
            raise Interrupt("killed after 3 shards")

    monkeypatch.setattr(StoreWriter, "_commit", failing_commit)
    with pytest.raises(Interrupt):
        P.prepare("ntu", str(syn_dir), str(out), PrepareOptions(), progress=False, **SMALL)
    monkeypatch.setattr(StoreWriter, "_commit", real_commit)
    progress = json.loads((tmp_path / "st.partial" / "_progress.json").read_text())
    done = progress["state"]["units_done"]
    assert 0 < done < NUM_FILES and progress["parts"] == 3
    # different options refuse to resume
    with pytest.raises(StoreError, match=r"different arguments \(differs in \['options'\]\).*delete"):
        P.prepare("ntu", str(syn_dir), str(out), PrepareOptions(center=False), progress=False, **SMALL)
    seen = []
    real_unit = P.process_unit
    monkeypatch.setattr(P, "process_unit", lambda u: (seen.append(u), real_unit(u))[1])
    s = P.prepare("ntu", str(syn_dir), str(out), PrepareOptions(), progress=False, **SMALL)
    assert s["units_resumed"] == done and len(seen) == NUM_FILES - done  # committed files not redone
    assert s["input_bytes"] == sum(f.stat().st_size for f in syn_dir.iterdir())
    assert_same_store(Store.open(out), reference)


_KILL_SCRIPT = """
import sys, time
from mtscale.data import prepare as P
real = P.process_unit
def slow(u):
    time.sleep(0.15)
    return real(u)
P.process_unit = slow
P.prepare("ntu", sys.argv[1], sys.argv[2], P.PrepareOptions(), workers=1, progress=False, chunk_frames=64, shard_chunks=2)
"""


def test_resume_after_sigkill(syn_dir: Path, reference: Store, tmp_path: Path):
    out = tmp_path / "st"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(syn_dir), str(out)])
    progress = tmp_path / "st.partial" / "_progress.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if progress.exists() and json.loads(progress.read_text())["parts"] >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "prepare finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = json.loads(progress.read_text())["state"]["units_done"]
    s = P.prepare("ntu", str(syn_dir), str(out), PrepareOptions(), progress=False, **SMALL)
    assert 0 < s["units_resumed"] <= NUM_FILES and s["units_resumed"] >= done
    assert_same_store(Store.open(out), reference)


def test_refuses_existing_store_and_bad_parts(syn_dir: Path, reference: Store):
    with pytest.raises(StoreError, match="already exists"):
        P.prepare("ntu", str(syn_dir), reference.url, PrepareOptions(), progress=False)
    with pytest.raises(ConfigError, match="expected both or neither"):
        P.prepare("ntu", str(syn_dir), "/nonexistent/x", PrepareOptions(), part_index=0, progress=False)
    with pytest.raises(ConfigError, match="0 <= part-index < num-parts"):
        P.prepare("ntu", str(syn_dir), "/nonexistent/x", PrepareOptions(), part_index=3, num_parts=3, progress=False)
    with pytest.raises(ConfigError, match="--format"):
        P.prepare("nope", str(syn_dir), "/nonexistent/x", PrepareOptions(), progress=False)


def test_parts_then_merge_equals_whole(syn_dir: Path, reference: Store, tmp_path: Path):
    parts = []
    for i in range(3):
        out = tmp_path / f"part{i}"
        s = P.prepare("ntu", str(syn_dir), str(out), PrepareOptions(), part_index=i, num_parts=3, progress=False, **SMALL)
        assert s["num_samples"] == NUM_FILES // 3
        parts.append(str(out))
    merge_stores(parts, str(tmp_path / "merged"), progress=False)
    m = Store.open(tmp_path / "merged")
    assert m.manifest.equals(reference.manifest)
    np.testing.assert_array_equal(m.frames[:], reference.frames[:])
    assert m.verify(progress=False) == []


def test_nothing_ingestable(tmp_path: Path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "S001C001P001R001A001.skeleton").write_text("3\n1\n")
    with pytest.raises(BadInputError, match="no sample could be ingested from 1 units"):
        P.prepare("ntu", str(d), str(tmp_path / "out"), PrepareOptions(), progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# ---------------------------------------------------------------- the parallel path (parts + merge)


def test_part_ranges_cover_units_and_ignore_workers():
    for n in (1, 15, 16, 17, 33, 1200, 56880, 114480):
        r = P.part_ranges(n)
        assert r[0][0] == 0 and r[-1][1] == n and all(a < b and b == c for (a, b), (c, _) in zip(r, r[1:] + [(n, n)]))
        assert len(r) <= 32 or r[0][1] - r[0][0] == 2048
    assert len(P.part_ranges(1200)) == 8 and len(P.part_ranges(4800)) == 19 and len(P.part_ranges(10**5)) == 49
    assert P.part_ranges(20) == [(0, 16), (16, 20)]


def _messy_input(syn_dir: Path, d: Path) -> None:
    """6 good + 3 bad files, then all 24 again in a sub-folder (6 of them repeat ids of the
    first 6): 33 units, 3 parts, duplicates across parts."""
    _bad_inputs(syn_dir, d)
    (d / "sub").mkdir()
    for f in sorted(syn_dir.glob("*.skeleton")):
        shutil.copy(f, d / "sub" / f.name)


def test_parallel_equals_single_on_messy_input(syn_dir: Path, tmp_path: Path):
    _messy_input(syn_dir, tmp_path / "in")
    one = P.prepare("ntu", str(tmp_path / "in"), str(tmp_path / "one"), PrepareOptions(), workers=1, progress=False, **SMALL)
    two = P.prepare("ntu", str(tmp_path / "in"), str(tmp_path / "two"), PrepareOptions(), workers=2, progress=False, **SMALL)
    assert one["num_samples"] == two["num_samples"] == NUM_FILES and one["num_skipped"] == two["num_skipped"] == 9
    assert one["input_bytes"] == two["input_bytes"]
    a, b = Store.open(one["out"]), Store.open(two["out"])
    assert_same_store(b, a)
    assert a.attrs["ingest"] == b.attrs["ingest"]
    rep = [sorted(json.dumps(json.loads(x), sort_keys=True) for x in Path(s["report"]).read_text().splitlines())
           for s in (one, two)]
    assert rep[0] == rep[1] and sum("duplicate sample_id" in r for r in rep[0]) == 6
    assert not (tmp_path / "two.parts").exists() and not (tmp_path / "two.partial").exists()


def test_parallel_strict_keeps_parts_then_resumes_with_other_workers(syn_dir: Path, reference: Store, tmp_path: Path):
    d = tmp_path / "in"
    d.mkdir()
    for f in sorted(syn_dir.glob("*.skeleton")):
        shutil.copy(f, d / f.name)
    bad = d / "S050C001P001R001A001.skeleton"  # sorts last: in the second part
    bad.write_text("3\n1\n")
    out = tmp_path / "out"
    with pytest.raises(BadInputError, match=r"S050C001P001R001A001\.skeleton"):
        P.prepare("ntu", str(d), str(out), PrepareOptions(), workers=2, strict=True, progress=False, **SMALL)
    assert not out.exists() and (tmp_path / "out.parts" / "part-00000" / "manifest.parquet").is_file()
    assert (tmp_path / "out.parts" / "part-00001.partial").is_dir()
    bad.unlink()  # a different input listing: the finished part refuses to be reused
    with pytest.raises(StoreError, match="another prepare"):
        P.prepare("ntu", str(d), str(out), PrepareOptions(), workers=1, progress=False, **SMALL)
    bad.write_text("3\n1\n")
    s = P.prepare("ntu", str(d), str(out), PrepareOptions(), workers=1, progress=False, **SMALL)  # parts exist: resumed
    assert s["units_resumed"] >= 16 and s["num_samples"] == NUM_FILES and s["num_skipped"] == 1
    assert_same_store(Store.open(out), reference)


_KILL_PARALLEL = _KILL_SCRIPT.replace("workers=1", "workers=2").replace(
    "P.process_unit = slow",
    "P.process_unit = slow\nimport multiprocessing as mp\n"
    "P._pool_context = lambda: mp.get_context('fork')  # workers inherit the slow-down")


def test_parallel_resume_after_sigkill(syn_dir: Path, reference: Store, tmp_path: Path):
    out = tmp_path / "st"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_PARALLEL, str(syn_dir), str(out)], start_new_session=True)
    first = tmp_path / "st.parts" / "part-00000.partial" / "_progress.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not first.exists():
        time.sleep(0.02)
    assert proc.poll() is None, "prepare finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the parent and its workers, as a node failure would
    proc.wait()
    assert not out.exists()
    s = P.prepare("ntu", str(syn_dir), str(out), PrepareOptions(), workers=2, progress=False, **SMALL)
    assert s["units_resumed"] > 0 and s["num_samples"] == NUM_FILES
    assert_same_store(Store.open(out), reference)


def test_parallel_prepare_into_memory_url_streams_to_the_parent(syn_dir: Path, reference: Store):
    """memory:// exists in one process only, so workers there cannot write parts of their own:
    the parent writes, and the store still equals one worker's."""
    url = f"memory://prep-{os.getpid()}-{time.time_ns()}/st"
    s = P.prepare("ntu", str(syn_dir), url, PrepareOptions(), workers=2, progress=False, **SMALL)
    m = Store.open(s["out"])
    assert m.manifest.equals(reference.manifest)
    np.testing.assert_array_equal(m.frames[:], reference.frames[:])


def test_progress_rate_is_blank_until_bytes_are_known() -> None:
    """Issue 30 papercut: a generic-format prepare showed "0.0 MB/s" (formats that report no input
    bytes); the bar now shows files/s alone until a byte count exists."""
    from mtscale.data.prepare import _rate

    assert _rate(0, 3.0) == ""
    assert _rate(2_000_000, 1.0) == "2.0 MB/s"
    assert _rate(5_000_000, 0.0).endswith("MB/s")  # no division by zero at the first tick
