"""``mtscale <verb>``: dispatches to the verb's module (mtscale/verbs.py or mtscale/VERB.py). No logic here.

Every entry point (``mtscale VERB``, ``python -m mtscale.VERB``, ``deepspeed mtscale/VERB.py``)
runs through ``run_verb``: errors derived from ``MtscaleError`` (and file-system failures a user
fixes) are printed as one line (no traceback), exit code 2; Ctrl-C exits 130. A closed output
pipe (``mtscale info STORE | head``) ends the command quietly, exit code 141 (128 + SIGPIPE, as a
Unix tool killed by SIGPIPE reports it).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from mtscale.errors import MtscaleError, user_os_error

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

    from mtscale.verbs import add_parsers  # here: importing mtscale.cli stays standard-library only (script_path)

    add_parsers(sub)  # synth, prepare, info, verify, merge, ensemble
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
