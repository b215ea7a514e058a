"""The quickstart's recipes (mtscale/recipes.py) and its verdict sentence (mtscale/pipeline.py)."""

from __future__ import annotations

import pytest

from mtscale.pipeline import verdict
from mtscale.recipes import binomial_half_width, demo_recipe, val_group


def test_validation_holds_out_whole_takes_or_performers() -> None:
    ucla = ["sample_id", "label", "action", "environment", "split_view", "subject", "view"]
    assert val_group(ucla, "view") == ["action", "subject", "environment"]  # both views of a take together
    ntu = ["sample_id", "label", "setup", "camera", "performer", "replication", "action", "split_xsub60"]
    assert val_group(ntu, "xsub60") == ["performer"]
    assert val_group(ntu, "xview60") == ["action", "performer", "setup", "replication"]
    assert val_group(["sample_id", "label", "split_custom"], "custom") == []  # stratified random


def test_binomial_band() -> None:
    assert binomial_half_width(50.0, 100) == pytest.approx(10.0)
    assert binomial_half_width(90.0, 400) == pytest.approx(3.0)
    assert binomial_half_width(100.0, 100) > 0  # never a zero-width band


def test_demo_recipe_gives_every_side_the_same_labels_and_budget() -> None:
    r = demo_recipe(quick=False)
    assert r.labels == 0.1 and any(s == "data.label_fraction=0.1" for s in r.common_sets)
    assert any(s.startswith("epochs=") for s in r.common_sets)  # one schedule for scratch and fine-tuning
    for sets in (r.scratch_sets, r.finetune_sets):
        assert not any(s.startswith(("epochs=", "data.", "train.batch_size", "train.seed")) for s in sets)
    assert any(s.startswith("objective.kind=") for s in r.pretrain_sets)
    assert not any("label_fraction" in s for s in r.pretrain_sets)  # pre-training uses no labels


def _stage(top1: float, train: int = 32, test: int = 288) -> dict:
    return {"test_top1": top1, "train": train, "test": test}


def test_verdict_says_paid_or_not_with_numbers() -> None:
    paid = verdict({"scratch": _stage(38.9), "finetune": _stage(45.5), "linear": _stage(52.4)}, 0.1)
    assert paid.startswith("Pre-training paid here: +6.6 points")
    assert "10% of the labels (32 labelled clips)" in paid and "52.4 %" in paid and "288 test clips" in paid
    lost = verdict({"scratch": _stage(45.9, 70, 738), "finetune": _stage(40.5, 70, 738)}, 0.1)
    assert lost.startswith("Pre-training did not pay here: -5.4 points") and "linear" not in lost
    assert "+-3.7 points" in lost  # 2 standard errors of 45.9 % on 738 clips
    unclear = verdict({"scratch": _stage(45.9), "finetune": _stage(40.5)}, 0.1)  # 288 clips: band +-5.9
    assert unclear.startswith("Pre-training made no clear difference here: -5.4 points, inside the noise band")
    assert "all 923 labelled" in verdict({"scratch": _stage(80.0, 923, 464), "finetune": _stage(82.0, 923, 464)}, 1.0)
    assert "no comparison" in verdict({"scratch": _stage(1.0)}, 0.1)


def test_holdout_split_for_a_store_without_one(tmp_path) -> None:
    """A generic store with no split gets split_holdout: stratified 20 %, whole performers per class,
    a one-sample class kept in training, deterministic, refused twice."""
    import numpy as np

    from mtscale.data.store import Store
    from mtscale.data.store_writer import write_store
    from mtscale.data.subsets import add_holdout_split
    from mtscale.errors import ConfigError

    rng = np.random.default_rng(0)
    samples = []
    for i in range(61):
        label = 2 if i == 60 else i % 2  # class 2 has one sample
        samples.append((f"s{i}", rng.normal(size=(8, 1, 25, 3)).astype(np.float32), label, {"performer": i % 10}))
    url = str(tmp_path / "st")
    write_store(url, samples, layout="ntu25", num_bodies=1, dtype="float32")
    assert not Store.open(url).info().get("splits")
    sizes = add_holdout_split(url, 0.2, ["performer"])
    st = Store.open(url)
    part = np.asarray(st.manifest.column("split_holdout").to_pylist())
    perf = np.asarray(st.manifest.column("performer").to_pylist())
    labels = np.asarray(st.labels)
    assert sizes == {"train": int((part == "train").sum()), "test": int((part == "test").sum())}
    assert st.info()["splits"]["holdout"] == sizes
    for c in (0, 1):  # 5 performers per class, 1 of them (20 %) held out whole
        test_perf = set(perf[(labels == c) & (part == "test")])
        assert len(test_perf) == 1 and not test_perf & set(perf[(labels == c) & (part == "train")])
    assert part[labels == 2].tolist() == ["train"]
    with pytest.raises(ConfigError, match="already has a split_holdout"):
        add_holdout_split(url, 0.2)
    url2 = str(tmp_path / "st2")
    write_store(url2, samples, layout="ntu25", num_bodies=1, dtype="float32")
    add_holdout_split(url2, 0.2, ["performer"])
    assert Store.open(url2).manifest.column("split_holdout").to_pylist() == part.tolist()  # same seed, same split


def test_quickstart_data_without_split_holds_out_a_test_set(tmp_path, capsys) -> None:
    """`quickstart --data` on recordings with no split: the pipeline adds the hold-out and says so;
    with splits but not the format's default one it takes the store's first split."""
    import argparse

    import numpy as np

    from mtscale.data.store import Store
    from mtscale.data.store_writer import write_store
    from mtscale.pipeline import Pipeline

    rng = np.random.default_rng(0)
    samples = [(f"s{i}", rng.normal(size=(8, 1, 25, 3)).astype(np.float32), i % 3, {"subject": i % 5})
               for i in range(45)]
    args = argparse.Namespace(workdir=str(tmp_path / "qs"), quick=False, data=str(tmp_path), format="generic",
                              split=None, procs=2, skip_tune=True, minutes=1.0)
    pipe = Pipeline(args)
    write_store(str(pipe.store), samples, layout="ntu25", num_bodies=1, dtype="float32")
    assert pipe._default_split(Store.open(str(pipe.store)).info()) == "holdout"
    out = capsys.readouterr().out
    assert "held out 20 % of each class as the test set (whole subjects)" in out
    assert Store.open(str(pipe.store)).info()["splits"]["holdout"]["test"] == 9  # 1 of 5 subjects x 3 classes
    assert pipe._default_split(Store.open(str(pipe.store)).info()) == "holdout"  # an existing split is used
    assert "using 'holdout'" in capsys.readouterr().out
