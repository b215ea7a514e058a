"""What one rank reads in one epoch, as whole collated batches: the selected samples
(``select_samples``), their order, the read arenas and the clips cut from them
(``ClipDataset``). ``mtscale.data.loader`` wraps it with workers, the device, augmentation, the
input stream and resumable state.

Order: a pure function of (seed, epoch, world size, rank) over the selected samples (see
``mtscale.data.order``): chunk-aligned blocks permuted per epoch, contiguous equal shares per
rank (training drops the ``n % world_size`` remainder so every rank runs the same number of
batches; evaluation, ``exact=True``, yields every sample exactly once across ranks), then a
bounded shuffle in windows of ``cfg.shuffle_buffer`` samples.

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
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mtscale.config import DataConfig
from mtscale.data.clips import (
    crop_windows,
    frame_times,
    gather_clips,
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
