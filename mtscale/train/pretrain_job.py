"""One pre-training run, start to end: world -> store + loader -> model under DeepSpeed ->
resume -> step loop -> checkpoints -> exported encoder + loss plot.

Run directory (``run.dir``): ``config.yaml`` (resolved), ``ds_config.json``, ``metrics.jsonl``,
``tb/`` (TensorBoard), ``checkpoints/``, ``encoder.safetensors`` + ``encoder.json``,
``loss.png``, ``status.json`` (``finished`` or ``preempted``, with the step and signal).
"""

from __future__ import annotations

import logging
import time

import torch

from mtscale.config import PretrainConfig, to_dict
from mtscale.dist import World, barrier, init_distributed, select_device, shutdown
from mtscale.errors import ConfigError
from mtscale.train import checkpoint as ckpt
from mtscale.train.engine import DTYPES, batch_geometry, build_engine, deepspeed_config, resolve_precision
from mtscale.train.loop import MetricsWriter, StopFlag, Throughput, plot_loss, run_steps, setup_logging
from mtscale.train.rundir import EXIT_PREEMPTED, PRETRAIN_KEEP, check_resume, check_run_dir, start_run_dir, write_json

log = logging.getLogger(__name__)


def run_pretrain(cfg: PretrainConfig, world: World | None = None) -> int:
    """Run (or resume) the pre-training described by ``cfg``; returns the process exit code:
    0 when finished, ``EXIT_PREEMPTED`` after a signal-triggered checkpoint (``status.json``
    says which; see mtscale/train/rundir.py)."""
    stop = StopFlag()  # first, so a signal during start-up is not lost
    world = world or World.from_env()
    setup_logging(world)
    if not cfg.data.store:
        raise ConfigError("data.store: empty, expected the path or URL of a store (--set data.store=PATH)")
    device = select_device(world, cfg.train.device)
    backend = init_distributed(world, device)
    try:
        return _run(cfg, world, device, backend, stop)
    finally:
        stop.restore()
        shutdown()


