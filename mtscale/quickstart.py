"""``mtscale quickstart``: the whole pipeline, end to end, on this machine.

    mtscale quickstart [--workdir quickstart] [--quick]
    mtscale quickstart --data ../shared/data/nw_ucla/all_sqe --format nw-ucla [--minutes 10]
    mtscale quickstart --data /path/to/nturgbd_skeletons --format ntu --split xsub60

Without ``--data`` it demonstrates what the product is for: the label-scarce case, where
pre-training on all the unlabelled clips is meant to pay. With ``--data`` it trains real models on
your recordings with a recipe sized from their number and ``--minutes`` (mtscale/recipes.py says
which recipe and why, and prints it).

Stages (each resumable: a finished stage is skipped on re-run, a half-finished one resumes):

1. ``synth``     synthetic NTU-format ``.skeleton`` files (skipped with ``--data``)
2. ``prepare``   raw files -> Zarr store + Parquet manifest (``--data``: view-normalised)
3. ``pretrain``  self-supervised pre-training on the training clips, no labels, through the real
                 ``deepspeed`` launcher, 2 CPU processes (or the GPUs of this machine)
4. ``scratch``   supervised training from random init (the baseline)
5. ``finetune``  the same labels, epochs and seed, starting from the pre-trained encoder
                 (``--data``: 4 and 5 run side by side, one core each)
6. ``linear``    linear probe on the frozen pre-trained encoder, the same labels
7. ``tune``      a small Ray Tune sweep (ASHA) over fine-tuning hyper-parameters (demo only)
8. summary       ``summary.md`` / ``summary.json``: one sentence on whether pre-training paid,
                 the table, ``summary.png`` (bar chart); plots: pre-training loss, confusion
                 matrices, sweep.

Configs come from ``configs/`` of the source checkout; every value the quickstart changes is
passed as a visible ``--set`` override and printed, so each stage can be re-run by hand.
"""

from __future__ import annotations

import argparse
import sys

from mtscale.data.formats import FORMATS
from mtscale.pipeline import run_quickstart


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtscale quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="quickstart", help="where every stage writes (default: ./quickstart)")
    p.add_argument("--quick", action="store_true", help="a smaller, faster variant (used by the tests)")
    p.add_argument("--data", help="your raw recordings instead of synthetic data")
    p.add_argument("--format", default="ntu", choices=FORMATS, help="format of --data")
    p.add_argument("--split", default=None,
                   help="split column to train/test on (default: xsub120 for synthetic/NTU data, view for NW-UCLA)")
    p.add_argument("--minutes", type=float, default=10.0,
                   help="--data: time budget the recipe's schedule is sized to (default 10; the demo ignores it)")
    p.add_argument("--procs", type=int, default=2, help="pre-training processes on CPU (default 2)")
    p.add_argument("--skip-tune", action="store_true", help="leave out the Ray Tune stage")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print("\n" + run_quickstart(args))
    return 0


if __name__ == "__main__":
    from mtscale.cli import run_verb

    sys.exit(run_verb("quickstart", main))
