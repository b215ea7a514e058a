"""The checks of ``benchmarks/gpu_check.py`` that run mtscale's own code: the SDPA kernels, the
loader, the pre-training targets, pre-training / resume / ZeRO-3 through the ``deepspeed``
launcher, fine-tuning, evaluation and training-step throughput (``bench_model.Step``). Each
takes the shared :class:`gpu_check_base.Ctx` and returns its one-line detail, or raises.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpu_check_base import FINETUNE_CONFIG, PRETRAIN_CONFIG, ROOT, Ctx, Skip, expect, last_error_line, metrics_rows, set_args

# --------------------------------------------------------------------------- checks: model + data


SDPA_OPS = {"_scaled_dot_product_flash_attention": "flash", "_scaled_dot_product_flash_attention_for_cpu": "flash",
            "_scaled_dot_product_efficient_attention": "efficient", "_scaled_dot_product_cudnn_attention": "cudnn",
            "_scaled_dot_product_attention_math": "math", "_scaled_dot_product_attention_math_for_mps": "math"}


def kernels_ran(fn: Callable[[], Any]) -> set[str]:
    """Names (flash | efficient | cudnn | math) of the SDPA kernels ``fn`` ran, read from the
    profiler's aten ops (not from SDPA's own choice function)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {SDPA_OPS[e.name.removeprefix("aten::")] for e in prof.events() if e.name.removeprefix("aten::") in SDPA_OPS}


def check_sdpa_kernel(ctx: Ctx) -> str:
    """``layers.attend`` forward + backward at the encoder's visible (75) and the decoder's
    (750) token counts, q/k/v laid out as ``layers.Attention`` passes them, with and without the
    key-padding mask of ``key_padding_to_attn_mask``."""
    import torch
    from bench_model import attention_case, explicit_attention

    from mtscale.models import layers

    parts, bad = [], []
    tol = 3e-2 if ctx.dtype == torch.bfloat16 else 1e-4
    for L in (75, 750):
        for masked in (False, True):
            _, (q, k, v), mask = attention_case(L, masked, ctx.device, ctx.dtype)
            expected = ("efficient" if masked else "flash") if ctx.plan.cuda else "flash"
            reported = layers._chosen_backend(q, k, v, mask, 0.0)
            box: dict[str, torch.Tensor] = {}

            def call(q=q, k=k, v=v, mask=mask, box=box) -> None:  # bound now (called at once, below)
                box["o"] = layers.attend(q, k, v, mask)
                box["o"].float().sum().backward()

            ran = kernels_ran(call)
            ref = explicit_attention(*(t.detach().float() for t in (q, k, v)), mask)
            err = float((box["o"].detach().float() - ref).abs().max())
            tag = f"{L}_{'masked' if masked else 'unmasked'}"
            ctx.values.update({f"sdpa_kernel_{tag}": ",".join(sorted(ran)) or "none",
                               f"sdpa_reported_{tag}": reported, f"sdpa_max_err_{tag}": err})
            parts.append(f"L={L}{' masked' if masked else ''}: {','.join(sorted(ran)) or 'none'}")
            if ran != {expected}:
                bad.append(f"L={L} {'with' if masked else 'without'} mask ran {sorted(ran)}, expected {expected}")
            if {reported} != ran:
                bad.append(f"L={L}: mtscale reports {reported!r} but {sorted(ran)} ran")
            if not err < tol:
                bad.append(f"L={L}: max |error| vs explicit fp32 attention {err:.3g} > {tol}")
    expect(not bad, "; ".join(bad))
    return "; ".join(parts) + f" ({str(ctx.dtype).removeprefix('torch.')}, fwd+bwd, matches explicit attention)"


def _batches(ctx: Ctx, augment: bool, batch_size: int = 8):
    from mtscale.config import AugmentConfig, DataConfig
    from mtscale.data.loader import build_loader

    cfg = DataConfig(store=ctx.store(), clip_frames=ctx.plan.clip_frames, num_bodies=2, num_workers=ctx.plan.workers,
                     shuffle_buffer=256, augment=AugmentConfig(rotate_deg=30.0))
    return build_loader(ctx.store(), cfg, batch_size=batch_size, seed=0, train=True, device=ctx.device, augment=augment)


