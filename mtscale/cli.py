"""``mtscale <verb>``: parses arguments, calls the library, prints results. No logic here.

Every entry point (``mtscale VERB``, ``python -m mtscale.VERB``, ``deepspeed mtscale/VERB.py``)
runs through ``run_verb``: errors derived from ``MtscaleError`` (and file-system failures a user
fixes) are printed as one line (no traceback), exit code 2; Ctrl-C exits 130. A closed output
pipe (``mtscale info STORE | head``) ends the command quietly, exit code 141 (128 + SIGPIPE, as a
Unix tool killed by SIGPIPE reports it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from mtscale.errors import MtscaleError, user_os_error

FORMATS = ("ntu", "nw-ucla", "generic", "ctrgcn-npz", "pyskl")


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


# Verbs whose module has its own parser (they also run as ``python -m`` / ``deepspeed``):
# ``mtscale VERB ARGS...`` calls ``module.main(ARGS)``.
FORWARDED = {
    "pretrain": ("mtscale.pretrain", "self-supervised pre-training (also: deepspeed mtscale/pretrain.py)"),
    "finetune": ("mtscale.finetune", "fine-tune / linear probe / semi-supervised / scratch"),
    "evaluate": ("mtscale.evaluate", "exact evaluation of a fine-tuned checkpoint"),
    "predict": ("mtscale.predict", "classify raw recordings"),
    "tune": ("mtscale.tune", "Ray Tune sweep over fine-tuning"),
    "quickstart": ("mtscale.quickstart", "the whole pipeline on synthetic (or your) data"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtscale", description="Self-supervised pre-training of Motion-Transformers on skeleton sequences.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

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

    for verb, (_, help_) in FORWARDED.items():
        sub.add_parser(verb, help=help_ + f" (mtscale {verb} --help)")
    return p


EXIT_USER_ERROR, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 2, 130, 141
"""One line on stderr (MtscaleError, a file-system failure a user fixes); Ctrl-C (128 + SIGINT);
128 + SIGPIPE, what a shell reports for a Unix tool whose reader went away."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FORWARDED:
        import importlib

        module = FORWARDED[argv[0]][0]
        return run_verb(argv[0], lambda rest: importlib.import_module(module).main(rest), argv[1:])
    args = build_parser().parse_args(argv)
    return run_verb(args.verb, lambda _: args.func(args), [])


def run_verb(verb: str, fn: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """The one runner of every entry point (``mtscale VERB``, ``python -m mtscale.VERB``,
    ``deepspeed mtscale/VERB.py``): ``fn(argv)`` (argv None: sys.argv[1:]) in a process mtscale
    owns, its errors as exit codes. argparse usage errors exit 2 by themselves (SystemExit)."""
    from mtscale.malloc import tune_malloc

    tune_malloc()  # this process is ours (mtscale.malloc)
    try:
        try:
            rc = int(fn(argv) or 0)
        except MtscaleError as e:
            return _error(verb, str(e))
        except OSError as e:
            if isinstance(e, BrokenPipeError) or (line := user_os_error(e)) is None:
                raise
            return _error(verb, line)
        except KeyboardInterrupt:
            print(f"mtscale {verb}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        sys.stdout.flush()  # here, not at interpreter exit, where a closed pipe could not be caught
        return rc
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE


def _error(verb: str, message: str) -> int:
    print(f"mtscale {verb}: error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


def _silence_stdout() -> None:
    """The reader of stdout is gone: point stdout at /dev/null so the interpreter's final flush
    does not raise again (the Python documentation's recipe for SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor (e.g. captured in tests)
        pass


def script_path(file: str) -> None:
    """``deepspeed mtscale/pretrain.py`` (finetune.py, evaluate.py) runs the entry module as a file:
    Python puts mtscale/ first on sys.path, where its modules (config, data, train, ...) would shadow
    top-level packages. Drop mtscale/ (also as "" when it is the working directory) and put its
    checkout first, so ``mtscale`` is this checkout's package. The caller has put the checkout on
    sys.path to import this module; mtscale.cli and mtscale.errors import only the standard library."""
    here = os.path.dirname(os.path.abspath(file))
    root = os.path.dirname(here)
    sys.path[:] = [root] + [p for p in sys.path if os.path.abspath(p or ".") not in (here, root)]


if __name__ == "__main__":
    sys.exit(main())
