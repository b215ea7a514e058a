"""``mtscale predict``: classify raw recordings with a fine-tuned checkpoint.

    mtscale predict --checkpoint runs/ft/final data/S001C001P001R001A001.skeleton ...
    mtscale predict --checkpoint runs/ucla/final --format nw-ucla a01_s01_e00_v03.json --json

Each file goes through its reader, the preprocessing recorded in the training store and the
evaluation crop; prints one row per recording (class id, name, probability, runner-up) or JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

from mtscale.data.formats import FORMATS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtscale predict", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", metavar="FILE", help="raw recordings")
    p.add_argument("--checkpoint", required=True, help="classifier folder (<run>/final) or fine-tuning run dir")
    p.add_argument("--format", choices=FORMATS, default=None, help="default: from the extension / the checkpoint")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from mtscale.train.predict import format_table, predict_files

    rows = predict_files(a.checkpoint, a.files, fmt=a.format, topk=a.topk, device=a.device)
    print(json.dumps(rows, indent=2, allow_nan=False) if a.json else format_table(rows))  # valid JSON or an error
    return 0


if __name__ == "__main__":
    from mtscale.cli import run_verb

    sys.exit(run_verb("predict", main))
