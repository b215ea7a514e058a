"""Joining stores prepared in parts (array jobs) into one store, shard by shard."""

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


def merge_stores(parts: list[str], out: str, progress: bool = True) -> dict[str, Any]:
    """Concatenate the stores ``parts`` (in that order) into a new store ``out``.

    Layout, bodies, dtype, units, preprocessing, format and class names must agree; sample ids
    must be unique across parts. Offsets are rebased, checksums kept (the merged store can be
    checked with ``verify``), skip reports concatenated. Memory: one shard of frames.
    """
    if not parts:
        raise StoreError("merge: no parts given, expected one or more stores")
    stores = [Store.open(p) for p in parts]
    first = stores[0]
    for s in stores[1:]:
        for k in _SAME_ATTRS:
            if s.attrs.get(k) != first.attrs.get(k):
                raise StoreError(f"{s.url}: attribute {k} is {s.attrs.get(k)!r}, expected {first.attrs.get(k)!r} as in {first.url}")
        if s.frames.shape[3] != first.frames.shape[3]:
            raise StoreError(f"{s.url}: {s.frames.shape[3]} coordinates, expected {first.frames.shape[3]} as in {first.url}")
    seen: dict[str, str] = {}
    for s in stores:
        for sid in s.manifest.column("sample_id").to_pylist():
            if sid in seen:
                raise StoreError(f"{s.url}: sample_id {sid!r} also in {seen[sid]}, expected unique ids across parts")
            seen[sid] = s.url
    attrs = {k: first.attrs.get(k) for k in _SAME_ATTRS}
    ingest = [s.attrs.get("ingest") or {} for s in stores]
    totals = {k: sum(i.get(k, 0) or 0 for i in ingest) for k in ("num_skipped", "num_excluded", "input_bytes")}
    attrs["ingest"] = {**totals, "merged_from": [s.url for s in stores]}
    w = StoreWriter(out, layout=first.layout.name, num_bodies=first.num_bodies, dtype=first.attrs["dtype"],
                    attrs=attrs, chunk_frames=first.chunk_frames,
                    shard_chunks=max(1, first.shard_frames // first.chunk_frames))
    bar = tqdm(total=sum(s.num_frames for s in stores), unit="frame", unit_scale=True, desc="merge", disable=not progress)
    for s in stores:
        rows = s.manifest.to_pylist()
        for i, x in s.iter_samples():
            r = rows[i]
            fields = {k: v for k, v in r.items() if k not in _DERIVED and v is not None}
            w.append(r["sample_id"], x, r["label"], fields, checksum=r["checksum"])
            bar.update(len(x))
        fs, path = url_to_fs(s.url)
        if fs.exists(join(path, REPORT)):
            for line in fs.cat_file(join(path, REPORT)).decode().splitlines():
                if line.strip():
                    w.add_report(json.loads(line))
    bar.close()
    merged = w.close()
    return {"num_samples": merged.num_samples, "num_frames": merged.num_frames, "num_parts": len(stores), "out": merged.url}
