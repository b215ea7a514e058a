"""Self-supervised pre-training entry point. The same run, four ways:

    python -m mtscale.pretrain --config configs/pretrain/tiny_cpu.yaml --set data.store=data/synth
    mtscale pretrain --config configs/pretrain/tiny_cpu.yaml --set run.dir=runs/t --set train.max_steps=50
    deepspeed --num_gpus 8 mtscale/pretrain.py --config configs/pretrain/base.yaml --set data.store=...
    srun python -m mtscale.pretrain --config ...      # RANK/WORLD_SIZE/MASTER_* from SLURM_* (mtscale.dist)

On CPU the deepspeed launcher needs ``--num_gpus N`` (processes per node; there are no GPUs)
and ``DS_ACCELERATOR=cpu`` is best set explicitly. A rerun with the same ``run.dir`` resumes
from its latest checkpoint. Run outputs are described in ``mtscale.train.pretrain``.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a file (``deepspeed mtscale/pretrain.py``): mtscale/ is first on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's mtscale
    from mtscale.cli import script_path

    script_path(__file__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtscale pretrain", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML config (see configs/pretrain/)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=10 (repeatable)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="passed by the deepspeed launcher; LOCAL_RANK in the environment is what is used")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and the DeepSpeed config, then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mtscale.config import PretrainConfig, load_config
    from mtscale.malloc import tune_malloc

    tune_malloc()  # this process is ours (mtscale.malloc)

    cfg = load_config(PretrainConfig, args.config, args.sets)
    if args.print_config:
        import json

        import yaml

        from mtscale.config import to_dict
        from mtscale.dist import World
        from mtscale.train.engine import deepspeed_config

        world = World.from_env()
        device_type = "cuda" if cfg.train.device == "cuda" else ("cpu" if cfg.train.device == "cpu" else _auto_device())
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        print(json.dumps(deepspeed_config(cfg.train, world_size=world.world_size, device_type=device_type), indent=2))
        return 0
    from mtscale.train.pretrain import run_pretrain

    return run_pretrain(cfg)


def _auto_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    from mtscale.cli import run_verb

    sys.exit(run_verb("pretrain", main))
