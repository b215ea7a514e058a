"""DeepSpeed config generation: every default the run depends on is written, precision and
optimizer follow the device, batch geometry and the LR schedule are right."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mtscale.config import PretrainTrainConfig
from mtscale.errors import ConfigError
from mtscale.train.engine import BatchGeometry, batch_geometry, deepspeed_config, lr_lambda, resolve_precision

REQUIRED = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "optimizer", "bf16", "fp16", "zero_optimization", "steps_per_print", "wall_clock_breakdown",
    "prescale_gradients", "gradient_predivide_factor",
}
ZERO_KEYS = {
    "stage", "allgather_partitions", "allgather_bucket_size", "reduce_scatter", "reduce_bucket_size", "overlap_comm",
    "contiguous_gradients", "offload_optimizer", "offload_param", "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold", "stage3_max_live_parameters", "stage3_max_reuse_distance", "sub_group_size",
}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_key_written(stage: int, device: str) -> None:
    ds = deepspeed_config(PretrainTrainConfig(zero_stage=stage, batch_size=32), world_size=4, device_type=device,
                          precision="bf16" if device == "cuda" else "fp32")
    assert REQUIRED <= set(ds)
    assert ZERO_KEYS <= set(ds["zero_optimization"])
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 1
    assert "enabled" in ds["bf16"] and "enabled" in ds["fp16"] and "loss_scale" in ds["fp16"]
    assert ds["optimizer"]["type"] == "AdamW"
    assert set(ds["optimizer"]["params"]) >= {"lr", "betas", "eps", "weight_decay"}
    assert ds["zero_optimization"]["overlap_comm"] is (device == "cuda")


def test_gradient_clipping_explicit_even_when_off() -> None:
    # DeepSpeed >= 0.19.3 defaults to 1.0 when the key is absent: 0 must be written as 0.
    assert deepspeed_config(PretrainTrainConfig(grad_clip=0.0, batch_size=8), world_size=1, device_type="cpu")[
        "gradient_clipping"] == 0.0
    assert deepspeed_config(PretrainTrainConfig(grad_clip=0.5, batch_size=8), world_size=1, device_type="cpu")[
        "gradient_clipping"] == 0.5


def test_precision_per_device() -> None:
    cpu = deepspeed_config(PretrainTrainConfig(batch_size=8), world_size=1, device_type="cpu", precision="fp32")
    gpu = deepspeed_config(PretrainTrainConfig(batch_size=8, zero_stage=1), world_size=1, device_type="cuda",
                           precision=resolve_precision("auto", "cuda", bf16_fast=True))
    assert cpu["bf16"]["enabled"] is False and cpu["fp16"]["enabled"] is False
    assert gpu["bf16"]["enabled"] is True and gpu["fp16"]["enabled"] is False
    # auto follows what the device can do (issue 25, items 8 and 11), never a blanket rule
    assert resolve_precision("auto", "cuda", bf16_fast=True) == "bf16"
    assert resolve_precision("auto", "cuda", bf16_fast=False) == "fp16"  # e.g. a V100: loss-scaled fp16
    assert resolve_precision("auto", "cpu", bf16_fast=False) == "fp32"
    assert resolve_precision("auto", "cpu", bf16_fast=True) == "fp32"  # an AMX Xeon: a step is slower in bf16
    assert resolve_precision("bf16", "cpu", bf16_fast=False) == "bf16"  # allowed when asked (with a warning)
    with pytest.raises(ConfigError, match="does not support"):
        resolve_precision("bf16", "cuda", bf16_fast=False)
    fp16 = deepspeed_config(PretrainTrainConfig(batch_size=8, precision="fp16"), world_size=1, device_type="cuda",
                            precision="fp16")
    assert fp16["fp16"]["enabled"] is True and fp16["bf16"]["enabled"] is False


def test_cpu_bf16_gemm_is_measured_here() -> None:
    """The GEMM measurement behind the slow-bf16 warning runs on this CPU and gives a ratio."""
    from mtscale.train.engine import cpu_bf16_speedup

    assert cpu_bf16_speedup() > 0
    assert resolve_precision("auto", "cpu") == "fp32"  # whatever the CPU measures


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_gradients_accumulate_and_reduce_in_fp32(stage: int) -> None:
    """Issue 25, item 3: no bf16 gradient accumulation or reduction in any ZeRO stage."""
    ds = deepspeed_config(PretrainTrainConfig(batch_size=64, micro_batch_size=8, zero_stage=stage), world_size=2,
                          device_type="cuda", precision="bf16")
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["communication_data_type"] == "fp32"
    if stage == 0:  # DeepSpeed cannot accumulate a bf16 model in fp32 without ZeRO: autocast, fp32 params
        assert ds["bf16"]["enabled"] is False and ds["torch_autocast"]["enabled"] is True
        assert ds["torch_autocast"]["lower_precision_safe_modules"] == [] and "data_types" not in ds
    else:
        assert ds["bf16"]["enabled"] is True and ds["torch_autocast"]["enabled"] is False
        assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    fp32 = deepspeed_config(PretrainTrainConfig(batch_size=8, zero_stage=stage), world_size=1, device_type="cpu",
                            precision="fp32")
    assert fp32["communication_data_type"] is None and not fp32["torch_autocast"]["enabled"]


def test_optimizer_per_device_and_offload() -> None:
    cpu = deepspeed_config(PretrainTrainConfig(batch_size=8), world_size=1, device_type="cpu")["optimizer"]["params"]
    gpu = deepspeed_config(PretrainTrainConfig(batch_size=8), world_size=1, device_type="cuda", precision="bf16")[
        "optimizer"]["params"]
    assert cpu["torch_adam"] is True and cpu["fused"] is False  # no DeepSpeed op to JIT-build on CPU
    assert gpu["torch_adam"] is True and gpu["fused"] is True
    off = deepspeed_config(PretrainTrainConfig(batch_size=8, zero_stage=3, offload_optimizer=True, offload_params=True),
                           world_size=2, device_type="cuda")
    assert "torch_adam" not in off["optimizer"]["params"]  # DeepSpeedCPUAdam
    assert off["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert off["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    with pytest.raises(ConfigError, match="offload_params"):
        PretrainTrainConfig(zero_stage=2, offload_params=True)


def test_deepspeed_accepts_the_config() -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    for stage in (0, 3):
        ds = deepspeed_config(PretrainTrainConfig(batch_size=8, zero_stage=stage, grad_clip=0.0), world_size=1,
                              device_type="cpu")
        parsed = DeepSpeedConfig(ds)
        assert parsed.gradient_clipping == 0.0
        assert parsed.zero_optimization_stage == stage
        assert parsed.train_batch_size == 8 and parsed.gradient_accumulation_steps == 1


def test_batch_geometry() -> None:
    assert batch_geometry(PretrainTrainConfig(batch_size=64), 4) == BatchGeometry(16, 1, 64)
    assert batch_geometry(PretrainTrainConfig(batch_size=64, micro_batch_size=8), 2) == BatchGeometry(8, 4, 64)
    with pytest.raises(ConfigError, match="train.batch_size"):
        batch_geometry(PretrainTrainConfig(batch_size=10), 4)
    with pytest.raises(ConfigError, match="train.batch_size"):
        batch_geometry(PretrainTrainConfig(batch_size=64, micro_batch_size=5), 2)


def test_lr_schedule_warmup_then_cosine() -> None:
    tc = PretrainTrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=14)
    f = lr_lambda(tc)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(4, 20))


ZERO3_SCRIPT = r"""
import json, torch
from mtscale.config import ModelConfig, ObjectiveConfig, PretrainTrainConfig
from mtscale.dist import World, init_distributed
from mtscale.models.objectives import build_pretrain_model
from mtscale.train.engine import build_engine, deepspeed_config
world = World.from_env()
init_distributed(world, torch.device("cpu"))
tr = PretrainTrainConfig(batch_size=2, zero_stage=3, max_steps=4, warmup_steps=1, zero3_param_persistence_threshold=0,
                 precision="fp32")  # fp32: the case where the partition can be the master copy
