"""Store writer/reader: round trips, fsspec URLs, select/where, atomic publish, resume commit
points, verify, schema refusal, merge."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from mtscale.data.manifest import build_manifest, checksum_bytes, concat_manifests
from mtscale.data.store import Store, format_info
from mtscale.data.store_merge import merge_stores
from mtscale.data.store_writer import StoreWriter, write_store
from mtscale.errors import ConfigError, StoreError

M, V, C = 2, 25, 3


def make_samples(n: int, seed: int = 0, prefix: str = "s", max_len: int = 90):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        T = int(rng.integers(3, max_len))
        x = rng.normal(size=(T, M, V, C)).astype(np.float32)
        if i % 3 == 0:
            x[:, 1] = 0  # one body only
        fields = {
            "camera": i % 3 + 1, "performer": i % 5, "setup": f"S{i % 2:03d}",
            "split_xsub": "train" if i % 4 else "test",
            "split_view": None if i % 7 == 0 else ("train" if i % 2 else "test"),
            "source_file": f"/raw/{prefix}{i}.skeleton",
        }
        out.append((f"{prefix}{i:04d}", x, i % 4, fields))
    return out


SMALL = dict(chunk_frames=32, shard_chunks=4)  # shard = 128 frames: many shards on small data


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_local(tmp_path: Path, dtype: str):
    samples = make_samples(40)
    s = write_store(tmp_path / "st", samples, layout="ntu25", num_bodies=M, dtype=dtype,
                    attrs={"format": "test", "class_names": ["a", "b", "c", "d"]}, **SMALL)
    assert s.num_samples == 40 and s.num_frames == sum(len(x) for _, x, _, _ in samples)
    assert s.frames.shape == (s.num_frames, M, V, C) and str(s.frames.dtype) == dtype
    assert s.num_classes == 4 and s.class_names == ["a", "b", "c", "d"] and s.attrs["format"] == "test"
    assert s.attrs["chunk_frames"] == 32 and s.attrs["shard_frames"] == 128
    for i, (sid, x, label, _fields) in enumerate(samples):
        got = s.read_sample(i)
        assert got.dtype == np.float32 and got.shape == x.shape
        if dtype == "float32":
            np.testing.assert_array_equal(got, x)
        else:
            np.testing.assert_allclose(got, x, rtol=1e-3, atol=1e-3)
            np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))
        assert s.manifest.column("sample_id")[i].as_py() == sid
        assert s.labels[i] == label
    m = s.manifest
    assert m.column("offset").to_pylist() == list(np.cumsum([0] + [len(x) for _, x, _, _ in samples])[:-1])
    assert m.column("num_bodies").to_pylist() == [1 if i % 3 == 0 else 2 for i in range(40)]
    assert m.column("camera").type.id == m.column("offset").type.id  # int64
    assert m.column("split_view")[0].as_py() is None
    assert m.column("source_file")[5].as_py() == "/raw/s5.skeleton"
    want = checksum_bytes(samples[7][1].astype(dtype))
    assert m.column("checksum")[7].as_py() == want
    # read_frames returns the raw dtype, across sample boundaries
    o = int(s.offsets[3])
    np.testing.assert_array_equal(s.read_frames(o, o + 5), samples[3][1][:5].astype(dtype))
    # sequential scan == per-sample reads, with blocks smaller than samples
    for i, x in s.iter_samples(block_frames=7):
        np.testing.assert_array_equal(x, samples[i][1].astype(dtype))
    assert s.verify(progress=False) == []
    assert not os.path.exists(str(tmp_path / "st") + ".partial")


def test_memory_url_and_atomic_publish():
    url = "memory://mtscale-tests/atomic"
    w = StoreWriter(url, layout="ntu25", num_bodies=M, **SMALL)
    for sid, x, label, f in make_samples(30):
        w.append(sid, x, label, f)
    # shards are on "disk" already, but without its manifest the store is not visible
    with pytest.raises(StoreError, match="missing manifest.parquet"):
        Store.open(url)
    s = w.close()
    assert Store.open(url).num_samples == 30 == s.num_samples
    assert s.verify(progress=False) == []
    with pytest.raises(StoreError, match="already exists"):
        StoreWriter(url, layout="ntu25", num_bodies=M)


def test_local_atomic_publish(tmp_path: Path):
    out = tmp_path / "st"
    w = StoreWriter(str(out), layout="ntu25", num_bodies=M, **SMALL)
    for sid, x, label, f in make_samples(20):
        w.append(sid, x, label, f)
    assert not out.exists() and (tmp_path / "st.partial").is_dir()
    with pytest.raises(StoreError, match=r"st\.partial"):
        Store.open(out)
    w.close()
    assert out.is_dir() and not (tmp_path / "st.partial").exists()
    assert not (out / "_progress.json").exists()


def test_select_split_part_where(tmp_path: Path):
    s = write_store(tmp_path / "st", make_samples(28), layout="ntu25", num_bodies=M, **SMALL)
    idx = np.arange(28)
    np.testing.assert_array_equal(s.select("xsub", "train"), idx[idx % 4 != 0])
    np.testing.assert_array_equal(s.select("xsub", "test"), idx[idx % 4 == 0])
    np.testing.assert_array_equal(s.select("view"), idx[idx % 7 != 0])  # any non-null
    np.testing.assert_array_equal(s.select(), idx)
    np.testing.assert_array_equal(s.select(where="camera in (1, 2) and performer >= 3"),
                                  idx[(idx % 3 + 1 <= 2) & (idx % 5 >= 3)])
    np.testing.assert_array_equal(s.select(where="not (camera == 1) or setup == 'S001'"),
                                  idx[(idx % 3 != 0) | (idx % 2 == 1)])
    np.testing.assert_array_equal(s.select(where="1 < camera <= 3"), idx[idx % 3 + 1 > 1])
    np.testing.assert_array_equal(s.select(where="split_view != 'train'"), idx[(idx % 7 != 0) & (idx % 2 == 0)])
    np.testing.assert_array_equal(s.select("xsub", "train", where="label not in [1, 2]"),
                                  idx[(idx % 4 != 0) & ~np.isin(idx % 4, [1, 2])])
    with pytest.raises(ConfigError, match=r"found 'nope', expected one of \['view', 'xsub'\]"):
        s.select("nope", "train")
    with pytest.raises(ConfigError, match=r"found part 'tain', expected one of \['test', 'train'\]"):
        s.select("xsub", "tain")
    with pytest.raises(ConfigError, match="unknown column 'camrea'"):
        s.select(where="camrea == 1")
    with pytest.raises(ConfigError, match="expected a literal"):
        s.select(where="camera == __import__('os').getpid()")
    with pytest.raises(ConfigError, match="syntax error"):
        s.select(where="camera ==")
    with pytest.raises(ConfigError, match="expected comparisons"):
        s.select(where="camera + 1")
    with pytest.raises(ConfigError, match="cannot compare"):
        s.select(where="setup > 3")


def test_writer_errors(tmp_path: Path):
    w = StoreWriter(str(tmp_path / "st"), layout="ntu25", num_bodies=M)
    x = np.zeros((5, M, V, C), np.float32)
    with pytest.raises(ValueError, match=r"expected \(T>=1, M<=2, 25, C\)"):
        w.append("a", np.zeros((5, 3, V, C)), 0, {})
    with pytest.raises(ValueError, match="reserved manifest column"):
        w.append("a", x, 0, {"offset": 3})
    with pytest.raises(ValueError, match="expected a scalar"):
        w.append("a", x, 0, {"camera": [1, 2]})
    with pytest.raises(ValueError, match="non-finite"):
        w.append("a", np.full((5, M, V, C), 1e6, np.float32), 0, {})  # overflows float16
    w.append("a", x[:, :1], 0, {})  # padded to M bodies
    with pytest.raises(StoreError, match="appended twice"):
        w.append("a", x, 0, {})
    s = w.close()
    assert s.read_sample(0).shape == (5, M, V, C) and s.manifest.column("num_bodies")[0].as_py() == 0


def _flip_bytes(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    k = int(len(data) * at)
    for j in range(k, k + 64):
        data[j] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_detects_corrupted_shard(tmp_path: Path):
    samples = make_samples(40)
    s = write_store(tmp_path / "st", samples, layout="ntu25", num_bodies=M, **SMALL)
    shards = sorted((tmp_path / "st" / "frames" / "c").rglob("*"))
    shards = [p for p in shards if p.is_file()]
    assert len(shards) == -(-s.num_frames // 128)
    _flip_bytes(shards[1], 0.3)
    problems = Store.open(tmp_path / "st").verify(progress=False)
    assert problems, "a corrupted shard must be reported"
    # the problems name rows whose frames lie in shard 1 (frames 128..255) only
    rows = {int(p.split(": row ")[1].split()[0]) for p in problems if ": row " in p}
    assert rows and all(s.offsets[r] < 256 and s.offsets[r] + s.lengths[r] > 128 for r in rows)


def test_verify_detects_wrong_checksum_and_manifest_problems(tmp_path: Path):
    s = write_store(tmp_path / "st", make_samples(10), layout="ntu25", num_bodies=M, **SMALL)
    t = s.manifest
    col = t.column("checksum").to_pylist()
    col[4] = "0" * 16
    import pyarrow as pa

    pq.write_table(t.set_column(t.column_names.index("checksum"), "checksum", pa.array(col)),
                   tmp_path / "st" / "manifest.parquet")
    problems = Store.open(tmp_path / "st").verify(progress=False)
    assert len(problems) == 1 and "row 4 (s0004)" in problems[0] and "expected 0000000000000000" in problems[0]
    # offsets beyond the frames array are refused at open
    off = t.column("length").to_pylist()
    off[-1] += 5
    pq.write_table(t.set_column(t.column_names.index("length"), "length", pa.array(off, pa.int32())),
                   tmp_path / "st" / "manifest.parquet")
    with pytest.raises(StoreError, match=r"end at frame \d+, expected \d+ \(frames array length\)"):
        Store.open(tmp_path / "st")
    ids = t.column("sample_id").to_pylist()
    ids[3] = ids[2]
    pq.write_table(t.set_column(0, "sample_id", pa.array(ids)), tmp_path / "st" / "manifest.parquet")
    with pytest.raises(StoreError, match="sample_id 's0002' occurs more than once"):
        Store.open(tmp_path / "st")
    (tmp_path / "st" / "manifest.parquet").unlink()
    with pytest.raises(StoreError, match="missing manifest.parquet"):
        Store.open(tmp_path / "st")


def test_unknown_schema_version_and_missing_store(tmp_path: Path):
    write_store(tmp_path / "st", make_samples(3), layout="ntu25", num_bodies=M)
    g = zarr.open_group(str(tmp_path / "st"), mode="r+")
    g.attrs["schema_version"] = 99
    with pytest.raises(StoreError, match=r"schema_version 99, expected 1"):
        Store.open(tmp_path / "st")
    with pytest.raises(StoreError, match="no store found"):
        Store.open(tmp_path / "nothing")


def test_resume_from_commit_point_is_byte_identical(tmp_path: Path):
    samples = make_samples(60, seed=3)
    key = {"job": "t"}
    # reference: uninterrupted
    ref = StoreWriter(str(tmp_path / "ref"), layout="ntu25", num_bodies=M, resume_key=key, **SMALL)
    for k, (sid, x, label, f) in enumerate(samples):
        ref.append(sid, x, label, f)
        ref.mark({"done": k + 1})
    ref = ref.close()
    # interrupted: abandon the writer after 35 samples (as if killed)
    w = StoreWriter(str(tmp_path / "st"), layout="ntu25", num_bodies=M, resume_key=key, **SMALL)
    for k, (sid, x, label, f) in enumerate(samples[:35]):
        w.append(sid, x, label, f)
        w.mark({"done": k + 1})
        if k == 10:
            w.add_report({"file": "bad.skeleton", "line": 3, "message": "boom"})
    assert w.num_commits >= 2
    progress = json.loads((tmp_path / "st.partial" / "_progress.json").read_text())
    done = progress["state"]["done"]
    assert 0 < done < 35 and progress["frames"] <= w._flushed
    with pytest.raises(StoreError, match=r"different arguments \(differs in \['job'\]\)"):
        StoreWriter(str(tmp_path / "st"), layout="ntu25", num_bodies=M, resume_key={"job": "other"}, **SMALL)
    w2 = StoreWriter(str(tmp_path / "st"), layout="ntu25", num_bodies=M, resume_key=key, **SMALL)
    assert w2.resumed == {"done": done} and w2.num_samples == done
    for k, (sid, x, label, f) in enumerate(samples[done:], start=done):
        w2.append(sid, x, label, f)
        w2.mark({"done": k + 1})
    s = w2.close()
    assert s.manifest.drop_columns([]).equals(ref.manifest)
    np.testing.assert_array_equal(s.frames[:], ref.frames[:])
    for a, b in zip(sorted((tmp_path / "st" / "frames").rglob("*")), sorted((tmp_path / "ref" / "frames").rglob("*"))):
        assert a.name == b.name and (a.is_dir() or a.read_bytes() == b.read_bytes())
    assert (tmp_path / "st" / "report.jsonl").read_text().count("\n") == 1
    assert s.verify(progress=False) == []


def test_merge(tmp_path: Path):
    a = make_samples(25, seed=1, prefix="a")
    b = make_samples(17, seed=2, prefix="b")
    sa = write_store(tmp_path / "a", a, layout="ntu25", num_bodies=M, attrs={"format": "t", "ingest": {"num_skipped": 1}},
                     **SMALL)
    write_store(tmp_path / "b", b, layout="ntu25", num_bodies=M, attrs={"format": "t", "ingest": {"num_skipped": 2}}, **SMALL)
    summary = merge_stores([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "m"), progress=False)
    assert summary["num_samples"] == 42
    m = Store.open(tmp_path / "m")
    assert m.num_frames == sum(len(x) for _, x, _, _ in a + b) and m.attrs["ingest"]["num_skipped"] == 3
    for i, (_sid, x, _label, _f) in enumerate(a + b):
        np.testing.assert_array_equal(m.read_sample(i), x.astype(np.float16).astype(np.float32))
    assert m.manifest.column("checksum").to_pylist()[25:] == Store.open(tmp_path / "b").manifest.column("checksum").to_pylist()
    assert m.manifest.column("camera").to_pylist() == [r[3]["camera"] for r in a + b]
    assert m.verify(progress=False) == []
    with pytest.raises(StoreError, match="sample_id 'a0000' also in"):
        merge_stores([str(tmp_path / "a"), str(tmp_path / "a")], str(tmp_path / "m2"), progress=False)
    write_store(tmp_path / "c", make_samples(3, prefix="c"), layout="ntu25", num_bodies=M, dtype="float32", attrs={"format": "t"})
    with pytest.raises(StoreError, match="attribute dtype is 'float32', expected 'float16'"):
        merge_stores([str(tmp_path / "a"), str(tmp_path / "c")], str(tmp_path / "m3"), progress=False)
    assert sa.num_samples == 25


def test_info_and_format(tmp_path: Path):
    s = write_store(tmp_path / "st", make_samples(12), layout="ntu25", num_bodies=M,
                    attrs={"class_names": ["w", "x", "y", "z"], "preprocessing": {"center": True}})
    info = s.info()
    assert info["num_samples"] == 12 and info["label_counts"] == {"0": 3, "1": 3, "2": 3, "3": 3}
    assert info["splits"]["xsub"] == {"test": 3, "train": 9}
    assert info["splits"]["view"]["null"] == 2 and info["bytes_on_disk"] > 0
    json.dumps(info)
    text = format_info(info)
    assert "split        xsub: test 3, train 9" in text and "z" in text.splitlines()[-1]


def test_store_pickles_by_url(tmp_path: Path):
    import pickle

    s = write_store(tmp_path / "st", make_samples(4), layout="ntu25", num_bodies=M)
    s2 = pickle.loads(pickle.dumps(s))
    np.testing.assert_array_equal(s2.read_sample(2), s.read_sample(2))


# ---------------------------------------------------------------- direct chunk reads


def _ranges(n: int, rng: np.random.Generator, k: int = 40) -> list[tuple[int, int]]:
    out = [(0, n), (0, 1), (n - 1, n), (31, 33), (127, 129), (96, 300), (0, 0), (n - 5, n + 10)]
    for _ in range(k):
        a = int(rng.integers(0, n))
        out.append((a, a + int(rng.integers(1, 400))))
    return out


def _assert_same_as_zarr(s: Store, rng: np.random.Generator) -> None:
    assert s.direct_reader is not None
    for a, b in _ranges(s.num_frames, rng):
        got = s.read_frames(a, b)
        want = s.frames[a:b]  # zarr's own read
        assert got.dtype == want.dtype and got.shape == want.shape, (a, b)
        assert got.tobytes() == want.tobytes(), (a, b)  # byte-identical
        out = np.full(want.shape, 7, dtype=want.dtype)
        assert s.read_frames(a, b, out=out) is out and out.tobytes() == want.tobytes()


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_direct_reads_are_byte_identical_to_zarr(tmp_path: Path, dtype: str):
    samples = make_samples(40, seed=3)
    # an all-zero run of > 1 chunk: zarr does not store all-fill chunks (read as fill value)
    samples[10] = (samples[10][0], np.zeros((100, M, V, C), np.float32), 0, samples[10][3])
    s = write_store(tmp_path / "st", samples, layout="ntu25", num_bodies=M, dtype=dtype, **SMALL)
    r = s.direct_reader
    assert r.cname == "lz4" and r.index_crc and r.chunk_rows == 32 and r.chunks_per_shard == 4
    idx = r.shard_index(0)
    assert idx.shape == (4, 2) and idx.dtype == np.dtype("<u8")
    _assert_same_as_zarr(s, np.random.default_rng(0))
    s.direct_reads = False
    np.testing.assert_array_equal(s.read_frames(5, 77), Store.open(s.url).read_frames(5, 77))


def test_direct_reads_memory_url_and_old_zstd_codec(monkeypatch):
    from zarr.codecs import BloscCodec

    import mtscale.data.store_writer as sw

    monkeypatch.setattr(sw, "_codec", lambda: BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"))
    s = write_store("memory://mtscale-tests/direct-zstd", make_samples(30, seed=5), layout="ntu25",
                    num_bodies=M, **SMALL)
    assert s.direct_reader.cname == "zstd"
    _assert_same_as_zarr(s, np.random.default_rng(1))


def test_unsupported_codec_chain_falls_back_to_zarr(tmp_path: Path, monkeypatch):
    from zarr.codecs import ZstdCodec

    import mtscale.data.store_writer as sw

    monkeypatch.setattr(sw, "_codec", lambda: ZstdCodec(level=1))
    samples = make_samples(20, seed=6)
    s = write_store(tmp_path / "st", samples, layout="ntu25", num_bodies=M, **SMALL)
    assert s.direct_reader is None  # not a chain the direct reader implements
    o = int(s.offsets[4])
    np.testing.assert_array_equal(s.read_frames(o, o + 3), samples[4][1][:3].astype(np.float16))


def test_direct_read_of_damaged_shard_index_is_a_store_error(tmp_path: Path):
    s = write_store(tmp_path / "st", make_samples(30, seed=7), layout="ntu25", num_bodies=M, **SMALL)
    shard = tmp_path / "st" / "frames" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the index, before its crc32c
    shard.write_bytes(bytes(data))
    s = Store.open(str(tmp_path / "st"))
    s.read_frames(0, 100)  # shard 0 is intact
    with pytest.raises(StoreError, match="checksum"):
        s.read_frames(130, 140)


def _row(i: int, **fields) -> dict:
    return {"sample_id": f"s{i}", "offset": 10 * i, "length": 10, "label": i % 3, "source_file": None,
            "num_bodies": 1, "checksum": "0" * 32, **fields}


def test_concat_manifests_types_like_one_build() -> None:
    """Parts typed on their own (int vs float, a column absent, an all-null split) concatenate to
    exactly the table build_manifest gives for all rows at once."""
    parts = [
        [_row(0, score=1, view=2), _row(1, score=2)],
        [_row(2, score=0.5, split_x="train"), _row(3, note="a")],
        [_row(4, view=None, split_x=None)],
    ]
    whole = build_manifest([r for p in parts for r in p])
    got = concat_manifests([build_manifest(p) for p in parts])
    assert got.schema == whole.schema
    assert got.to_pylist() == whole.to_pylist()
    assert got.schema.field("score").type == whole.schema.field("score").type  # float64 across parts


def test_multi_shard_manifest_matches_rows(tmp_path: Path) -> None:
    """Rows sealed per shard: the published manifest has every sample, in order, with its fields."""
    rng = np.random.default_rng(0)
    samples = [(f"id{i}", rng.standard_normal((int(rng.integers(3, 9)), 1, 25, 3)).astype(np.float32), i % 4,
                {"source_file": f"f{i}", "extra": i if i < 20 else float(i)}) for i in range(60)]
    st = write_store(str(tmp_path / "s"), samples, layout="ntu25", num_bodies=1, chunk_frames=8, shard_chunks=2)
    m = st.manifest
    assert m.column("sample_id").to_pylist() == [s[0] for s in samples]
    assert m.column("extra").to_pylist() == [float(i) for i in range(60)]
    assert m.column("label").to_pylist() == [i % 4 for i in range(60)]
    assert st.attrs["num_classes"] == 4
    lengths = m.column("length").to_pylist()
    assert m.column("offset").to_pylist() == list(np.cumsum([0] + lengths[:-1]))
