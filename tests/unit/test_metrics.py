"""Metrics, results rows, classifier pieces and the fine-tuning splits (fast, CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtscale.config import DataConfig, FinetuneConfig, load_config
from mtscale.data.store_writer import write_store
from mtscale.errors import ConfigError
from mtscale.train import metrics as M
from mtscale.train.classifier import fold_standardisation
from mtscale.train.evaluate import gather_by_index
from mtscale.train.finetune_data import make_splits
from mtscale.train.trainers import smoothed_targets, soft_cross_entropy


def test_topk_accuracy_by_hand():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])
    labels = np.array([1, 1, 0, 2])
    assert M.topk_accuracy(scores, labels, 1) == pytest.approx(25.0)  # only sample 0
    assert M.topk_accuracy(scores, labels, 2) == pytest.approx(75.0)  # + sample 1 (2nd), sample 3 (2nd)
    assert M.topk_accuracy(scores, labels, 5) == pytest.approx(100.0)  # k clipped to K
    assert math.isnan(M.topk_accuracy(np.zeros((0, 3)), np.zeros(0), 1))


def test_confusion_and_per_class():
    labels = np.array([0, 0, 1, 1, 1, 2])
    preds = np.array([0, 1, 1, 1, 0, 2])
    cm = M.confusion_matrix(labels, preds, 4)
    assert cm.tolist() == [[1, 1, 0, 0], [1, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    pc = M.per_class_accuracy(cm)
    assert pc[:3] == pytest.approx([50.0, 200 / 3, 100.0])
    assert math.isnan(pc[3])  # no sample of class 3
    with pytest.raises(ValueError):
        M.confusion_matrix(np.array([5]), np.array([0]), 4)


def test_classification_metrics_mean_class_ignores_absent_classes():
    scores = np.eye(3)[[0, 1, 1, 2]]  # predictions 0 1 1 2
    m = M.classification_metrics(scores, np.array([0, 1, 2, 2]), prefix="val_", with_per_class=True)
    assert m["val_top1"] == pytest.approx(75.0)
    assert m["val_mean_class_acc"] == pytest.approx((100 + 100 + 50) / 3)
    assert m["val_num_samples"] == 4
    assert m["val_per_class"] == [100.0, 100.0, 50.0]
    assert m["val_confusion"][2] == [0, 1, 1]


def test_mean_std_and_format():
    assert M.mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert M.mean_std([4.0]) == (4.0, 0.0)
    assert M.format_mean_std([90.0, 92.0]) == "91.00 ± 1.41"
    assert M.format_mean_std([90.0]) == "90.00"


def test_results_row_and_file(tmp_path):
    row = M.results_row(protocol="linear", store="/x/ucla", split="view/test", label_fraction=1.0, seeds=[0, 1],
                        val_top1=[80.0, 82.0], test_top1=[70.0, 74.0], test_top1_best=[71.0, float("nan")],
                        epochs=5, wall_s=120.0, hardware="CPU")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:5] == ["linear", "ucla", "view/test", "1", "0,1"]
    assert cells[5] == "81.00 ± 1.41" and cells[6] == "72.00 ± 2.83" and cells[7] == "71.00"
    assert cells[9] == "2.0 min"
    p = tmp_path / "results.md"
    M.append_results_md(p, row)
    M.append_results_md(p, row)
    lines = p.read_text().splitlines()
    assert lines[0].startswith("| protocol") and len(lines) == 4  # header, rule, 2 rows
    assert lines[0].count("|") == row.count("|")


def test_save_confusion_csv_and_png(tmp_path):
    cm = np.array([[3, 1], [0, 2]])
    M.save_confusion(cm, ["walk", "sit"], tmp_path / "c.csv", tmp_path / "c.png")
    rows = (tmp_path / "c.csv").read_text().splitlines()
    assert rows[0].endswith("walk,sit") and rows[1] == "walk,3,1" and rows[2] == "sit,0,2"
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_fold_standardisation_matches_explicit():
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3)
    mean, std = torch.randn(5), torch.rand(5) + 0.5
    x = torch.randn(7, 5)
    want = lin((x - mean) / std)
    fold_standardisation(lin, mean, std)
    assert torch.allclose(lin(x), want, atol=1e-5)


def test_label_smoothing_targets_and_loss():
    t = smoothed_targets(torch.tensor([2, 0]), 4, 0.1)
    assert torch.allclose(t.sum(1), torch.ones(2))
    assert t[0, 2] == pytest.approx(0.925) and t[0, 0] == pytest.approx(0.025)
    logits = torch.randn(2, 4)
    hard = smoothed_targets(torch.tensor([2, 0]), 4, 0.0)
    want = float(torch.nn.functional.cross_entropy(logits, torch.tensor([2, 0])))
    assert soft_cross_entropy(logits, hard) == pytest.approx(want, abs=1e-6)


def test_gather_by_index_single_process_checks_exactness():
    vals = gather_by_index(np.array([5, 2, 9]), np.array([[5.0], [2.0], [9.0]]), np.array([2, 5, 9]))
    assert vals[:, 0].tolist() == [2.0, 5.0, 9.0]  # ordered by row
    with pytest.raises(RuntimeError, match="more than once"):
        gather_by_index(np.array([2, 2]), np.zeros((2, 1)), np.array([2]))
    with pytest.raises(RuntimeError, match="expected 3"):
        gather_by_index(np.array([2, 5]), np.zeros((2, 1)), np.array([2, 5, 9]))


# --------------------------------------------------------------------------- splits


@pytest.fixture(scope="module")
def split_store(tmp_path_factory):
    """60 train samples (6 classes x 10) + 12 test samples, tiny sequences."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(72):
        part = "train" if i < 60 else "test"
        x = rng.normal(size=(8, 1, 25, 3)).astype(np.float32)
        samples.append((f"s{i:03d}", x, i % 6, {"split_demo": part, "performer": i % 4}))
    url = str(tmp_path_factory.mktemp("splits") / "store")
    return write_store(url, samples, layout="ntu25", num_bodies=1, dtype="float32")


