"""One pre-training run, start to end: world -> store + loader -> model under DeepSpeed ->
resume -> step loop -> checkpoints -> exported encoder + loss plot.

The step loop (``run_steps``): a step is one optimizer step (``accum`` micro-batches per rank);
``step_fn(batch, step)`` runs one micro-batch forward and returns ``(loss, metrics)``, the loop
does backward / step, periodic and signal-triggered checkpoints, throughput / MFU accounting,
the metrics rows and a rank-0 progress bar.

Run directory (``run.dir``): ``config.yaml`` (resolved), ``ds_config.json``, ``metrics.jsonl``,
``tb/`` (TensorBoard), ``checkpoints/``, ``encoder.safetensors`` + ``encoder.json``,
``loss.png``, ``status.json`` (``finished`` or ``preempted``, with the step and signal).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from mtscale.config import PretrainConfig, to_dict
from mtscale.dist import World, all_reduce_flag, barrier, init_distributed, select_device, shutdown
from mtscale.errors import ConfigError, NonFiniteLossError
from mtscale.train import checkpoint as ckpt
from mtscale.train.engine import DTYPES, batch_geometry, build_engine, deepspeed_config
from mtscale.train.rundir import (
    EXIT_PREEMPTED,
    PRETRAIN_KEEP,
    MetricsLog,
    StopFlag,
    check_resume,
    check_run_dir,
    plot_loss,
    start_run_dir,
    write_json,
)
from mtscale.train.runtime import run_precision, setup_logging
from mtscale.train.state import capture_rng, restore_rng

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
    precision = run_precision(tr.precision, device, run_dir)
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
        start_run_dir(run_dir, cfg, facts={"precision": precision, "device_type": device.type})
        write_json(run_dir / "ds_config.json", ds_config)

    client = ckpt.resume(engine, run_dir)
    start_step = 0
    if client is not None:
        start_step = int(client["step"])
        loader.load_state_dict(client["loader"])
        restore_rng(client["rng"])
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
        time = batch["time"].to(device, non_blocking=True)  # frames into the recording (model.time_index)
        loss, metrics = engine(x, mask, keys, step=step, seed=tr.seed, time_NT=time)
        return loss, {k: v for k, v in metrics.items() if k != "loss" and torch.is_tensor(v) and v.numel() == 1}

    def save(step: int) -> None:
        client_state = {"step": step, "loader": loader.state_dict(), "rng": capture_rng(), "config": cfg_dict,
                        "world_size": world.world_size,
                        "encoder_meta": ckpt.encoder_meta(cfg_dict, num_joints=num_joints, layout=layout, step=step)}
        ckpt.save(engine, run_dir, step, client_state, tr.keep_checkpoints)

    peak = peak_flops(device, in_dtype) if world.is_main else None
    throughput = Throughput(flops_per_sample=float(model.flops_per_sample()),
                            tokens_per_sample=int(model.tokens_per_sample()),
                            peak_flops_total=(peak or 0.0) * world.world_size)
    metrics = MetricsLog(run_dir, "step", first=start_step + 1 if client is not None else 0, enabled=world.is_main,
                         tensorboard=cfg.run.tensorboard)
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


# --------------------------------------------------------------------------- the step loop


@dataclass
class Throughput:
    """Samples/s, tokens/s, achieved TFLOP/s and MFU over the last logging window."""

    flops_per_sample: float
    tokens_per_sample: int
    peak_flops_total: float
    """Peak FLOP/s of all ranks together (per-device peak x world size)."""
    _t0: float = field(default_factory=time.perf_counter)
    _samples: int = 0

    def add(self, samples: int) -> None:
        self._samples += samples

    def read(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self._t0, 1e-9)
        sps = self._samples / dt
        flops = sps * self.flops_per_sample
        out = {"samples_per_s": sps, "tokens_per_s": sps * self.tokens_per_sample, "tflops": flops / 1e12,
               "mfu": flops / self.peak_flops_total if self.peak_flops_total > 0 else float("nan")}
        self._t0, self._samples = time.perf_counter(), 0
        return out


@dataclass
class LoopResult:
    step: int
    stopped_by_signal: int | None
    last_loss: float


def run_steps(
    engine: Any,
    batches: Iterator[dict[str, torch.Tensor]],
    step_fn: Callable[[dict[str, torch.Tensor], int], tuple[torch.Tensor, dict[str, Any]]],
    *,
    start_step: int,
    max_steps: int,
    accum: int,
    global_batch: int,
    world: World,
    device: torch.device,
    throughput: Throughput,
    metrics: MetricsLog,
    log_every: int,
    ckpt_every: int,
    save_ckpt: Callable[[int], None],
    progress: bool = True,
    stop: StopFlag | None = None,
) -> LoopResult:
    """Optimizer steps ``start_step + 1 .. max_steps``. Saves every ``ckpt_every`` steps and, after a
    signal, at the next check (every ``stop_every(log_every)`` steps; then returns with
    ``stopped_by_signal`` set).

    No host synchronisation per micro-batch: losses and metrics stay device tensors and are read
    (and all-reduced) once per ``log_every`` window. A non-finite loss anywhere in a window stops
    the run with :class:`NonFiniteLossError` naming its first step and that step's sample ids, before
    any checkpoint of the poisoned weights is written."""
    bar = None
    if progress and world.is_main:
        from tqdm import tqdm

        bar = tqdm(total=max_steps, initial=start_step, desc="pretrain", unit="step", dynamic_ncols=True)
    step, last_loss, last_saved = start_step, float("nan"), start_step
    stop = stop or StopFlag(())
    check_every = stop_every(log_every)
    progress_every = max(log_every, (max_steps // 50) // log_every * log_every)  # a logged window's loss
    last_sps = math.nan
    window: list[tuple[int, torch.Tensor, list[torch.Tensor]]] = []  # (step, loss sum on this rank, sample ids)
    try:
        while step < max_steps:
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            extra: dict[str, Any] = {}
            ids = []
            for _ in range(accum):
                batch = next(batches)
                ids.append(batch["index"])
                loss, m = step_fn(batch, step)
                engine.backward(loss)
                engine.step()
                loss_sum += loss.detach().double()
                for k, v in m.items():
                    extra[k] = extra.get(k, 0.0) + v / accum
            step += 1
            throughput.add(global_batch)
            window.append((step, loss_sum, ids))
            logging_now = step % log_every == 0 or step == max_steps or step == start_step + 1
            stopping = step % check_every == 0 and all_reduce_flag(stop.raised, device)
            saving = step % ckpt_every == 0 or stopping
            if logging_now or saving:  # never checkpoint weights that a non-finite loss may have poisoned
                last_loss = _check_window(window, accum, world)
                window = []
            if logging_now:
                row = {"step": step, "loss": last_loss, "lr": float(engine.get_lr()[0]),
                       "grad_norm": _grad_norm(engine), **{k: float(v) for k, v in extra.items()},
                       **throughput.read()}
                row = {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
                metrics.write(row)
                last_sps = row["samples_per_s"]
                if bar is not None:
                    bar.set_postfix(loss=f"{last_loss:.4f}", sps=f"{row['samples_per_s']:.1f}",
                                    tok_s=f"{row['tokens_per_s']:.3g}", tflops=f"{row['tflops']:.3g}",
                                    mfu=f"{row.get('mfu', float('nan')):.2%}")
            if bar is not None:
                bar.update(1)
            elif world.is_main and (step % progress_every == 0 or step == max_steps):  # no bar: ~50 lines a run
                log.info("step %d/%d: loss %.4f, %.1f samples/s", step, max_steps, last_loss, last_sps)
            if saving:
                save_ckpt(step)
                last_saved = step
            if stopping:
                log.warning("signal %s: checkpointed at step %d, stopping", stop.signum, step)
                return LoopResult(step, stop.signum or -1, last_loss)
        if last_saved != step:  # (the last step always logs, so its window is checked)
            save_ckpt(step)
        return LoopResult(step, None, last_loss)
    finally:
        if bar is not None:
            bar.close()


def stop_every(log_every: int) -> int:
    """Steps between two checks of the stop flag (each check is a collective + host sync): every
    logging window, at most 10 steps apart (a SLURM signal arrives minutes before the kill)."""
    return max(1, min(log_every, 10))


def _check_window(window: list[tuple[int, torch.Tensor, list[torch.Tensor]]], accum: int, world: World) -> float:
    """All-reduce the window's per-step losses (one collective, one host sync); raise on the first
    non-finite one; return the last step's global-batch mean loss."""
    import torch.distributed as dist

    losses = torch.stack([w[1] for w in window])
    if dist.is_initialized() and world.world_size > 1:
        dist.all_reduce(losses)
    losses = (losses / (accum * world.world_size)).cpu()
    bad = (~torch.isfinite(losses)).nonzero()
    if bad.numel():
        i = int(bad[0])
        step, _, ids = window[i]
        sample_ids = torch.cat([t.reshape(-1).cpu() for t in ids]).tolist()
        raise NonFiniteLossError.of_batch(f"step {step}", float(losses[i]), sample_ids, f"on rank {world.rank} ")
    return float(losses[-1])


def _grad_norm(engine: Any) -> float:
    try:
        g = engine.get_global_grad_norm()
    except Exception:
        return float("nan")
    return float(g) if g is not None else float("nan")


