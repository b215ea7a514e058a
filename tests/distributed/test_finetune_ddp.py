"""Fine-tuning on two ranks through the real ``deepspeed`` launcher (gloo, CPU): DDP with
BatchNorm (the per-joint head and the graph stem).

Each rank's BatchNorm running statistics take in its own last batch, so they differ between ranks
after every step. Validation splits its rows over the ranks: each share must be scored with the
statistics that are saved (rank 0's), or the reported validation loss / top-1 (and the best-epoch
choice) describe no model that exists. The saved classifier's own validation scores
(``final/scores_val.parquet``, computed after reloading the file on every rank) are the check.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from support import mtscale_cmd, run_ok

from mtscale.train.scores import read_scores

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    from mtscale.dist import free_port

    d = tmp_path_factory.mktemp("ddp")
    run_ok(mtscale_cmd("synth", "--out", d / "raw", "--num-samples", "160", "--num-classes", "4", "--seed", "3", "--quiet"))
    run_ok(mtscale_cmd("prepare", "--format", "ntu", "--input", d / "raw", "--out", d / "store", "--quiet"))
    sets = ["protocol=scratch", "epochs=2", "warmup_epochs=0.5", "train.batch_size=16", "pool=joint",
            "head_hidden=64", "model.graph_stem=2", "model.graph_stem_width=16", "run.progress=false",
            "run.tensorboard=false", f"data.store={d / 'store'}", f"run.dir={d / 'run'}"]
    p = run_ok([BIN / "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), ROOT / "mtscale" / "finetune.py",
                "--config", ROOT / "configs" / "finetune" / "tiny_cpu.yaml", *sum((["--set", s] for s in sets), [])])
    return d / "run", d / "store", p.stdout + p.stderr


def test_two_ranks_train_one_model(run) -> None:
    run_dir, _, log = run
    assert "world 2" in log, log[-2000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]  # rank 0 alone writes: one row per epoch
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) for r in rows)


def test_validation_scores_the_saved_statistics(run) -> None:
    """The last epoch's reported validation loss and top-1 are the saved classifier's, to fp
    precision (before the fix each rank scored its share with its own BatchNorm statistics)."""
    run_dir, _, _ = run
    last = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    s = read_scores(run_dir / "final" / "scores_val.parquet")
    probs, labels = s.scores_NK.astype(np.float64), s.labels
    assert len(labels) > 0
    loss = float(-np.mean(np.log(probs[np.arange(len(labels)), labels])))
    assert last["val_loss"] == pytest.approx(loss, rel=2e-6), (last["val_loss"], loss)
    assert last["val_top1"] == pytest.approx(100.0 * float(np.mean(probs.argmax(1) == labels)), abs=1e-6)


def test_evaluate_on_one_process_reproduces_the_test_top1(run) -> None:
    run_dir, store, _ = run
    res = json.loads((run_dir / "results.json").read_text())
    out = run_ok(mtscale_cmd("evaluate", "--checkpoint", run_dir / "final", "--store", store, "--split", "xsub60",
                             "--json", "--quiet")).stdout
    got = json.loads(out)
    assert got["num_samples"] == res["test"]
    assert got["top1"] == pytest.approx(res["test_top1"], abs=1e-6)