def _cfg(store, **kw) -> FinetuneConfig:
    sets = [f"data.store={store.url}", "data.split=demo", "data.part=train"] + [f"{k}={v}" for k, v in kw.items()]
    return load_config(FinetuneConfig, None, sets)


def test_splits_val_is_stratified_disjoint_and_seed_independent(split_store):
    s = make_splits(split_store, _cfg(split_store, val_fraction=0.2))
    labels = split_store.labels
    assert s.sizes() == {"train": 48, "val": 12, "test": 12}
    assert np.bincount(labels[s.val], minlength=6).tolist() == [2] * 6  # stratified
    assert not np.intersect1d(s.train, s.val).size and not np.intersect1d(s.test, s.train).size
    assert set(s.test.tolist()) == set(range(60, 72))
    # training seed does not move the validation rows (only data.subset_seed does)
    s2 = make_splits(split_store, _cfg(split_store, val_fraction=0.2, **{"train.seed": 7}))
    assert np.array_equal(s.val, s2.val)
    s3 = make_splits(split_store, _cfg(split_store, val_fraction=0.2, **{"data.subset_seed": 1}))
    assert not np.array_equal(s.val, s3.val)


def test_semi_label_fraction_is_stratified_and_excludes_val(split_store):
    cfg = _cfg(split_store, protocol="scratch", val_fraction=0.2, **{"data.label_fraction": 0.25})
    s = make_splits(split_store, cfg)
    counts = np.bincount(split_store.labels[s.train], minlength=6)
    assert counts.tolist() == [2] * 6  # round(0.25 * 8) per class
    assert not np.intersect1d(s.train, s.val).size
    again = make_splits(split_store, cfg)  # identical on every rank / call
    assert np.array_equal(s.train, again.train)


