"""The worker side of ``mtscale prepare`` (``mtscale.data.prepare`` is the parent side):
``process_unit`` turns one work unit (a file) into checked, preprocessed, checksummed samples
and report records for its bad records; ``ingest_units`` appends results to a ``StoreWriter``
with a commit point after each unit; ``run_part`` ingests one part of the parallel path into
its own scratch store (resumable). A worker process is set up by ``init_worker`` /
``init_part_worker`` (the reader module, options, layout and coordinate count it checks against).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from mtscale.data.formats import LABEL_RULE, label_problem
from mtscale.data.manifest import checksum_bytes
from mtscale.data.preprocess import PrepareOptions, preprocess
from mtscale.data.store import Store, store_exists
from mtscale.data.store_writer import StoreWriter, duplicate_record
from mtscale.errors import BadInputError, StoreError

log = logging.getLogger(__name__)

_WORKER: dict[str, Any] = {}


def init_worker(reader_module: str, options: PrepareOptions, layout: str, coords: tuple[int | None, str]) -> None:
    _WORKER.update(reader=importlib.import_module(reader_module), options=options, layout=layout, coords=coords)


def _unit_bytes(reader: Any, unit: Any) -> int:
    if hasattr(reader, "unit_bytes"):
        return int(reader.unit_bytes(unit))
    path = unit if isinstance(unit, (str, os.PathLike)) else None
    try:
        return os.path.getsize(path) if path is not None else 0
    except OSError:
        return 0


def failure_record(e: BadInputError, num_records: int = 1) -> dict[str, Any]:
    return {"file": e.path, "line": e.line, "index": e.index, "message": str(e), "found": e.found,
            "expected": e.expected, "num_records": num_records}


def process_unit(unit: Any) -> tuple[list[tuple], list[dict], int]:
    """Worker: read one unit, check, preprocess, cast to the store dtype, checksum.

    Returns (samples [(sample_id, x_TMVC, label, fields, checksum)], failures [report
    records], bytes of raw input). A bad record (yielded or raised as ``BadInputError``)
    becomes a failure record; the unit's other records are kept. A unit that raises counts its
    records not yet seen (``reader.unit_records``) in the failure.
    """
    reader, options, layout = _WORKER["reader"], _WORKER["options"], _WORKER["layout"]
    num_coords, first = _WORKER["coords"]
    dtype = np.dtype(options.dtype)
    samples: list[tuple] = []
    failures: list[dict] = []
    seen = 0
    try:
        for raw in reader.read_unit(unit):
            seen += 1
            if isinstance(raw, BadInputError):
                failures.append(failure_record(raw))
                continue
            try:
                where = raw.source or str(unit)
                if raw.layout != layout:
                    raise BadInputError(where, None, f"sample {raw.sample_id} has layout {raw.layout!r}",
                                        f"{layout!r} like the rest of this store")
                problem = label_problem(raw.label)
                if problem is not None:
                    raise BadInputError(where, None, f"sample {raw.sample_id} has {problem}", LABEL_RULE)
                C = np.shape(raw.x_MTVC)[-1] if np.ndim(raw.x_MTVC) == 4 else num_coords  # else preprocess refuses it
                if num_coords is not None and C != num_coords:
                    raise BadInputError(where, None, f"{C} coordinates per joint",
                                        f"{num_coords} like the first sample ({first})")
                x = preprocess(raw, options)  # (T, M, V, C) float32
                with np.errstate(over="ignore"):
                    x = np.ascontiguousarray(x, dtype=dtype)
                if not np.isfinite(x).all():
                    raise BadInputError(raw.source or str(unit), None, f"sample {raw.sample_id} overflows {dtype}",
                                        "coordinates within float16 range (use --dtype float32)")
                fields = dict(raw.fields)
                fields.setdefault("source_file", raw.source or None)
                samples.append((raw.sample_id, x, int(raw.label), fields, checksum_bytes(x)))
            except BadInputError as e:
                if e.index is None:
                    e.index = raw.index
                failures.append(failure_record(e))
    except BadInputError as e:
        total = int(reader.unit_records(unit)) if hasattr(reader, "unit_records") else 1
        failures.append(failure_record(e, max(1, total - seen)))
    return samples, failures, _unit_bytes(reader, unit)


def ingest_units(writer: StoreWriter, units: list[Any], start: int, input_bytes: int, strict: bool,
                  results: Iterable[tuple[list, list, int]], on_unit=None, log_skips: bool = True) -> int:
    """Append the results of ``units[start:]`` (in order) to ``writer`` with a commit point after
    each unit; returns the input bytes done. Duplicate ids and bad units go to the report (with
    ``strict``: the first raises; logged unless ``log_skips`` is False: a part's are logged by
    the parent)."""
    for k, (samples, failures, nbytes) in enumerate(results, start=start):
        for sid, x, label, fields, checksum in samples:
            if sid in writer:
                failures.append(duplicate_record(sid, fields.get("source_file") or str(units[k]), units[k]))
                continue
            writer.append(sid, x, label, fields, checksum=checksum)
        for f in failures:
            if strict:
                raise BadInputError(f["file"], f["line"], f["found"], f["expected"], index=f.get("index"))
            if log_skips:
                log.warning("skipped: %s", f["message"])
            writer.add_report(f)
        input_bytes += nbytes
        writer.mark({"units_done": k + 1, "input_bytes": input_bytes})
        if on_unit is not None:
            on_unit(nbytes)
    return input_bytes


def init_part_worker(reader_module: str, options: PrepareOptions, layout: str, coords: tuple[int | None, str],
                      units_done: Any, bytes_done: Any) -> None:
    init_worker(reader_module, options, layout, coords)
    _WORKER.update(units_done=units_done, bytes_done=bytes_done)


def _count(units: int, nbytes: int) -> None:
    for name, n in (("units_done", units), ("bytes_done", nbytes)):
        v = _WORKER.get(name)
        if v is not None and n:
            with v.get_lock():
                v.value += n


def run_part(job: dict[str, Any]) -> dict[str, Any]:
    """Worker: ingest ``job["units"]`` into the part store ``job["url"]`` (resumable like a whole
    prepare; a finished part is kept and only checked). Returns {url, num_samples, input_bytes,
    units_resumed, bytes_run}, or {error: failure record} for a strict abort (the part's commit
    point is kept)."""
    url, units, key = job["url"], job["units"], job["key"]
    if store_exists(url):
        ingest = Store.open(url).attrs.get("ingest") or {}
        if ingest.get("part_key") != key:
            raise StoreError(f"{url}: a part of another prepare (different arguments), expected the same arguments "
                             f"to resume; delete {url.rsplit('/', 1)[0]} to start over")
        _count(len(units), 0)
        return {"url": url, "num_samples": ingest["num_samples"], "input_bytes": ingest["input_bytes"],
                "units_resumed": len(units), "bytes_run": 0}
    options, layout = _WORKER["options"], _WORKER["layout"]
    writer = StoreWriter(url, layout=layout, num_bodies=options.max_bodies, dtype=options.dtype, attrs=job["attrs"],
                         chunk_frames=job["chunk_frames"], shard_chunks=job["shard_chunks"], resume_key=key,
                         compress=False)
    state = writer.resumed or {"units_done": 0, "input_bytes": 0}
    start = int(state["units_done"])
    _count(start, 0)
    try:
        input_bytes = ingest_units(writer, units, start, int(state["input_bytes"]), job["strict"],
                                    (process_unit(u) for u in units[start:]), on_unit=lambda n: _count(1, n),
                                    log_skips=False)
    except BadInputError as e:
        return {"error": failure_record(e)}
    writer.attrs["ingest"] = {"part_key": key, "num_samples": writer.num_samples, "input_bytes": input_bytes}
    writer.close()
    return {"url": url, "num_samples": writer.num_samples, "input_bytes": input_bytes, "units_resumed": start,
            "bytes_run": input_bytes - int(state["input_bytes"])}
