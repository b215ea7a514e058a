"""Pure sample-order functions of the streaming loader (no store, no torch).

The order of an epoch is a pure function of ``(seed, epoch, world size, rank)`` and the
selected samples' offsets; it never depends on the number of dataloader workers. Steps
(MosaicML-streaming style):

1. **Blocks.** The selected rows, sorted by frame offset, are grouped into blocks of
   consecutive samples whose first frame falls in the same ``block_frames``-aligned range
   (``block_frames`` = the store's read chunk). One block = one contiguous ``read_frames``.
2. **Block permutation** by ``rng(seed, epoch)`` (training) or identity (evaluation); the
   same on every rank.
3. **Partition across ranks** of the block-permuted sample sequence into contiguous slices:
   - ``exact=False`` (training): every rank gets ``n // world_size`` samples; the
     ``n % world_size`` samples at the end of the permuted sequence are dropped (different
     ones each epoch), so every rank runs the same number of batches.
   - ``exact=True`` (evaluation): slice sizes differ by at most one; every sample is
     yielded exactly once across ranks, no padding duplicates.
4. **Bounded shuffle**: the rank's slice is cut into windows of ``shuffle_buffer`` samples
   and each window is permuted by ``rng(seed, epoch, rank, window)``. A window spans a
   contiguous run of blocks, so a reader holds at most about one window of frames.

Workers then take interleaved batch-sized groups of the rank's sequence
(:func:`worker_batches`); the DataLoader's in-order round-robin delivery reassembles it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def make_blocks(offsets: np.ndarray, block_frames: int) -> np.ndarray:
    """Block boundaries of samples sorted by ``offsets``: returns ``bounds`` (B + 1,) with
    block ``b`` = samples ``bounds[b]:bounds[b + 1]``. Samples whose first frame lies in the
    same ``block_frames``-aligned frame range share a block."""
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets.size and np.any(np.diff(offsets) < 0):
        raise ValueError("make_blocks: offsets must be sorted ascending")
    if block_frames < 1:
        raise ValueError(f"make_blocks: block_frames must be >= 1, found {block_frames}")
    key = offsets // int(block_frames)
    starts = np.flatnonzero(np.diff(key)) + 1
    return np.concatenate([[0], starts, [offsets.size]]).astype(np.int64) if offsets.size else np.zeros(1, np.int64)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key] + [len(key)])


@dataclass(frozen=True)
class RankOrder:
    """One rank's order for one epoch, as indices into the selected-sample arrays.

    ``unshuffled`` (n_rank,): the rank's contiguous slice of the block-permuted sequence.
    ``perm`` (n_rank,): the rank's sequence is ``unshuffled[perm]``; ``perm`` only permutes
    within windows of ``window`` samples, so position ``p`` reads window ``p // window``.
    """

    unshuffled: np.ndarray
    perm: np.ndarray
    window: int

    @property
    def sequence(self) -> np.ndarray:
        return self.unshuffled[self.perm]

    def __len__(self) -> int:
        return int(self.unshuffled.size)


def rank_slice(n: int, rank: int, world_size: int, exact: bool) -> tuple[int, int]:
    """[start, stop) of ``rank``'s contiguous share of an ``n``-sample sequence."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    if exact:
        return rank * n // world_size, (rank + 1) * n // world_size
    per = n // world_size
    return rank * per, (rank + 1) * per


def rank_order(
    bounds: np.ndarray,
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    shuffle: bool,
    shuffle_buffer: int,
    exact: bool,
) -> RankOrder:
    """The order of ``rank`` in ``epoch`` over the blocks given by ``bounds`` (see module
    docstring). Indices refer to the selected samples (0 .. bounds[-1] - 1)."""
    n = int(bounds[-1])
    num_blocks = bounds.size - 1
    if shuffle:
        block_perm = _rng(seed, epoch).permutation(num_blocks)
        sizes = np.diff(bounds)[block_perm]
        starts = bounds[:-1][block_perm]
        # concatenated ranges starts[b] .. starts[b] + sizes[b], vectorised
        within = np.arange(n, dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        seq = np.repeat(starts, sizes) + within
    else:
        seq = np.arange(n, dtype=np.int64)
    lo, hi = rank_slice(n, rank, world_size, exact)
    unshuffled = seq[lo:hi]
    n_rank = unshuffled.size
    window = max(1, int(shuffle_buffer))
    perm = np.arange(n_rank, dtype=np.int64)
    if shuffle:
        for k, w0 in enumerate(range(0, n_rank, window)):
            w1 = min(w0 + window, n_rank)
            perm[w0:w1] = w0 + _rng(seed, epoch, rank, k, 1).permutation(w1 - w0)
    return RankOrder(unshuffled=unshuffled, perm=perm, window=window)


def num_batches(num_samples: int, batch_size: int, drop_last: bool) -> int:
    return num_samples // batch_size if drop_last else -(-num_samples // batch_size)


def worker_batches(
    num_remaining: int, batch_size: int, drop_last: bool, worker: int, num_workers: int
) -> list[tuple[int, int]]:
    """[start, stop) positions (relative to the first unconsumed sample) of the batches that
    ``worker`` of ``num_workers`` produces: batches ``worker, worker + W, ...``, so that
    round-robin in-order delivery yields the rank's sequence unchanged."""
    nb = num_batches(num_remaining, batch_size, drop_last)
    return [(b * batch_size, min((b + 1) * batch_size, num_remaining)) for b in range(worker, nb, max(1, num_workers))]


def uniform_hash(seed: int, epoch: int, salt: int, rows: np.ndarray) -> np.ndarray:
    """Counter-based uniforms in [0, 1): a pure function of (seed, epoch, salt, row), so a
    sample's random crop does not depend on batching, workers, ranks or resume points.
    splitmix64 finaliser, vectorised."""
    with np.errstate(over="ignore"):
        z = np.asarray(rows, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z ^= np.uint64((seed * 0x632BE59BD9B4E019 + epoch * 0x85EBCA77C2B2AE63 + salt * 0x27D4EB2F165667C5) & 0xFFFFFFFFFFFFFFFF)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
