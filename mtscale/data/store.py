"""The on-disk dataset: one Zarr v3 group + a Parquet manifest. The only code (with its
``store_writer`` / ``store_merge`` helpers) that knows the layout on disk.

Layout of a store at ``URL`` (a local path or any fsspec URL: ``memory://``, ``s3://`` ...)::

    URL/zarr.json            group; attrs: schema_version, layout, num_bodies, dtype, units,
                             preprocessing, format, class_names, num_classes, chunk_frames,
                             shard_frames, compressor, mtscale_version, created, ingest
    URL/frames/              (num_frames, M, V, C) float16|float32, every sample's frames
                             concatenated along axis 0; sharding codec (shard = shard_frames
                             frames, the unit of writing; inner chunk = chunk_frames frames,
                             the unit of reading), blosc (lz4-9 by default; stores written before: zstd-3)
                             + byte shuffle per chunk; read directly by ``shard_reader``
    URL/manifest.parquet     one row per sample, sorted by offset (see ``manifest.py``)
    URL/report.jsonl         records skipped by prepare (file, line, index, message, ...), if any

Writers build ``URL.partial`` beside the target and rename it when complete (local disks); on
object stores, where renames are copies, they write in place and the manifest last: a store
without its manifest is incomplete and is refused.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from fsspec.implementations.local import LocalFileSystem
from tqdm.auto import tqdm

from mtscale.data.layouts import Layout, get_layout
from mtscale.data.manifest import FIXED_COLUMNS, evaluate_where, split_names, value_counts
from mtscale.data.shard_reader import DirectReader
from mtscale.errors import ConfigError, MtscaleError, StoreError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.parquet"
FRAMES = "frames"
REPORT = "report.jsonl"
REQUIRED_ATTRS = ("schema_version", "layout", "num_bodies", "dtype", "units", "chunk_frames", "shard_frames")


# ---------------------------------------------------------------- locations


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) of a local path or fsspec URL."""
    return fsspec.core.url_to_fs(str(url))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(url: str, name: str) -> str:
    return str(url).rstrip("/") + "/" + name


