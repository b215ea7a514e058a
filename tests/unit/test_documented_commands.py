"""The commands the docs and config headers tell a user to type name files that exist (issue 25,
item 5: the configs documented `sbatch cluster/pretrain.sbatch ...`, a path that never existed).
The SLURM integration test submits the documented pre-training form itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", ROOT / "cluster" / "README.md", *ROOT.glob("configs/**/*.yaml")])
PATH_RE = re.compile(r"(?<![\w/.$-])((?:cluster|configs|benchmarks|mtscale)/[\w./-]+\.(?:sbatch|yaml|py|sh))\b")


def _commands(path: Path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if re.search(r"\b(sbatch|deepspeed|python|mtscale)\b", ln)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_paths_exist(doc: Path) -> None:
    missing = sorted({m for ln in _commands(doc) for m in PATH_RE.findall(ln) if not (ROOT / m).exists()})
    assert not missing, f"{doc.relative_to(ROOT)} documents missing files: {missing}"


def test_every_sbatch_line_of_the_configs_uses_the_positional_config_form() -> None:
    lines = [(f, ln) for f in ROOT.glob("configs/pretrain/*.yaml") for ln in f.read_text().splitlines()
             if "sbatch " in ln]
    assert lines
    for f, ln in lines:
        m = re.search(r"sbatch (\S+) (\S+\.yaml)", ln)
        assert m, f"{f.name}: {ln}"
        assert m.group(1) == "cluster/slurm/pretrain.sbatch" and m.group(2) == f"configs/pretrain/{f.name}", ln
    text = (ROOT / "cluster" / "slurm" / "pretrain.sbatch").read_text()
    assert 'MTSCALE_CONFIG="$1"' in text  # the script takes that positional config
