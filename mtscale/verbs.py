"""The verbs without an entry module of their own -- ``mtscale synth | prepare | info | verify |
merge | ensemble``: their parsers (added to ``mtscale``'s by ``add_parsers``) and handlers, which
parse, call the library and print. ``mtscale.cli`` runs them through its one runner.
"""

from __future__ import annotations

import argparse
import json
import sys

from mtscale.data.formats import FORMATS


def _cmd_synth(a: argparse.Namespace) -> int:
    from mtscale.data.synthetic import synthesize

    summary = synthesize(
        a.out, num_samples=a.num_samples, num_classes=a.num_classes, seed=a.seed,
        workers=a.workers, progress=not a.quiet, posture=a.posture,
    )
    print(json.dumps(summary) if a.json else f"wrote {summary['num_files']} files to {a.out}")
    return 0


def _cmd_prepare(a: argparse.Namespace) -> int:
    from mtscale.data.prepare import PrepareOptions, prepare

    opts = PrepareOptions(
        max_bodies=a.max_bodies, dtype=a.dtype, center=not a.no_center,
        view_normalize=a.view_normalize, drop_empty_frames=not a.keep_empty_frames,
        denoise=not a.no_denoise, layout=a.layout, units=a.units,
    )
    summary = prepare(
        fmt=a.format, input_path=a.input, out=a.out, options=opts, workers=a.workers,
        strict=a.strict, progress=not a.quiet, part_index=a.part_index, num_parts=a.num_parts,
    )
    if a.json:
        print(json.dumps(summary))
    else:
        print(
            f"prepared {summary['num_samples']} samples ({summary['num_frames']} frames) into {a.out}; "
            f"skipped {summary['num_skipped']} bad records, excluded {summary['num_excluded']}"
            + (f"; report: {summary['report']}" if summary.get("report") else "")
        )
    return 0


def _cmd_info(a: argparse.Namespace) -> int:
    from mtscale.data.store import Store

    info = Store.open(a.store).info()
    if a.json:
        print(json.dumps(info, indent=2))
    else:
        from mtscale.data.store import format_info

        print(format_info(info))
    return 0


def _cmd_verify(a: argparse.Namespace) -> int:
    from mtscale.data.store import Store

    problems = Store.open(a.store).verify(progress=not a.quiet)
    for p in problems:
        print(p)
    if problems:
        print(f"{a.store}: {len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print(f"{a.store}: ok")
    return 0


def _cmd_merge(a: argparse.Namespace) -> int:
    from mtscale.data.store_merge import merge_stores

    summary = merge_stores(a.parts, a.out, progress=not a.quiet)
    print(f"merged {len(a.parts)} parts into {a.out}: {summary['num_samples']} samples")
    return 0


def _cmd_ensemble(a: argparse.Namespace) -> int:
    from mtscale.train.ensemble import run_ensemble

    res = run_ensemble(a.runs, split=a.split, weights=a.weights, out_dir=a.out)
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        w = ", ".join(f"{s} {x:.2f}" for s, x in zip(res["streams"], res["weights"]))
        val = f"  (val top-1 {res['val_top1']:.2f}%)" if "val_top1" in res else ""
        print(f"top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  mean class {res['mean_class_acc']:.2f}%  "
              f"on {res['num_samples']} {a.split} samples; weights {w} ({res['weights_rule']}){val}")
        print(f"confusion matrix: {res['confusion_csv']}, {res['confusion_png']}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add these verbs to the ``mtscale`` parser's subcommands (each sets ``func``)."""
    s = sub.add_parser("synth", help="write a synthetic NTU-format .skeleton dataset")
    s.add_argument("--out", required=True)
    s.add_argument("--num-samples", type=int, default=1000)
    s.add_argument("--num-classes", type=int, default=10)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--posture", default="class", choices=["class", "shared"],
                   help="class: classes differ in base pose and motion; shared: in motion only")
    s.add_argument("--json", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_cmd_synth)

    s = sub.add_parser("prepare", help="ingest raw recordings into a Zarr store + Parquet manifest")
    s.add_argument("--format", required=True, choices=FORMATS)
    s.add_argument("--input", required=True, help="file or folder of raw recordings")
    s.add_argument("--out", required=True, help="store path (or fsspec URL)")
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--strict", action="store_true", help="the first bad record (file or sample) is fatal")
    s.add_argument("--max-bodies", type=int, default=2)
    s.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    s.add_argument("--layout", default=None, help="joint layout (generic format; others know theirs)")
    s.add_argument("--units", choices=("m", "mm", "px"), default="m",
                   help="units of the raw coordinates (generic / pyskl; others are in m): recorded in the store, "
                        "they set the bound on |coordinate| (100 m; 100,000 mm or px)")
    s.add_argument("--no-center", action="store_true")
    s.add_argument("--no-denoise", action="store_true", help="keep every body (no length / spread test)")
    s.add_argument("--keep-empty-frames", action="store_true")
    s.add_argument("--view-normalize", action="store_true")
    s.add_argument("--part-index", type=int, default=None, help="prepare only slice i of num-parts")
    s.add_argument("--num-parts", type=int, default=None)
    s.add_argument("--json", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_cmd_prepare)

    s = sub.add_parser("info", help="summarise a store")
    s.add_argument("store")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("verify", help="re-check a store's schema and checksums")
    s.add_argument("store")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_cmd_verify)

    s = sub.add_parser("merge", help="join stores prepared in parts into one")
    s.add_argument("parts", nargs="+")
    s.add_argument("--out", required=True)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_cmd_merge)

    s = sub.add_parser("ensemble", help="add the per-sample softmax scores of several runs (e.g. one per stream)",
                       description="Adds the softmax probabilities of RUN_OR_SCORES (fine-tuning run dirs, classifier "
                                   "folders or scores_<part>.parquet files) with weights chosen on the validation "
                                   "scores only (--weights auto) or given; see mtscale/train/ensemble.py.")
    s.add_argument("runs", nargs="+", metavar="RUN_OR_SCORES")
    s.add_argument("--split", "--part", dest="split", default="test",
                   help="the scored part to combine: test (default) or val; weights come from the val scores")
    s.add_argument("--weights", default="auto", help="auto (chosen on validation top-1) or w1,w2,... one per run")
    s.add_argument("--out", default=None, help="output folder (default: ensemble_<split>)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_ensemble)
