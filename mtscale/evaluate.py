"""``mtscale evaluate``: exact evaluation of a fine-tuned checkpoint on a store.

    mtscale evaluate --checkpoint runs/ft/final --store stores/ntu60 --split xsub60 --part test --json
    deepspeed --num_gpus 8 mtscale/evaluate.py --checkpoint ... --store ... --split xsub60   # same numbers
    torchrun --nproc_per_node 2 -m mtscale.evaluate ...

Every sample of the split is counted exactly once whatever the number of ranks. The input
stream (joint, bone, ...) is the one recorded in the checkpoint. Writes the confusion matrix
(CSV + PNG) and metrics.json beside the checkpoint (or into --out); ``--save-scores`` also the
per-sample softmax scores (``scores_<part>.parquet``, what ``mtscale ensemble`` reads).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as a file (``deepspeed mtscale/evaluate.py``): mtscale/ is first on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's mtscale
    from mtscale.cli import script_path

    script_path(__file__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtscale evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="classifier folder (<run>/final, <run>/best) or run dir")
    p.add_argument("--store", required=True, help="store path or fsspec URL")
    p.add_argument("--split", default=None, help="split name (split_<name> column), e.g. xsub60, view")
    p.add_argument("--part", default="test", help="value of the split column (default: test)")
    p.add_argument("--where", default=None, help="extra manifest filter, e.g. 'camera == 2'")
    p.add_argument("--clips", type=int, default=1, help="test-time clips averaged per sample (1 = centre crop)")
    p.add_argument("--batch-size", type=int, default=64, help="per-rank batch")
    p.add_argument("--out", default=None, help="folder for confusion.csv / confusion.png / metrics.json")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--save-scores", action="store_true",
                   help="also write per-sample softmax scores to scores_<part>.parquet in the output folder "
                        "(sample id, label, one column per class, run, stream; for mtscale ensemble)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from mtscale.dist import World
    from mtscale.train.classifier import resolve_checkpoint
    from mtscale.train.evaluate import evaluate_checkpoint
    from mtscale.train.runtime import setup_logging

    resolve_checkpoint(a.checkpoint)  # a missing checkpoint: one line, before the runtime starts (and logs)
    world = World.from_env()
    setup_logging(world)
    res = evaluate_checkpoint(a.checkpoint, a.store, split=a.split, part=a.part, where=a.where, clips=a.clips,
                              batch_size=a.batch_size, out_dir=a.out, device=a.device, precision=a.precision,
                              progress=not a.quiet, save_scores=a.save_scores)
    if world.is_main:
        if a.json:
            print(json.dumps(res, indent=2))
        else:
            print(f"top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  mean class {res['mean_class_acc']:.2f}%  "
                  f"on {res['num_samples']} samples ({res['num_ranks']} rank(s), {res['clips']} clip(s))")
            print(f"confusion matrix: {res['confusion_csv']}, {res['confusion_png']}")
            if "scores" in res:
                print(f"per-sample scores: {res['scores']}")
    return 0


if __name__ == "__main__":
    from mtscale.cli import run_verb

    sys.exit(run_verb("evaluate", main))