ds = deepspeed_config(tr, world_size=1, device_type="cpu", precision="fp32")
engine, model = build_engine(lambda: build_pretrain_model(ModelConfig(size="tiny"), ObjectiveConfig(decoder_dim=32,
    decoder_depth=1, decoder_heads=2), clip_frames=8, num_bodies=1, num_joints=25), tr, ds)
opt = engine.optimizer
before = [t.clone() for t in opt.fp16_partitioned_groups_flat]
x = torch.randn(2, 8, 1, 25, 3, generator=torch.Generator().manual_seed(0))
loss, _ = engine(x, torch.ones(2, 8, dtype=torch.bool), torch.arange(2), step=0, seed=0)
engine.backward(loss)
engine.step()
print(json.dumps({
    "shared": [m.data_ptr() == p.data_ptr() for m, p in zip(opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat)],
    "moved": [bool((b != p).any()) for b, p in zip(before, opt.fp16_partitioned_groups_flat)],
    "finite": bool(torch.isfinite(loss)),
}))
"""


def test_zero3_fp32_master_shares_the_parameter_partition() -> None:
    """ZeRO-3 in fp32 keeps one copy of each partition (the DeepSpeed device-comparison bug
    worked around in build_engine), and the optimizer step still updates the parameters."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", ZERO3_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    row = json.loads(p.stdout.strip().splitlines()[-1])
    assert row["shared"] and all(row["shared"])
    assert all(row["moved"]) and row["finite"]


