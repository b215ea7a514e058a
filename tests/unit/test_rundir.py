"""rundir.check_resume: a resume may change runtime fields and gain fields newer than the run, not the model or seed."""

import pytest
import yaml

from mtscale.errors import ConfigError
from mtscale.train.rundir import check_resume, check_run_dir


def test_resume_rules(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    (d / "config.yaml").write_text(yaml.safe_dump({"model": {"size": "tiny", "compile": False}, "train": {"seed": 0}}))
    (d / "metrics.jsonl").write_text("")
    check_resume(d, {"model": {"size": "tiny", "compile": True, "temporal_conv": 0}, "train": {"seed": 0}},
                 ("model", "train.seed"))
    with pytest.raises(ConfigError, match="model.size: found 'small'"):
        check_resume(d, {"model": {"size": "small"}, "train": {"seed": 0}}, ("model", "train.seed"))
    with pytest.raises(ConfigError, match="train.seed: found 1"):
        check_resume(d, {"model": {"size": "tiny"}, "train": {"seed": 1}}, ("model", "train.seed"))


def test_a_run_killed_before_its_first_checkpoint_is_resumable_and_a_foreign_config_is_not(tmp_path):
    from mtscale.train.rundir import RUN_MARK, is_run_dir, start_run_dir

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "config.yaml").write_text("lr: 1\n")  # somebody's own config.yaml, no run
    with pytest.raises(ConfigError, match="not an mtscale run"):
        check_run_dir(foreign)
    run = tmp_path / "run"
    start_run_dir(run, {"model": {"size": "tiny"}, "train": {"seed": 0}})
    assert (run / RUN_MARK).is_file() and yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == 0
    assert is_run_dir(run) and check_run_dir(run) == run  # only the mark and config.yaml: still a run
    with pytest.raises(ConfigError, match="train.seed: found 1"):
        check_resume(run, {"model": {"size": "tiny"}, "train": {"seed": 1}}, ("model", "train.seed"))
    (run / "config.yaml").unlink()  # killed between the mark and the config: resumable, nothing to compare
    assert check_run_dir(run) == run
    check_resume(run, {"model": {"size": "small"}, "train": {"seed": 1}}, ("model", "train.seed"))


def test_a_resumed_run_keeps_the_precision_auto_chose_at_its_start(tmp_path):
    """A resume must not switch a run's precision: what auto decides can change between releases
    (CPU auto was a GEMM timing until 2026-12-06, fp32 now) or machines of one cluster."""
    import torch

    from mtscale.train.rundir import run_facts, start_run_dir
    from mtscale.train.runtime import run_precision

    cpu = torch.device("cpu")
    measured, other = "fp32", "bf16"
    run = tmp_path / "run"
    start_run_dir(run, {"train": {"seed": 0}}, facts={"precision": other, "device_type": "cpu"})
    assert run_facts(run) == {"precision": other, "device_type": "cpu"}
    assert run_precision("auto", cpu, run) == other  # what the run started with, not a new measurement
    assert run_precision("fp32", cpu, run) == "fp32"  # an explicit choice is the user's
    start_run_dir(run, {"train": {"seed": 0}}, facts={"precision": measured, "device_type": "cpu"})
    assert run_facts(run)["precision"] == other  # restarting keeps the first start's facts
    start_run_dir(tmp_path / "gpu_run", {}, facts={"precision": "bf16", "device_type": "cuda"})
    assert run_precision("auto", cpu, tmp_path / "gpu_run") == measured  # another device: decided anew
    assert run_facts(tmp_path / "nothing") == {} and run_precision("auto", cpu, None) == measured
