"""Property tests of the loader's pure order / partition / subset functions (no store)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtscale.data.order import make_blocks, rank_order, uniform_hash, worker_batches
from mtscale.data.subsets import class_quota, label_fraction_subset
from mtscale.errors import ConfigError


def _offsets(lengths: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


lengths_st = st.lists(st.integers(1, 300), min_size=1, max_size=400)


def _order(bounds, seed, epoch, rank, world, shuffle=True, buf=37, exact=False):
    return rank_order(bounds, seed=seed, epoch=epoch, rank=rank, world_size=world,
                      shuffle=shuffle, shuffle_buffer=buf, exact=exact)


@settings(max_examples=60, deadline=None)
@given(lengths_st, st.integers(1, 2000))
def test_blocks_cover_samples_in_order_and_align_to_chunks(lengths, block_frames):
    off = _offsets(lengths)
    b = make_blocks(off, block_frames)
    assert b[0] == 0 and b[-1] == len(lengths) and np.all(np.diff(b) > 0)
    for i in range(b.size - 1):
        keys = off[b[i]:b[i + 1]] // block_frames
        assert np.all(keys == keys[0])  # one aligned range per block
        if i:
            assert off[b[i - 1]] // block_frames < keys[0]


@settings(max_examples=60, deadline=None)
@given(lengths_st, st.integers(0, 2**31), st.integers(0, 50), st.integers(1, 8), st.integers(1, 500))
def test_training_epoch_ranks_disjoint_equal_and_lose_only_remainder(lengths, seed, epoch, world, block_frames):
    n = len(lengths)
    bounds = make_blocks(_offsets(lengths), block_frames)
    seqs = [_order(bounds, seed, epoch, r, world).sequence for r in range(world)]
    assert {len(s) for s in seqs} == {n // world}  # same batches on every rank
    allv = np.concatenate(seqs)
    assert len(np.unique(allv)) == allv.size  # disjoint, no duplicates
    assert allv.size == n - n % world and np.all((allv >= 0) & (allv < n))
    if world == 1:
        assert np.array_equal(np.sort(allv), np.arange(n))  # an epoch is a permutation


@settings(max_examples=60, deadline=None)
@given(lengths_st, st.integers(0, 2**31), st.integers(1, 8), st.booleans())
def test_exact_mode_yields_every_sample_once(lengths, seed, world, shuffle):
    n = len(lengths)
    bounds = make_blocks(_offsets(lengths), 64)
    seqs = [_order(bounds, seed, 3, r, world, shuffle=shuffle, exact=True).sequence for r in range(world)]
    assert np.array_equal(np.sort(np.concatenate(seqs)), np.arange(n))
    assert max(map(len, seqs)) - min(map(len, seqs)) <= 1


def test_order_depends_on_seed_and_epoch_and_is_reproducible():
    bounds = make_blocks(_offsets([50] * 1000), 256)
    a = _order(bounds, 1, 0, 0, 1).sequence
    assert np.array_equal(a, _order(bounds, 1, 0, 0, 1).sequence)
    assert not np.array_equal(a, _order(bounds, 1, 1, 0, 1).sequence)
    assert not np.array_equal(a, _order(bounds, 2, 0, 0, 1).sequence)
    # evaluation order (no shuffle) is store order
    assert np.array_equal(_order(bounds, 1, 0, 0, 1, shuffle=False).sequence, np.arange(1000))


def test_shuffle_stays_within_bounded_windows_but_mixes_blocks():
    lengths = [10] * 2000
    bounds = make_blocks(_offsets(lengths), 100)  # 10 samples per block
    o = _order(bounds, 0, 0, 0, 1, buf=300)
    seq = o.sequence
    for k in range(0, 2000, 300):  # each window is a permutation of a contiguous block run
        assert np.array_equal(np.sort(seq[k:k + 300]), np.sort(o.unshuffled[k:k + 300]))
    blocks = seq // 10
    # consecutive samples usually come from different blocks (shuffled inside the window)
    assert np.mean(blocks[1:] != blocks[:-1]) > 0.8
    # a window touches about window / block_size blocks, not the whole dataset
    assert len(np.unique(blocks[:300])) <= 31


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 500), st.integers(1, 40), st.booleans(), st.sampled_from([1, 2, 3, 4, 7]))
def test_worker_interleave_reassembles_the_same_sequence(n, batch, drop_last, workers):
    """Round-robin in-order delivery of per-worker batches == the rank's batches, for any W."""
    per_worker = [iter(worker_batches(n, batch, drop_last, w, workers)) for w in range(workers)]
    got, active = [], list(range(workers))
    while active:  # DataLoader's in-order round robin, workers leave when exhausted
        for w in list(active):
            nxt = next(per_worker[w], None)
            if nxt is None:
                active.remove(w)
            else:
                got.append(nxt)
    expect = worker_batches(n, batch, drop_last, 0, 1)
    assert got == expect
    covered = sum(b - a for a, b in expect)
    assert covered == (n - n % batch if drop_last else n)