def check_loader(ctx: Ctx) -> str:
    """One batch with its augmentation (random rotation) run on the device, against the same
    batch unaugmented: same samples, rotated (every joint keeps its distance from the origin)."""
    import torch

    ctx.store()
    t0 = time.perf_counter()
    b = next(iter(_batches(ctx, augment=True)))
    first_s = time.perf_counter() - t0
    raw = next(iter(_batches(ctx, augment=False)))
    x, x0 = b["x"], raw["x"]
    N, T = x.shape[:2]
    expect(x.device.type == ctx.device.type, f"batch on {x.device}, expected {ctx.device}")
    expect(tuple(x.shape) == (N, ctx.plan.clip_frames, 2, 25, 3) and x.dtype == torch.float32,
           f"batch x {tuple(x.shape)} {x.dtype}, expected (N, {ctx.plan.clip_frames}, 2, 25, 3) float32")
    expect(torch.equal(b["index"].cpu(), raw["index"].cpu()), "augmented and plain loaders gave different samples")
    expect(bool(torch.isfinite(x).all()), "non-finite coordinates in the batch")
    norm_err = float((x.norm(dim=-1) - x0.norm(dim=-1)).abs().max() / x0.norm(dim=-1).max())
    moved = float((x - x0).abs().max())
    ctx.values.update(loader_first_batch_s=first_s, loader_rotation_norm_err=norm_err)
    tol = 2e-3 if ctx.plan.cuda else 1e-4  # a CUDA bmm may run in TF32 (10-bit mantissa) where enabled
    expect(norm_err < tol, f"rotation changed joint norms by {norm_err:.2e} (relative), expected < {tol:g}")
    expect(moved > 1e-3, "the augmented batch equals the plain one: no augmentation ran")
    return (f"batch ({N}, {T}, 2, 25, 3) on {x.device} in {first_s:.1f} s ({ctx.plan.workers} workers); rotation on "
            f"the device keeps joint norms (rel. err {norm_err:.1e})")


def _forward_recording(model: Any, x: Any, mask: Any, keys: Any, time: Any = None,
                       autocast: Any = None) -> dict[str, Any]:
    """One no-grad ``PretrainModel.forward``, recording the clip dtype its targets were derived
    from, the targets (B, L, K) and the hidden-token mask (B, L) it used, and the loss."""
    import torch

    seen: dict[str, Any] = {}
    targets, split = model.targets, model._mask

    def rec_targets(x_: torch.Tensor, m_: Any) -> Any:
        out = targets(x_, m_)
        seen.update(x_dtype=str(x_.dtype).removeprefix("torch."), target=out[0].detach().float())
        return out

    def rec_mask(*args: Any) -> Any:
        out = split(*args)
        seen["hidden"] = out[2]
        return out

    model.targets, model._mask = rec_targets, rec_mask  # instance attributes shadow the methods
    try:
        with torch.no_grad(), torch.autocast(x.device.type, dtype=autocast or torch.float32,
                                             enabled=autocast is not None):
            loss, _ = model(x, mask, keys, step=0, seed=0, time_NT=time)
    finally:
        del model.targets, model._mask
    seen["loss"] = float(loss)
    return seen


