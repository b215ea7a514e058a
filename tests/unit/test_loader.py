"""The streaming loader over real stores (memory:// and local / file:// URLs)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtscale.config import AugmentConfig, DataConfig
from mtscale.data.clips import crop_windows, resample_indices
from mtscale.data.loader import build_loader
from mtscale.data.order import uniform_hash
from mtscale.data.store_writer import write_store
from mtscale.errors import ConfigError

_counter = itertools.count()


def _samples(n: int, seed: int = 0, min_len: int = 8, max_len: int = 150, bodies: int = 2):
    rng = np.random.default_rng(seed)
    for i in range(n):
        length = int(rng.integers(min_len, max_len))
        x = rng.standard_normal((length, bodies, 25, 3)).astype(np.float32)
        x[..., 0] += i  # sample identity readable from the data
        fields = {"split_xs": "train" if i % 4 else "test", "subject": i % 5}
        yield f"s{i:05d}", x, i % 6, fields


def _store(url: str, n: int = 300, **kw):
    return write_store(url, _samples(n, **kw), layout="ntu25", num_bodies=kw.get("bodies", 2),
                       chunk_frames=512, shard_chunks=2)


@pytest.fixture(scope="module")
def mem_store():
    return _store(f"memory://loader-test-{next(_counter)}")


@pytest.fixture(scope="module")
def file_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("loader") / "store"
    _store(str(path), n=200)
    return "file://" + str(path)


def _cfg(**kw) -> DataConfig:
    kw.setdefault("shuffle_buffer", 50)
    kw.setdefault("num_workers", 0)
    kw.setdefault("clip_frames", 32)
    return DataConfig(**kw)


def _epoch(loader) -> tuple[np.ndarray, torch.Tensor]:
    batches = list(loader)
    return (np.concatenate([b["index"].numpy() for b in batches]), torch.cat([b["x"] for b in batches]))


def test_batch_schema_and_reference_crop_resample(mem_store):
    """Training clips equal MAMP's per-sample crop + F.interpolate of the stored frames."""
    cfg = _cfg(crop_min=0.3, crop_max=0.9)
    loader = build_loader(mem_store, cfg, batch_size=16, seed=3)
    b = next(iter(loader))
    assert b["x"].shape == (16, 32, 2, 25, 3) and b["x"].dtype == torch.float32
    assert b["mask"].shape == (16, 32) and b["mask"].dtype == torch.bool and bool(b["mask"].all())
    assert b["label"].dtype == torch.int64 and b["index"].dtype == torch.int64
    rows = b["index"].numpy()
    assert np.array_equal(b["label"].numpy(), mem_store.labels[rows])
    u_f, u_s = uniform_hash(3, 0, 1, rows), uniform_hash(3, 0, 2, rows)
    start, crop = crop_windows(mem_store.lengths[rows], train=True, crop_min=0.3, crop_max=0.9,
                               eval_crop=1.0, u_frac=u_f, u_start=u_s)
    assert len(set(crop.tolist())) > 3  # random crop lengths
    # each frame's time in the recording: crop start + its resample position (align_corners=False)
    src = np.maximum((np.arange(32) + 0.5) * (crop[:, None] / 32) - 0.5, 0.0)
    np.testing.assert_allclose(b["time"].numpy(), start[:, None] + np.minimum(src, crop[:, None] - 1), atol=1e-4)
    assert b["time"].dtype == torch.float32
    for j, r in enumerate(rows):
        full = torch.from_numpy(mem_store.read_sample(int(r)))  # (T, M, V, C)
        seg = full[start[j]:start[j] + crop[j]]
        t, m, v, c = seg.shape
        ref = F.interpolate(seg.reshape(t, -1).T[None], size=32, mode="linear", align_corners=False)[0].T
        torch.testing.assert_close(b["x"][j], ref.reshape(32, m, v, c), atol=1e-4, rtol=1e-4)


def test_eval_is_exact_centre_crop_and_covers_split_across_ranks(mem_store):
    cfg = _cfg(split="xs", part="test", eval_crop=1.0)
    want = mem_store.select(split="xs", part="test")
    got = []
    for rank in range(3):
        loader = build_loader(mem_store, cfg, batch_size=7, seed=0, rank=rank, world_size=3, train=False)
        idx, x = _epoch(loader)
        got.append(idx)
        for j in (0, len(idx) - 1):  # eval_crop=1: the whole sequence resampled, no augmentation
            full = torch.from_numpy(mem_store.read_sample(int(idx[j])))
            t = full.shape[0]
            ref = F.interpolate(full.reshape(t, -1).T[None], size=32, mode="linear", align_corners=False)[0].T
            torch.testing.assert_close(x[j], ref.reshape(32, 2, 25, 3), atol=1e-4, rtol=1e-4)
    assert np.array_equal(np.sort(np.concatenate(got)), want)  # every test sample exactly once