@settings(max_examples=40, deadline=None)
@given(lengths_st, st.integers(0, 1000), st.integers(1, 16), st.sampled_from([0, 1, 4]))
def test_resume_after_k_batches_continues_with_exactly_the_remaining_samples(lengths, k, batch, workers):
    bounds = make_blocks(_offsets(lengths), 128)
    seq = _order(bounds, 5, 2, 0, 1).sequence
    consumed = min(k * batch, seq.size)
    w = max(1, workers)
    remaining = seq.size - consumed
    parts = [[seq[consumed + a: consumed + b] for a, b in worker_batches(remaining, batch, False, i, w)] for i in range(w)]
    merged = [parts[i % w][i // w] for i in range(sum(map(len, parts)))]
    rest = np.concatenate(merged) if merged else np.zeros(0, np.int64)
    assert np.array_equal(np.concatenate([seq[:consumed], rest]), seq)


def test_uniform_hash_is_per_row_pure_and_uniform():
    rows = np.arange(200_000)
    u = uniform_hash(3, 1, 1, rows)
    assert np.all((u >= 0) & (u < 1))
    assert abs(u.mean() - 0.5) < 0.01 and abs(np.percentile(u, 10) - 0.1) < 0.01
    assert np.array_equal(u[[5, 7]], uniform_hash(3, 1, 1, np.array([5, 7])))  # batch-independent
    assert not np.allclose(u[:100], uniform_hash(3, 2, 1, rows[:100]))
    assert not np.allclose(u[:100], uniform_hash(3, 1, 2, rows[:100]))


# ------------------------------------------------------------------ label-fraction subsets


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-1, 12), min_size=1, max_size=600), st.sampled_from([0.01, 0.1, 0.25, 0.5]), st.integers(0, 2**31))
def test_label_fraction_stratified_and_identical_across_ranks(labels, fraction, seed):
    labels = np.array(labels)
    if not (labels >= 0).any():
        with pytest.raises(ConfigError):
            label_fraction_subset(labels, fraction, seed)
        return
    subsets = [label_fraction_subset(labels.copy(), fraction, seed) for _rank in range(3)]
    assert all(np.array_equal(subsets[0], s) for s in subsets[1:])  # every rank computes the same
    sub = subsets[0]
    assert np.all(np.diff(sub) > 0) and np.all(labels[sub] >= 0)
    for c in np.unique(labels[labels >= 0]):
        n_c = int((labels == c).sum())
        k_c = int((labels[sub] == c).sum())
        assert k_c == class_quota(n_c, fraction) and k_c >= 1  # stratified, >= 1 per class


def test_label_fraction_values_and_seed_dependence():
    labels = np.repeat(np.arange(10), 200)  # 10 classes x 200
    sub = label_fraction_subset(labels, 0.1, seed=0)
    assert sub.size == 200 and np.all(np.bincount(labels[sub]) == 20)
    assert not np.array_equal(sub, label_fraction_subset(labels, 0.1, seed=1))
    assert np.array_equal(label_fraction_subset(labels, 1.0, 0), np.arange(2000))
    one = label_fraction_subset(labels, 0.001, 0)  # 0.2 per class -> still one each
    assert np.array_equal(np.bincount(labels[one]), np.ones(10))
    with pytest.raises(ConfigError, match="label_fraction"):
        label_fraction_subset(labels, 0.0, 0)