def check_pretrain_targets(ctx: Ctx) -> str:
    """bf16 must not reach the pre-training targets: ``PretrainModel.forward`` in the two bf16
    modes of the trainer -- bf16 parameters (DeepSpeed bf16, ZeRO 1-3) and fp32 parameters
    under bf16 autocast (ZeRO-0) -- fed the fp32 clip as ``mtscale.train.pretrain``'s step does, must
    derive the masked-motion targets and the motion-aware mask exactly as in fp32 (a bf16 clip
    puts ~30 % error in the normalised motion target). The model embeds each token's time
    (``model.time_index``, encoder and decoder terms made non-zero), so the time features, built
    in fp32 from the loader's frame times, are exercised in both modes too. Runs in bf16 on any
    device."""
    import copy

    import torch

    from mtscale.config import ModelConfig, ObjectiveConfig
    from mtscale.models.objectives import build_pretrain_model

    b = next(iter(_batches(ctx, augment=False)))
    x, mask, keys, t = b["x"].float(), b["mask"], b["index"], b["time"]
    torch.manual_seed(0)
    model = build_pretrain_model(ModelConfig(size="tiny", time_index=True), ObjectiveConfig(kind="masked_motion"),
                                 clip_frames=ctx.plan.clip_frames, num_bodies=2, num_joints=25).to(ctx.device).eval()
    with torch.no_grad():  # zero at init: give the time terms weight, as training would
        model.encoder.time_proj.weight.normal_(0, 0.02)
        model.decoder_time_proj.weight.normal_(0, 0.02)
    ref = _forward_recording(model, x, mask, keys, t)
    modes = {"bf16_params": _forward_recording(copy.deepcopy(model).to(torch.bfloat16), x, mask, keys, t),
             "bf16_autocast": _forward_recording(model, x, mask, keys, t, autocast=torch.bfloat16)}
    bad, parts = [], []
    for name, r in modes.items():
        same_t = torch.equal(r["target"], ref["target"])
        same_m = torch.equal(r["hidden"], ref["hidden"])
        dloss = abs(r["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-12)
        ctx.values.update({f"pretrain_targets_{name}_x_dtype": r["x_dtype"], f"pretrain_targets_{name}_exact": same_t,
                           f"pretrain_targets_{name}_mask_exact": same_m, f"pretrain_targets_{name}_loss_rel_diff": dloss})
        if r["x_dtype"] != "float32" or not (same_t and same_m):
            err = float((r["target"] - ref["target"]).norm() / ref["target"].norm().clamp_min(1e-12))
            bad.append(f"{name}: targets from a {r['x_dtype']} clip (rel. err {err:.1e}), mask "
                       f"{'same' if same_m else 'differs'}")
        if not (math.isfinite(r["loss"]) and dloss < 0.05):
            bad.append(f"{name}: loss {r['loss']:.4f} vs fp32 {ref['loss']:.4f}")
        parts.append(f"{name}: targets + mask exact, loss {100 * dloss:.2f} % off fp32")
    expect(not bad, "; ".join(bad))
    return "; ".join(parts) + " (fp32 clip in, as the pre-training step feeds it)"


# --------------------------------------------------------------------------- checks: training runs


def _pretrain_cmd(ctx: Ctx, run_dir: Path, steps: int) -> list[str]:
    p = ctx.plan
    sets = {"data.store": ctx.store(), "run.dir": run_dir, "objective.kind": "masked_recon",
            "train.precision": p.precision, "train.max_steps": steps, "train.log_every": 1,
            "train.ckpt_every": 1000, "run.progress": "false", "run.tensorboard": str(not p.dry).lower(),
            "data.clip_frames": p.clip_frames, **p.pretrain_sets}
    return ctx.launcher(ROOT / "mtscale" / "pretrain.py", "--config", PRETRAIN_CONFIG, *set_args(sets))


def check_pretrain(ctx: Ctx) -> str:
    p = ctx.plan
    run_dir = ctx.fresh_dir("pretrain")
    t0 = time.perf_counter()
    out = "".join(ctx.run("pretrain", _pretrain_cmd(ctx, run_dir, p.steps)))
    wall = time.perf_counter() - t0
    rows = metrics_rows(run_dir)
    loss = [r["loss"] for r in rows]
    expect([r["step"] for r in rows] == list(range(1, p.steps + 1)), f"metrics steps {[r['step'] for r in rows]}")
    expect(all(math.isfinite(v) for v in loss), f"non-finite loss: {loss}")
    k = max(1, len(loss) // 3)
    head, tail = sum(loss[:k]) / k, sum(loss[-k:]) / k
    last = rows[-1]
    ctx.values.update(pretrain_steps=p.steps, pretrain_loss_first=loss[0], pretrain_loss_last=loss[-1],
                      pretrain_loss_head_mean=head, pretrain_loss_tail_mean=tail, pretrain_wall_s=wall,
                      **{f"pretrain_{key}": last.get(key) for key in ("samples_per_s", "tokens_per_s", "tflops", "mfu")})
    m = re.search(r"backend (\w+) on (\S+),", out)
    ctx.values["pretrain_backend"] = m.group(1) if m else None
    want = "nccl" if p.cuda else "gloo"
    expect(m is not None and m.group(1) == want, f"process group backend {m and m.group(1)}, expected {want}")
    ds = json.loads((run_dir / "ds_config.json").read_text())
    ran = ds_precision(ds)
    ctx.values["pretrain_ds_precision"] = ran
    expect(ran.startswith(p.precision), f"ds_config.json runs {ran}, expected {p.precision}")
    status = json.loads((run_dir / "status.json").read_text())
    expect(status["state"] == "finished" and status["world_size"] == p.nproc, f"status.json {status}")
    expect(tail < head and loss[-1] < loss[0], f"loss does not fall: first {loss[0]:.4f}, last {loss[-1]:.4f}, "
           f"mean of first / last third {head:.4f} / {tail:.4f}")
    mfu = last.get("mfu")
    expect(mfu is None or not p.cuda or 0 < mfu < 1, f"MFU {mfu}, expected in (0, 1)")
    tok = last.get("tokens_per_s", float("nan"))
    return (f"{p.nproc} x {want}, {p.precision}, {p.steps} steps in {wall:.0f} s: loss {loss[0]:.3f} -> {loss[-1]:.3f}; "
            f"{last.get('samples_per_s', float('nan')):.1f} samples/s, {tok:.3g} tokens/s, "
            f"{last.get('tflops', float('nan')):.3g} TFLOP/s, MFU {'-' if mfu is None else f'{100 * mfu:.1f} %'}")


def check_compile(ctx: Ctx) -> str:
    """``model.compile=true`` (issue 25, item 10): on CUDA the engine is compiled in place and
    trains the eager run's loss curve (bf16: within 5 %); on CPU mtscale warns and runs eager
    (tests/integration/test_pretrain_cli.py checks that), so there is nothing to measure here."""
    p = ctx.plan
    if not p.cuda:
        raise Skip("no CUDA (on CPU model.compile warns and runs eager)")
    eager = metrics_rows(ctx.work / "pretrain")[:p.steps]
    expect(len(eager) == p.steps, "needs the pretrain check's run, which is missing")
    run_dir = ctx.fresh_dir("compile")
    t0 = time.perf_counter()
    out = "".join(ctx.run("compile", _pretrain_cmd(ctx, run_dir, p.steps) + ["--set", "model.compile=true"]))
    wall = time.perf_counter() - t0
    expect("model.compile: torch.compile on" in out, "the run did not compile (no 'torch.compile on' line)")
    rows = metrics_rows(run_dir)
    a, b = [r["loss"] for r in eager], [r["loss"] for r in rows]
    expect(len(b) == len(a) and all(math.isfinite(v) for v in b), f"compiled losses {b}")
    worst = max(abs(x - y) / max(abs(x), 1e-6) for x, y in zip(a, b))
    ctx.values.update(compile_wall_s=wall, compile_loss_max_rel_diff=worst,
                      compile_samples_per_s=rows[-1].get("samples_per_s"))
    expect(worst < 0.05, f"compiled loss curve differs from eager by {worst:.1%}")
    return f"{p.steps} steps in {wall:.0f} s, loss within {worst:.2%} of eager, {rows[-1].get('samples_per_s', 0):.1f} samples/s"


def ds_precision(ds: dict[str, Any]) -> str:
    """What a written ds_config.json computes in: ``bf16`` (DeepSpeed's bf16 mode), ``bf16
    autocast`` (torch_autocast, fp32 parameters), ``fp16`` or ``fp32``."""
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    ac = ds.get("torch_autocast", {})
    if ac.get("enabled"):
        return {"bfloat16": "bf16", "float16": "fp16"}.get(ac.get("dtype"), str(ac.get("dtype"))) + " autocast"
    return "fp16" if ds.get("fp16", {}).get("enabled") else "fp32"


def check_resume(ctx: Ctx) -> str:
    """Rerun the pre-training with a larger max_steps in the same run dir: it must resume at the
    saved step and continue the same loss curve file."""
    p = ctx.plan
    run_dir = ctx.work / "pretrain"
    expect((run_dir / "status.json").is_file(), "needs the pretrain check's finished run, which is missing")
    before = metrics_rows(run_dir)
    total = p.steps + p.more_steps
    out = "".join(ctx.run("resume", _pretrain_cmd(ctx, run_dir, total)))
    m = re.search(r"resuming at step (\d+)", out)
    ctx.values["resume_from_step"] = int(m.group(1)) if m else None
    expect(m is not None, "no 'resuming at step' in the log: the run started over")
    expect(int(m.group(1)) == p.steps, f"resumed at step {m.group(1)}, expected {p.steps}")
    rows = metrics_rows(run_dir)
    expect([r["step"] for r in rows] == list(range(1, total + 1)), f"metrics steps {[r['step'] for r in rows]}")
    expect(rows[:p.steps] == before, "the rows up to the resumed step changed")
    expect(all(math.isfinite(r["loss"]) for r in rows), "non-finite loss after resuming")
    status = json.loads((run_dir / "status.json").read_text())
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    ctx.values.update(resume_final_step=status["step"], resume_latest_tag=latest)
    expect(status["step"] == total and latest == f"step{total:08d}", f"status {status}, latest {latest}")
    return f"resumed at step {p.steps}, ran to {total} (loss {rows[p.steps]['loss']:.3f} -> {rows[-1]['loss']:.3f})"


def prebuild_cpu_adam(ctx: Ctx) -> None:
    """Start building DeepSpeed's CPU Adam op (optimizer offload) now, in the background: a
    first build takes 1-2 minutes; later ones load the cached op in seconds."""
    code = "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()"
    with open(ctx.work / "cpu_adam_build.log", "w") as log:  # the child keeps its own copy of the descriptor
        ctx.cpu_adam = subprocess.Popen([sys.executable, "-c", code], env=ctx.env(), cwd=ROOT, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)


def check_zero3(ctx: Ctx) -> str:
    """ZeRO-3 (every parameter partitioned) + activation checkpointing + optimizer offload on a
    tiny model through the launcher; the child records the optimizer's weight-decay groups."""
    p = ctx.plan
    if ctx.cpu_adam is not None:
        t0 = time.perf_counter()
        rc = ctx.cpu_adam.wait(timeout=p.timeout_s)
        ctx.values["cpu_adam_wait_s"] = time.perf_counter() - t0
        expect(rc == 0, f"building DeepSpeed's CPUAdam op failed: "
               f"{last_error_line((ctx.work / 'cpu_adam_build.log').read_text(errors='replace'))}")
    run_dir, groups_json, steps = ctx.fresh_dir("zero3"), ctx.work / "zero3_wd_groups.json", 4
    groups_json.unlink(missing_ok=True)
    sets = {"data.store": ctx.store(), "run.dir": run_dir, "objective.kind": "masked_recon",
            "train.precision": p.precision, "train.max_steps": steps, "train.log_every": 1, "train.ckpt_every": 1000,
            "run.progress": "false", "run.tensorboard": "false", **p.pretrain_sets,
            "model.size": "tiny", "objective.decoder_dim": 64, "objective.decoder_depth": 1,
            "objective.decoder_heads": 4, "train.batch_size": 4 * p.nproc, "data.clip_frames": p.clip_frames,
            "train.zero_stage": 3, "train.zero3_param_persistence_threshold": 0,
            "model.checkpoint_activations": "true", "train.offload_optimizer": "true"}
    ctx.run("zero3", ctx.launcher(ROOT / "benchmarks" / "gpu_check.py", "--pretrain-child", groups_json, "--config",
                                  PRETRAIN_CONFIG, *set_args(sets)))
    g = json.loads(groups_json.read_text())
    ctx.values.update({f"zero3_{k}": v for k, v in g.items() if not isinstance(v, list)})
    ctx.values["zero3_matrices_not_decayed"] = len(g["matrices_not_decayed"])
    ctx.values["zero3_vectors_decayed"] = len(g["vectors_decayed"])
    ctx.values["zero3_target_clip_dtypes"] = ",".join(g["target_clip_dtypes"])
    expect(g["stage"] == 3 and g["partitioned"] == g["decay_params"] + g["no_decay_params"],
           f"ZeRO stage {g['stage']}, {g['partitioned']} of {g['decay_params'] + g['no_decay_params']} params partitioned")
    expect(g["checkpoint_activations"], "model.checkpoint_activations=true did not reach the model")
    expect("CPUAdam" in g["optimizer"], f"optimizer {g['optimizer']}, expected DeepSpeedCPUAdam (offload)")
    expect(g["missing_from_groups"] == 0, f"{g['missing_from_groups']} parameters in no optimizer group")
    expect(g["decay_params"] > 0 and not g["matrices_not_decayed"],
           f"{g['decay_params']} params decayed; matrices at weight_decay 0: {g['matrices_not_decayed'][:4]}")
    expect(not g["vectors_decayed"], f"vectors decayed: {g['vectors_decayed'][:4]}")
    expect(g["target_clip_dtypes"] == ["float32"],
           f"the model derived its targets from {g['target_clip_dtypes']} clips, expected float32 only")
    from mtscale.train.checkpoint import load_encoder

    _, meta = load_encoder(run_dir / "encoder.safetensors")  # strict: exactly the encoder's keys
    expect(meta["step"] == steps, f"exported encoder at step {meta['step']}, expected {steps}")
    loss = [r["loss"] for r in metrics_rows(run_dir)]
    expect(len(loss) == steps and all(math.isfinite(v) for v in loss), f"losses {loss}")
    return (f"{g['optimizer']}, {g['param_dtype']} params, {g['partitioned']} partitioned over {p.nproc} rank(s), "
            f"targets from {'/'.join(g['target_clip_dtypes'])} clips; weight decay "
            f"{g['weight_decay']}: {g['decay_params']} params ({g['decay_numel']:,} elements), 0: "
            f"{g['no_decay_params']} params ({g['no_decay_numel']:,}); encoder.safetensors exported at step {steps}")


def weight_decay_groups(engine: Any, model: Any) -> dict[str, Any]:
    """Which parameters the optimizer decays, read from the DeepSpeed optimizer itself (ZeRO-3:
    its sub-groups mapped to the base optimizer's groups; ZeRO-1/2 and bf16: aligned groups)."""
    from mtscale.models.encoder import full_shape

    names = {id(p): n for n, p in model.named_parameters()}
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    pairs = []
    if hasattr(opt, "sub_group_to_group_id"):  # ZeRO-3
        for sid, params in enumerate(opt.fp16_groups):
            pairs += [(p, base.param_groups[opt.sub_group_to_group_id[sid]]["weight_decay"]) for p in params]
    else:
        groups = getattr(opt, "bit16_groups", None) or getattr(opt, "bf16_groups", None) or \
            [g["params"] for g in base.param_groups]
        for i, params in enumerate(groups):
            pairs += [(p, base.param_groups[i]["weight_decay"]) for p in params]
    rows = [(names.get(id(p), "?"), full_shape(p), wd, tuple(p.shape)) for p, wd in pairs]
    decay = [r for r in rows if r[2] > 0]
    first = next(iter(model.parameters()))
    return {
        "stage": int(engine.zero_optimization_stage()), "optimizer": type(base).__name__,
        "param_dtype": str(getattr(first, "ds_tensor", first).dtype).removeprefix("torch."),
        "weight_decay": max((r[2] for r in rows), default=0.0),
        "decay_params": len(decay), "no_decay_params": len(rows) - len(decay),
        "decay_numel": sum(math.prod(r[1]) for r in decay),
        "no_decay_numel": sum(math.prod(r[1]) for r in rows if r[2] == 0),
        "partitioned": sum(r[3] != r[1] for r in rows),  # ZeRO-3: p.shape is an empty partition
        "missing_from_groups": len(set(names) - {id(p) for p, _ in pairs}),
        "matrices_not_decayed": [r[0] for r in rows if r[2] == 0 and r[0].endswith(".weight") and len(r[1]) >= 2],
        "vectors_decayed": [r[0] for r in decay if len(r[1]) < 2],
        "checkpoint_activations": any(getattr(m, "checkpoint_activations", False) for m in model.modules()),
    }


def pretrain_child(out_json: str, argv: list[str]) -> int:
    """``mtscale.pretrain`` under the launcher, recording on rank 0 :func:`weight_decay_groups`
    right after the engine is built, and the dtypes of the clips the model derived its targets
    from during the run (``target_clip_dtypes``)."""
    from mtscale import pretrain
    from mtscale.errors import MtscaleError
    from mtscale.models.objectives import PretrainModel
    from mtscale.train import pretrain as pretrain_run

    build, targets = pretrain_run.build_engine, PretrainModel.targets
    rank0 = int(os.environ.get("RANK", "0")) == 0
    record: dict[str, Any] = {}
    clip_dtypes: set[str] = set()

    def build_and_record(*args: Any, **kw: Any):
        engine, model = build(*args, **kw)
        record.update(weight_decay_groups(engine, model))
        return engine, model

    def targets_recorded(self: Any, x: Any, mask: Any) -> Any:
        clip_dtypes.add(str(x.dtype).removeprefix("torch."))
        return targets(self, x, mask)

    pretrain_run.build_engine, PretrainModel.targets = build_and_record, targets_recorded
    try:
        rc = pretrain.main(argv)
    except MtscaleError as e:
        print(f"mtscale pretrain: error: {e}", file=sys.stderr)
        return 2
    if rank0:
        Path(out_json).write_text(json.dumps(record | {"target_clip_dtypes": sorted(clip_dtypes)}, indent=1))
    return rc


def _encoder_for_finetune(ctx: Ctx) -> tuple[Path, str]:
    """The pretrain check's exported encoder, else (that check failed) a seeded random one in
    the same export format, so fine-tuning is checked either way."""
    enc = ctx.work / "pretrain" / "encoder.safetensors"
    if enc.is_file():
        return enc, "the pre-trained encoder"
    import torch

    from mtscale.config import ModelConfig, to_dict
    from mtscale.models.encoder import MotionTransformer
    from mtscale.train.checkpoint import encoder_meta, save_encoder

    torch.manual_seed(0)
    size = ctx.plan.pretrain_sets.get("model.size", "small")
    mcfg = ModelConfig(size=size)
    model = MotionTransformer.from_config(mcfg, clip_frames=ctx.plan.clip_frames, num_bodies=2, num_joints=25)
    meta = encoder_meta({"model": to_dict(mcfg), "data": {"clip_frames": ctx.plan.clip_frames, "num_bodies": 2}},
                        num_joints=25, layout="ntu25", step=0)
    return save_encoder(model.state_dict(), meta, ctx.work / "random_encoder.safetensors"), "a random encoder"


FT_BATCH = 16


def _finetune_on_device(ctx: Ctx, name: str, args: list[Any], sets: dict[str, Any]
                        ) -> tuple[dict[str, Any], str, list[float], str]:
    """``mtscale finetune --json ARGS`` for 2 epochs on the plan's device and precision, in a fresh
    ``<work>/<name>``; checks the device line, the optimizer line (``train.optimizer`` in ``sets``,
    else AdamW; torch's fused kernel on CUDA, foreach on CPU), a test accuracy and finite losses.
    Returns the result, the device it reported, the per-epoch training losses and a one-line summary."""
    p = ctx.plan
    run_dir = ctx.fresh_dir(name)
    sets = {"data.store": ctx.store(), "run.dir": run_dir, "epochs": 2, "warmup_epochs": 0.5,
            "data.clip_frames": p.clip_frames, "data.num_workers": p.workers, "train.device": "cuda" if p.cuda else "cpu",
            "train.precision": p.precision, "train.batch_size": FT_BATCH, "run.progress": "false",
            "run.tensorboard": "false", **sets}
    out, err = ctx.run(name, [sys.executable, "-m", "mtscale.cli", "finetune", "--config", FINETUNE_CONFIG, *args,
                              "--json", *set_args(sets)])
    res = json.loads(out)
    m = re.search(r"device (\S+) \((\w+)\)", err)
    expect(m is not None and m.group(1).startswith(p.device.split(":")[0]) and m.group(2) == p.precision,
           f"{name}: trained on {m and m.group(0)}, expected {p.device} ({p.precision})")
    opt = f"{'SGD' if sets.get('train.optimizer') == 'sgd' else 'AdamW'} ({'fused' if p.cuda else 'foreach'})"
    expect(f"optimizer {opt}" in err, f"{name}: no 'optimizer {opt}' line in the run's log")
    expect(0.0 <= res["test_top1"] <= 100.0 and res["test"] > 0, f"test top-1 {res.get('test_top1')}")
    losses = [r["train_loss"] for r in metrics_rows(run_dir)]
    expect(len(losses) == 2 and all(math.isfinite(v) for v in losses), f"train losses {losses}")
    summary = (f"{opt} on {m.group(1)} ({p.precision}), 2 epochs in {res['wall_s']:.0f} s: test top-1 "
               f"{res['test_top1']:.1f} % on {res['test']} samples, train loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return res, m.group(1), losses, summary


def check_finetune(ctx: Ctx) -> str:
    enc, which = _encoder_for_finetune(ctx)
    # the from-scratch recipe's stem (convs, BatchNorm) added over the encoder
    res, device, _, summary = _finetune_on_device(ctx, "finetune", ["--pretrained", enc], {"model.graph_stem": 2})
    ctx.values.update(finetune_test_top1=res.get("test_top1"), finetune_val_top1=res.get("val_top1"),
                      finetune_test_samples=res.get("test"), finetune_wall_s=res.get("wall_s"), finetune_device=device)
    return f"{which} + graph stem, {summary}"


def check_scratch_stem(ctx: Ctx) -> str:
    """The from-scratch recipe (benchmarks/README.md): frames drawn over the whole clip on the
    device, each token's time index, a graph stem under 2 transformer blocks; here the stem in its
    pyramid shape (strided temporal convs, the frame mask following the strides), trained by SGD
    with Nesterov momentum (``train.optimizer=sgd``: torch's fused kernel on CUDA, under the
    GradScaler in fp16)."""
    sets = {"layer_decay": 1.0, "data.sampling": "random", "data.crop_min": 1.0, "data.crop_max": 1.0,
            "model.time_index": "true", "model.depth": 2, "model.graph_stem": 3, "model.graph_stem_width": 16,
            "model.graph_stem_pyramid": "true", "train.optimizer": "sgd", "train.lr": 0.05, "train.weight_decay": 4e-4}
    res, device, losses, summary = _finetune_on_device(ctx, "scratch_stem", ["--protocol", "scratch"], sets)
    ctx.values.update(scratch_stem_test_top1=res.get("test_top1"), scratch_stem_losses=losses,
                      scratch_stem_wall_s=res.get("wall_s"), scratch_stem_device=device)
    return f"stem recipe from scratch, {summary}"


def check_evaluate(ctx: Ctx) -> str:
    """``mtscale evaluate`` of the fine-tuned checkpoint on the device: same test accuracy."""
    p = ctx.plan
    final = ctx.work / "finetune" / "final"
    expect(final.is_dir() and "finetune_test_top1" in ctx.values, "needs the finetune check's checkpoint, missing")
    out, _ = ctx.run("evaluate", [sys.executable, "-m", "mtscale.cli", "evaluate", "--checkpoint", final, "--store",
                                  ctx.store(), "--split", "xsub60", "--part", "test", "--device", p.device.split(":")[0],
                                  "--precision", p.precision, "--batch-size", 2 * FT_BATCH, "--json", "--quiet"])
    res = json.loads(out)
    want, n = ctx.values["finetune_test_top1"], res["num_samples"]
    ctx.values.update(evaluate_top1=res["top1"], evaluate_num_samples=n)
    tol = 100.0 / n + 1e-6 if p.cuda else 1e-6  # bf16 kernels may flip one sample's argmax
    expect(n == ctx.values["finetune_test_samples"],
           f"evaluated {n} samples, fine-tuning tested {ctx.values['finetune_test_samples']}")
    expect(abs(res["top1"] - want) <= tol, f"top-1 {res['top1']:.3f} vs fine-tuning's {want:.3f}")
    expect(Path(res["confusion_csv"]).is_file(), "no confusion matrix written")
    return f"top-1 {res['top1']:.1f} % on {n} samples (fine-tuning reported {want:.1f} %), confusion matrix written"


def make_throughput_check(size: str, tok: str) -> Callable[[Ctx], str]:
    def check(ctx: Ctx) -> str:
        """Real training steps of the pre-training model (benchmarks/bench_model.Step)."""
        import torch
        from bench_model import Step

        from mtscale.models.flops import gpu_peak_flops, measure_cpu_gemm_flops

        p = ctx.plan
        if p.cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
            peak = gpu_peak_flops(torch.cuda.get_device_name(ctx.device), ctx.dtype)
        else:
            peak = ctx.gemm_flops or measure_cpu_gemm_flops(seconds=0.5, n=1024)
        st = Step(size, tok, 0, ctx.device, ctx.dtype, flop_budget=p.flop_budget)
        try:
            sec = st.time(p.bench_steps, warmup=1 if p.dry else 2)
            ran = kernels_ran(st)  # one more step, profiled: the attention kernel training runs
            sps = st.batch / sec
            flops = st.model.flops_per_sample() * sps
            mfu = flops / peak if peak else None
            key = f"throughput_{size}_{tok}"
            ctx.values.update({f"{key}_batch": st.batch, f"{key}_samples_per_s": sps,
                               f"{key}_tokens_per_s": sps * st.model.tokens_per_sample(),
                               f"{key}_tflops": flops / 1e12, f"{key}_mfu": mfu,
                               f"{key}_peak_mem_bytes": torch.cuda.max_memory_allocated(ctx.device) if p.cuda else None,
                               f"{key}_sdpa_kernel": ",".join(sorted(ran))})
        finally:
            del st
            gc.collect()
            if p.cuda:
                torch.cuda.empty_cache()
        expect(math.isfinite(flops) and flops > 0, f"{flops} FLOP/s")
        expect(ran == {"flash"}, f"the training step ran SDPA kernel(s) {sorted(ran)}, expected flash (no padding)")
        expect(mfu is None or not p.cuda or 0 < mfu < 1, f"MFU {mfu}, expected in (0, 1)")
        return (f"batch {ctx.values[key + '_batch']}: {sps:.1f} samples/s, {ctx.values[key + '_tokens_per_s']:.3g} "
                f"tokens/s, {flops / 1e12:.3g} TFLOP/s, MFU {'-' if mfu is None else f'{100 * mfu:.1f} %'}, "
                f"SDPA {','.join(sorted(ran))}")

    return check