def test_training_ranks_disjoint_and_epochs_differ(mem_store):
    cfg = _cfg()
    per_rank = [_epoch(build_loader(mem_store, cfg, batch_size=8, seed=1, rank=r, world_size=2))[0] for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 144  # 300 // 2 = 150, drop_last batches of 8
    assert not set(per_rank[0]) & set(per_rank[1])
    loader = build_loader(mem_store, cfg, batch_size=10, seed=1, drop_last=False)
    e0, _ = _epoch(loader)
    e1, _ = _epoch(loader)  # the loader advanced to epoch 1 by itself
    assert np.array_equal(np.sort(e0), np.arange(300)) and np.array_equal(np.sort(e1), np.arange(300))
    assert not np.array_equal(e0, e1)


def test_resume_mid_epoch_yields_exactly_the_rest_with_same_augmented_values(mem_store):
    cfg = _cfg(augment=AugmentConfig(rotate_deg=20, scale=0.1, time_mask_frames=4, body_swap_p=0.5))
    full_idx, full_x = _epoch(build_loader(mem_store, cfg, batch_size=8, seed=9))
    a = build_loader(mem_store, cfg, batch_size=8, seed=9)
    it = iter(a)
    head = [next(it) for _ in range(5)]
    state = a.state_dict()
    assert state["epoch"] == 0 and state["consumed"] == 40
    b = build_loader(mem_store, cfg, batch_size=8, seed=9)
    b.load_state_dict(state)
    rest_idx, rest_x = _epoch(b)
    idx = np.concatenate([h["index"].numpy() for h in head] + [rest_idx])
    assert np.array_equal(idx, full_idx)
    torch.testing.assert_close(torch.cat([h["x"] for h in head] + [rest_x]), full_x)
    assert b.state_dict()["epoch"] == 1 and b.state_dict()["consumed"] == 0


def test_resume_state_mismatch_is_a_clear_error(mem_store):
    a = build_loader(mem_store, _cfg(), batch_size=8, seed=9)
    state = dict(a.state_dict(), world_size=4)
    with pytest.raises(ConfigError, match="world_size=4"):
        a.load_state_dict(state)


def test_label_fraction_and_where_filter(mem_store):
    cfg = _cfg(split="xs", part="train", label_fraction=0.1, where="subject == 2")
    loader = build_loader(mem_store, cfg, batch_size=4, seed=0, train=False)
    idx, _ = _epoch(loader)
    pool = mem_store.select(split="xs", part="train", where="subject == 2")
    assert set(idx) <= set(pool)
    counts = np.bincount(mem_store.labels[idx], minlength=6)
    assert np.all(counts >= 1) and len(idx) < len(pool) / 3
    with pytest.raises(ConfigError, match="selects 0 samples"):
        build_loader(mem_store, _cfg(where="subject == 99"), batch_size=4, seed=0)


def test_pad_short_clips_and_body_count(tmp_path):
    store = write_store(f"memory://pad-{next(_counter)}", _samples(20, min_len=5, max_len=20, bodies=1),
                        layout="ntu25", num_bodies=1, chunk_frames=64)
    cfg = _cfg(short_clips="pad", eval_crop=1.0, num_bodies=2)
    idx, _ = _epoch(build_loader(store, cfg, batch_size=20, seed=0, train=False))
    b = next(iter(build_loader(store, cfg, batch_size=20, seed=0, train=False)))
    lengths = store.lengths[b["index"].numpy()]
    assert np.array_equal(b["mask"].sum(1).numpy(), lengths)  # valid frames = sequence length
    for j in range(3):
        n = lengths[j]
        torch.testing.assert_close(b["x"][j, :n, :1], torch.from_numpy(store.read_sample(int(b["index"][j]))))
        assert bool((b["x"][j, n:] == 0).all()) and bool((b["x"][j, :, 1] == 0).all())  # padding, added body


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_workers_give_the_same_stream_and_resume_across_worker_counts(file_store):
    """Same samples and values with 0, 2 and 1 workers; 3 batches with 2 workers, then
    resume with 1 worker: exactly the remaining samples (worker spawns are the slow part)."""
    cfg = _cfg(augment=AugmentConfig(rotate_deg=10))
    ref_idx, ref_x = _epoch(build_loader(file_store, cfg, batch_size=8, seed=4, num_workers=0))
    a = build_loader(file_store, cfg, batch_size=8, seed=4, num_workers=2)
    it = iter(a)
    head = [next(it) for _ in range(3)]
    state = a.state_dict()
    del it
    assert state["consumed"] == 24
    b = build_loader(file_store, cfg, batch_size=8, seed=4, num_workers=1)
    b.load_state_dict(state)
    rest_idx, rest_x = _epoch(b)
    assert np.array_equal(np.concatenate([h["index"].numpy() for h in head] + [rest_idx]), ref_idx)
    torch.testing.assert_close(torch.cat([h["x"] for h in head] + [rest_x]), ref_x)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_workers_live_across_epochs_with_the_same_order(file_store):
    """Issue 25, item 7: the worker processes are started once, not every epoch, and each epoch
    (also one left half-way) yields what fresh workers / no workers yield."""
    cfg = _cfg(augment=AugmentConfig(rotate_deg=10))
    ref = build_loader(file_store, cfg, batch_size=8, seed=4, num_workers=0)
    refs = [_epoch(ref) for _ in range(3)]
    a = build_loader(file_store, cfg, batch_size=8, seed=4, num_workers=2)
    got, pids = [], []
    for e in range(3):
        if e == 1:  # epoch 1: two batches, then a fresh pass of the rest (same epoch, as a resume would)
            it = iter(a)
            head = [next(it) for _ in range(2)]
            pids.append([w.pid for w in a._workers._iterator._workers])
            del it
            rest = _epoch(a)
            got.append((np.concatenate([h["index"].numpy() for h in head] + [rest[0]]),
                        torch.cat([h["x"] for h in head] + [rest[1]])))
        else:
            got.append(_epoch(a))
        pids.append([w.pid for w in a._workers._iterator._workers])
    assert all(p == pids[0] for p in pids), pids  # the same two processes throughout
    for (gi, gx), (ri, rx) in zip(got, refs):
        assert np.array_equal(gi, ri)
        torch.testing.assert_close(gx, rx)
    assert not np.array_equal(got[0][0], got[2][0])  # epochs differ


def test_batches_say_whether_they_need_a_mask(file_store, mem_store):
    """``all_valid`` is decided on the host; ``model_mask`` gives None then (no device sync, and
    SDPA keeps its flash kernel), the mask itself when a clip is padded."""
    from mtscale.data.loader import model_mask

    b = next(iter(build_loader(mem_store, _cfg(), batch_size=8, seed=0)))
    assert b["all_valid"] is True and model_mask(b) is None
    padded = _cfg(short_clips="pad", clip_frames=400, eval_crop=1.0)
    b = next(iter(build_loader(mem_store, padded, batch_size=8, seed=0, train=False)))
    assert b["all_valid"] is False and model_mask(b) is b["mask"] and not bool(b["mask"].all())


def test_memory_store_with_workers_is_refused(mem_store):
    with pytest.raises(ConfigError, match="memory://"):
        build_loader(mem_store, _cfg(), batch_size=8, seed=0, num_workers=2)


def test_reads_whole_blocks_not_samples(mem_store, monkeypatch):
    calls = []
    orig = type(mem_store).read_frames
    monkeypatch.setattr(type(mem_store), "read_frames",
                        lambda self, a, b, out=None: calls.append((a, b)) or orig(self, a, b, out))
    idx, _ = _epoch(build_loader(mem_store, _cfg(shuffle_buffer=1000), batch_size=50, seed=0))
    assert len(idx) == 300
    assert len(calls) <= mem_store.num_frames // 512 + 2  # about one read per chunk, not 300


def test_worker_reads_only_its_own_samples_with_identical_batches(mem_store):
    from mtscale.data.dataset import ClipDataset
    from mtscale.data.order import worker_batches

    ds = ClipDataset(mem_store, _cfg(shuffle_buffer=120), batch_size=16, seed=3, train=True)
    order = ds.order(0)
    mine = worker_batches(len(order), 16, True, worker=1, num_workers=3)
    pos = np.concatenate([np.arange(a, b) for a, b in mine])
    need = np.zeros(len(order), dtype=bool)
    need[order.perm[pos]] = True
    arena_full, _ = ds._window_arena(order, 0)
    arena_mine, _ = ds._window_arena(order, 0, need)
    assert 0 < len(arena_mine) < len(arena_full) * 0.6  # about a third of the window's frames
    for a, b in mine:
        ref = ds.make_batch(order, np.arange(a, b), {})
        got = ds.make_batch(order, np.arange(a, b), {}, need)
        assert torch.equal(ref["index"], got["index"]) and torch.equal(ref["x"], got["x"])


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_fused_gather_equals_the_torch_ops(monkeypatch, dtype):
    """The numba gather (float16 bits converted in the kernel, float32 direct) gives the blocked torch
    path's clips to float32 rounding, zeroes masked frames, and runs for both dtypes."""
    from mtscale.data import clips as C

    assert C._gather_kernel() is not None, "numba is a dependency: the fused gather must be available"
    rng = np.random.default_rng(3)
    arena = rng.standard_normal((3000, 2, 25, 3)).astype(dtype)
    lengths = rng.integers(5, 200, 40)
    start, crop = crop_windows(lengths, train=True, crop_min=0.3, crop_max=1.0, eval_crop=0.9,
                               u_frac=rng.random(40), u_start=rng.random(40))
    i0, i1, w, mask = resample_indices(crop, 48, pad_short=True)
    base = rng.integers(0, 2700, 40) + start
    fused = C.gather_clips(arena, base, i0, i1, w, mask)
    monkeypatch.setattr(C, "_gather_kernel", lambda: None)
    ref = C.gather_clips(arena, base, i0, i1, w, mask)
    assert (~mask).any() and (w > 0).any()
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6)
    assert (fused[torch.from_numpy(~mask)] == 0).all()
    n = int(np.flatnonzero(w[:, 5] == 0)[0]) if (w[:, 5] == 0).any() else None
    if n is not None and mask[n, 5]:  # w == 0: the stored value itself
        np.testing.assert_array_equal(fused[n, 5].numpy(), arena[base[n] + i0[n, 5]].astype(np.float32))