def _run(cfg: PretrainConfig, world: World, device: torch.device, backend: str, stop: StopFlag) -> int:
    from mtscale.data.loader import build_loader, model_mask
    from mtscale.data.store import Store
    from mtscale.data.streams import stream_channels
    from mtscale.models.flops import peak_flops
    from mtscale.models.objectives import build_pretrain_model

    run_dir = check_run_dir(cfg.run.dir)
    check_resume(run_dir, to_dict(cfg), PRETRAIN_KEEP)  # before anything is written
    tr = cfg.train
    geo = batch_geometry(tr, world.world_size)
    precision = resolve_precision(tr.precision, device.type)
    ds_config = deepspeed_config(tr, world_size=world.world_size, device_type=device.type, precision=precision)
    log.info("device %s, backend %s, precision %s, ZeRO %d, world %d, batch %d = %d x %d ranks x %d accum",
             device, backend, precision, tr.zero_stage, world.world_size, geo.global_batch_size,
             geo.micro_batch_size, world.world_size, geo.grad_accum_steps)

    store = Store.open(cfg.data.store)
    loader = build_loader(store, cfg.data, batch_size=geo.micro_batch_size, seed=tr.seed, rank=world.rank,
                          world_size=world.world_size, train=True, device=device)
    num_joints = store.layout.num_joints
    torch.manual_seed(tr.seed)  # identical initial weights on every rank and every run
    engine, model = build_engine(
        lambda: build_pretrain_model(cfg.model, cfg.objective, clip_frames=cfg.data.clip_frames,
                                     num_bodies=cfg.data.num_bodies, num_joints=num_joints,
                                     in_chans=stream_channels(cfg.data.stream), parents=store.layout.parents),
        tr, ds_config)
    if cfg.model.compile and device.type == "cuda":  # in place (engine.compile): state-dict keys stay un-prefixed
        engine.compile()
        log.info("model.compile: torch.compile on (the first steps include the compilation)")
    elif cfg.model.compile:
        # Measured 2026-12-06 (torch 2.13.0+cpu, DeepSpeed 0.19.8, AMD EPYC): engine.compile() on CPU
        # aborts the process with glibc heap corruption at the first step (1 or 2 threads, with or
        # without mtscale's malloc tuning); the same model compiled outside DeepSpeed trains.
        log.warning("model.compile: not applied on CPU pre-training (torch.compile under DeepSpeed corrupts the "
                    "heap on CPU here: benchmarks/README.md); running eager")
    cfg_dict = to_dict(cfg)
    layout = store.layout.name
    if world.is_main:  # only now: a config or store error above leaves no half-made run dir behind
        start_run_dir(run_dir, cfg)
        write_json(run_dir / "ds_config.json", ds_config)

    client = ckpt.resume(engine, run_dir)
    start_step = 0
    if client is not None:
        start_step = int(client["step"])
        loader.load_state_dict(client["loader"])
        ckpt.restore_rng(client["rng"])
        log.info("resuming at step %d of %d", start_step, tr.max_steps)

    def batches():
        while True:
            yield from loader

    in_dtype = DTYPES[precision]

    def step_fn(batch: dict[str, torch.Tensor], step: int):
        # The clip stays fp32: targets, their normalisation and the motion-aware masking scores
        # are computed from it; the model casts only the tokens entering the network to its
        # compute dtype (PretrainModel.forward).
        x = batch["x"].to(device=device, dtype=torch.float32, non_blocking=True)
        mask = model_mask(batch)
        mask = None if mask is None else mask.to(device, non_blocking=True)
        keys = batch["index"].to(device, non_blocking=True)
        loss, metrics = engine(x, mask, keys, step=step, seed=tr.seed)
        return loss, {k: v for k, v in metrics.items() if k != "loss" and torch.is_tensor(v) and v.numel() == 1}

    def save(step: int) -> None:
        client_state = {"step": step, "loader": loader.state_dict(), "rng": ckpt.capture_rng(), "config": cfg_dict,
                        "world_size": world.world_size,
                        "encoder_meta": ckpt.encoder_meta(cfg_dict, num_joints=num_joints, layout=layout, step=step)}
        ckpt.save(engine, run_dir, step, client_state, tr.keep_checkpoints)

    peak = peak_flops(device, in_dtype) if world.is_main else None
    throughput = Throughput(flops_per_sample=float(model.flops_per_sample()),
                            tokens_per_sample=int(model.tokens_per_sample()),
                            peak_flops_total=(peak or 0.0) * world.world_size)
    metrics = MetricsWriter(run_dir, enabled=world.is_main, tensorboard=cfg.run.tensorboard,
                            resume_step=start_step if client is not None else None)
    t0 = time.perf_counter()
    try:
        result = run_steps(
            engine, batches(), step_fn, start_step=start_step, max_steps=tr.max_steps, accum=geo.grad_accum_steps,
            global_batch=geo.global_batch_size, world=world, device=device, throughput=throughput,
            metrics=metrics, log_every=tr.log_every, ckpt_every=tr.ckpt_every, save_ckpt=save,
            progress=cfg.run.progress, stop=stop)
    finally:
        metrics.close()
    status = {"state": "preempted" if result.stopped_by_signal else "finished", "step": result.step,
              "signal": result.stopped_by_signal, "loss": result.last_loss,
              "seconds": round(time.perf_counter() - t0, 3), "world_size": world.world_size}
    if world.is_main:
        if result.stopped_by_signal is None:
            if cfg.run.export_encoder:
                out = ckpt.export_encoder(run_dir, run_dir / "encoder.safetensors")
                log.info("exported encoder to %s", out)
            plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png")
        write_json(run_dir / "status.json", status)
    barrier()
    log.info("%s at step %d (loss %.4f)", status["state"], result.step, result.last_loss)
    if result.stopped_by_signal is not None:
        log.warning("preempted: checkpointed at step %d of %d; run the same command again to resume (exit %d)",
                    result.step, tr.max_steps, EXIT_PREEMPTED)
        return EXIT_PREEMPTED
    return 0