def test_val_group_holds_out_whole_groups(split_store):
    """4 performers, each acting 3 of the 6 classes (5 clips each): val_fraction 0.2 of 4
    performers is 1 performer held out whole (15 clips), chosen among all performers at once, so
    none is on both sides (chosen per class, a performer would validate one action and train
    another)."""
    s = make_splits(split_store, _cfg(split_store, val_fraction=0.2, val_group="[performer]"))
    labels = split_store.labels
    perf = np.asarray(split_store.manifest.column("performer").to_pylist())
    assert len(set(perf[s.val])) == 1 and not set(perf[s.val]) & set(perf[s.train])
    assert sorted(np.bincount(labels[s.val], minlength=6).tolist()) == [0, 0, 0, 5, 5, 5]
    assert s.train.size == 45 and not np.intersect1d(s.train, s.val).size
    # the groups are drawn from data.subset_seed: some other seed holds out another performer
    others = {int(perf[make_splits(split_store, _cfg(split_store, val_fraction=0.2, val_group="[performer]",
                                                     **{"data.subset_seed": k})).val][0]) for k in range(1, 6)}
    assert others - set(perf[s.val])
    with pytest.raises(ConfigError, match="val_group: found column 'take'.*lacks"):
        make_splits(split_store, _cfg(split_store, val_fraction=0.2, val_group="[take]"))
    with pytest.raises(ConfigError, match="val_group: found an empty list"):
        _cfg(split_store, val_group="[]")


def test_val_where_validates_on_the_matching_training_rows(split_store):
    """A cross-group hold-out: validation is exactly the training rows of performer 2 (whatever
    val_fraction says), they leave training, the test part is untouched."""
    perf = np.asarray(split_store.manifest.column("performer").to_pylist())
    s = make_splits(split_store, _cfg(split_store, val_where="'performer == 2'", val_fraction=0.2))
    train_part = split_store.select(split="demo", part="train")
    assert s.val.tolist() == [r for r in train_part.tolist() if perf[r] == 2] and s.val.size == 15
    assert s.train.tolist() == [r for r in train_part.tolist() if perf[r] != 2]
    assert set(s.test.tolist()) == set(range(60, 72))
    for where, found in (("performer == 99", "matches 0 of the 60"), ("performer < 99", "matches 60 of the 60")):
        with pytest.raises(ConfigError, match=f"val_where: {where!r} {found} training rows"):
            make_splits(split_store, _cfg(split_store, val_where=repr(where)))
    with pytest.raises(ConfigError, match="val_where: found .* together with val_part"):
        _cfg(split_store, val_where="'performer == 2'", val_part="test")


def test_val_part_and_errors(split_store):
    s = make_splits(split_store, _cfg(split_store, val_part="test", test_part="null"))
    assert s.test is None and s.val.size == 12 and s.train.size == 60
    with pytest.raises(ConfigError, match="overlaps"):
        make_splits(split_store, _cfg(split_store, test_part="train"))
    with pytest.raises(ConfigError, match="selects 0|0 labelled"):
        make_splits(split_store, _cfg(split_store, **{"data.where": "performer == 99"}))


def test_finetune_config_validation():
    with pytest.raises(ConfigError, match="protocol"):
        load_config(FinetuneConfig, None, ["protocol=probe"])
    with pytest.raises(ConfigError, match="label_fraction"):
        load_config(FinetuneConfig, None, ["protocol=semi"])
    with pytest.raises(ConfigError, match="pretrained"):
        load_config(FinetuneConfig, None, ["protocol=scratch", "pretrained=x.safetensors"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(FinetuneConfig, None, ["layer_decayy=0.5"])
    cfg = load_config(FinetuneConfig, None, ["seeds=[0, 1, 2]", "protocol=semi", "data.label_fraction=0.1"])
    assert cfg.seeds == [0, 1, 2] and isinstance(cfg.data, DataConfig)
