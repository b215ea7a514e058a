"""`mtscale quickstart --quick` end to end: synthetic data -> store -> pre-training through the
real deepspeed launcher (2 CPU processes) -> scratch / fine-tune / linear probe -> Ray Tune
sweep -> summary. Then a re-run must resume (skip every finished stage)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from support import mtscale_cmd

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def _quickstart(workdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(mtscale_cmd("quickstart", "--quick", "--workdir", str(workdir)),
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
    for needle in ("from scratch", "fine-tuned from the pre-trained encoder", "linear probe", "Sweep (", "samples/s",
                   "label-scarce demo", "of the labels ("):
        assert needle in text
    assert sum(text.count(f"Pre-training {v} here") for v in ("paid", "did not pay", "made no clear difference")) == 1
    assert (work / "summary.png").stat().st_size > 1000
    # the same labelled subset on every side; pre-training saw every training clip without labels
    assert stages["scratch"]["train"] == stages["finetune"]["train"] == stages["linear"]["train"]
    assert stages["scratch"]["epochs"] == stages["finetune"]["epochs"]

    # re-running resumes: every stage is skipped, so it is fast and changes nothing
    t0 = time.perf_counter()
    again = _quickstart(work)
    assert again.returncode == 0, again.stderr[-3000:]
    assert time.perf_counter() - t0 < 120
    assert "$ " not in again.stdout  # no stage command was run again
    assert json.loads((work / "summary.json").read_text())["stages"] == stages

    # a second, fresh run on this machine prints the same table (the demo is reproducible)
    other = tmp_path / "qs2"
    proc = subprocess.run(mtscale_cmd("quickstart", "--quick", "--skip-tune", "--workdir", other),
                          capture_output=True, text=True, timeout=1400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages2 = json.loads((other / "summary.json").read_text())["stages"]
    for name in ("scratch", "finetune", "linear"):
        assert stages2[name]["test_top1"] == stages[name]["test_top1"], name
    assert stages2["pretrain"]["loss_last"] == stages["pretrain"]["loss_last"]


def test_quickstart_on_real_recordings_sizes_its_recipe(tmp_path: Path, ucla_dir: Path) -> None:
    """`--data` on a small NW-UCLA subset (real files from ../shared/data): the recipe is sized from
    the clips and --minutes, printed and kept for re-runs; validation holds out whole takes; scratch
    and fine-tuning run side by side; the summary has its verdict sentence and bar chart."""
    import shutil

    sub = tmp_path / "ucla"
    sub.mkdir()
    files = sorted(f for f in ucla_dir.glob("*.json") if "_e00_" in f.name and f.name.split("_")[1] in ("s01", "s02", "s03"))
    for f in files:
        shutil.copy(f, sub / f.name)
    n_train = sum(1 for f in files if not f.stem.endswith("v03"))
    n_test = len(files) - n_train
    work = tmp_path / "qs"
    cmd = mtscale_cmd("quickstart", "--data", sub, "--format", "nw-ucla", "--minutes", "0.5", "--workdir", work)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "recipe: real data, 0.5-minute budget" in proc.stdout
    summary = json.loads((work / "summary.json").read_text())
    why = " ".join(summary["recipe"]["why"])
    assert f"{n_train} training clips, 10 classes, 1 body per clip, split 'view'" in why
    assert "whole action/subject/environment groups" in why and "measured here:" in why
    stages = summary["stages"]
    for name in ("scratch", "finetune", "linear"):
        assert stages[name]["test"] == n_test and 0.0 <= stages[name]["test_top1"] <= 100.0, stages[name]
        assert stages[name]["train"] + stages[name]["val"] == n_train
    assert stages["scratch"]["epochs"] == stages["finetune"]["epochs"] >= 10  # the recipe's floor at 0.5 min
    assert "tune" not in stages  # the sweep is the demo's; real data spends its budget on the models
    text = (work / "summary.md").read_text()
    assert sum(text.count(f"Pre-training {v} here") for v in ("paid", "did not pay", "made no clear difference")) == 1
    assert (work / "summary.png").stat().st_size > 1000
    import yaml

    cfg = yaml.safe_load((work / "finetune" / "config.yaml").read_text())
    assert cfg["val_group"] == ["action", "subject", "environment"] and cfg["data"]["num_bodies"] == 1
    # the recipe's time index (both stages) and whole-clip sampling (the supervised stages)
    assert cfg["data"]["sampling"] == "random" and cfg["data"]["crop_min"] == cfg["data"]["crop_max"] == 1.0
    assert yaml.safe_load((work / "scratch" / "config.yaml").read_text())["model"]["time_index"] is True
    enc = json.loads((work / "pretrain" / "encoder.json").read_text())
    assert enc["model"]["time_index"] is True, enc["model"]
    recipe = (work / ".done" / "recipe.json").read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "$ " not in again.stdout  # nothing re-run, no new measurement
    assert (work / ".done" / "recipe.json").read_text() == recipe
