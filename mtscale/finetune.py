"""``mtscale finetune``: fine-tuning, linear probe, semi-supervised and from-scratch training.

    mtscale finetune --config configs/finetune/tiny_cpu.yaml --pretrained runs/pre/encoder.safetensors
    mtscale finetune --config configs/finetune/nw_ucla.yaml --protocol linear --seeds 0,1,2
    deepspeed --num_gpus 8 mtscale/finetune.py --config configs/finetune/ntu60_xsub.yaml --pretrained ...
    python -m mtscale.finetune --config ... --set train.lr=5e-4 --set data.label_fraction=0.1

Parses, builds the config, calls ``run_seeds`` (logic: ``mtscale/train/finetune.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as a file (``deepspeed mtscale/finetune.py``): mtscale/ is first on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's mtscale
    from mtscale.cli import script_path

    script_path(__file__)

from mtscale.config import FinetuneConfig, load_config
from mtscale.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtscale finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="finetune YAML (configs/finetune/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    p.add_argument("--pretrained", help="exported encoder .safetensors or pre-training run dir (= --set pretrained=)")
    p.add_argument("--protocol", choices=("finetune", "linear", "semi", "scratch"))
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (mean ± std is reported)")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse_config(argv: list[str] | None) -> tuple[FinetuneConfig, argparse.Namespace]:
    a = build_parser().parse_args(argv)
    sets = list(a.set)
    if a.pretrained is not None:
        sets.append(f"pretrained={a.pretrained}")
    if a.protocol is not None:
        sets.append(f"protocol={a.protocol}")
    if a.seeds is not None:
        try:
            seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--seeds: found {a.seeds!r}, expected comma-separated integers like 0,1,2") from None
        sets.append(f"seeds={seeds}")
    if a.protocol == "scratch" and a.pretrained is None:
        sets.append("pretrained=null")
    return load_config(FinetuneConfig, a.config, sets), a


def main(argv: list[str] | None = None) -> int:
    cfg, a = parse_config(argv)
    from mtscale.dist import World
    from mtscale.train.finetune import run_seeds
    from mtscale.train.runtime import setup_logging

    world = World.from_env()
    setup_logging(world)  # rank-prefixed; INFO on rank 0 only
    result = run_seeds(cfg)
    if result.get("preempted"):
        from mtscale.train.rundir import EXIT_PREEMPTED

        return EXIT_PREEMPTED
    if world.is_main:
        if a.json:
            print(json.dumps(result, indent=2, sort_keys=True, default=str))
        else:
            keys = [k for k in ("test_top1", "test_top1_best", "val_top1", "test_top1_mean", "test_top1_std")
                    if k in result]
            print(" ".join(f"{k}={result[k]:.2f}" for k in keys) + f" ({result.get('wall_s', 0):.0f} s) -> {cfg.run.dir}")
    return 0


if __name__ == "__main__":
    from mtscale.cli import run_verb

    sys.exit(run_verb("finetune", main))
