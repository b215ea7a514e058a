"""Deterministic streaming loader over a store: (seed, epoch, rank, cursor) -> batches.

    loader = build_loader("data/ntu60", cfg.data, batch_size=64, seed=0, rank=r, world_size=W,
                          train=True, device=device)
    for epoch in range(num_epochs):
        for batch in loader:              # the rest of the current epoch, then epoch += 1
            batch["x"]      # (N, T, M, V, C) float32 on `device`, augmented (train), in the
                            # input stream of cfg.stream (C = 3 x streams; data/streams.py)
            batch["mask"]   # (N, T) bool, valid frames
            batch["time"]   # (N, T) float32, each frame's time in the recording (frames; model.time_index)
            batch["all_valid"]  # Python bool: no padded frame in the batch (decided on the host)
            model_mask(batch)   # the mask to give a model: None when all_valid (no host sync later)
            batch["label"]  # (N,) int64
            batch["index"]  # (N,) int64, store row of each sample
        ckpt["loader"] = loader.state_dict()  # {epoch, consumed, ...}: a handful of ints

Order: a pure function of (seed, epoch, world size, rank) over the selected samples (see
``mtscale.data.order``): chunk-aligned blocks permuted per epoch, contiguous equal shares per
rank (training drops the ``n % world_size`` remainder so every rank runs the same number of
batches; evaluation, ``exact=True``, yields every sample exactly once across ranks), then a
bounded shuffle in windows of ``cfg.shuffle_buffer`` samples.

Workers: batch ``b`` of the rank's remaining sequence is made by worker ``b % W``; the
DataLoader's in-order round-robin delivery reassembles the sequence, so the samples (and
their crops and augmentations, keyed by sample / position, not by worker) do not depend on
the number of workers. ``state_dict`` records the samples the consumer has received; after
``load_state_dict`` iteration yields exactly the rest of that epoch, for any worker count.

Reading: a worker builds, per shuffle window, one arena of the window's frames with one
``read_frames`` per run of store-contiguous samples within a block (blocks: ~16k frames, a
multiple of the store chunk, see ``default_block_frames``), decoded straight into the arena
by the store's direct chunk reader; then cuts clips from it with vectorised index arithmetic
(``mtscale.data.clips``: one gather of both interpolation ends per batch, one float16 ->
float32 cast, one lerp). With ``W > 1`` workers a worker reads only the samples of its own
batches (every W-th batch), so its arena is ~1/W of the window; but the store decodes whole
inner chunks (4096 frames, ~25 samples), which nearly always hold a sample of every worker:
decode work still grows ~W x with W workers (gather, cast and augmentation do not). One or
two workers per GPU are enough at these rates. Clips: training takes a random crop of
``[crop_min, crop_max]`` of the valid frames, evaluation the centre ``eval_crop``; both are
linearly resampled to ``T = clip_frames`` (mask all True), or with ``short_clips="pad"``
shorter crops are zero-padded (mask False on padding); with ``sampling="random"`` a training
crop gives T frames drawn with replacement, in time order (``clips.sample_indices``).
Bodies: the first ``num_bodies`` of the store's M (zero bodies are added if the store has
fewer).

Workers are started with ``forkserver`` (else ``spawn``) and each opens the store lazily,
which is safe with zarr / fsspec (no forked file handles or event loops); blosc runs
single-threaded in workers. Memory cost: each worker holds up to two windows of raw frames
(``shuffle_buffer`` samples each, ~1/W of that with W workers) plus a reused arena buffer.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mtscale.config import DataConfig
from mtscale.data.augment import BatchAugment, step_seed
from mtscale.data.clips import (
    crop_windows,
    frame_times,
    gather_clips,
    normalize_clips,
    resample_indices,
    sample_indices,
)
from mtscale.data.order import (
    RankOrder,
    make_blocks,
    num_batches,
    rank_order,
    rank_slice,
    uniform_hash,
    worker_batches,
)
from mtscale.data.streams import apply_stream
from mtscale.data.subsets import label_fraction_subset
from mtscale.errors import ConfigError
from mtscale.malloc import tune_malloc

log = logging.getLogger(__name__)


@dataclass
class Selection:
    """The samples a loader reads, sorted by frame offset; ``bounds`` are the read blocks."""

    rows: np.ndarray  # (n,) store row indices
    offsets: np.ndarray  # (n,) first frame
    lengths: np.ndarray  # (n,) valid frames
    labels: np.ndarray  # (n,)
    bounds: np.ndarray  # (B + 1,) block boundaries into the arrays above

    def __len__(self) -> int:
        return int(self.rows.size)


BLOCK_FRAMES = 16384
"""Default read block: the multiple of the store's chunk of at least this many frames. A
block's last sample runs into the next chunk, decoded for a few frames: (k + 1) / k chunk
decodes per block of k chunks; ~100 samples per block keeps the block shuffle fine-grained."""


def default_block_frames(chunk_frames: int) -> int:
    return chunk_frames * max(1, -(-BLOCK_FRAMES // chunk_frames))


def select_samples(store: Any, cfg: DataConfig, block_frames: int | None = None) -> Selection:
    """Rows of ``store`` chosen by ``cfg`` (split / part / where, then label fraction)."""
    rows = np.asarray(store.select(split=cfg.split, part=cfg.part if cfg.split else None, where=cfg.where), dtype=np.int64)
    if cfg.label_fraction < 1.0:
        rows = rows[label_fraction_subset(np.asarray(store.labels)[rows], cfg.label_fraction, cfg.subset_seed)]
    if rows.size == 0:
        raise ConfigError(
            f"data: {store.url}: split={cfg.split!r} part={cfg.part!r} where={cfg.where!r} "
            f"label_fraction={cfg.label_fraction} selects 0 samples, expected at least 1"
        )
    offsets = np.asarray(store.offsets, dtype=np.int64)[rows]
    order = np.argsort(offsets, kind="stable")
    rows, offsets = rows[order], offsets[order]
    bf = int(block_frames or default_block_frames(int(store.chunk_frames)))
    return Selection(
        rows=rows,
        offsets=offsets,
        lengths=np.asarray(store.lengths, dtype=np.int64)[rows],
        labels=np.asarray(store.labels, dtype=np.int64)[rows],
        bounds=make_blocks(offsets, bf),
    )


class ClipDataset(IterableDataset):
    """Yields whole collated batches (dicts of CPU tensors) of one rank's epoch, starting at
    ``self.consumed``; set ``epoch`` / ``consumed`` before iterating (``StatefulLoader`` does).
    Augmentation is not applied here (it runs batched on the training device)."""

    def __init__(
        self,
        store: Any,
        cfg: DataConfig,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        train: bool = True,
        drop_last: bool | None = None,
        exact: bool | None = None,
        block_frames: int | None = None,
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size: found {batch_size}, expected >= 1")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank: found {rank}, expected in [0, world_size={world_size})")
        self._store = None
        if isinstance(store, str):
            from mtscale.data.store import Store

            self.url = store
            self._store = Store.open(store)
        else:
            self.url, self._store = store.url, store
        self.cfg, self.batch_size, self.seed = cfg, int(batch_size), int(seed)
        self.rank, self.world_size, self.train = int(rank), int(world_size), bool(train)
        self.drop_last = train if drop_last is None else bool(drop_last)
        self.exact = (not train) if exact is None else bool(exact)
        self.sel = select_samples(self._store, cfg, block_frames)
        self.store_bodies = int(self._store.num_bodies)
        self.parents = tuple(self._store.layout.parents)  # the bone streams' tree
        if self.store_bodies < cfg.num_bodies:
            log.warning("data.num_bodies=%d but %s has %d bodies: padding with zero bodies",
                        cfg.num_bodies, self.url, self.store_bodies)
        # (epoch, consumed) in shared memory: persistent worker processes hold their own copy of
        # this object, and read where the next pass starts from here (set by StatefulLoader).
        self._cursor = torch.zeros(2, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._cursor[0])

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._cursor[0] = int(value)

    @property
    def consumed(self) -> int:
        return int(self._cursor[1])

    @consumed.setter
    def consumed(self, value: int) -> None:
        self._cursor[1] = int(value)

    # -------------------------------------------------------------- order (pure)

    def order(self, epoch: int) -> RankOrder:
        return rank_order(
            self.sel.bounds, seed=self.seed, epoch=epoch, rank=self.rank, world_size=self.world_size,
            shuffle=self.train, shuffle_buffer=self.cfg.shuffle_buffer, exact=self.exact,
        )

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch (the same every epoch)."""
        lo, hi = rank_slice(len(self.sel), self.rank, self.world_size, self.exact)
        return hi - lo

    def num_batches(self, consumed: int = 0) -> int:
        return num_batches(max(0, self.num_samples - consumed), self.batch_size, self.drop_last)

    # -------------------------------------------------------------- reading

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_store"] = None  # each worker opens the store lazily
        state.pop("_spare", None)
        return state

    @property
    def store(self) -> Any:
        if self._store is None:
            from mtscale.data.store import Store

            self._store = Store.open(self.url)
        return self._store

    def _window_arena(self, order: RankOrder, k: int, need: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Frames of window ``k`` (F, M, V, C) in raw dtype and each window sample's start.
        ``need`` (n_rank,) bool: only those samples are read (a worker's own batches).

        One ``read_frames`` per run of consecutive samples in one block, decoded straight
        into the arena where the store's bodies are the ones kept; the arena buffer of a
        finished window is reused (no fresh pages to fault in per window)."""
        sel, m_out = self.sel, self.cfg.num_bodies
        store = self.store
        lo_w = k * order.window
        u_all = order.unshuffled[lo_w : lo_w + order.window]  # selected-sample ids
        keep = np.arange(u_all.size) if need is None else np.flatnonzero(need[lo_w : lo_w + u_all.size])
        u = u_all[keep]
        lens = sel.lengths[u]
        starts = np.zeros(u_all.size, dtype=np.int64)  # arena start per window position
        starts[keep] = np.cumsum(lens) - lens
        total = int(lens.sum())
        if u.size == 0:
            return np.empty((0, m_out) + tuple(self.store.frames.shape[2:]), dtype=self.store.frames.dtype), starts
        block_of = np.searchsorted(sel.bounds, u, side="right") - 1
        ends = sel.offsets[u] + lens
        gap = sel.offsets[u[1:]] != ends[:-1]  # not contiguous frames in the store
        cut = np.flatnonzero((np.diff(block_of) != 0) | gap) + 1
        run_lo = np.concatenate([[0], cut])
        run_hi = np.concatenate([cut, [u.size]])
        m_store = self.store_bodies
        v, c = store.frames.shape[2:]
        dtype = np.dtype(store.frames.dtype)
        arena = self._take_buffer(total, (m_out, v, c), dtype, zero=m_store < m_out)
        direct = m_store == m_out
        for r0, r1 in zip(run_lo.tolist(), run_hi.tolist()):
            first, last = int(u[r0]), int(u[r1 - 1])
            lo, hi = int(sel.offsets[first]), int(sel.offsets[last] + sel.lengths[last])
            a0 = int(starts[keep[r0]])
            a1 = a0 + (hi - lo)
            if direct:  # consecutive samples of the store are contiguous frames
                store.read_frames(lo, hi, out=arena[a0:a1])
            else:
                m = min(m_out, m_store)
                arena[a0:a1, :m] = store.read_frames(lo, hi)[:, :m]
        return arena, starts

    def _take_buffer(self, frames: int, tail: tuple[int, ...], dtype: np.dtype, zero: bool) -> np.ndarray:
        spare = self.__dict__.pop("_spare", None)
        if spare is None or spare.dtype != dtype or spare.shape[1:] != tail or spare.shape[0] < frames:
            spare = np.empty((int(frames * 1.1) + 1, *tail), dtype=dtype)
        arena = spare[:frames]
        if zero:
            arena[...] = 0
        return arena

    def _release(self, arena: np.ndarray) -> None:
        base = arena.base if arena.base is not None else arena
        if isinstance(base, np.ndarray) and base.ndim == arena.ndim:
            spare = self.__dict__.get("_spare")
            if spare is None or base.shape[0] > spare.shape[0]:
                self._spare = base

    def make_batch(self, order: RankOrder, positions: np.ndarray, arenas: dict,
                   need: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """Collate the samples at ``positions`` of the rank's sequence (window arenas cached
        in ``arenas``: the current window, and the next one while a batch straddles both)."""
        cfg, sel = self.cfg, self.sel
        local = order.perm[positions]  # unshuffled positions
        ids = order.unshuffled[local]
        rows = sel.rows[ids]
        start, crop = crop_windows(
            sel.lengths[ids], train=self.train, crop_min=cfg.crop_min, crop_max=cfg.crop_max,
            eval_crop=cfg.eval_crop,
            u_frac=uniform_hash(self.seed, self.epoch, 1, rows) if self.train else None,
            u_start=uniform_hash(self.seed, self.epoch, 2, rows) if self.train else None,
        )
        if self.train and cfg.sampling == "random":  # per (sample, frame slot): pure in (seed, epoch, row)
            slots = rows.astype(np.int64)[:, None] * cfg.clip_frames + np.arange(cfg.clip_frames)
            i0, i1, w, mask = sample_indices(crop, cfg.clip_frames,
                                             uniform_hash(self.seed, self.epoch, 3, slots.reshape(-1)).reshape(slots.shape))
        else:
            i0, i1, w, mask = resample_indices(crop, cfg.clip_frames, pad_short=cfg.short_clips == "pad")
        win = local // order.window
        x = None
        for k in list(arenas):  # windows behind this batch are never needed again
            if k < win.min():
                self._release(arenas.pop(k)[0])
        for k in np.unique(win):
            if k not in arenas:
                arenas[k] = self._window_arena(order, int(k), need)
            arena, starts = arenas[k]
            sub = win == k
            base = starts[local[sub] - k * order.window] + start[sub]
            if sub.all():
                x = gather_clips(arena, base, i0, i1, w, mask)
            else:
                if x is None:
                    x = torch.empty((len(ids), cfg.clip_frames) + arena.shape[1:], dtype=torch.float32)
                x[torch.from_numpy(sub)] = gather_clips(arena, base, i0[sub], i1[sub], w[sub], mask[sub])
        return {
            "x": x,  # (N, T, M, V, C) float32
            "mask": torch.from_numpy(mask),  # (N, T) bool
            "time": torch.from_numpy(frame_times(start, i0, w)),  # (N, T) float32, frames into the recording
            "label": torch.from_numpy(sel.labels[ids]),  # (N,) int64
            "index": torch.from_numpy(rows),  # (N,) int64
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = self.order(self.epoch)
        remaining = len(order) - self.consumed
        if info is not None:  # blosc threads in every worker would oversubscribe the cores
            _blosc_single_thread()
            tune_malloc()  # the worker process is ours: reuse freed batch buffers (mtscale.malloc)
        arenas: dict = {}
        batches = worker_batches(remaining, self.batch_size, self.drop_last, worker, num_workers)
        need = None
        if num_workers > 1 and batches:  # read only the samples of this worker's batches
            pos = np.concatenate([np.arange(self.consumed + a, self.consumed + b) for a, b in batches])
            need = np.zeros(len(order), dtype=bool)
            need[order.perm[pos]] = True
        for a, b in batches:
            yield self.make_batch(order, np.arange(self.consumed + a, self.consumed + b), arenas, need)


def _blosc_single_thread() -> None:
    try:
        import numcodecs.blosc

        numcodecs.blosc.use_threads = False
    except ImportError:
        pass


def _die_with(parent_pid: int, _worker_id: int) -> None:
    """Worker start-up: end this worker when the training process ends, however it ends.

    Workers are children of the forkserver, not of the training process, so PyTorch's own check
    (the parent pid changed) never fires after a SIGKILL of the run: the workers stayed alive.
    Here the kernel kills the worker when its parent (the forkserver, which exits with the run)
    dies (Linux ``PR_SET_PDEATHSIG``), and a daemon thread checks the run's pid every second."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the thread below still does it
        pass

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # the pid was reused by another user's process: parent gone
                os._exit(1)

    threading.Thread(target=watch, name="mtscale-parent-watch", daemon=True).start()


def default_mp_context() -> str:
    """``forkserver`` where available (Linux), else ``spawn``: never ``fork`` (zarr / fsspec
    hold threads, event loops and file handles that do not survive a fork)."""
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


class StatefulLoader:
    """Iterates the rest of the current epoch of a :class:`ClipDataset` (then advances the
    epoch), moves batches to ``device``, applies batched augmentations (training), the clip
    normalisation and the input stream (``cfg.stream``), and counts what the consumer received,
    so ``state_dict`` / ``load_state_dict`` resume exactly. This is the one place batches are
    finalised: pre-training, fine-tuning, the linear probe and evaluation all read through it."""

    def __init__(
        self,
        dataset: ClipDataset,
        *,
        num_workers: int = 0,
        device: torch.device | str | None = None,
        augment: BatchAugment | None = None,
        mp_context: str | None = None,
        prefetch_factor: int = 2,
    ):
        if num_workers > 0 and dataset.url.startswith("memory://"):
            raise ConfigError(
                f"data.num_workers: found {num_workers} with store {dataset.url}, expected 0 "
                "(memory:// filesystems are per-process; use a file or object-store URL with workers)"
            )
        self.dataset, self.num_workers = dataset, int(num_workers)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.augment = augment if augment is not None and augment.active else None
        self.mp_context, self.prefetch_factor = mp_context or default_mp_context(), prefetch_factor
        self.epoch, self.consumed = 0, 0
        self._workers: DataLoader | None = None  # made on the first pass, kept across epochs

    def __len__(self) -> int:
        """Batches in a full epoch."""
        return self.dataset.num_batches(0)

    @property
    def num_samples(self) -> int:
        return self.dataset.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (no-op if already positioned in it)."""
        if epoch != self.epoch:
            self.epoch, self.consumed = int(epoch), 0

    def state_dict(self) -> dict[str, int]:
        ds = self.dataset
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": ds.seed, "rank": ds.rank,
                "world_size": ds.world_size, "num_samples": ds.num_samples, "batch_size": ds.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        ds = self.dataset
        for key, have in (("seed", ds.seed), ("world_size", ds.world_size), ("num_samples", ds.num_samples)):
            if key in state and int(state[key]) != have:
                raise ConfigError(
                    f"loader state: found {key}={state[key]} in the checkpoint, expected {have} "
                    "(the order cannot resume exactly; drop the loader state to restart the epoch)"
                )
        if not 0 <= int(state["consumed"]) <= ds.num_samples:
            raise ConfigError(f"loader state: found consumed={state['consumed']}, expected in [0, {ds.num_samples}]")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        ds = self.dataset
        ds.epoch, ds.consumed = self.epoch, self.consumed
        if self.num_workers == 0:
            return iter(ds)
        if self._workers is None:
            # Persistent: the worker processes (and their imports, store handles, page cache)
            # live across epochs; each pass reads its start (epoch, consumed) from the dataset's
            # shared cursor, so order and resume are those of fresh workers.
            self._workers = DataLoader(
                ds, batch_size=None, num_workers=self.num_workers, multiprocessing_context=self.mp_context,
                prefetch_factor=self.prefetch_factor, pin_memory=self.device.type == "cuda",
                persistent_workers=True, worker_init_fn=functools.partial(_die_with, os.getpid()),
            )
        return iter(self._workers)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        ds = self.dataset
        for batch in self._batches():
            pos = self.consumed
            self.consumed += int(batch["index"].numel())
            all_valid = bool(batch["mask"].all())  # on the host, before the copy: no device sync
            if self.device.type != "cpu":
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            batch["all_valid"] = all_valid
            if self.augment is not None:
                batch["x"] = self.augment(batch["x"], seed=step_seed(ds.seed, self.epoch, ds.rank, pos))
            batch["x"] = normalize_clips(batch["x"], batch["mask"], ds.cfg.normalize)  # "none": as is
            batch["x"] = apply_stream(batch["x"], batch["mask"], ds.parents, ds.cfg.stream)  # "joint": as is
            yield batch
        self.epoch, self.consumed = self.epoch + 1, 0


def model_mask(batch: dict[str, Any]) -> torch.Tensor | None:
    """The valid-frame mask to pass to a model: None when the loader found every frame of the
    batch valid (the usual case: clips are resampled to T), so the model needs no padding mask
    and never asks the device whether one is needed (a host sync per forward on CUDA), and
    SDPA keeps its flash kernel."""
    return None if batch.get("all_valid") else batch["mask"]


def build_loader(
    store: Any,
    cfg: DataConfig,
    *,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    train: bool = True,
    drop_last: bool | None = None,
    device: torch.device | str | None = None,
    num_workers: int | None = None,
    augment: bool | None = None,
) -> StatefulLoader:
    """A resumable loader over ``store`` (a ``Store`` or a path / fsspec URL).

    ``train=True``: shuffled, random crops, ``drop_last`` (default), augmentations from
    ``cfg.augment`` on ``device``. ``train=False``: store order, centre crops, exact
    partition (every sample once across ranks), no augmentation. ``num_workers`` defaults to
    ``cfg.num_workers``."""
    ds = ClipDataset(store, cfg, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                     train=train, drop_last=drop_last)
    use_aug = train if augment is None else augment
    loader = StatefulLoader(
        ds, num_workers=cfg.num_workers if num_workers is None else num_workers, device=device,
        augment=BatchAugment(cfg.augment) if use_aug else None,
    )
    if train and len(loader) == 0:  # an epoch of no batch: a training loop would wait forever
        raise ConfigError(f"data: {ds.url}: {len(ds.sel)} selected training samples give rank {rank}/{world_size} "
                          f"{ds.num_samples} per epoch, fewer than one batch of {batch_size} (per rank); expected "
                          "a smaller train.batch_size or more samples")
    log.info("loader %s: %d selected samples, rank %d/%d sees %d per epoch (%d batches of %d)%s",
             ds.url, len(ds.sel), rank, world_size, ds.num_samples, len(loader), batch_size,
             ", exact" if ds.exact else "")
    return loader
