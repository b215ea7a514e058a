"""``mtscale predict`` on the real NTU files with a model fine-tuned on synthetic NTU-format
data (real synth -> prepare -> finetune), and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from support import cli

from mtscale.config import FinetuneConfig, load_config
from mtscale.data.formats.ntu import CLASS_NAMES
from mtscale.train.finetune import run_finetune

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("predict")
    assert cli("synth", "--out", str(d / "raw"), "--num-samples", "80", "--num-classes", "4", "--quiet").returncode == 0
    r = cli("prepare", "--format", "ntu", "--input", str(d / "raw"), "--out", str(d / "store"), "--quiet")
    assert r.returncode == 0, r.stderr
    cfg = load_config(FinetuneConfig, ROOT / "configs" / "finetune" / "tiny_cpu.yaml", [
        f"data.store={d / 'store'}", f"run.dir={d / 'run'}", "protocol=scratch", "epochs=1", "run.progress=false",
        "run.tensorboard=false", "train.batch_size=8", "keep_best=false", "test_part=null"])
    run_finetune(cfg)
    return d / "run"


@pytest.mark.realdata
def test_predict_real_ntu_files(checkpoint, ntu_dir):
    files = sorted(str(p) for p in Path(ntu_dir).glob("*.skeleton"))
    assert len(files) == 5
    r = cli("predict", "--checkpoint", str(checkpoint), "--json", "--topk", "1000", *files)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)
    assert [row["file"] for row in rows] == files  # one row per file, in order
    num_classes = 4  # the store's classes are those its data uses: synthetic actions 1..4
    for row in rows:
        assert 0 <= row["label_id"] < num_classes
        assert row["class_name"] == CLASS_NAMES[row["label_id"]]
        probs = [t["probability"] for t in row["topk"]]
        assert len(probs) == num_classes  # topk clipped to the number of classes
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert probs == sorted(probs, reverse=True) and row["probability"] == probs[0]
    by_id = {row["sample_id"]: row for row in rows}
    assert by_id["S001C001P001R001A001"]["true_label"] == 0 and by_id["S001C001P001R001A050"]["true_label"] == 49
    # table output: a header + one line per file
    r = cli("predict", "--checkpoint", str(checkpoint / "final"), *files[:2])
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 3
    assert "S001C001P001R001A001.skeleton" in r.stdout


def test_predict_matches_the_evaluation_clip(checkpoint, tmp_path):
    """predict's clip (reader -> preprocess -> centre crop) equals the loader's evaluation clip."""
    import torch

    from mtscale.config import DataConfig, from_dict
    from mtscale.data.store import Store
    from mtscale.train.classifier import read_meta
    from mtscale.train.finetune_data import rows_loader
    from mtscale.train.predict import eval_clip

    meta = read_meta(checkpoint / "final")
    data = from_dict(DataConfig, meta["data"], "data")
    store = Store.open(data.store)
    batch = next(iter(rows_loader(store, data, np.arange(3), batch_size=3, seed=0, rank=0, world_size=1,
                                  train=False, device=torch.device("cpu"))))
    for j, row in enumerate(batch["index"].tolist()):
        x, mask, _ = eval_clip(store.read_sample(row), data, int(meta["num_bodies"]))
        assert torch.allclose(x[0], batch["x"][j], atol=1e-6) and torch.equal(mask[0], batch["mask"][j])


@pytest.mark.realdata
def test_predict_errors_are_one_line(checkpoint, ucla_dir):
    f = sorted(Path(ucla_dir).glob("*.json"))[0]
    r = cli("predict", "--checkpoint", str(checkpoint), str(f))
    assert r.returncode == 2 and "kinect_v1_20" in r.stderr and "Traceback" not in r.stderr
    r = cli("predict", "--checkpoint", str(checkpoint.parent / "nope"), str(f))
    assert r.returncode == 2 and "no classifier checkpoint" in r.stderr


def test_predict_on_a_generic_folder_names_each_sample(tmp_path):
    """Issue 29, item 11: on a generic-format folder every row named the folder; now each row
    names the sample's own .npy file (and its id)."""
    d = tmp_path / "gen"
    d.mkdir()
    rng = np.random.default_rng(0)
    rows = ["id,label"]
    for i in range(24):
        np.save(d / f"s{i}.npy", (rng.normal(size=(20, 25, 3)) * 0.1 + (i % 2)).astype(np.float32))
        rows.append(f"s{i},{i % 2}")
    (d / "labels.csv").write_text("\n".join(rows) + "\n")
    r = cli("prepare", "--format", "generic", "--input", str(d), "--layout", "ntu25", "--out", str(tmp_path / "st"),
            "--quiet")
    assert r.returncode == 0, r.stderr
    cfg = load_config(FinetuneConfig, ROOT / "configs" / "finetune" / "tiny_cpu.yaml", [
        f"data.store={tmp_path / 'st'}", f"run.dir={tmp_path / 'run'}", "protocol=scratch", "epochs=1",
        "run.progress=false", "run.tensorboard=false", "train.batch_size=8", "keep_best=false", "test_part=null",
        "data.split=null", "data.num_bodies=1", "val_fraction=0.0", "val_group=null"])
    run_finetune(cfg)
    r = cli("predict", "--checkpoint", str(tmp_path / "run"), "--format", "generic", str(d), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert sorted(Path(x["file"]).name for x in out) == sorted(f"s{i}.npy" for i in range(24))
    assert all(Path(x["file"]).stem == x["sample_id"] for x in out)
