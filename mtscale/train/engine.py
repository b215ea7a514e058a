"""Config -> DeepSpeed: the DeepSpeed config dict (every default the run depends on written
out), precision per device, the warmup + cosine schedule, and the engine itself.

DeepSpeed changes defaults between releases (0.19.3 made ``gradient_clipping`` 1.0 unless
set), so ``deepspeed_config`` never leaves a value that matters to DeepSpeed's default; the
dict is saved as ``ds_config.json`` beside the run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mtscale.config import PretrainTrainConfig, TrainConfig
from mtscale.errors import ConfigError
from mtscale.models.encoder import full_shape, no_weight_decay
from mtscale.train.schedule import warmup_cosine

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class BatchGeometry:
    """global = micro x world_size x accumulation."""

    micro_batch_size: int
    grad_accum_steps: int
    global_batch_size: int


def batch_geometry(train: TrainConfig, world_size: int) -> BatchGeometry:
    """Split ``train.batch_size`` over ranks (and accumulation steps when micro_batch_size is set)."""
    micro = train.micro_batch_size
    if micro is None:
        if train.batch_size % world_size:
            raise ConfigError(
                f"train.batch_size: found {train.batch_size}, expected a multiple of the world size {world_size}"
            )
        micro = train.batch_size // world_size
    per_step = micro * world_size
    if micro < 1 or train.batch_size % per_step:
        raise ConfigError(
            f"train.batch_size: found {train.batch_size}, expected a multiple of micro_batch_size x world size "
            f"= {micro} x {world_size}"
        )
    return BatchGeometry(micro, train.batch_size // per_step, train.batch_size)


def resolve_precision(precision: str, device_type: str, *, bf16_fast: bool | None = None) -> str:
    """The precision a run computes in. ``auto`` is decided from what the device can do, never
    from a blanket rule, and logged: on CUDA bf16 where the card supports it, else fp16 (loss
    scaling: DeepSpeed's dynamic scaler in pre-training, ``torch.amp.GradScaler`` in fine-tuning);
    on a CPU fp32, because a training step in bf16 autocast measured slower than fp32 on every
    CPU tried, AMX Xeons included (see the note below). An explicit bf16 on a CPU is allowed, with
    a warning where its GEMM is not even ``CPU_BF16_MIN_SPEEDUP``x fp32; on a GPU without bf16 it
    is an error. ``bf16_fast`` replaces the device query (None: ask the device)."""
    if precision not in ("auto", *DTYPES):
        raise ConfigError(f"train.precision: found {precision!r}, expected auto|fp32|bf16|fp16")
    if device_type == "cuda":
        ok = bf16_fast if bf16_fast is not None else (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        if precision == "auto":
            log.info("precision auto -> %s (CUDA device: bf16 %ssupported)", "bf16" if ok else "fp16",
                     "" if ok else "not ")
            return "bf16" if ok else "fp16"
        if precision == "bf16" and not ok:
            raise ConfigError("train.precision: found 'bf16', but this GPU does not support it; expected fp16, fp32 "
                              "or auto")
        return precision
    if device_type != "cpu":
        return "fp32" if precision == "auto" else precision
    if precision == "fp32":
        return precision
    if precision == "auto":
        log.info("precision auto -> fp32 (CPU: bf16 autocast measured slower than fp32 for a training step "
                 "on every CPU tried, AMX included; set train.precision=bf16 to use it anyway)")
        return "fp32"
    fast = bf16_fast if bf16_fast is not None else cpu_bf16_speedup() >= CPU_BF16_MIN_SPEEDUP
    if not fast:
        log.warning("train.precision=%s on a CPU without fast bf16 (GEMM below %gx fp32): expect a slow run",
                    precision, CPU_BF16_MIN_SPEEDUP)
    return precision


CPU_BF16_MIN_SPEEDUP = 1.5
"""An explicit ``bf16`` on a CPU whose bf16 GEMM is not at least this much faster than fp32 gets a
warning (the AMD EPYC VMs without bf16 units run it at ~1/500x)."""

# Why ``auto`` is fp32 on every CPU (benchmarks/bench_precision.py, benchmarks/README.md): a
# pre-training step of the NW-UCLA model (width 128, 1 thread) in bf16 autocast against fp32 ran at
# 0.96x on a Zen 4 EPYC with AVX512-BF16 (256 x 256 GEMM 2-3.1x) and at 0.83x on an AMX Xeon (GEMM
# 4.3x). The GEMM speed-up, which ``auto`` used to decide from, overstates what a whole step gains:
# the casts, norms, softmax and small matrices of a CPU-sized model do not speed up.


@functools.cache
def cpu_bf16_speedup(n: int = 256, budget_s: float = 0.2) -> float:
    """fp32 time / bf16 time of an (n x n) @ (n x n) GEMM on this CPU, measured once per process
    (a few ms; a CPU without fast bf16 is cut short after ``budget_s``)."""
    import time

    a = torch.randn(n, n)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        torch.mm(x, x)  # warm-up
        reps, t0 = 0, time.perf_counter()
        while reps < 20 and (reps < 2 or time.perf_counter() - t0 < budget_s):
            torch.mm(x, x)
            reps += 1
            if time.perf_counter() - t0 > budget_s:
                break
        times[dtype] = (time.perf_counter() - t0) / reps
    return times[torch.float32] / times[torch.bfloat16]


def mixed_precision_config(precision: str, zero_stage: int) -> dict[str, Any]:
    """The DeepSpeed keys that decide the numerics of a ``precision`` run (written out in full).

    bf16 keeps gradients in fp32 wherever DeepSpeed can: ZeRO 1-3 run DeepSpeed's bf16 mode
    (bf16 parameters, fp32 master copy) with ``data_types.grad_accum_dtype = fp32`` (ZeRO-1 then
    uses its BF16_Optimizer, ZeRO-2/3 accumulate their gradient partitions in fp32) and reduce in
    fp32 (``communication_data_type``: twice the bf16 bytes, the price of not rounding every
    rank's gradient to 8 bits of mantissa before the sum). ZeRO-0 cannot accumulate a bf16 model
    in fp32 in DeepSpeed (0.19.8 raises), so it runs ``torch_autocast`` instead: fp32 parameters
    and gradients, bf16 matrix products, no parameter marked for bf16 communication. fp16 runs
    DeepSpeed's fp16 mode with dynamic loss scaling."""
    bf16 = precision == "bf16"
    autocast = bf16 and zero_stage == 0
    cfg: dict[str, Any] = {
        "bf16": {"enabled": bf16 and not autocast},
        "fp16": {
            "enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
            "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1,
        },
        "torch_autocast": {"enabled": autocast, "dtype": "bfloat16", "lower_precision_safe_modules": []},
        "communication_data_type": "fp32" if bf16 else None,
    }
    if bf16 and not autocast:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


def deepspeed_config(train: PretrainTrainConfig, *, world_size: int, device_type: str,
                     precision: str | None = None) -> dict[str, Any]:
    """The complete DeepSpeed config for this run. Every key that changes numerics, memory or
    logging is written explicitly, so a DeepSpeed upgrade cannot silently change the run.
    ``precision``: the resolved precision (None: ``resolve_precision(train.precision, ...)``)."""
    geo = batch_geometry(train, world_size)
    precision = precision or resolve_precision(train.precision, device_type)
    cuda = device_type == "cuda"
    overlap = cuda if train.zero_overlap_comm is None else train.zero_overlap_comm
    opt_params: dict[str, Any] = {
        "lr": train.lr, "betas": list(train.betas), "eps": train.adam_eps, "weight_decay": train.weight_decay,
    }
    if not train.offload_optimizer:
        # torch.optim.AdamW (fused kernel on CUDA): no DeepSpeed op to JIT-build. With optimizer
        # offload DeepSpeed uses its DeepSpeedCPUAdam (built once, ~90 s, cached in TORCH_EXTENSIONS_DIR).
        opt_params["torch_adam"] = True
        opt_params["fused"] = bool(cuda)
        if not cuda:
            opt_params["foreach"] = True
    offload_dev = {"device": "cpu", "pin_memory": bool(cuda)}
    zero: dict[str, Any] = {
        "stage": train.zero_stage,
        "allgather_partitions": True,
        "allgather_bucket_size": train.zero_bucket_size,
        "reduce_scatter": True,
        "reduce_bucket_size": train.zero_bucket_size,
        "overlap_comm": bool(overlap),
        "contiguous_gradients": True,
        "round_robin_gradients": False,
        "offload_optimizer": dict(offload_dev) if train.offload_optimizer else {"device": "none"},
        "offload_param": dict(offload_dev) if train.offload_params else {"device": "none"},
        "sub_group_size": 1_000_000_000,
        "stage3_prefetch_bucket_size": train.zero3_prefetch_bucket_size,
        "stage3_param_persistence_threshold": train.zero3_param_persistence_threshold,
        "stage3_max_live_parameters": train.zero3_max_live_parameters,
        "stage3_max_reuse_distance": 1_000_000_000,
        "stage3_gather_16bit_weights_on_model_save": False,
    }
    return {
        "train_batch_size": geo.global_batch_size,
        "train_micro_batch_size_per_gpu": geo.micro_batch_size,
        "gradient_accumulation_steps": geo.grad_accum_steps,
        "gradient_clipping": float(train.grad_clip),
        "optimizer": {"type": "AdamW", "params": opt_params},
        # The warmup + cosine schedule is ours (``lr_lambda``), passed to deepspeed.initialize
        # and saved in its checkpoints; DeepSpeed's own scheduler is therefore absent.
        **mixed_precision_config(precision, train.zero_stage),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": False,
        "prescale_gradients": False,
        "gradient_predivide_factor": 1.0,
        "steps_per_print": 1_000_000_000,  # we log ourselves (loop.py)
        "wall_clock_breakdown": False,
        "memory_breakdown": False,
        "dump_state": False,
        "checkpoint": {"tag_validation": "Warn", "load_universal": False, "use_node_local_storage": False},
    }


def lr_lambda(train: PretrainTrainConfig) -> Callable[[int], float]:
    """Pre-training's schedule (``schedule.warmup_cosine``) from its config: warmup_steps, then
    cosine from lr down to min_lr at max_steps."""
    return warmup_cosine(warmup=train.warmup_steps, total=train.max_steps,
                         floor=train.min_lr / train.lr if train.lr else 0.0)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay where ``models.encoder.no_weight_decay`` says so (biases,
    norms, tokens, position embeddings, relative attention biases)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if no_weight_decay(name, p):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    n = [sum(math.prod(full_shape(p)) for p in ps) for ps in (decay, no_decay)]
    log.info("weight decay %g on %d tensors (%d elements), none on %d tensors (%d elements)", weight_decay,
             len(decay), n[0], len(no_decay), n[1])
    return [g for g in groups if g["params"]]


def build_engine(
    make_model: Callable[[], torch.nn.Module], train: PretrainTrainConfig, ds_config: dict[str, Any]
) -> tuple[Any, torch.nn.Module]:
    """Build the model (under ``deepspeed.zero.Init`` for ZeRO-3, so no rank ever holds all of
    it) and wrap it in a DeepSpeed engine with our LR schedule. Returns (engine, model)."""
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    stage3 = ds_config["zero_optimization"]["stage"] == 3
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=stage3):
        model = make_model()
    schedule = lr_lambda(train)
    with _zero3_shares_fp32_master():
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, train.weight_decay), config=ds_config,
            lr_scheduler=lambda opt: LambdaLR(opt, schedule), dist_init_required=False,
        )
    return engine, model


@contextlib.contextmanager
def _zero3_shares_fp32_master():
    """Let ZeRO-3 reuse an fp32 parameter partition as its fp32 master copy, as it means to.

    DeepSpeed (0.19.8) skips the separate master copy when the partition already has the
    master dtype and lives on ``self.device``, but it compares ``tensor.device`` (a
    ``torch.device``) with ``self.device`` (the *string* ``"cpu"`` / ``"cuda:0"``), which is
    never equal, so fp32 runs (CPU) keep two identical copies of every partition: ZeRO-3 used
    2/3 of ZeRO-0's per-rank bytes instead of 1/2. For the duration of that one method we make
    ``self.device`` a ``torch.device``; bf16 runs are unaffected (their dtypes differ).
    """
    try:
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3
    except ImportError:  # pragma: no cover - a DeepSpeed without stage 3
        yield
        return
    original = Stage3._create_fp32_partitions

    def create(self):
        device = self.device
        if isinstance(device, str):
            self.device = torch.device(device)
        try:
            return original(self)
        finally:
            self.device = device

    Stage3._create_fp32_partitions = create
    try:
        yield
    finally:
        Stage3._create_fp32_partitions = original
