"""Joining stores prepared in parts (array jobs, or a parallel ``prepare``'s workers) into one
store, shard by shard."""

from __future__ import annotations

import json
import logging
from typing import Any

from tqdm.auto import tqdm

from mtscale.data.store import REPORT, Store, join, url_to_fs
from mtscale.data.store_writer import StoreWriter, duplicate_record, skipped_records
from mtscale.errors import StoreError

log = logging.getLogger(__name__)

_SAME_ATTRS = ("layout", "num_bodies", "dtype", "units", "preprocessing", "format", "class_names")
_DERIVED = ("sample_id", "offset", "length", "label", "checksum", "num_bodies")


class Merger:
    """Appends whole stores, in order, to a new store ``out`` (one ``StoreWriter``): the result
    is byte-identical to writing the same samples in one writer. Parts may be added as they
    become ready (``prepare`` merges part k while its workers ingest later parts).

    Layout, bodies, dtype, units, preprocessing, format and class names must agree. A sample id
    already written is skipped and recorded in the skip report (what ``prepare`` does within
    one store; ``merge_stores`` refuses such parts up front). Offsets are rebased, checksums
    and body counts taken from the part manifests (parts are stores we wrote: values are not
    re-validated), reports concatenated. Memory: one shard of frames.
    """

    def __init__(self, out: str, *, ingest: dict[str, Any] | None = None, progress: bool = False):
        self.out, self.ingest = out, ingest
        self.writer: StoreWriter | None = None
        self.first: Store | None = None
        self.urls: list[str] = []
        self._old_ingest: list[dict] = []
        self._bar = tqdm(unit="frame", unit_scale=True, desc="merge", disable=not progress)

    def add(self, part: str | Store) -> list[dict[str, Any]]:
        """Append the store ``part`` (a url or an opened store); returns the skip-report records
        this added (the duplicate ids it had, then the part's own report)."""
        s = part if isinstance(part, Store) else Store.open(part)
        if self.first is None:
            self.first = s
            attrs = {k: s.attrs.get(k) for k in _SAME_ATTRS}
            self.writer = StoreWriter(self.out, layout=s.layout.name, num_bodies=s.num_bodies, dtype=s.attrs["dtype"],
                                      attrs=attrs, chunk_frames=s.chunk_frames,
                                      shard_chunks=max(1, s.shard_frames // s.chunk_frames))
        _check_compatible(s, self.first)
        w = self.writer
        added = []
        rows = s.manifest.to_pylist()
        for i, x in s.iter_samples():
            r = rows[i]
            self._bar.update(len(x))
            if r["sample_id"] in w:
                added.append(duplicate_record(r["sample_id"], r.get("source_file"), r.get("source_file")))
                continue
            fields = {k: v for k, v in r.items() if k not in _DERIVED and v is not None}
            w.append(r["sample_id"], x, r["label"], fields, checksum=r["checksum"], num_bodies=r["num_bodies"])
        fs, path = url_to_fs(s.url)
        if fs.exists(join(path, REPORT)):
            added += [json.loads(line) for line in fs.cat_file(join(path, REPORT)).decode().splitlines() if line.strip()]
        for rec in added:
            w.add_report(rec)
        self.urls.append(s.url)
        self._old_ingest.append(s.attrs.get("ingest") or {})
        return added

    @property
    def num_samples(self) -> int:
        return self.writer.num_samples if self.writer else 0

    @property
    def report(self) -> list[dict[str, Any]]:
        """The skip-report records so far."""
        return list(self.writer._report) if self.writer else []

    def discard(self) -> None:
        self._bar.close()
        if self.writer is not None:
            self.writer.discard()

    def close(self) -> dict[str, Any]:
        """Publish ``out``. Its ``ingest`` attribute is ``self.ingest`` with ``num_skipped`` the
        records the merged report stands for, or by default the parts' counts summed and their urls."""
        self._bar.close()
        if self.writer is None:
            raise StoreError("merge: no parts given, expected one or more stores")
        w = self.writer
        if self.ingest is not None:
            ingest = dict(self.ingest, num_skipped=skipped_records(w._report))
        else:
            ingest = {k: sum(i.get(k, 0) or 0 for i in self._old_ingest) for k in ("num_skipped", "num_excluded", "input_bytes")}
            ingest["merged_from"] = self.urls
        w.attrs["ingest"] = ingest
        merged = w.close()
        return {"num_samples": merged.num_samples, "num_frames": merged.num_frames, "num_parts": len(self.urls),
                "num_skipped": skipped_records(w._report), "out": merged.url}


def _check_compatible(s: Store, first: Store) -> None:
    for k in _SAME_ATTRS:
        if s.attrs.get(k) != first.attrs.get(k):
            raise StoreError(f"{s.url}: attribute {k} is {s.attrs.get(k)!r}, expected {first.attrs.get(k)!r} as in {first.url}")
    if s.num_frames and first.num_frames and s.frames.shape[3] != first.frames.shape[3]:
        raise StoreError(f"{s.url}: {s.frames.shape[3]} coordinates, expected {first.frames.shape[3]} as in {first.url}")


def merge_stores(parts: list[str], out: str, progress: bool = True) -> dict[str, Any]:
    """Concatenate the stores ``parts`` (in that order) into a new store ``out`` (see ``Merger``;
    the merged store can be checked with ``verify``). Parts are checked before anything is
    written: same attributes, sample ids unique across parts."""
    if not parts:
        raise StoreError("merge: no parts given, expected one or more stores")
    stores = [Store.open(p) for p in parts]
    seen: dict[str, str] = {}
    for s in stores:
        _check_compatible(s, stores[0])
        for sid in s.manifest.column("sample_id").to_pylist():
            if sid in seen:
                raise StoreError(f"{s.url}: sample_id {sid!r} also in {seen[sid]}, expected unique ids across parts")
            seen[sid] = s.url
    m = Merger(out, progress=progress)
    try:
        for s in stores:
            m.add(s)
    except BaseException:
        m.discard()
        raise
    return m.close()
