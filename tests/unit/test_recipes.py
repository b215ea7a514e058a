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
    """A generic store with no split gets split_holdout: 20 % of the performers held out whole
    (each acts both classes: no performer on both sides), a one-sample class kept in training,
    deterministic, refused twice."""
    import numpy as np

    from mtscale.data.store import Store
    from mtscale.data.store_writer import write_store
    from mtscale.data.subsets import add_holdout_split
    from mtscale.errors import ConfigError

    rng = np.random.default_rng(0)
    samples = []
    for i in range(61):
        label = 2 if i == 60 else i % 2  # class 2 has one sample, by a performer of its own
        performer = 10 if i == 60 else (i // 2) % 10  # performers 0-9 act both classes, 3 clips each
        samples.append((f"s{i}", rng.normal(size=(8, 1, 25, 3)).astype(np.float32), label, {"performer": performer}))
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
    test_perf, train_perf = set(perf[part == "test"]), set(perf[part == "train"])
    assert not test_perf & train_perf  # chosen among all performers at once, not per class
    assert len(test_perf) == 2 and test_perf <= set(range(10))  # 20 % of 11 performers; seed 0 picks two of 0-9
    assert sizes["test"] == 12 and all((labels[part == "test"] == c).sum() == 6 for c in (0, 1))
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
    assert "held out 20 % of the subjects, whole, as the test set" in out
    assert Store.open(str(pipe.store)).info()["splits"]["holdout"]["test"] == 9  # 1 of 5 subjects: 9 clips
    assert pipe._default_split(Store.open(str(pipe.store)).info()) == "holdout"  # an existing split is used
    assert "using 'holdout'" in capsys.readouterr().out


def test_grouped_subset_keeps_groups_whole_and_strata_exact() -> None:
    """Groups nested in classes (takes): each class holds out its own quota of whole groups.
    Groups spanning classes (performers): chosen at once, so none lands on both sides, where
    choosing per class would split most of them."""
    import numpy as np

    from mtscale.data.subsets import grouped_fraction_subset

    labels = np.repeat(np.arange(4), 30)  # 4 classes x 30 clips
    takes = np.array([f"a{c}_t{i // 3}" for c, i in zip(labels, np.tile(np.arange(30), 4))])  # 10 takes per class
    pick = grouped_fraction_subset(labels, takes, 0.2, seed=3)
    for c in range(4):  # 2 whole takes (6 clips) of every class
        assert len(set(takes[pick][labels[pick] == c])) == 2 and (labels[pick] == c).sum() == 6
    assert not set(takes[pick]) & set(np.delete(takes, pick))

    performers = np.tile(np.arange(10), 12)  # every performer in every class
    for seed in range(5):
        pick = grouped_fraction_subset(labels, performers, 0.2, seed)
        held = set(performers[pick])
        assert len(held) == 2 and not held & set(np.delete(performers, pick))
        assert pick.size == 24 and np.array_equal(pick, np.sort(pick))
    assert grouped_fraction_subset(np.full(5, -1), np.arange(5), 0.2, 0).size == 0  # nothing labelled


def test_a_stage_log_is_written_while_the_stage_runs(tmp_path) -> None:
    """A stage that prints and then hangs (the stuck pre-training of an earlier session) left an
    empty log: the tee's file was block-buffered. Each line is on disk as it arrives."""
    import argparse
    import sys
    import threading
    import time

    from mtscale.pipeline import Pipeline

    args = argparse.Namespace(workdir=str(tmp_path / "qs"), quick=True, data=None, format="ntu", split=None,
                              procs=2, skip_tune=True, minutes=1.0)
    pipe = Pipeline(args)
    pipe.work.mkdir(parents=True)
    code = "import time; print('step 1: loss 0.9', flush=True); time.sleep(8)"
    t = threading.Thread(target=pipe._run, args=("hang", [sys.executable, "-c", code]), daemon=True)
    t.start()
    log = pipe.log_dir / "hang.log"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "step 1: loss 0.9" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.2)
    assert t.is_alive() and "step 1: loss 0.9" in log.read_text()  # on disk while the stage still runs
    t.join(timeout=20)
