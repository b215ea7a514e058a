"""Issue 28: every verb, from every entry point (``mtscale VERB``, ``python -m mtscale.VERB``,
``deepspeed mtscale/VERB.py``, i.e. the file run as a script), reports a bad config or a bad
argument that reaches mtscale's own validation as one line ``mtscale VERB: error: ...`` on
stderr, exit code 2, no traceback: one runner, ``mtscale.cli.run_verb``. Each case fails before
any training starts (a few seconds at most)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import mtscale_cmd

from mtscale.cli import EXIT_BROKEN_PIPE, run_verb, script_path
from mtscale.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
MISSING = "no/such/path"  # relative to the test's working directory (tmp_path)

# (case id, verb, argv after the entry point, text the error line must contain)
CASES = [
    ("synth-bad-value", "synth", ["synth", "--out", "raw", "--num-samples", "0"], "num_samples: found 0"),
    ("prepare-missing-input", "prepare", ["prepare", "--format", "ntu", "--input", MISSING, "--out", "s.zarr"],
     f"{MISSING}: no such file or folder"),
    ("info-missing-store", "info", ["info", MISSING], f"{MISSING}: no store found"),
    ("verify-not-a-store", "verify", ["verify", "."], "no store found"),
    ("merge-missing-part", "merge", ["merge", MISSING, "--out", "m.zarr"], f"{MISSING}: no store found"),
    ("ensemble-missing-run", "ensemble", ["ensemble", MISSING], f"{MISSING}: not found"),
    ("pretrain-unknown-key", "pretrain", ["pretrain", "--config", "unknown_key.yaml"], "bogus_key: unknown key"),
    ("pretrain-set-wrong-type", "pretrain",
     ["pretrain", "--config", str(CONFIGS / "pretrain" / "tiny_cpu.yaml"), "--set", "train.max_steps=abc"],
     "train.max_steps: found 'abc', expected an integer"),
    ("finetune-yaml-syntax", "finetune", ["finetune", "--config", "broken.yaml"], "broken.yaml: not valid YAML"),
    ("finetune-bad-seeds", "finetune",
     ["finetune", "--config", str(CONFIGS / "finetune" / "tiny_cpu.yaml"), "--seeds", "a,b"], "--seeds: found 'a,b'"),
    ("evaluate-missing-checkpoint", "evaluate", ["evaluate", "--checkpoint", MISSING, "--store", MISSING],
     f"{MISSING}: no classifier checkpoint found"),
    ("predict-missing-checkpoint", "predict", ["predict", "--checkpoint", MISSING, "x.skeleton"],
     f"{MISSING}: no classifier checkpoint found"),
    ("tune-set-wrong-type", "tune",
     ["tune", "--config", str(CONFIGS / "tune" / "tiny_cpu.yaml"), "--set", "num_samples=abc"],
     "num_samples: found 'abc', expected an integer"),
    ("tune-missing-config", "tune", ["tune", "--config", "missing.yaml"], "missing.yaml: config file not found"),
    ("quickstart-missing-data", "quickstart", ["quickstart", "--data", MISSING, "--workdir", "qs"],
     f"--data: {MISSING} not found"),
]
VERBS = ("synth", "prepare", "info", "verify", "merge", "ensemble", "pretrain", "finetune", "evaluate", "predict",
         "tune", "quickstart")
FORWARDED = ("pretrain", "finetune", "evaluate", "predict", "tune", "quickstart")
SCRIPTS = ("pretrain", "finetune", "evaluate")  # run as files by deepspeed / torchrun


def _bad_configs(d: Path) -> None:
    (d / "unknown_key.yaml").write_text("bogus_key: 1\n")
    (d / "broken.yaml").write_text("train: [1, 2\n")


def _assert_one_line_error(cmd: list[str], verb: str, expect: str, cwd: Path) -> None:
    _bad_configs(cwd)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    lines = p.stderr.splitlines()
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert len(lines) == 1 and lines[0].strip(), p.stderr[-3000:]
    assert lines[0].startswith(f"mtscale {verb}: error: "), lines[0]
    assert expect in lines[0], lines[0]
    assert not (cwd / "qs").exists() and not (cwd / "raw").exists()  # nothing was started


def test_every_verb_has_a_case() -> None:
    assert {verb for _, verb, _, _ in CASES} == set(VERBS)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cli_verb_bad_input_is_one_line_exit_2(case: tuple, tmp_path: Path) -> None:
    _, verb, argv, expect = case
    _assert_one_line_error(mtscale_cmd(*argv), verb, expect, tmp_path)


MODULE_CASES = [c for c in CASES if c[1] in FORWARDED]


@pytest.mark.parametrize("case", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_python_m_module_bad_input_is_one_line_exit_2(case: tuple, tmp_path: Path) -> None:
    """``python -m mtscale.pretrain ...`` (and every other verb with its own module)."""
    _, verb, argv, expect = case
    _assert_one_line_error([sys.executable, "-m", f"mtscale.{verb}", *argv[1:]], verb, expect, tmp_path)


SCRIPT_CASES = [c for c in CASES if c[1] in SCRIPTS]


@pytest.mark.parametrize("case", SCRIPT_CASES, ids=[c[0] for c in SCRIPT_CASES])
def test_script_entry_bad_input_is_one_line_exit_2(case: tuple, tmp_path: Path) -> None:
    """``deepspeed mtscale/finetune.py --local_rank=0 ...`` runs the file as a script."""
    _, verb, argv, expect = case
    cmd = [sys.executable, str(ROOT / "mtscale" / f"{verb}.py"), "--local_rank=0", *argv[1:]]
    _assert_one_line_error(cmd, verb, expect, tmp_path)


def test_quickstart_failed_stage_is_one_line_naming_the_stage_error(tmp_path: Path) -> None:
    """A stage that fails (here prepare, on a folder without recordings) is one line naming the
    stage, its own error line and its log (before: the error plus the log's last 15 lines)."""
    (tmp_path / "empty").mkdir()
    p = subprocess.run(mtscale_cmd("quickstart", "--data", "empty", "--workdir", "qs"),
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = p.stderr.splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
    assert lines[0].startswith("mtscale quickstart: error: stage prepare failed (exit 2): mtscale prepare: error: ")
    assert lines[0].endswith(f"; log {tmp_path / 'qs' / 'logs' / 'prepare.log'}")


# ---------------------------------------------------------------------------- the runner itself


def _raise(e: BaseException):
    def fn(argv):
        raise e
    return fn


def test_run_verb_exit_codes(capsys: pytest.CaptureFixture) -> None:
    assert run_verb("x", lambda argv: None, []) == 0
    assert run_verb("x", lambda argv: 75, []) == 75
    assert run_verb("x", _raise(ConfigError("a.b: found 1, expected 2")), []) == 2
    assert capsys.readouterr().err == "mtscale x: error: a.b: found 1, expected 2\n"
    assert run_verb("x", _raise(PermissionError(errno.EACCES, "Permission denied", "/ro/f")), []) == 2
    assert capsys.readouterr().err.startswith("mtscale x: error: /ro/f: Permission denied")
    assert run_verb("x", _raise(KeyboardInterrupt()), []) == 130
    assert capsys.readouterr().err == "mtscale x: interrupted\n"
    assert run_verb("x", _raise(BrokenPipeError(errno.EPIPE, "Broken pipe")), []) == EXIT_BROKEN_PIPE
    with pytest.raises(OSError):  # not one a user fixes: a traceback (exit 1), a bug to report
        run_verb("x", _raise(OSError(errno.EIO, "I/O error")), [])
    with pytest.raises(RuntimeError):
        run_verb("x", _raise(RuntimeError("bug")), [])


def test_script_path_drops_the_package_folder_and_puts_the_checkout_first(monkeypatch: pytest.MonkeyPatch) -> None:
    pkg, root = str(ROOT / "mtscale"), str(ROOT)
    monkeypatch.setattr(sys, "path", [pkg, "/lib/python.zip", root, "/site-packages", pkg + "/"])
    monkeypatch.chdir(pkg)  # "" is the working directory: mtscale/ too
    sys.path.insert(2, "")
    script_path(str(ROOT / "mtscale" / "pretrain.py"))
    assert sys.path == [root, "/lib/python.zip", "/site-packages"]
