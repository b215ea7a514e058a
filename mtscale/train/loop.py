"""The step loop shared by pre-training and fine-tuning: gradient accumulation over a DeepSpeed
engine, periodic + signal-triggered checkpoints, throughput / MFU accounting, JSONL metrics,
TensorBoard and a rank-0 progress bar.

A step here is one optimizer step (``accum`` micro-batches per rank). ``step_fn(batch, step)``
runs one micro-batch forward and returns ``(loss, metrics)``; the loop does backward / step.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from mtscale.dist import World, all_reduce_flag
from mtscale.errors import NonFiniteLossError

log = logging.getLogger(__name__)

def setup_logging(world: World, level: int = logging.INFO) -> None:
    """Rank-prefixed log lines on stderr; INFO on rank 0, WARNING elsewhere."""
    fmt = f"%(asctime)s [rank {world.rank}] %(levelname)s %(name)s: %(message)s"
    root = logging.getLogger("mtscale")
    for h in list(root.handlers):
        if getattr(h, "_mtscale", False):
            root.removeHandler(h)
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
    h._mtscale = True  # type: ignore[attr-defined]
    root.addHandler(h)
    root.setLevel(level if world.is_main else max(level, logging.WARNING))
    root.propagate = False


class StopFlag:
    """SIGTERM / SIGUSR1 set a flag; the loop checkpoints at its next stop check on every rank
    (the flag is all-reduced) and returns; the run records ``preempted`` in ``status.json``."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)):
        self.signum: int | None = None
        self._old = {}
        for s in signals:
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread
                pass

    def _handler(self, signum: int, frame: Any) -> None:
        self.signum = signum

    @property
    def raised(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class MetricsWriter:
    """Rank-0 ``metrics.jsonl`` (+ TensorBoard). On resume, rows past the resumed step are dropped
    so the file is the loss curve of one continuous run."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        elif resume_step is None and self.path.is_file():
            self.path.unlink()
        self._f = open(self.path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.enabled:
            self._f.close()
            if self.tb is not None:
                self.tb.close()


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
    metrics: MetricsWriter,
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
                if bar is not None:
                    bar.set_postfix(loss=f"{last_loss:.4f}", sps=f"{row['samples_per_s']:.1f}",
                                    tok_s=f"{row['tokens_per_s']:.3g}", tflops=f"{row['tflops']:.3g}",
                                    mfu=f"{row.get('mfu', float('nan')):.2%}")
            if bar is not None:
                bar.update(1)
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
    except Exception:  # noqa: BLE001 - not every DeepSpeed path tracks it
        return float("nan")
    return float(g) if g is not None else float("nan")


def plot_loss(metrics_path: Path, out_png: Path) -> Path | None:
    """Loss (and LR) against step from ``metrics.jsonl``."""
    if not metrics_path.is_file():
        return None
    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in rows], [r.get("lr", float("nan")) for r in rows], color="tab:orange", alpha=0.5, label="lr")
    ax2.set_ylabel("lr")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
