"""Joining stores prepared in parts (array jobs, or a parallel ``prepare``'s workers) into one
store, shard by shard."""

from __future__ import annotations

import json
import logging
from typing import Any

from tqdm.auto import tqdm

from mtscale.data.store import REPORT, Store, join, url_to_fs
from mtscale.data.store_writer import StoreWriter
from mtscale.errors import StoreError

log = logging.getLogger(__name__)

_SAME_ATTRS = ("layout", "num_bodies", "dtype", "units", "preprocessing", "format", "class_names")
_DERIVED = ("sample_id", "offset", "length", "label", "checksum", "num_bodies")


class Merger:
    """Appends whole stores, in order, to a new store ``out`` (one ``StoreWriter``): the result
    is byte-identical to writing the same samples in one writer. Parts may be added as they
    become ready (``prepare`` merges part k while its workers ingest later parts).

    Layout, bodies, dtype, units, preprocessing, format and class names must agree. A sample id
    seen before is an error, or with ``skip_duplicates`` a skip-report record (what ``prepare``
    does within one store). Offsets are rebased, checksums and body counts taken from the part
    manifests (parts are stores we wrote: values are not re-validated), reports concatenated.
    Memory: one shard of frames.
    """

    def __init__(self, out: str, *, skip_duplicates: bool = False, ingest: dict[str, Any] | None = None,
                 progress: bool = False):
        self.out, self.skip_duplicates, self.ingest = out, skip_duplicates, ingest
        self.writer: StoreWriter | None = None
        self.first: Store | None = None
        self.urls: list[str] = []
        self._seen: dict[str, str] = {}
        self._old_ingest: list[dict] = []
        self._bar = tqdm(unit="frame", unit_scale=True, desc="merge", disable=not progress)

    def _check(self, s: Store) -> None:
        first = self.first
        for k in _SAME_ATTRS:
            if s.attrs.get(k) != first.attrs.get(k):
                raise StoreError(f"{s.url}: attribute {k} is {s.attrs.get(k)!r}, expected {first.attrs.get(k)!r} as in {first.url}")
        if s.num_frames and first.num_frames and s.frames.shape[3] != first.frames.shape[3]:
            raise StoreError(f"{s.url}: {s.frames.shape[3]} coordinates, expected {first.frames.shape[3]} as in {first.url}")

    def add(self, url: str) -> None:
        s = Store.open(url)
        if self.first is None:
            self.first = s
            attrs = {k: s.attrs.get(k) for k in _SAME_ATTRS}
            self.writer = StoreWriter(self.out, layout=s.layout.name, num_bodies=s.num_bodies, dtype=s.attrs["dtype"],
                                      attrs=attrs, chunk_frames=s.chunk_frames,
                                      shard_chunks=max(1, s.shard_frames // s.chunk_frames))
        self._check(s)
        w = self.writer
        rows = s.manifest.to_pylist()
        for r in rows:
            sid = r["sample_id"]
            if sid in self._seen and not self.skip_duplicates:
                raise StoreError(f"{s.url}: sample_id {sid!r} also in {self._seen[sid]}, expected unique ids across parts")
            self._seen.setdefault(sid, s.url)
        for i, x in s.iter_samples():
            r = rows[i]
            self._bar.update(len(x))
            if r["sample_id"] in w:
                w.add_report({"file": r.get("source_file"), "line": None,
                              "message": f"{r.get('source_file')}: sample_id {r['sample_id']!r} already ingested from another unit, expected unique ids",
                              "found": f"duplicate sample_id {r['sample_id']!r}", "expected": "unique ids"})
                continue
            fields = {k: v for k, v in r.items() if k not in _DERIVED and v is not None}
            w.append(r["sample_id"], x, r["label"], fields, checksum=r["checksum"], num_bodies=r["num_bodies"])
        fs, path = url_to_fs(s.url)
        if fs.exists(join(path, REPORT)):
            for line in fs.cat_file(join(path, REPORT)).decode().splitlines():
                if line.strip():
                    w.add_report(json.loads(line))
        self.urls.append(s.url)
        self._old_ingest.append(s.attrs.get("ingest") or {})

    @property
    def num_samples(self) -> int:
        return self.writer.num_samples if self.writer else 0

    def discard(self) -> None:
        self._bar.close()
        if self.writer is not None:
            self.writer.discard()

    def close(self) -> dict[str, Any]:
        self._bar.close()
        if self.writer is None:
            raise StoreError("merge: no parts given, expected one or more stores")
        w = self.writer
        ingest = self.ingest
        if ingest is None:
            ingest = {k: sum(i.get(k, 0) or 0 for i in self._old_ingest) for k in ("num_skipped", "num_excluded", "input_bytes")}
            ingest["merged_from"] = self.urls
        if self.skip_duplicates:
            ingest = dict(ingest, num_skipped=len(w._report))
        w.attrs["ingest"] = ingest
        merged = w.close()
        return {"num_samples": merged.num_samples, "num_frames": merged.num_frames, "num_parts": len(self.urls),
                "num_skipped": len(w._report), "out": merged.url}


def merge_stores(parts: list[str], out: str, progress: bool = True, *, skip_duplicates: bool = False,
                 ingest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Concatenate the stores ``parts`` (in that order) into a new store ``out`` (see ``Merger``;
    the merged store can be checked with ``verify``). ``ingest`` replaces the merged ``ingest``
    attribute (by default: the parts' counts summed and their urls)."""
    if not parts:
        raise StoreError("merge: no parts given, expected one or more stores")
    stores = [Store.open(p) for p in parts]  # fail on a bad part before writing anything
    for s in stores[1:]:
        for k in _SAME_ATTRS:
            if s.attrs.get(k) != stores[0].attrs.get(k):
                raise StoreError(f"{s.url}: attribute {k} is {s.attrs.get(k)!r}, expected {stores[0].attrs.get(k)!r} as in {stores[0].url}")
    if not skip_duplicates:
        seen: dict[str, str] = {}
        for s in stores:
            for sid in s.manifest.column("sample_id").to_pylist():
                if sid in seen:
                    raise StoreError(f"{s.url}: sample_id {sid!r} also in {seen[sid]}, expected unique ids across parts")
                seen[sid] = s.url
    m = Merger(out, skip_duplicates=skip_duplicates, ingest=ingest, progress=progress)
    try:
        for s in stores:
            m.add(s.url)
    except BaseException:
        m.discard()
        raise
    return m.close()
