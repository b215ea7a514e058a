"""``mtscale prepare``: raw recordings -> store, in parallel, resumable, with a skip report.

The reader lists work units (usually files) in a deterministic order. With one worker the
process parses, preprocesses, casts and checksums each unit and appends it to a
``StoreWriter``. With ``workers`` > 1 the units are cut into contiguous **parts** (a pure
function of the number of units, never of ``workers``); each worker process ingests whole parts
into uncompressed scratch stores of its own under ``OUT.parts/`` (nothing flows back through
the parent), and the parent joins them in unit order, part k while the workers ingest later
parts (``store_merge.Merger``: re-chunks and compresses the binary frames, ~1/20 of the text's
bytes). Either way the store is byte-identical whatever the number of workers. (An earlier
design streamed every parsed array back to one writing parent; on 2 cores the parent was the
bottleneck, 0.83-1.33x one worker.) This module is the parent side; what a worker does with a
unit or a part is in ``mtscale.data.ingest``.

- Bad input: a record the reader (or preprocessing, or the checks here) refuses with
  ``BadInputError`` is recorded in the store's ``report.jsonl`` ({file, line, index, message,
  found, expected, num_records}) and skipped; its neighbours are kept, also the later records
  of the same file where a file holds many (``.pkl``, ``.npz``: the reader yields the error of
  a bad record and goes on). A unit that fails as a whole counts all its records. Refused
  here, for every format: a label outside ``formats.LABEL_RULE`` (-1 or 0..99,999), a
  coordinate beyond ``formats.MAX_ABS_COORD[units]`` (100 m; in preprocessing), a sample of
  another layout or coordinate count than the first readable sample. Counts
  (``num_skipped``) are of records. With ``strict`` the first bad record aborts instead.
- Memory: each writer (one per worker) buffers at most one shard of frames; the merge reads
  and writes one shard at a time.
- Resume: a writer persists a commit point after every shard written (units done, rows,
  report). A run killed at any point (even SIGKILL), or stopped by a strict error, leaves
  ``OUT.partial`` (one worker) or ``OUT.parts/`` (finished parts are complete stores,
  unfinished ones ``part-K.partial``); running the same command again continues from the last
  commit points, also with another ``--workers``. Different arguments (format, input listing,
  options, part) refuse to resume and say what to delete. An existing complete ``OUT`` is
  never overwritten.
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
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

import mtscale
from mtscale.data.formats import get_reader
from mtscale.data.ingest import ingest_units, init_part_worker, init_worker, process_unit, run_part
from mtscale.data.preprocess import PrepareOptions, describe
from mtscale.data.store import REPORT, Store, is_local, join, url_to_fs
from mtscale.data.store_writer import PROGRESS, StoreWriter, refuse_existing, skipped_records
from mtscale.errors import BadInputError, ConfigError

log = logging.getLogger(__name__)

__all__ = ["PrepareOptions", "prepare"]

PARTS = ".parts"
"""Suffix of the folder holding the parallel path's part stores while a prepare runs."""


# ---------------------------------------------------------------- parent side


