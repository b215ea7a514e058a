"""Which store rows fine-tuning trains, validates and tests on, and loaders over given rows.

Model selection never looks at the test part: validation is a ``val`` part of the split when
``val_part`` is set, the training part's rows matching ``val_where`` when that is set (e.g. one
camera: a cross-view hold-out), otherwise a class-stratified, seeded ``val_fraction`` of the
training part, whole groups of it with ``val_group`` (e.g. all views of one take), seeded by
``data.subset_seed`` so every training seed validates on the same samples. The label-fraction
subset (semi-supervised protocols) is then drawn from what is left, so the validation samples
are never among the training labels. Every rank computes the same rows.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mtscale.config import DataConfig, FinetuneConfig
from mtscale.data.augment import BatchAugment
from mtscale.data.dataset import ClipDataset, Selection
from mtscale.data.loader import StatefulLoader
from mtscale.data.manifest import evaluate_where
from mtscale.data.order import make_blocks
from mtscale.data.subsets import grouped_fraction_subset, label_fraction_subset
from mtscale.errors import ConfigError

log = logging.getLogger(__name__)

VAL_SALT = 0x5A1  # mixed into subset_seed so the val split and the label subset differ


@dataclass
class Splits:
    """Store rows (sorted) of each role; ``test`` is None without a test part."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray | None

    def sizes(self) -> dict[str, int]:
        return {"train": int(self.train.size), "val": int(self.val.size),
                "test": int(self.test.size) if self.test is not None else 0}


def make_splits(store: Any, cfg: FinetuneConfig) -> Splits:
    """Train / val / test rows of ``store`` for ``cfg`` (see the module docstring)."""
    d = cfg.data
    labels = np.asarray(store.labels, dtype=np.int64)
    part = d.part if d.split else None
    train = store.select(split=d.split, part=part, where=d.where)
    train = train[labels[train] >= 0]
    if train.size == 0:
        raise ConfigError(f"data: {store.url}: split={d.split!r} part={d.part!r} where={d.where!r} selects 0 "
                          "labelled training samples, expected at least 1")
    if cfg.val_part is not None:
        if d.split is None:
            raise ConfigError(f"val_part: found {cfg.val_part!r} without data.split, expected a split name as well")
        val = store.select(split=d.split, part=cfg.val_part, where=d.where)
        val = val[labels[val] >= 0]
    elif cfg.val_where is not None:
        pick = np.flatnonzero(evaluate_where(store.manifest, cfg.val_where)[train])
        if pick.size == 0 or pick.size == train.size:
            raise ConfigError(f"val_where: {cfg.val_where!r} matches {pick.size} of the {train.size} training rows "
                              f"(split={d.split!r} part={d.part!r} where={d.where!r}); expected some but not all")
        val = train[pick]
        train = np.delete(train, pick)
    elif cfg.val_fraction > 0:
        if cfg.val_group:
            pick = grouped_fraction_subset(labels[train], group_ids(store, cfg.val_group)[train], cfg.val_fraction,
                                           d.subset_seed ^ VAL_SALT)
        else:
            pick = label_fraction_subset(labels[train], cfg.val_fraction, d.subset_seed ^ VAL_SALT)
        val = train[pick]
        train = np.delete(train, pick)
    else:
        val = np.zeros(0, dtype=np.int64)
    if d.label_fraction < 1.0:
        train = train[label_fraction_subset(labels[train], d.label_fraction, d.subset_seed)]
    test = None
    if cfg.test_part is not None and d.split is not None:
        test = store.select(split=d.split, part=cfg.test_part, where=d.where)
        test = test[labels[test] >= 0]
        if np.intersect1d(test, train).size or np.intersect1d(test, val).size:
            raise ConfigError(f"test_part: {cfg.test_part!r} overlaps the training rows of data.part "
                              f"{d.part!r}; expected disjoint parts of split {d.split!r}")
    elif cfg.test_part is not None:
        log.warning("test_part=%r has no effect without data.split: no test evaluation", cfg.test_part)
    return Splits(np.sort(train), np.sort(val), None if test is None else np.sort(test))


def group_ids(store: Any, columns: list[str]) -> np.ndarray:
    """One integer per store row: equal iff the row has equal values in all ``columns``."""
    names = store.manifest.column_names
    missing = [c for c in columns if c not in names]
    if missing:
        raise ConfigError(f"val_group: found column {missing[0]!r}, which {store.url}'s manifest lacks; expected "
                          f"columns of {names}")
    codes = [np.unique(np.asarray(store.manifest.column(c).to_pylist(), dtype=object).astype(str),
                       return_inverse=True)[1] for c in columns]
    return np.unique(np.stack(codes, axis=1), axis=0, return_inverse=True)[1].reshape(-1)


def selection_for_rows(store: Any, rows: np.ndarray, block_frames: int | None = None) -> Selection:
    """A loader ``Selection`` over exactly ``rows`` (sorted by frame offset, chunk blocks)."""
    rows = np.asarray(rows, dtype=np.int64)
    offsets = np.asarray(store.offsets, dtype=np.int64)[rows]
    order = np.argsort(offsets, kind="stable")
    rows, offsets = rows[order], offsets[order]
    return Selection(rows=rows, offsets=offsets, lengths=np.asarray(store.lengths, dtype=np.int64)[rows],
                     labels=np.asarray(store.labels, dtype=np.int64)[rows],
                     bounds=make_blocks(offsets, int(block_frames or store.chunk_frames)))


def rows_loader(store: Any, data: DataConfig, rows: np.ndarray, *, batch_size: int, seed: int, rank: int,
                world_size: int, train: bool, device: torch.device, exact: bool | None = None,
                augment: bool | None = None, num_workers: int | None = None) -> StatefulLoader:
    """The streaming loader (``mtscale.data.loader``) over exactly ``rows``.

    ``train``: shuffled random crops + ``data.augment`` on ``device``, equal shares per rank.
    Otherwise centre crops, store order, exact partition (every row once across ranks).
    ``exact`` with ``train`` gives random crops with an exact partition (multi-clip testing),
    without ``data.augment`` unless ``augment`` (a linear probe's training views).
    """
    if rows.size == 0:
        raise ConfigError("rows_loader: no rows to load")
    # The dataset selects by split/part itself; rows replace that selection (label_fraction=1
    # so it does not subsample first).
    probe = dataclasses.replace(data, label_fraction=1.0)
    ds = ClipDataset(store, probe, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                     train=train, drop_last=train and not exact, exact=exact)
    ds.sel = selection_for_rows(ds.store, rows)
    aug = BatchAugment(data.augment) if train and (not exact if augment is None else augment) else None
    workers = data.num_workers if num_workers is None else num_workers
    if ds.url.startswith("memory://"):
        workers = 0
    return StatefulLoader(ds, num_workers=workers, device=device, augment=aug)
