"""Writing a store: samples are appended in order, frames buffered up to one shard and written
shard-aligned, the manifest written at the end, the whole published atomically.

Resumable writes: given a ``resume_key`` (a JSON dict naming the job), the writer persists a
commit point after each shard written: the manifest rows, the skip report and the caller's
``state`` as of the last ``mark(state)`` whose samples are all on disk. A writer created again
with the same key over an unfinished ``URL.partial`` truncates to that point and hands the
caller its ``state`` back (``writer.resumed``), so the job continues there.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import functools
import json
import logging
import os
import sys
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr
from zarr.codecs import BloscCodec

import mtscale
from mtscale.data.layouts import get_layout
from mtscale.data.manifest import build_manifest, checksum_bytes, clean_fields, concat_manifests, count_bodies
from mtscale.data.store import (
    FRAMES,
    MANIFEST,
    REPORT,
    SCHEMA_VERSION,
    Store,
    is_local,
    join,
    store_exists,
    url_to_fs,
    zarr_store,
)
from mtscale.errors import StoreError
from mtscale.files import atomic_write

log = logging.getLogger(__name__)

PROGRESS = "_progress.json"
PROGRESS_DIR = "_progress"
COMPRESSOR = "blosc-lz4-9-shuffle"
"""Decodes ~6x faster than blosc-zstd-3 (the loader's bottleneck) for a ~13 % larger store
(benchmarks/README.md, loader section). Stores written with zstd stay readable."""


def _codec() -> BloscCodec:
    return BloscCodec(cname="lz4", clevel=9, shuffle="shuffle")


class StoreWriter:
    """Appends samples to a new store at ``url``; ``close()`` publishes it and returns it opened.

    ``x_TMVC`` arrays are cast to ``dtype`` and zero-padded to ``num_bodies`` bodies;
    ``compress=False`` writes raw chunks (scratch stores that are read once, like the parts of a
    parallel ``prepare``: no encode there, no decode in the merge). Memory
    holds at most one shard of frames (``chunk_frames * shard_chunks``), the manifest rows of
    that shard as dicts, the earlier ones as compact pyarrow parts, and the set of sample ids.
    """

    def __init__(self, url: str, *, layout: str, num_bodies: int, dtype: str = "float16",
                 attrs: dict | None = None, chunk_frames: int = 4096, shard_chunks: int = 16,
                 resume_key: dict | None = None, compress: bool = True):
        if dtype not in ("float16", "float32"):
            raise ValueError(f"dtype: found {dtype!r}, expected 'float16' or 'float32'")
        if chunk_frames < 1 or shard_chunks < 1 or num_bodies < 1:
            raise ValueError("chunk_frames, shard_chunks and num_bodies must be >= 1")
        self.url = str(url).rstrip("/")
        self.layout = get_layout(layout)
        self.num_bodies, self.dtype = int(num_bodies), np.dtype(dtype)
        self.chunk_frames, self.shard_frames = int(chunk_frames), int(chunk_frames) * int(shard_chunks)
        self.resume_key = json.loads(json.dumps(resume_key)) if resume_key is not None else None
        self.compress = bool(compress)
        self.resumed: dict | None = None
        """The caller's state at the commit point resumed from (None: a fresh start)."""
        self.attrs: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION, "layout": self.layout.name, "num_bodies": self.num_bodies,
            "dtype": dtype, "units": "m", "format": None, "preprocessing": None, "class_names": None,
            "num_classes": None, "chunk_frames": self.chunk_frames, "shard_frames": self.shard_frames,
            "compressor": COMPRESSOR if compress else "none", "mtscale_version": mtscale.__version__,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        self.attrs.update(attrs or {})
        self._fs, path = url_to_fs(self.url)
        self._local = is_local(self._fs)
        self._path = path
        self._work_path = path + ".partial" if self._local else path
        self.work_url = self.url + ".partial" if self._local else self.url
        refuse_existing(self.url)
        self._rows: list[dict[str, Any]] = []  # manifest rows not yet sealed into a part
        self._parts: list[Any] = []  # sealed manifest rows, one pyarrow table per shard written
        self._sealed = 0  # rows in self._parts
        self._max_label = -1
        self._ids: set[str] = set()
        self._report: list[dict[str, Any]] = []
        self._buf: np.ndarray | None = None  # frames not yet written: one reused shard-sized array
        self._buf_frames = 0
        self._num_frames = 0  # appended
        self._flushed = 0  # on disk, shard-aligned until close
        self._marks: list[tuple[int, int, int, dict]] = []  # (rows, frames, report, state)
        self._committed: tuple[int, int] = (0, 0)  # (rows, parts)
        self.num_commits = 0
        self._frames: zarr.Array | None = None
        self._closed = False
        if not (self._fs.exists(self._work_path) and self._try_resume()):
            self._start()

    # -- setup

    def _start(self) -> None:
        if self._fs.exists(self._work_path):
            if not self._local and not self._fs.exists(join(self._work_path, "zarr.json")) and self._fs.ls(self._work_path):
                raise StoreError(f"{self.url}: exists and is not an mtscale store, expected a new path")
            self._fs.rm(self._work_path, recursive=True)
        self._group = zarr.open_group(zarr_store(self.work_url, read_only=False), mode="w", attributes=self.attrs)

    def _try_resume(self) -> bool:
        ppath = join(self._work_path, PROGRESS)
        if self.resume_key is None or not self._fs.exists(ppath):
            return False
        progress = json.loads(self._fs.cat_file(ppath))
        if progress.get("key") != self.resume_key:
            old = progress.get("key") or {}
            diff = sorted(k for k in set(old) | set(self.resume_key) if old.get(k) != self.resume_key.get(k))
            raise StoreError(f"{self.work_url}: unfinished prepare with different arguments (differs in {diff}), "
                             f"expected the same arguments to resume; delete {self.work_url} to start over")
        self._group = zarr.open_group(zarr_store(self.work_url, read_only=False), mode="r+")
        self.attrs = dict(self._group.attrs)
        parts = [pq.read_table(join(self._work_path, f"{PROGRESS_DIR}/rows-{part:05d}.parquet"), filesystem=self._fs)
                 for part in range(progress["parts"])]
        n_rows, n_frames = progress["rows"], progress["frames"]
        n_saved = sum(t.num_rows for t in parts)
        tail_part = next((t for t in reversed(parts) if t.num_rows), None)
        last = tail_part.slice(tail_part.num_rows - 1).to_pylist()[0] if tail_part is not None else None
        if n_saved != n_rows or (last and last["offset"] + last["length"] != n_frames):
            raise StoreError(f"{self.work_url}/{PROGRESS}: {n_saved} rows saved, expected {n_rows}; "
                             f"delete {self.work_url} to start over")
        self._parts, self._sealed = parts, n_rows
        self._ids = {sid for t in parts for sid in t.column("sample_id").to_pylist()}
        self._max_label = max((pc.max(t.column("label")).as_py() for t in parts if t.num_rows), default=-1)
        self._report = list(progress["report"])
        aligned = n_frames // self.shard_frames * self.shard_frames
        if FRAMES in self._group:
            self._frames = self._group[FRAMES]
            tail = np.asarray(self._frames[aligned:n_frames])
            shape = self._frames.shape
            self._frames.resize((aligned, *shape[1:]))
            self._buf_frames = 0
            if len(tail):
                self._buffer(tail)
        self._num_frames, self._flushed = n_frames, aligned
        self._committed = (n_rows, progress["parts"])
        self.num_commits = progress["parts"]
        self.resumed = progress["state"]
        self._marks = [(n_rows, n_frames, len(self._report), self.resumed)]
        log.info("resuming %s: %d samples, %d frames already written", self.work_url, n_rows, n_frames)
        return True

    # -- appending

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._ids

    @property
    def num_samples(self) -> int:
        return self._sealed + len(self._rows)

    @property
    def num_frames(self) -> int:
        return self._num_frames

    def append(self, sample_id: str, x_TMVC: np.ndarray, label: int, fields: dict,
               checksum: str | None = None, num_bodies: int | None = None) -> None:
        """Add one sample (T, M<=num_bodies, V, C). ``fields`` are scalar manifest columns
        (``source_file`` and ``split_<name>`` included). ``checksum`` may be precomputed by
        ``manifest.checksum_bytes`` on the array exactly as stored (cast and padded), and with
        it ``num_bodies`` (its non-zero bodies): the array is then taken as already checked
        (finite, stored dtype), as when copying from another store."""
        if self._closed:
            raise RuntimeError("append after close")
        x = np.asarray(x_TMVC)
        sample_id = str(sample_id)
        V = self.layout.num_joints
        if x.ndim != 4 or x.shape[0] < 1 or x.shape[2] != V or x.shape[1] > self.num_bodies:
            raise ValueError(f"sample {sample_id!r}: x_TMVC shape {x.shape}, expected (T>=1, M<={self.num_bodies}, {V}, C)")
        if self._frames is not None and x.shape[3] != self._frames.shape[3]:
            raise ValueError(f"sample {sample_id!r}: {x.shape[3]} coordinates, "
                             f"expected {self._frames.shape[3]} like the samples before")
        if self._buf is not None and x.shape[3] != self._buf.shape[3]:
            raise ValueError(f"sample {sample_id!r}: {x.shape[3]} coordinates, "
                             f"expected {self._buf.shape[3]} like the samples before")
        if sample_id in self._ids:
            raise StoreError(f"sample_id {sample_id!r}: appended twice, expected unique sample ids")
        if x.shape[1] < self.num_bodies:
            pad = np.zeros((x.shape[0], self.num_bodies - x.shape[1], *x.shape[2:]), dtype=x.dtype)
            x, checksum = np.concatenate([x, pad], axis=1), None
        if x.dtype != self.dtype or not x.flags.c_contiguous:
            with np.errstate(over="ignore"):  # overflow shows up as inf, refused just below
                x, checksum = np.ascontiguousarray(x, dtype=self.dtype), None
        if checksum is None or num_bodies is None:
            if not np.isfinite(x).all():
                raise ValueError(f"sample {sample_id!r}: non-finite values as {self.dtype}, expected finite coordinates")
            num_bodies = count_bodies(x)
        fields = clean_fields(fields)
        row = {"sample_id": sample_id, "offset": self._num_frames, "length": int(x.shape[0]), "label": int(label),
               "source_file": fields.pop("source_file", None), "num_bodies": int(num_bodies),
               "checksum": checksum or checksum_bytes(x), **fields}
        self._rows.append(row)
        self._ids.add(sample_id)
        self._max_label = max(self._max_label, row["label"])
        self._buffer(x)
        self._num_frames += len(x)
        if self._buf_frames >= self.shard_frames:
            self._flush(final=False)

    def add_report(self, record: dict[str, Any]) -> None:
        """Record a skipped input (e.g. {"file", "line", "message"}); saved as report.jsonl."""
        self._report.append(dict(record))

    def mark(self, state: dict[str, Any]) -> None:
        """Declare a commit point: everything appended so far plus the caller's JSON ``state``.
        It is persisted once its frames are on disk (at the next shard written)."""
        if self.resume_key is not None:
            self._marks.append((self.num_samples, self._num_frames, len(self._report), json.loads(json.dumps(state))))

    # -- writing

    def _buffer(self, x: np.ndarray) -> None:
        """Copy frames into the shard buffer (allocated once: no list of arrays to concatenate)."""
        need = self._buf_frames + len(x)
        if self._buf is None or need > len(self._buf):
            grown = np.empty((max(need, self.shard_frames + self.chunk_frames), *x.shape[1:]), dtype=self.dtype)
            if self._buf_frames:
                grown[: self._buf_frames] = self._buf[: self._buf_frames]
            self._buf = grown
        self._buf[self._buf_frames : need] = x
        self._buf_frames = need

    def _ensure_array(self, num_coords: int) -> zarr.Array:
        if self._frames is None:
            M, V = self.num_bodies, self.layout.num_joints
            self._frames = self._group.create_array(
                FRAMES, shape=(0, M, V, num_coords), dtype=self.dtype,
                chunks=(self.chunk_frames, M, V, num_coords), shards=(self.shard_frames, M, V, num_coords),
                compressors=_codec() if self.compress else None, fill_value=0, dimension_names=("T", "M", "V", "C"),
            )
        return self._frames

    def _flush(self, final: bool) -> None:
        if not self._buf_frames:
            return
        cat = self._buf[: self._buf_frames]
        n = len(cat) if final else len(cat) // self.shard_frames * self.shard_frames
        if n == 0:
            return
        arr = self._ensure_array(cat.shape[3])
        arr.resize((self._flushed + n, *arr.shape[1:]))
        arr[self._flushed : self._flushed + n] = cat[:n]
        self._flushed += n
        rest = len(cat) - n
        if rest:
            self._buf[:rest] = cat[n:].copy()  # the start of the next shard
        self._buf_frames = rest
        del cat
        release_free_memory()
        if not final and self.resume_key is not None:
            self._commit()
        elif not final:  # no commit points: seal every row so far
            self._seal(self.num_samples)

    def _commit(self) -> None:
        done = [m for m in self._marks if m[1] <= self._flushed]
        if not done:
            return
        rows, frames, nrep, state = done[-1]
        self._marks = self._marks[len(done) - 1 :]
        prev_rows, parts = self._committed
        self._write_bytes(join(self._work_path, f"{PROGRESS_DIR}/rows-{parts:05d}.parquet"),
                          parquet_bytes(self._seal(rows)))
        progress = {"key": self.resume_key, "rows": rows, "frames": frames, "parts": parts + 1,
                    "report": self._report[:nrep], "state": state}
        self._write_bytes(join(self._work_path, PROGRESS), json.dumps(progress).encode())
        self._committed = (rows, parts + 1)
        self.num_commits += 1

    def _seal(self, upto: int):
        """Move the rows before row number ``upto`` from dicts into a pyarrow part (~20x smaller
        than the dicts, so memory does not grow with the number of samples); returns the part."""
        k = upto - self._sealed
        table = build_manifest(self._rows[:k])
        del self._rows[:k]
        self._parts.append(table)
        self._sealed = upto
        return table

    def _write_bytes(self, path: str, data: bytes) -> None:
        """Write a small file atomically (temp + rename on local disks)."""
        if self._local:
            atomic_write(path, data)
        else:
            self._fs.pipe_file(path, data)

    def discard(self) -> None:
        """Delete the unfinished store (nothing of it stays visible)."""
        if self._fs.exists(self._work_path):
            self._fs.rm(self._work_path, recursive=True)
        self._closed = True

    def close(self) -> Store:
        """Flush, write attrs, report and manifest, publish ``url``; returns the opened store."""
        if self._closed:
            raise RuntimeError("close called twice")
        self._flush(final=True)
        self._ensure_array(int(self.attrs.get("num_coords", 3)))
        if self.attrs.get("num_classes") is None:
            # Classes are those the data uses (0 .. max label): an NTU-60 store has 60, a
            # synthetic store with K actions K, although the NTU reader knows 120 names
            # (``class_names`` keeps the format's whole list, so parts of a dataset merge).
            self.attrs["num_classes"] = self._max_label + 1
        self._group.attrs.update(self.attrs)
        if self._report:
            self._write_bytes(join(self._work_path, REPORT), "".join(json.dumps(r) + "\n" for r in self._report).encode())
        if self._rows:
            self._seal(self.num_samples)
        self._write_bytes(join(self._work_path, MANIFEST), parquet_bytes(concat_manifests(self._parts)))
        for p in (join(self._work_path, PROGRESS), join(self._work_path, PROGRESS_DIR)):
            if self._fs.exists(p):
                self._fs.rm(p, recursive=True)
        if self._local:
            os.rename(self._work_path, self._path)
        self._closed = True
        log.info("wrote %s: %d samples, %d frames", self.url, self.num_samples, self._num_frames)
        return Store.open(self.url)


def refuse_existing(url: str) -> None:
    """A writer never overwrites: error if ``url`` exists (locally: anything; remote: a store)."""
    fs, path = url_to_fs(url)
    if fs.exists(path) if is_local(fs) else store_exists(url):
        raise StoreError(f"{url}: already exists, expected a new path (delete it or choose another output)")


def duplicate_record(sample_id: str, file: str | None, where: Any) -> dict[str, Any]:
    """The skip-report record of a sample whose id was already written (``where``: the unit
    that brought it again)."""
    return {"file": file, "line": None, "index": None,
            "message": f"{where}: sample_id {sample_id!r} already ingested from another unit, expected unique ids",
            "found": f"duplicate sample_id {sample_id!r}", "expected": "unique ids", "num_records": 1}


def skipped_records(report: list[dict[str, Any]]) -> int:
    """Records a skip report stands for: one per entry, but an entry for a unit that failed as
    a whole counts its records (``num_records``)."""
    return sum(int(r.get("num_records", 1)) for r in report)


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    After a shard's ~20 MB buffers are freed, glibc keeps the pages, and with its mmap
    threshold raised by those frees later per-file arrays fragment the heap, so a long
    ``prepare`` grew by ~40 MB per 1,000 files. One call per shard written (~1,000 files) keeps
    the resident size flat for the cost of a few page faults."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def parquet_bytes(table) -> bytes:
    """A manifest table as the Parquet bytes every store holds (zstd)."""
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def write_store(url: str, samples: Iterable[tuple[str, np.ndarray, int, dict]], *, layout: str,
                num_bodies: int, dtype: str = "float16", attrs: dict | None = None, **kw: Any) -> Store:
    """Write ``(sample_id, x_TMVC, label, fields)`` tuples into a new store (tests, benchmarks)."""
    w = StoreWriter(url, layout=layout, num_bodies=num_bodies, dtype=dtype, attrs=attrs, **kw)
    for sample_id, x, label, fields in samples:
        w.append(sample_id, x, label, fields)
    return w.close()
