"""``mtscale tune``: a Ray Tune sweep of fine-tuning runs from one YAML.

    mtscale tune --config configs/tune/tiny_cpu.yaml                  # local Ray on this machine
    mtscale tune --config configs/tune/nw_ucla.yaml --address auto    # an existing Ray cluster
    mtscale tune --config configs/tune/nw_ucla.yaml --resume          # continue an interrupted sweep
    mtscale tune --config ... --set num_samples=32 --set space.train.lr='{loguniform: [1e-5, 1e-2]}'

Each trial runs the real fine-tuning loop from the same pre-trained weights and reports its
validation metrics every epoch (with a checkpoint), so ASHA stops bad trials early and PBT
exploits good ones. Results: ``<storage_path>/<name>/`` holds Ray's per-trial dirs plus
``trials.parquet``, ``epochs.parquet``, ``best_config.yaml``, ``best_checkpoint/`` and ``plots/``
(see mtscale/tuning/report.py). The config schema is ``mtscale.tuning.settings.TuneConfig``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from mtscale.config import load_config, to_dict
from mtscale.tuning.settings import TuneConfig

log = logging.getLogger("mtscale.tune")

__all__ = ["TuneConfig", "run_tune", "main"]


def run_tune(cfg: TuneConfig, *, config_path: str | Path | None = None, address: str | None = None,
             resume: bool = False) -> dict:
    """Run (or with ``resume`` continue) the sweep; write the outputs; return a summary dict."""
    import yaml

    from mtscale.tuning.driver import init_ray, is_url, resolve, run_sweep
    from mtscale.tuning.report import write_outputs_to_experiment

    sweep = resolve(cfg, config_path)
    started = init_ray(cfg, address)
    stopped = _forward_stop_signals()
    try:
        grid = run_sweep(sweep, resume=resume)
        summary = write_outputs_to_experiment(grid, sweep)
    finally:
        stopped.restore()
        if started:
            import ray

            ray.shutdown()
    if stopped.raised:
        summary["interrupted_by_signal"] = stopped.signum
    if not is_url(sweep.experiment_dir):
        (Path(sweep.experiment_dir) / "tune_config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    errors = sum(1 for r in grid if r.error is not None)
    if errors:
        log.warning("%d of %d trials errored after %d retries each (see trials.parquet)",
                    errors, len(grid), cfg.max_failures)
    return summary


def _forward_stop_signals():
    """SIGTERM (a scheduler's preemption or time limit) and SIGINT (Ctrl-C) to the driver: recorded,
    then handed to Ray Tune as SIGUSR1, on which it saves the experiment state one last time and
    returns (``ray.init`` would otherwise turn SIGTERM into an exit without that save). The
    caller then exits ``EXIT_PREEMPTED``: ``--resume`` continues the sweep."""
    import os
    import signal

    from mtscale.train.rundir import StopFlag

    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours forwards it; Tune keeps its SIGUSR1 handler

    class Forward(StopFlag):
        def _handler(self, signum, frame):
            first = self.signum is None
            super()._handler(signum, frame)
            if first:
                log.warning("signal %d: asking Ray Tune to save the sweep's state and stop (again to force)", signum)
                os.kill(os.getpid(), signal.SIGUSR1)
            else:
                raise KeyboardInterrupt

    return Forward((signal.SIGTERM, signal.SIGINT))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtscale tune", description="Ray Tune sweep over fine-tuning.")
    p.add_argument("--config", required=True, help="tune YAML (configs/tune/*.yaml)")
    p.add_argument("--address", default=None,
                   help="existing Ray cluster: auto or HOST:PORT (default: start a local instance)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted sweep <storage_path>/<name>: finished trials are kept")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a tune config key")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(TuneConfig, args.config, args.set)
    from mtscale.dist import World
    from mtscale.train.runtime import setup_logging

    setup_logging(World.from_env())  # rank-prefixed, as every entry point logs
    summary = run_tune(cfg, config_path=args.config, address=args.address, resume=args.resume)
    if summary.get("interrupted_by_signal") is not None:
        from mtscale.train.rundir import EXIT_PREEMPTED

        log.warning("interrupted by signal %d: the sweep's state is saved in %s; run the same command with --resume "
                    "to continue it (exit %d)", summary["interrupted_by_signal"], summary["experiment_dir"],
                    EXIT_PREEMPTED)
        return EXIT_PREEMPTED
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        best = summary.get("best") or {}
        print(f"{summary['num_trials']} trials {summary['status']} in {summary['experiment_dir']}; "
              f"best {best.get('trial_id')}: {best.get('metric')}={best.get('value')} "
              f"-> {summary['experiment_dir']}/best_config.yaml")
    return 0


if __name__ == "__main__":
    from mtscale.cli import run_verb

    sys.exit(run_verb("tune", main))
