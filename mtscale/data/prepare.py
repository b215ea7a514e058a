"""``mtscale prepare``: raw recordings -> store, in parallel, resumable, with a skip report.

The reader lists work units (usually files) in a deterministic order; worker processes parse,
preprocess, cast and checksum one unit each; the parent appends the results **in unit order**
to a ``StoreWriter``, so the store is byte-identical whatever the number of workers.

- Bad input: a unit whose reader (or preprocessing) raises ``BadInputError`` is recorded in the
  store's ``report.jsonl`` ({file, line, message}) and skipped; its neighbours are kept. With
  ``strict`` the first bad unit aborts with that error instead.
- Memory: the writer buffers at most one shard of frames; at most ``window`` unit results are
  in flight between the workers and the writer.
- Resume: the writer persists a commit point after every shard written (units done, rows,
  report). A run killed at any point (even SIGKILL), or stopped by a strict error, leaves
  ``OUT.partial``; running the same command again continues from the last commit point.
  Different arguments (format, input listing, options, part) refuse to resume and say to
  delete ``OUT.partial``. An existing complete ``OUT`` is never overwritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import multiprocessing as mp
import os
import threading
import time
from typing import Any, Iterable, Iterator

import numpy as np

import mtscale
from mtscale.data.formats import get_reader
from mtscale.data.manifest import checksum_bytes
from mtscale.data.preprocess import PrepareOptions, describe, preprocess
from mtscale.data.store import REPORT, Store, join
from mtscale.data.store_writer import StoreWriter
from mtscale.errors import BadInputError, ConfigError

log = logging.getLogger(__name__)

__all__ = ["PrepareOptions", "prepare", "merge_stores"]


# ---------------------------------------------------------------- worker side

_WORKER: dict[str, Any] = {}


def _init_worker(reader_module: str, options: PrepareOptions, layout: str) -> None:
    _WORKER.update(reader=importlib.import_module(reader_module), options=options, layout=layout)


def _unit_bytes(unit: Any) -> int:
    path = unit if isinstance(unit, (str, os.PathLike)) else None
    try:
        return os.path.getsize(path) if path is not None else 0
    except OSError:
        return 0


def _failure(e: BadInputError) -> dict[str, Any]:
    return {"file": e.path, "line": e.line, "message": str(e), "found": e.found, "expected": e.expected}


def process_unit(unit: Any) -> tuple[list[tuple], list[dict], int]:
    """Worker: read one unit, preprocess, cast to the store dtype, checksum.

    Returns (samples [(sample_id, x_TMVC, label, fields, checksum)], failures [report
    records], bytes of raw input). ``BadInputError`` becomes a failure record; samples
    yielded before a failure in the same unit are kept.
    """
    reader, options, layout = _WORKER["reader"], _WORKER["options"], _WORKER["layout"]
    dtype = np.dtype(options.dtype)
    samples: list[tuple] = []
    failures: list[dict] = []
    try:
        for raw in reader.read_unit(unit):
            try:
                if raw.layout != layout:
                    raise BadInputError(raw.source or str(unit), None, f"sample {raw.sample_id} has layout {raw.layout!r}",
                                        f"{layout!r} like the rest of this store")
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
                failures.append(_failure(e))
    except BadInputError as e:
        failures.append(_failure(e))
    return samples, failures, _unit_bytes(unit)


# ---------------------------------------------------------------- parent side


def _slice(units: list[Any], part_index: int | None, num_parts: int | None) -> list[Any]:
    if part_index is None and num_parts is None:
        return units
    if part_index is None or num_parts is None:
        raise ConfigError("--part-index/--num-parts: found only one of them, expected both or neither")
    if num_parts < 1 or not 0 <= part_index < num_parts:
        raise ConfigError(f"--part-index: found {part_index} of {num_parts} parts, expected 0 <= part-index < num-parts")
    n = len(units)  # contiguous slices: part i holds units [i*n//k, (i+1)*n//k)
    return units[part_index * n // num_parts : (part_index + 1) * n // num_parts]


def _detect_layout(reader: Any, units: list[Any], options: PrepareOptions) -> str:
    layout = options.layout or getattr(reader, "LAYOUT", None)
    if layout:
        return layout
    for unit in units[:50]:  # the format does not say: ask the first readable unit
        try:
            for raw in reader.read_unit(unit):
                return raw.layout
        except BadInputError:
            continue
    raise ConfigError("--layout: the format does not name its joint layout and no readable unit was found, expected --layout")


def _throttled(items: Iterable[Any], sem: threading.Semaphore, stop: threading.Event) -> Iterator[Any]:
    """Yield items no faster than the consumer releases ``sem`` (bounded in-flight results)."""
    for it in items:
        while not sem.acquire(timeout=0.1):
            if stop.is_set():
                return
        yield it


def _results(units: list[Any], workers: int, init_args: tuple, sem: threading.Semaphore,
             stop: threading.Event) -> Iterator[tuple[list, list, int]]:
    if workers <= 1:
        _init_worker(*init_args)
        for u in units:
            yield process_unit(u)
        return
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":  # import once in the server, not in every worker
        ctx.set_forkserver_preload([__name__, init_args[0]])
    chunksize = max(1, min(8, len(units) // (workers * 16)))
    with ctx.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        try:
            yield from pool.imap(process_unit, _throttled(units, sem, stop), chunksize=chunksize)
        finally:
            stop.set()
            pool.terminate()


def prepare(fmt: str, input_path: str, out: str, options: PrepareOptions | None = None, workers: int = 1,
            strict: bool = False, progress: bool = True, part_index: int | None = None,
            num_parts: int | None = None, chunk_frames: int = 4096, shard_chunks: int = 16) -> dict[str, Any]:
    """Ingest ``input_path`` (format ``fmt``) into a new store at ``out``; see the module doc.

    Returns {num_samples, num_frames, num_skipped, num_excluded, num_units, units_resumed,
    input_bytes, seconds, mb_per_s, report, out}.
    """
    from tqdm.auto import tqdm

    options = options or PrepareOptions()
    if workers < 1:
        raise ConfigError(f"--workers: found {workers}, expected >= 1")
    t0 = time.perf_counter()
    reader = get_reader(fmt)
    listing = reader.list_units(str(input_path), options.layout)
    units = _slice(list(listing.units), part_index, num_parts)
    layout = _detect_layout(reader, units, options)
    units_digest = hashlib.blake2b(json.dumps(units, default=str).encode(), digest_size=16).hexdigest()
    key = {
        "format": fmt, "input": os.path.abspath(input_path) if "://" not in str(input_path) else str(input_path),
        "options": dataclasses.asdict(options), "part_index": part_index, "num_parts": num_parts,
        "num_units": len(units), "units_digest": units_digest, "chunk_frames": chunk_frames,
        "shard_chunks": shard_chunks, "mtscale_version": mtscale.__version__,
    }
    attrs = {"format": fmt, "preprocessing": describe(options), "class_names": listing.class_names}
    writer = StoreWriter(out, layout=layout, num_bodies=options.max_bodies, dtype=options.dtype, attrs=attrs,
                         chunk_frames=chunk_frames, shard_chunks=shard_chunks, resume_key=key)
    state = writer.resumed or {"units_done": 0, "input_bytes": 0}
    start, input_bytes = int(state["units_done"]), int(state["input_bytes"])
    if start:
        log.info("%s: resuming after %d of %d units", writer.work_url, start, len(units))
    num_excluded = len(listing.excluded) if part_index in (None, 0) else 0
    window = max(4, workers * 8)
    sem, stop = threading.Semaphore(window), threading.Event()
    bar = tqdm(total=len(units), initial=start, unit="file", desc="prepare", disable=not progress)
    t_run, bytes_run, last_post = time.perf_counter(), 0, 0.0
    results = _results(units[start:], workers, (reader.__name__, options, layout), sem, stop)
    try:
        for k, (samples, failures, nbytes) in enumerate(results, start=start):
            sem.release()
            for sid, x, label, fields, checksum in samples:
                if sid in writer:
                    failures.append({"file": fields.get("source_file") or str(units[k]), "line": None,
                                     "message": f"{units[k]}: sample_id {sid!r} already ingested from another unit, expected unique ids",
                                     "found": f"duplicate sample_id {sid!r}", "expected": "unique ids"})
                    continue
                writer.append(sid, x, label, fields, checksum=checksum)
            for f in failures:
                if strict:
                    raise BadInputError(f["file"], f["line"], f["found"], f["expected"])
                log.warning("skipped: %s", f["message"])
                writer.add_report(f)
            input_bytes += nbytes
            bytes_run += nbytes
            writer.mark({"units_done": k + 1, "input_bytes": input_bytes})
            bar.update(1)
            now = time.perf_counter()
            if progress and now - last_post > 0.5:
                bar.set_postfix_str(f"{bytes_run / max(now - t_run, 1e-9) / 1e6:.1f} MB/s", refresh=False)
                last_post = now
    except BaseException:
        log.warning("prepare stopped; %s kept: re-run the same command to resume, or delete it", writer.work_url)
        raise
    finally:
        stop.set()
        if hasattr(results, "close"):
            results.close()
        bar.close()
    seconds = time.perf_counter() - t0
    num_skipped = len(writer._report)
    if writer.num_samples == 0:
        first = writer._report[0]["message"] if writer._report else "no samples"
        writer.discard()
        raise BadInputError(str(input_path), None, f"no sample could be ingested from {len(units)} units ({first})",
                            "at least one readable recording")
    ingest = {"num_units": len(units), "num_skipped": num_skipped, "num_excluded": num_excluded,
              "input_bytes": input_bytes, "part_index": part_index, "num_parts": num_parts}
    writer.attrs["ingest"] = ingest
    store: Store = writer.close()
    summary = {
        "num_samples": store.num_samples, "num_frames": store.num_frames, "num_skipped": num_skipped,
        "num_excluded": num_excluded, "num_units": len(units), "units_resumed": start,
        "input_bytes": input_bytes, "seconds": round(seconds, 3),
        "mb_per_s": round(bytes_run / 1e6 / max(time.perf_counter() - t_run, 1e-9), 2),
        "report": join(store.url, REPORT) if num_skipped else None, "out": store.url,
    }
    log.info("prepared %s: %s", out, summary)
    return summary


def merge_stores(parts: list[str], out: str, progress: bool = True) -> dict[str, Any]:
    """See ``mtscale.data.store_merge.merge_stores``."""
    from mtscale.data.store_merge import merge_stores as _merge

    return _merge(parts, out, progress=progress)