def test_fused_gather_converts_every_float16_exactly():
    """The kernel's float16 -> float32 conversion (bit arithmetic, no table) is exact for every
    finite float16: normals, subnormals and both zeros, bit for bit."""
    from mtscale.data import clips as C

    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    vals = bits.view(np.float16)[np.isfinite(bits.view(np.float16))]
    vals = np.concatenate([vals, np.zeros(-len(vals) % 150, np.float16)])
    arena = vals.reshape(-1, 2, 25, 3)  # (F, M, V, C)
    f = arena.shape[0]
    rows = np.arange(f)[None, :]
    got = C.gather_clips(arena, np.zeros(1, np.int64), rows, rows, np.zeros((1, f), np.float32), np.ones((1, f), bool))
    want = arena.astype(np.float32)
    assert np.array_equal(got[0].numpy().view(np.uint32), want.view(np.uint32))


def test_minmax_normalize_clips_per_axis_and_leaves_absent_joints_zero():
    from mtscale.data.clips import normalize_clips

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 10, 2, 5, 3, generator=g) * torch.tensor([1.0, 2.0, 0.5])
    x[1, :, 1] = 0  # an absent body
    x[2, :, 0, 3] = 0  # an absent joint
    mask = torch.ones(4, 10, dtype=torch.bool)
    mask[3, 7:] = False  # padded frames (zero, as the gather writes them)
    x[3, 7:] = 0
    y = normalize_clips(x, mask, "minmax")
    present = (x != 0).any(-1) & mask[:, :, None, None]  # (N, T, M, V)
    for i in range(4):
        p = y[i][present[i]]  # (P, 3)
        torch.testing.assert_close(p.amin(0), -torch.ones(3))
        torch.testing.assert_close(p.amax(0), torch.ones(3))
        assert bool((y[i][~present[i]] == 0).all())
    # a moved and enlarged clip normalises to the same values; "none" is the identity
    moved = torch.where(present[..., None], x * 3.0 + torch.tensor([5.0, -2.0, 1.0]), 0.0)
    torch.testing.assert_close(normalize_clips(moved, mask, "minmax"), y, atol=1e-5, rtol=1e-5)
    assert normalize_clips(x, mask, "none") is x
    with pytest.raises(ConfigError, match="data.normalize"):
        _cfg(normalize="zscore")


