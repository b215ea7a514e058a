"""`mtscale quickstart --quick` end to end: synthetic data -> store -> pre-training through the
real deepspeed launcher (2 CPU processes) -> scratch / fine-tune / linear probe -> Ray Tune
sweep -> summary. Then a re-run must resume (skip every finished stage)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def _quickstart(workdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtscale.cli", "quickstart", "--quick", "--workdir", str(workdir)],
                          capture_output=True, text=True, timeout=1400)


def test_quickstart_end_to_end_and_resume(tmp_path: Path) -> None:
    work = tmp_path / "qs"
    proc = _quickstart(work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((work / "summary.json").read_text())
    stages = summary["stages"]
    num_classes = stages["prepare"]["num_classes"]
    chance = 100.0 / num_classes
    assert stages["prepare"]["num_samples"] > 100

    # pre-training ran on 2 processes and its loss went down
    pre = stages["pretrain"]
    assert pre["processes"] == 2
    assert pre["steps"] >= 20
    assert pre["loss_last"] < pre["loss_first"]
    assert pre["samples_per_s"] > 0
    assert Path(pre["encoder"]).is_file() and Path(pre["loss_png"]).is_file()

    # accuracies are present and sane; pre-trained features are far above chance
    for name in ("scratch", "finetune", "linear"):
        top1 = stages[name]["test_top1"]
        assert 0.0 <= top1 <= 100.0, (name, top1)
        assert Path(stages[name]["confusion_png"]).is_file()
    best_pretrained = max(stages["finetune"]["test_top1"], stages["linear"]["test_top1"])
    assert best_pretrained >= chance + 30.0, stages

    # the sweep ran 4 trials and picked a best one
    tune = stages["tune"]
    assert tune["num_trials"] == 4
    assert tune["best"]["config"], tune
    assert (Path(tune["experiment"]) / "best_config.yaml").is_file()
    assert tune["plots"]

    text = (work / "summary.md").read_text()
    for needle in ("from scratch", "fine-tuned from pre-trained", "linear probe", "Sweep:", "samples/s"):
        assert needle in text

    # re-running resumes: every stage is skipped, so it is fast and changes nothing
    t0 = time.perf_counter()
    again = _quickstart(work)
    assert again.returncode == 0, again.stderr[-3000:]
    assert time.perf_counter() - t0 < 120
    assert "$ " not in again.stdout  # no stage command was run again
    assert json.loads((work / "summary.json").read_text())["stages"] == stages
