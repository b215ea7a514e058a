"""Label-fraction subsets for semi-supervised protocols (1 %, 10 %, ... of the labels).

The subset is class-stratified and a pure function of (labels, fraction, seed): every rank
computes the same one without communicating, and runs with different training seeds can
share one subset (``DataConfig.subset_seed``).
"""

from __future__ import annotations

import numpy as np

from mtscale.errors import ConfigError


def class_quota(count: int, fraction: float) -> int:
    """Samples kept from a class of ``count``: ``round(fraction * count)``, at least one."""
    return min(count, max(1, int(np.floor(fraction * count + 0.5))))


def label_fraction_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted positions into ``labels`` of a class-stratified ``fraction`` subset.

    Each class ``c`` with ``n_c`` samples keeps :func:`class_quota` ``(n_c, fraction)`` of
    them, chosen uniformly with ``rng(seed, c)`` (so adding a class does not reshuffle the
    others). Unlabelled samples (label < 0) are never chosen. ``fraction == 1`` keeps all
    labelled samples.
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"data.label_fraction: found {fraction}, expected in (0, 1]")
    labels = np.asarray(labels, dtype=np.int64)
    labelled = np.flatnonzero(labels >= 0)
    if fraction == 1.0:
        return labelled
    if labelled.size == 0:
        raise ConfigError("data.label_fraction: found no labelled samples (all labels < 0), expected at least one")
    keep = []
    for c in np.unique(labels[labelled]):
        members = labelled[labels[labelled] == c]
        k = class_quota(members.size, fraction)
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(c), 7])
        keep.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(keep))


def grouped_fraction_subset(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Like :func:`label_fraction_subset`, but whole groups at a time, so that no group sits on
    both sides of the hold-out. A group is a take seen by several cameras, a performer, ...

    - Groups within one class each (a take: its action is part of the group): within each class
      ``c``, :func:`class_quota` ``(g_c, fraction)`` of its ``g_c`` groups are chosen
      (``rng(seed, c)``), so the hold-out is stratified exactly.
    - Groups spanning classes (a performer acts every action): ``class_quota(g, fraction)`` of
      all ``g`` groups are chosen at once (``rng(seed)``) and every labelled sample of theirs is
      kept; stratified only as far as the groups are. (Choosing per class would put a performer
      held out for one action into training for another.)

    Unlabelled samples (label < 0) are never chosen. Sorted positions into ``labels``."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"val_fraction: found {fraction}, expected in (0, 1) for a grouped hold-out")
    labels, groups = np.asarray(labels, dtype=np.int64), np.asarray(groups)
    if groups.shape != labels.shape:
        raise ConfigError(f"groups: found shape {groups.shape}, expected one group per sample {labels.shape}")
    labelled = np.flatnonzero(labels >= 0)
    if labelled.size == 0:
        return np.zeros(0, dtype=np.int64)
    names = np.unique(groups[labelled])
    if len(set(zip(groups[labelled].tolist(), labels[labelled].tolist()))) > names.size:  # a group spans classes
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 13])
        chosen = rng.choice(names, size=class_quota(names.size, fraction), replace=False)
        return labelled[np.isin(groups[labelled], chosen)]
    keep = []
    for c in np.unique(labels[labelled]):
        members = labelled[labels[labelled] == c]
        names = np.unique(groups[members])
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(c), 11])
        chosen = rng.choice(names, size=class_quota(names.size, fraction), replace=False)
        keep.append(members[np.isin(groups[members], chosen)])
    return np.sort(np.concatenate(keep))


HOLDOUT = "holdout"
"""Name of the split ``add_holdout_split`` adds (manifest column ``split_holdout``)."""


def add_holdout_split(url: str, fraction: float = 0.2, group: list[str] | None = None, seed: int = 0) -> dict[str, int]:
    """Give a store without a split one: manifest column ``split_holdout`` = ``test`` for a
    class-stratified ``fraction`` of the labelled samples (whole ``group`` values together, e.g.
    performers, when the manifest has such columns), ``train`` for the rest (unlabelled samples
    included); a class too small to split (one sample or one group) stays in training. The
    manifest is rewritten atomically; the arrays are untouched. Local stores only.
    Returns the part sizes."""
    import pyarrow as pa

    from mtscale.data.store import MANIFEST, Store
    from mtscale.data.store_writer import parquet_bytes
    from mtscale.files import atomic_write

    store = Store.open(url)
    path = store.url.rstrip("/") + "/" + MANIFEST
    if "://" in store.url and not store.url.startswith("file://"):
        raise ConfigError(f"{url}: a hold-out split is added to local stores only, found a remote URL")
    table = store.manifest
    if f"split_{HOLDOUT}" in table.column_names:
        raise ConfigError(f"{url}: the manifest already has a split_{HOLDOUT} column, expected a store without it")
    labels = np.asarray(store.labels, dtype=np.int64)
    if group:
        from mtscale.train.finetune_data import group_ids

        pick = grouped_fraction_subset(labels, group_ids(store, group), fraction, seed)
    else:
        pick = label_fraction_subset(labels, fraction, seed)
    part = np.full(labels.shape[0], "train", dtype=object)
    part[pick] = "test"
    for c in np.unique(labels[labels >= 0]):  # a class with one group / sample stays in training
        if not (part[labels == c] == "train").any():
            part[labels == c] = "train"
    table = table.append_column(f"split_{HOLDOUT}", pa.array(part.tolist(), pa.string()))
    atomic_write(path.removeprefix("file://"), parquet_bytes(table))
    return {"train": int((part == "train").sum()), "test": int((part == "test").sum())}