def zarr_store(url: str, read_only: bool) -> Any:
    """A zarr storage object for ``url`` (LocalStore for local paths, FsspecStore otherwise)."""
    fs, path = url_to_fs(url)
    if is_local(fs):
        return zarr.storage.LocalStore(path, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(str(url), read_only=read_only)


def store_exists(url: str) -> bool:
    """True where a complete store (its manifest) is at ``url``."""
    fs, path = url_to_fs(url)
    return fs.exists(join(path, MANIFEST))


# ---------------------------------------------------------------- reader


class Store:
    """A prepared dataset, opened read-only. Row ``i`` of ``manifest`` is sample ``i``.

    Frames of sample ``i`` are ``frames[offsets[i] : offsets[i] + lengths[i]]``, shaped
    (T, M, V, C). Read whole chunks (``chunk_frames`` frames) on hot paths, not one sample
    per call.
    """

    def __init__(self, url: str, group: zarr.Group, manifest: pa.Table):
        self.url = str(url)
        self.group = group
        self.attrs: dict[str, Any] = dict(group.attrs)
        self.manifest = manifest
        self.frames: zarr.Array = group[FRAMES]
        self.layout: Layout = get_layout(self.attrs["layout"])
        self.num_bodies = int(self.attrs["num_bodies"])
        self.num_samples = manifest.num_rows
        self.num_frames = int(self.frames.shape[0])
        self.chunk_frames = int(self.attrs["chunk_frames"])
        self.shard_frames = int(self.attrs["shard_frames"])
        self.offsets = manifest.column("offset").to_numpy().astype(np.int64)
        self.lengths = manifest.column("length").to_numpy().astype(np.int64)
        self.labels = manifest.column("label").to_numpy().astype(np.int64)
        n = self.attrs.get("num_classes")
        self.num_classes = int(n) if n is not None else int(self.labels.max(initial=-1) + 1)
        names = self.attrs.get("class_names")
        # attrs keep the format's whole list (NTU: 120); the store's classes are the first num_classes
        self.class_names: list[str] | None = list(names)[: self.num_classes] if names is not None else None
        self.direct_reads = True
        """``read_frames`` decodes shard chunks itself (``shard_reader``); False: through zarr."""
        self._direct: DirectReader | None | bool = False  # False: not built yet; None: unsupported

    # -- opening and validation

    @classmethod
    def open(cls, url: str) -> Store:
        """Open a complete store; a missing, incomplete or inconsistent one raises StoreError."""
        url = str(url)
        fs, path = url_to_fs(url)
        if not fs.exists(join(path, "zarr.json")):
            hint = ""
            if fs.exists(path + ".partial"):
                hint = f" (an unfinished prepare left {url}.partial: re-run the same prepare to resume it)"
            raise StoreError(f"{url}: no store found (missing zarr.json), expected a store written by 'mtscale prepare'{hint}")
        try:
            group = zarr.open_group(zarr_store(url, read_only=True), mode="r")
        except Exception as e:  # zarr raises several types for unreadable metadata
            raise StoreError(f"{url}/zarr.json: cannot open the zarr group ({type(e).__name__}: {e}), "
                             "expected Zarr v3 group metadata") from None
        attrs = dict(group.attrs)
        _check_attrs(url, attrs)
        if FRAMES not in group:
            raise StoreError(f"{url}: missing array {FRAMES!r}, expected the frames array (num_frames, M, V, C)")
        mpath = join(path, MANIFEST)
        if not fs.exists(mpath):
            raise StoreError(f"{url}: missing {MANIFEST}, "
                             "expected one (the store is incomplete: an interrupted prepare on an object store?)")
        try:
            manifest = pq.read_table(mpath, filesystem=fs)
        except Exception as e:
            raise StoreError(f"{url}/{MANIFEST}: cannot read the manifest ({type(e).__name__}: {e}), "
                             "expected a Parquet file") from None
        store = cls(url, group, manifest)
        problems = store._check_consistency(first_only=True)
        if problems:
            raise StoreError(problems[0])
        return store

    def __reduce__(self):  # picklable by URL (DataLoader workers reopen it)
        return (type(self).open, (self.url,))

    def _check_consistency(self, first_only: bool = False) -> list[str]:
        """Manifest vs frames array: columns, shapes, contiguous offsets, unique ids."""
        url, m, problems = self.url, self.manifest, []
        for col, typ in FIXED_COLUMNS.items():
            if col not in m.column_names:
                return [f"{url}/{MANIFEST}: missing column {col!r}, expected columns {list(FIXED_COLUMNS)}"]
            if m.schema.field(col).type != typ:
                return [f"{url}/{MANIFEST}: column {col!r} is {m.schema.field(col).type}, expected {typ}"]
        shape = tuple(self.frames.shape)
        want = (self.num_bodies, self.layout.num_joints)
        if len(shape) != 4 or shape[1:3] != want:
            return [f"{url}/{FRAMES}: shape {shape}, "
                    f"expected (num_frames, {want[0]}, {want[1]}, C) for layout {self.layout.name}"]
        if str(self.frames.dtype) != self.attrs["dtype"]:
            problems.append(f"{url}/{FRAMES}: dtype {self.frames.dtype}, expected {self.attrs['dtype']} (attrs)")
        ends = self.offsets + self.lengths
        starts = np.concatenate([[0], ends[:-1]]) if len(ends) else ends
        bad = np.flatnonzero((self.offsets != starts) | (self.lengths <= 0))
        if len(bad):
            i = int(bad[0])
            problems.append(f"{url}/{MANIFEST}: row {i} has offset {self.offsets[i]} length {self.lengths[i]}, "
                            f"expected offset {starts[i]} and length > 0 (rows contiguous, sorted by offset)")
        total = int(ends[-1]) if len(ends) else 0
        if total != self.num_frames:
            problems.append(f"{url}/{MANIFEST}: offsets + lengths end at frame {total}, "
                            f"expected {self.num_frames} (frames array length)")
        ids = m.column("sample_id")
        if ids.null_count or len(pa.compute.unique(ids)) != len(ids):
            dup = pa.compute.value_counts(ids).filter(pa.compute.greater(pa.compute.value_counts(ids).field("counts"), 1))
            found = dup[0]["values"].as_py() if len(dup) else None
            problems.append(f"{url}/{MANIFEST}: sample_id {found!r} occurs more than once, expected unique ids")
        return problems[:1] if first_only else problems

    # -- queries

    def select(self, split: str | None = None, part: str | None = None, where: str | None = None) -> np.ndarray:
        """Sorted row indices: rows with ``split_<split> == part`` (any non-null value where
        ``part`` is None) that also match ``where`` (see ``manifest.evaluate_where``)."""
        mask = np.ones(self.num_samples, dtype=bool)
        if split is not None:
            col = f"split_{split}"
            if col not in self.manifest.column_names:
                raise ConfigError(f"split: found {split!r}, expected one of {split_names(self.manifest)} ({self.url})")
            values = self.manifest.column(col)
            if part is None:
                mask &= ~np.asarray(values.is_null().to_numpy(zero_copy_only=False), dtype=bool)
            else:
                parts = [v for v in value_counts(values) if v != "null"]
                if part not in parts:
                    raise ConfigError(f"split {split!r}: found part {part!r}, expected one of {parts} ({self.url})")
                mask &= np.asarray(pa.compute.fill_null(pa.compute.equal(values, part), False).to_numpy(zero_copy_only=False),
                                   dtype=bool)
        elif part is not None:
            raise ConfigError(f"part {part!r} given without a split, expected split= as well")
        if where:
            mask &= evaluate_where(self.manifest, where)
        return np.flatnonzero(mask).astype(np.int64)

    @property
    def direct_reader(self) -> DirectReader | None:
        """The zarr-free chunk reader, or None where the array's codecs are not ones it
        implements (then zarr reads)."""
        if self._direct is False:
            fs, path = url_to_fs(self.url)
            self._direct = DirectReader.for_array(self.frames, fs, path, self.url, is_local(fs))
            if self._direct is None:
                log.info("%s: codec chain %s not read directly, reading through zarr", self.url, self.frames.metadata.codecs)
        return self._direct

    def read_frames(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Frames ``[start, stop)`` in the stored dtype, (stop - start, M, V, C), written
        into ``out`` (C-contiguous, that shape and dtype) when given.

        Decodes the shard's inner chunks directly (no zarr call per read, ~ decode time);
        falls back to zarr for codec chains the direct reader does not implement."""
        reader = self.direct_reader if self.direct_reads else None
        if reader is not None:
            return reader.read(start, stop, out)
        x = self.frames[start:stop]
        if out is None:
            return x
        out[...] = x
        return out

    def iter_samples(self, block_frames: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Sequential scan: ``(i, x_TMVC)`` for every sample in the stored dtype, reading
        ``block_frames`` (default: one shard) at a time."""
        step = block_frames or self.shard_frames
        carry: list[np.ndarray] = []
        i = 0
        for start in range(0, self.num_frames, step):
            block = self.read_frames(start, min(start + step, self.num_frames))
            pos = start
            while i < self.num_samples and pos < start + len(block):
                end = int(self.offsets[i] + self.lengths[i])
                piece = block[pos - start : min(end, start + len(block)) - start]
                pos += len(piece)
                if pos < end:
                    carry.append(piece)
                    break
                x = np.concatenate(carry + [piece]) if carry else piece.copy()
                carry = []
                yield i, x
                i += 1

    def read_sample(self, i: int) -> np.ndarray:
        """Sample ``i`` as float32 (T, M, V, C)."""
        o = int(self.offsets[i])
        return np.asarray(self.read_frames(o, o + int(self.lengths[i])), dtype=np.float32)

    # -- summaries and checks

    def info(self) -> dict[str, Any]:
        """Plain-JSON summary of the store (see ``format_info``)."""
        fs, path = url_to_fs(self.url)
        try:
            nbytes = int(fs.du(path))
        except Exception:  # some filesystems cannot list sizes
            nbytes = None
        a = self.attrs
        labels, counts = np.unique(self.labels, return_counts=True)
        return {
            "url": self.url, "schema_version": a["schema_version"], "format": a.get("format"),
            "layout": self.layout.name, "num_bodies": self.num_bodies, "num_joints": self.layout.num_joints,
            "num_coords": int(self.frames.shape[3]), "dtype": a["dtype"], "units": a["units"],
            "num_samples": self.num_samples, "num_frames": self.num_frames, "bytes_on_disk": nbytes,
            "chunk_frames": self.chunk_frames, "shard_frames": self.shard_frames,
            "compressor": a.get("compressor"), "num_classes": self.num_classes, "class_names": self.class_names,
            "label_counts": {str(int(k)): int(n) for k, n in zip(labels, counts)},
            "splits": {s: value_counts(self.manifest.column(f"split_{s}")) for s in split_names(self.manifest)},
            "columns": self.manifest.column_names, "preprocessing": a.get("preprocessing"),
            "ingest": a.get("ingest"), "mtscale_version": a.get("mtscale_version"), "created": a.get("created"),
        }

    def verify(self, progress: bool = True) -> list[str]:
        """Re-check attrs, manifest vs frames, and every sample's checksum (reading chunk by
        chunk). Returns the problems found, one line each (empty: the store is sound)."""
        problems: list[str] = []
        try:
            _check_attrs(self.url, self.attrs)
        except StoreError as e:
            problems.append(str(e))
        problems += self._check_consistency()
        if problems:
            return problems
        checks = self.manifest.column("checksum").to_pylist()
        ids = self.manifest.column("sample_id").to_pylist()
        step = self.chunk_frames
        i = 0  # next sample to finish
        h = hashlib.blake2b(digest_size=8)
        bad_block: str | None = None
        bar = tqdm(total=self.num_frames, unit="frame", unit_scale=True, desc="verify", disable=not progress)
        for start in range(0, self.num_frames, step):
            stop = min(start + step, self.num_frames)
            try:
                block = np.ascontiguousarray(self.frames[start:stop])
            except Exception as e:  # a damaged shard fails to decode
                block = None
                problems.append(f"{self.url}/{FRAMES}[{start}:{stop}]: cannot decode ({type(e).__name__}: {e}), "
                                "expected a readable chunk")
                bad_block = f"frames[{start}:{stop}] unreadable"
            pos = start
            while i < self.num_samples and pos < stop:
                end = int(self.offsets[i] + self.lengths[i])
                take = min(end, stop) - pos
                if block is not None:
                    h.update(block[pos - start : pos - start + take].data)
                pos += take
                if pos == end:
                    digest = h.hexdigest()
                    if bad_block:
                        problems.append(f"{self.url}/{MANIFEST}: row {i} ({ids[i]}): {bad_block}, expected checksum {checks[i]}")
                    elif digest != checks[i]:
                        problems.append(f"{self.url}/{MANIFEST}: row {i} ({ids[i]}): frames checksum {digest}, "
                                        f"expected {checks[i]}")
                    h, bad_block, i = hashlib.blake2b(digest_size=8), None, i + 1
            bar.update(stop - start)
        bar.close()
        return problems


def _check_attrs(url: str, attrs: dict[str, Any]) -> None:
    v = attrs.get("schema_version")
    if v is None:
        raise StoreError(f"{url}/zarr.json: no schema_version attribute, expected {SCHEMA_VERSION} (not an mtscale store?)")
    if v != SCHEMA_VERSION:
        raise StoreError(f"{url}/zarr.json: schema_version {v!r}, "
                         f"expected {SCHEMA_VERSION} (written by another mtscale version?)")
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise StoreError(f"{url}/zarr.json: missing attributes {missing}, expected {list(REQUIRED_ATTRS)}")
    try:
        get_layout(attrs["layout"])
    except MtscaleError:
        raise StoreError(f"{url}/zarr.json: layout {attrs['layout']!r} unknown to this mtscale version") from None
    if attrs["dtype"] not in ("float16", "float32"):
        raise StoreError(f"{url}/zarr.json: dtype {attrs['dtype']!r}, expected float16 or float32")


def format_info(info: dict[str, Any]) -> str:
    """Readable text block of ``Store.info()``."""
    names = info.get("class_names") or []
    lines = [
        f"store        {info['url']}",
        f"samples      {info['num_samples']}  frames {info['num_frames']}  "
        f"(mean {info['num_frames'] / max(info['num_samples'], 1):.1f} frames/sample)",
        f"layout       {info['layout']} (V={info['num_joints']}, M={info['num_bodies']}, C={info['num_coords']}), "
        f"{info['dtype']}, units {info['units']}",
        f"format       {info.get('format')}   schema v{info['schema_version']}   mtscale {info.get('mtscale_version')}",
        f"on disk      {_human(info.get('bytes_on_disk'))}  chunk {info['chunk_frames']} frames, "
        f"shard {info['shard_frames']} frames, {info.get('compressor')}",
        f"created      {info.get('created')}",
    ]
    if info.get("preprocessing"):
        lines.append("preprocess   " + ", ".join(f"{k}={v}" for k, v in info["preprocessing"].items()))
    if info.get("ingest"):
        lines.append("ingest       " + ", ".join(f"{k}={v}" for k, v in info["ingest"].items()))
    for split, counts in info["splits"].items():
        lines.append(f"split        {split}: " + ", ".join(f"{k} {n}" for k, n in counts.items()))
    lines.append(f"classes      {info['num_classes']}")
    for k, n in info["label_counts"].items():
        li = int(k)
        name = names[li] if 0 <= li < len(names) else ("(unlabelled)" if li < 0 else "")
        lines.append(f"  {li:>4}  {n:>8}  {name}")
    return "\n".join(lines)


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


__all__ = ["Store", "format_info", "SCHEMA_VERSION"]
