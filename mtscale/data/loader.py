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

The batches come from ``mtscale.data.dataset.ClipDataset`` (order, reading, clips: see there).

Workers: batch ``b`` of the rank's remaining sequence is made by worker ``b % W``; the
DataLoader's in-order round-robin delivery reassembles the sequence, so the samples (and
their crops and augmentations, keyed by sample / position, not by worker) do not depend on
the number of workers. ``state_dict`` records the samples the consumer has received; after
``load_state_dict`` iteration yields exactly the rest of that epoch, for any worker count.

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
from typing import Any

import torch
from torch.utils.data import DataLoader

from mtscale.config import DataConfig
from mtscale.data.augment import BatchAugment, step_seed
from mtscale.data.clips import (
    normalize_clips,
)
from mtscale.data.dataset import ClipDataset
from mtscale.data.streams import apply_stream
from mtscale.errors import ConfigError

log = logging.getLogger(__name__)


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