def test_loader_and_prediction_apply_the_configured_normalisation(mem_store):
    from mtscale.train.predict import eval_clip

    cfg = _cfg(split="xs", part="test", eval_crop=1.0, normalize="minmax")
    b = next(iter(build_loader(mem_store, cfg, batch_size=4, seed=0, train=False)))
    flat = b["x"].reshape(4, -1, 3)
    assert torch.allclose(flat.amin(1), -torch.ones(4, 3)) and torch.allclose(flat.amax(1), torch.ones(4, 3))
    raw = next(iter(build_loader(mem_store, _cfg(split="xs", part="test", eval_crop=1.0), batch_size=4, seed=0,
                                 train=False)))
    assert not torch.allclose(raw["x"], b["x"])
    # prediction cuts the same evaluation clip, normalised the same way
    x, mask, time = eval_clip(mem_store.read_sample(int(b["index"][0])), cfg, num_bodies=2)
    torch.testing.assert_close(x[0], b["x"][0], atol=1e-5, rtol=1e-5)
    assert bool(mask.all())
    torch.testing.assert_close(time[0], b["time"][0], atol=0, rtol=0)  # the same frame times (model.time_index)


_ORPHAN_SCRIPT = r"""
import sys, time
from mtscale.config import DataConfig
from mtscale.data.loader import build_loader
loader = build_loader(sys.argv[1], DataConfig(num_workers=2, clip_frames=32, shuffle_buffer=50), batch_size=8, seed=0)
it = iter(loader)
next(it)
print(" ".join(str(w.pid) for w in loader._workers._iterator._workers), flush=True)
time.sleep(600)
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_workers_die_with_a_killed_run(file_store):
    """Issue 29, item 4: SIGKILL of the process that owns a loader leaves no worker behind (they
    are forkserver children: PyTorch's parent check never fired, two ~485 MB workers stayed)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    p = subprocess.Popen([sys.executable, "-c", _ORPHAN_SCRIPT, file_store], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        pids = [int(x) for x in p.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(q) for q in pids)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        deadline = time.time() + 15
        while any(_alive(q) for q in pids) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(q) for q in pids), pids
    finally:
        if p.poll() is None:
            p.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_a_training_epoch_without_one_batch_is_refused() -> None:
    """60 clips on 2 ranks with 32 per rank: drop_last left every epoch empty and pre-training spun
    forever without a step (found by the quickstart's --data test); now a one-line error."""
    store = _store(f"memory://loader-test-{next(_counter)}", n=60)
    with pytest.raises(ConfigError, match=r"rank 1/2 30 per epoch, fewer than one batch of 32"):
        build_loader(store, _cfg(), batch_size=32, seed=0, rank=1, world_size=2)
    assert len(build_loader(store, _cfg(), batch_size=16, seed=0, rank=1, world_size=2)) == 1
    assert len(build_loader(store, _cfg(), batch_size=32, seed=0, rank=1, world_size=2, train=False)) == 1  # eval: partial


