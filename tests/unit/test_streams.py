"""Input streams (data/streams.py): bone and motion against hand-computed values, padding and
absent bodies left at zero, concatenation on C, and the loader computing them after
augmentation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mtscale.config import AugmentConfig, DataConfig
from mtscale.data.layouts import get_layout
from mtscale.data.loader import build_loader
from mtscale.data.store_writer import write_store
from mtscale.data.streams import apply_stream, parse_stream, stream_channels
from mtscale.errors import ConfigError

PARENTS = (-1, 0, 1)  # a chain: root 0 <- 1 <- 2

# one body, 3 joints, 3 valid frames then one padded frame (mask False, zeros as the gather writes)
JOINT = [
    [[1, 0, 0], [1, 2, 0], [2, 3, 1]],
    [[2, 0, 0], [2, 1, 0], [4, 1, 1]],
    [[2, 1, 0], [3, 1, 0], [3, 1, 2]],
]
# bone = joint - parent (root: 0), by hand
BONE = [
    [[0, 0, 0], [0, 2, 0], [1, 1, 1]],
    [[0, 0, 0], [0, 1, 0], [2, 0, 1]],
    [[0, 0, 0], [1, 0, 0], [0, 0, 2]],
]
# joint_motion = joint[t+1] - joint[t]; 0 at the last valid frame (t = 2)
JOINT_MOTION = [
    [[1, 0, 0], [1, -1, 0], [2, -2, 0]],
    [[0, 1, 0], [1, 0, 0], [-1, 0, 1]],
    [[0, 0, 0], [0, 0, 0], [0, 0, 0]],
]
# bone_motion = bone[t+1] - bone[t]
BONE_MOTION = [
    [[0, 0, 0], [0, -1, 0], [1, -1, 0]],
    [[0, 0, 0], [1, -1, 0], [-2, 0, 1]],
    [[0, 0, 0], [0, 0, 0], [0, 0, 0]],
]


def _tiny() -> tuple[torch.Tensor, torch.Tensor]:
    """(N=1, T=4, M=2, V=3, C=3): body 0 in frames 0-2, frame 3 padding, body 1 absent."""
    x = torch.zeros(1, 4, 2, 3, 3)
    x[0, :3, 0] = torch.tensor(JOINT, dtype=torch.float32)
    mask = torch.tensor([[True, True, True, False]])
    return x, mask


def _expected(values: list) -> torch.Tensor:
    out = torch.zeros(1, 4, 2, 3, 3)
    out[0, :3, 0] = torch.tensor(values, dtype=torch.float32)
    return out


@pytest.mark.parametrize("stream,values", [("bone", BONE), ("joint_motion", JOINT_MOTION),
                                           ("bone_motion", BONE_MOTION)])
def test_each_stream_against_hand_computed_values(stream, values):
    x, mask = _tiny()
    y = apply_stream(x, mask, PARENTS, stream)
    assert y.shape == x.shape
    assert torch.equal(y, _expected(values))  # padding (t = 3) and the absent body (m = 1) are zero
    assert not torch.signbit(y[y == 0]).any()  # no -0.0 from masking


def test_joint_is_the_identity_and_streams_concatenate_on_c_in_the_order_named():
    x, mask = _tiny()
    assert apply_stream(x, mask, PARENTS, "joint") is x
    y = apply_stream(x, mask, PARENTS, "bone_motion+joint+bone")
    assert y.shape == (1, 4, 2, 3, 9) and stream_channels("bone_motion+joint+bone") == 9
    assert torch.equal(y[..., 0:3], _expected(BONE_MOTION))
    assert torch.equal(y[..., 3:6], x)
    assert torch.equal(y[..., 6:9], _expected(BONE))


def test_motion_is_zero_where_a_body_enters_or_leaves():
    """A second body present only from frame 2: its motion from frame 1 (absent, zeros) to 2 is
    0, not its whole position; from 2 to 3 it is the difference."""
    x, mask = torch.zeros(1, 4, 2, 3, 3), torch.ones(1, 4, dtype=torch.bool)
    x[0, 2:, 1] = torch.tensor([[[5.0, 5, 5]] * 3, [[6.0, 4, 5]] * 3])
    y = apply_stream(x, mask, PARENTS, "joint_motion")
    assert torch.equal(y[0, 1, 1], torch.zeros(3, 3))
    assert torch.equal(y[0, 2, 1], torch.tensor([[1.0, -1, 0]] * 3))
    assert torch.equal(y[0, 3], torch.zeros(2, 3, 3))  # the last frame of the clip
    assert torch.equal(y[0, :, 0], torch.zeros(4, 3, 3))  # body 0 is absent throughout


def test_root_bones_of_the_real_layouts_are_zero():
    g = torch.Generator().manual_seed(0)
    for name in ("ntu25", "kinect_v1_20"):
        lay = get_layout(name)
        x = torch.randn(2, 5, 1, lay.num_joints, 3, generator=g)
        b = apply_stream(x, torch.ones(2, 5, dtype=torch.bool), lay.parents, "bone")
        root = lay.parents.index(-1)
        assert torch.equal(b[..., root, :], torch.zeros(2, 5, 1, 3))
        for v, p in lay.bones:
            assert torch.equal(b[..., v, :], x[..., v, :] - x[..., p, :])


def test_stream_names_are_validated_with_the_dotted_field():
    assert parse_stream("joint+bone_motion") == ("joint", "bone_motion")
    for bad in ("jiont", "joint+joint", "", "joint+", "joint + bone"):
        with pytest.raises(ConfigError, match=r"^data\.stream: found"):
            DataConfig(stream=bad)


_counter = itertools.count()


@pytest.fixture(scope="module")
def store():
    rng = np.random.default_rng(0)

    def samples():
        for i in range(24):
            x = rng.standard_normal((int(rng.integers(20, 60)), 2, 25, 3)).astype(np.float32)
            if i % 3 == 0:
                x[:, 1] = 0  # a single-person sample: body 1 absent
            yield f"s{i:03d}", x, i % 3, {}

    return write_store(f"memory://streams-{next(_counter)}", samples(), layout="ntu25", num_bodies=2,
                       chunk_frames=256, shard_chunks=2)


def test_loader_computes_the_stream_after_augmentation_and_normalisation(store):
    aug = AugmentConfig(rotate_deg=20, scale=0.2)
    kw = dict(shuffle_buffer=24, num_workers=0, clip_frames=16, augment=aug, normalize="minmax")
    joint = next(iter(build_loader(store, DataConfig(**kw), batch_size=8, seed=3, train=True)))
    multi = next(iter(build_loader(store, DataConfig(stream="joint+bone+bone_motion", **kw), batch_size=8, seed=3,
                                   train=True)))
    assert torch.equal(multi["index"], joint["index"])
    x = joint["x"]  # augmented and normalised joints
    assert multi["x"].shape == x.shape[:-1] + (9,)
    torch.testing.assert_close(multi["x"][..., :3], x)
    parents = store.layout.parents
    torch.testing.assert_close(multi["x"][..., 3:6], apply_stream(x, joint["mask"], parents, "bone"))
    torch.testing.assert_close(multi["x"][..., 6:9], apply_stream(x, joint["mask"], parents, "bone_motion"))
    absent = (x == 0).all(dim=(1, 3, 4))  # (N, M) bodies absent in the whole clip
    assert absent.any()
    assert bool((multi["x"].permute(0, 2, 1, 3, 4)[absent] == 0).all())
