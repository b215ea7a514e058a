"""rundir.check_resume: a resume may change runtime fields and gain fields newer than the run, not the model or seed."""

import yaml, pytest
from pathlib import Path
from mtscale.train.rundir import check_resume, check_run_dir
from mtscale.errors import ConfigError
def test_resume_rules(tmp_path):
    d = tmp_path / "r"; d.mkdir()
    (d / "config.yaml").write_text(yaml.safe_dump({"model": {"size": "tiny", "compile": False}, "train": {"seed": 0}}))
    (d / "metrics.jsonl").write_text("")
    check_resume(d, {"model": {"size": "tiny", "compile": True, "temporal_conv": 0}, "train": {"seed": 0}}, ("model", "train.seed"))
    with pytest.raises(ConfigError, match="model.size: found 'small'"):
        check_resume(d, {"model": {"size": "small"}, "train": {"seed": 0}}, ("model", "train.seed"))
    with pytest.raises(ConfigError, match="train.seed: found 1"):
        check_resume(d, {"model": {"size": "tiny"}, "train": {"seed": 1}}, ("model", "train.seed"))