def test_finetune_train_section_has_no_pretraining_or_zero_fields() -> None:
    """Fine-tuning's schedule is in epochs and it runs DDP: a step or ZeRO field there is an error
    naming it (it used to be accepted and ignored), while pre-training keeps them."""
    from mtscale.config import FinetuneConfig, PretrainConfig, load_config
    from mtscale.errors import ConfigError

    root = Path(__file__).resolve().parents[2] / "configs"
    for key in ("train.zero_stage=2", "train.max_steps=10", "train.warmup_steps=5", "train.ckpt_every=3",
                "train.offload_optimizer=true", "train.log_every=2"):
        with pytest.raises(ConfigError, match=rf"^{key.split('=')[0]}: unknown key"):
            load_config(FinetuneConfig, root / "finetune" / "tiny_cpu.yaml", [key])
    pre = load_config(PretrainConfig, root / "pretrain" / "tiny_cpu.yaml", ["train.zero_stage=2", "train.max_steps=7"])
    assert (pre.train.zero_stage, pre.train.max_steps) == (2, 7)
    with pytest.raises(ConfigError, match="train.lr: found 0"):  # the shared checks apply to both
        load_config(FinetuneConfig, root / "finetune" / "tiny_cpu.yaml", ["train.lr=0"])


def test_finetune_optimizer_sgd_nesterov_step_and_groups() -> None:
    """``train.optimizer: sgd`` builds torch's SGD with Nesterov momentum over the layer-decay param
    groups (biases / norms keep weight decay 0); one step equals the hand-computed Nesterov update
    with coupled weight decay. AdamW stays the default; pre-training refuses SGD."""
    import torch

    from mtscale.config import TrainConfig
    from mtscale.train.trainers import make_optimizer

    lin = torch.nn.Linear(3, 2)
    groups = [{"params": [lin.weight], "weight_decay": 0.1}, {"params": [lin.bias], "weight_decay": 0.0}]
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    opt = make_optimizer(groups, TrainConfig(optimizer="sgd", lr=0.5, momentum=0.9, weight_decay=4e-4),
                         torch.device("cpu"))
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # the groups' own decay wins
    gw, gb = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([1.0, -2.0])
    lin.weight.grad, lin.bias.grad = gw.clone(), gb.clone()
    opt.step()
    # first step: buf = d = g + wd * p; Nesterov: p -= lr * (d + m * buf) = lr * 1.9 * d
    assert torch.allclose(lin.weight, w0 - 0.5 * 1.9 * (gw + 0.1 * w0), atol=1e-6)
    assert torch.allclose(lin.bias, b0 - 0.5 * 1.9 * gb, atol=1e-6)
    plain = make_optimizer(lin.parameters(), TrainConfig(optimizer="sgd", nesterov=False), torch.device("cpu"))
    assert plain.defaults["nesterov"] is False
    adamw = make_optimizer(lin.parameters(), TrainConfig(betas=(0.8, 0.9)), torch.device("cpu"))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.8, 0.9)
    with pytest.raises(ConfigError, match=r"^train.optimizer: found 'adam', expected adamw\|sgd"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ConfigError, match=r"^train.momentum: found 1.0"):
        TrainConfig(optimizer="sgd", momentum=1.0)
    with pytest.raises(ConfigError, match=r"^train.optimizer: found 'sgd'; pre-training runs DeepSpeed's AdamW"):
        PretrainTrainConfig(optimizer="sgd")