def part_ranges(num_units: int) -> list[tuple[int, int]]:
    """The parallel path's parts: contiguous unit ranges of 16 to 2,048 units, ~32 of them, but
    up to 256 units each while that leaves >= 8 parts (each part store costs ~0.1 CPU-s to create,
    commit and merge: 30 % of the work of a 150-file part). A pure function of the number of
    units, so a resumed run may use another ``--workers``."""
    size = min(2048, max(16, -(-num_units // 32), min(256, -(-num_units // 8))))
    return [(a, min(a + size, num_units)) for a in range(0, num_units, size)]


def _preload(reader_module: str) -> list[str]:
    """Modules the forkserver imports before forking workers: the worker side (``ingest``, which
    imports this one's dependencies), the reader and what the reader asks for (``PRELOAD``, e.g. a
    compiled kernel loaded at import)."""
    return ["mtscale.data.ingest", reader_module, *getattr(importlib.import_module(reader_module), "PRELOAD", ())]


def _pool_context():
    methods = mp.get_all_start_methods()
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


def _slice(units: list[Any], part_index: int | None, num_parts: int | None) -> list[Any]:
    if part_index is None and num_parts is None:
        return units
    if part_index is None or num_parts is None:
        raise ConfigError("--part-index/--num-parts: found only one of them, expected both or neither")
    if num_parts < 1 or not 0 <= part_index < num_parts:
        raise ConfigError(f"--part-index: found {part_index} of {num_parts} parts, expected 0 <= part-index < num-parts")
    n = len(units)  # contiguous slices: part i holds units [i*n//k, (i+1)*n//k)
    return units[part_index * n // num_parts : (part_index + 1) * n // num_parts]


def _detect_shape(reader: Any, units: list[Any], options: PrepareOptions) -> tuple[str, tuple[int | None, str]]:
    """(layout, (coordinates per joint, the sample that decided them)) of the store: what the
    format or ``--layout`` says, else what the first readable sample has (in unit order, so
    the same whatever the number of workers). Later samples that differ are skipped."""
    layout = options.layout or getattr(reader, "LAYOUT", None)
    num_coords = getattr(reader, "NUM_COORDS", None)
    if layout and num_coords:
        return layout, (num_coords, f"format {reader.__name__.rsplit('.', 1)[-1]}")
    for unit in units:  # ask the first readable sample
        try:
            for raw in reader.read_unit(unit):
                if not isinstance(raw, BadInputError) and np.ndim(raw.x_MTVC) == 4:
                    return layout or raw.layout, (num_coords or int(np.shape(raw.x_MTVC)[-1]), raw.source or str(unit))
        except BadInputError:
            continue
    if layout:
        return layout, (num_coords, "")  # nothing readable: every unit will be reported
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
        init_worker(*init_args)
        for u in units:
            yield process_unit(u)
        return
    ctx = _pool_context()
    if ctx.get_start_method() == "forkserver":  # import once in the server, not in every worker
        ctx.set_forkserver_preload(_preload(init_args[0]))
    chunksize = max(1, min(8, len(units) // (workers * 16)))
    with ctx.Pool(workers, initializer=init_worker, initargs=init_args) as pool:
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
    fixed_units = getattr(reader, "UNITS", None)
    if fixed_units is not None and options.units != fixed_units:
        raise ConfigError(f"--units: found {options.units!r}, expected {fixed_units!r} for format {fmt} "
                          "(its coordinates are always in those units)")
    listing = reader.list_units(str(input_path), options.layout)
    units = _slice(list(listing.units), part_index, num_parts)
    layout, coords = _detect_shape(reader, units, options)
    units_digest = hashlib.blake2b(json.dumps(units, default=str).encode(), digest_size=16).hexdigest()
    key = {
        "format": fmt, "input": os.path.abspath(input_path) if "://" not in str(input_path) else str(input_path),
        "options": dataclasses.asdict(options), "part_index": part_index, "num_parts": num_parts,
        "num_units": len(units), "units_digest": units_digest, "chunk_frames": chunk_frames,
        "shard_chunks": shard_chunks, "mtscale_version": mtscale.__version__,
    }
    attrs = {"format": fmt, "units": options.units, "preprocessing": describe(options),
             "class_names": listing.class_names}
    num_excluded = len(listing.excluded) if part_index in (None, 0) else 0
    ingest = {"num_units": len(units), "num_excluded": num_excluded, "part_index": part_index, "num_parts": num_parts}
    fs, path = url_to_fs(str(out).rstrip("/"))
    single_leftover = is_local(fs) and fs.exists(join(path + ".partial", PROGRESS))
    per_process = "memory" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    # memory:// lives in one process: there the workers stream results to the writing parent
    if (workers > 1 or fs.exists(path + PARTS)) and not single_leftover and not per_process:
        return _prepare_parts(str(out).rstrip("/"), units, workers, (reader.__name__, options, layout, coords), key,
                              attrs, ingest, strict, progress, chunk_frames, shard_chunks, t0, str(input_path))
    writer = StoreWriter(out, layout=layout, num_bodies=options.max_bodies, dtype=options.dtype, attrs=attrs,
                         chunk_frames=chunk_frames, shard_chunks=shard_chunks, resume_key=key)
    state = writer.resumed or {"units_done": 0, "input_bytes": 0}
    start = int(state["units_done"])
    if start:
        log.info("%s: resuming after %d of %d units", writer.work_url, start, len(units))
    sem, stop = threading.Semaphore(max(4, workers * 8)), threading.Event()
    bar = tqdm(total=len(units), initial=start, unit="file", desc="prepare", disable=not progress)
    t_run, done = time.perf_counter(), {"bytes": 0, "post": 0.0}

    def on_unit(nbytes: int) -> None:
        sem.release()
        done["bytes"] += nbytes
        bar.update(1)
        now = time.perf_counter()
        if progress and now - done["post"] > 0.5:
            bar.set_postfix_str(_rate(done["bytes"], now - t_run), refresh=False)
            done["post"] = now

    results = _results(units[start:], workers, (reader.__name__, options, layout, coords), sem, stop)
    try:
        input_bytes = ingest_units(writer, units, start, int(state["input_bytes"]), strict, results, on_unit)
    except BaseException:
        log.warning("prepare stopped; %s kept: re-run the same command to resume, or delete it", writer.work_url)
        raise
    finally:
        stop.set()
        if hasattr(results, "close"):
            results.close()
        bar.close()
    num_skipped = skipped_records(writer._report)
    if writer.num_samples == 0:
        first = writer._report[0]["message"] if writer._report else "no samples"
        writer.discard()
        raise BadInputError(str(input_path), None, f"no sample could be ingested from {len(units)} units ({first})",
                            "at least one readable recording")
    writer.attrs["ingest"] = {**ingest, "num_skipped": num_skipped, "input_bytes": input_bytes}
    store: Store = writer.close()
    return _summary(store, ingest, num_skipped, start, input_bytes, t0, done["bytes"], time.perf_counter() - t_run)


def _rate(nbytes: int, seconds: float) -> str:
    """Progress-bar postfix: input MB/s (empty while no bytes are known: the bar shows files/s)."""
    return f"{nbytes / max(seconds, 1e-9) / 1e6:.1f} MB/s" if nbytes else ""


def _summary(store: Store, ingest: dict, num_skipped: int, units_resumed: int, input_bytes: int, t0: float,
             bytes_run: int, seconds_run: float) -> dict[str, Any]:
    summary = {
        "num_samples": store.num_samples, "num_frames": store.num_frames, "num_skipped": num_skipped,
        "num_excluded": ingest["num_excluded"], "num_units": ingest["num_units"], "units_resumed": units_resumed,
        "input_bytes": input_bytes, "seconds": round(time.perf_counter() - t0, 3),
        "mb_per_s": round(bytes_run / 1e6 / max(seconds_run, 1e-9), 2),
        "report": join(store.url, REPORT) if num_skipped else None, "out": store.url,
    }
    log.info("prepared %s: %s", store.url, summary)
    return summary


def _prepare_parts(out: str, units: list[Any], workers: int, init_args: tuple, key: dict, attrs: dict, ingest: dict,
                   strict: bool, progress: bool, chunk_frames: int, shard_chunks: int, t0: float,
                   input_path: str) -> dict[str, Any]:
    """The parallel path (module doc): parts ingested by ``workers`` processes, then merged."""
    from tqdm.auto import tqdm

    from mtscale.data.store_merge import Merger

    refuse_existing(out)  # before any work, not when the merge starts writing
    fs, path = url_to_fs(out)
    parts_url = out + PARTS
    jobs = [{"url": join(parts_url, f"part-{i:05d}"), "units": units[a:b], "key": {**key, "part_units": [a, b]},
             "attrs": attrs, "strict": strict, "chunk_frames": chunk_frames, "shard_chunks": shard_chunks}
            for i, (a, b) in enumerate(part_ranges(len(units)))]
    ctx = _pool_context()
    units_done, bytes_done = ctx.Value("q", 0), ctx.Value("q", 0)
    bar = tqdm(total=len(units), unit="file", desc="prepare", disable=not progress)
    t_run, results = time.perf_counter(), []
    merger = Merger(out)  # joins part k while the workers ingest later parts

    def show() -> None:
        bar.n = units_done.value
        bar.set_postfix_str(_rate(bytes_done.value, time.perf_counter() - t_run), refresh=False)
        bar.refresh()

    pool = None
    try:
        if workers > 1 and len(jobs) > 1:
            if ctx.get_start_method() == "forkserver":
                ctx.set_forkserver_preload(_preload(init_args[0]))
            pool = ctx.Pool(min(workers, len(jobs)), initializer=init_part_worker, initargs=(*init_args, units_done, bytes_done))
            pending = [pool.apply_async(run_part, (j,)) for j in jobs]
        else:
            init_part_worker(*init_args, units_done, bytes_done)
        for i, job in enumerate(jobs):
            if pool is None:
                res = run_part(job)
            else:
                while not pending[i].ready():
                    pending[i].wait(0.5)
                    show()
                res = pending[i].get()
            if "error" in res:
                f = res["error"]
                raise BadInputError(f["file"], f["line"], f["found"], f["expected"])
            for rec in merger.add(res["url"]):
                log.warning("skipped: %s", rec["message"])
            results.append(res)
            show()
    except BaseException:
        merger.discard()
        log.warning("prepare stopped; %s kept: re-run the same command to resume, or delete it", parts_url)
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    seconds_run = time.perf_counter() - t_run
    input_bytes = sum(r["input_bytes"] for r in results)
    if merger.num_samples == 0:
        first = merger.report[0]["message"] if merger.report else "no samples"
        merger.discard()
        fs.rm(path + PARTS, recursive=True)
        raise BadInputError(input_path, None, f"no sample could be ingested from {len(units)} units ({first})",
                            "at least one readable recording")
    merger.ingest = {**ingest, "input_bytes": input_bytes}  # close() adds num_skipped
    merged = merger.close()
    fs.rm(path + PARTS, recursive=True)
    store = Store.open(merged["out"])
    return _summary(store, ingest, merged["num_skipped"], sum(r["units_resumed"] for r in results), input_bytes, t0,
                    sum(r["bytes_run"] for r in results), seconds_run)