def test_random_sampling_draws_stored_frames_in_order_with_replacement(mem_store):
    """``sampling: random``: every training frame is one stored frame of the crop, in time order,
    repeats where the sequence is shorter than T; a pure function of (seed, epoch, sample);
    evaluation still resamples."""
    cfg = _cfg(crop_min=1.0, crop_max=1.0, sampling="random")
    loader = build_loader(mem_store, cfg, batch_size=32, seed=5)
    b = next(iter(loader))
    assert bool(b["mask"].all())
    picked = []
    for j, r in enumerate(b["index"].numpy()):
        full = mem_store.read_sample(int(r)).reshape(int(mem_store.lengths[r]), -1)  # (L, M*V*C)
        d = np.abs(b["x"][j].reshape(32, -1).numpy()[:, None] - full[None]).max(-1)  # (T, L)
        idx = d.argmin(1)
        assert d.min(1).max() < 1e-5  # a stored frame, not an interpolation
        assert (np.diff(idx) >= 0).all()  # in time order
        assert np.array_equal(b["time"][j].numpy(), idx)  # its time: the drawn frame's own index
        if full.shape[0] < 32:
            assert (np.diff(idx) == 0).any()  # drawn with replacement: short sequences repeat frames
        picked.append(idx)
    assert any(len(set(p.tolist())) < len(p) for p in picked)
    again = next(iter(build_loader(mem_store, cfg, batch_size=32, seed=5)))
    torch.testing.assert_close(again["x"], b["x"], atol=0, rtol=0)
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader))["x"], b["x"])
    ev = build_loader(mem_store, cfg, batch_size=8, seed=5, train=False)
    ev_ref = build_loader(mem_store, _cfg(crop_min=1.0, crop_max=1.0), batch_size=8, seed=5, train=False)
    torch.testing.assert_close(next(iter(ev))["x"], next(iter(ev_ref))["x"], atol=0, rtol=0)
    with pytest.raises(ConfigError, match="data.sampling: found 'jitter', expected resample|random"):
        _cfg(sampling="jitter")
