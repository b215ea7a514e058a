"""``mtscale ensemble`` on hand-made scores files: weights chosen on validation only, the
combination and its metrics, mismatched runs refused, the CLI's outputs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from support import mtscale_cmd

from mtscale.errors import BadInputError, ConfigError
from mtscale.train.ensemble import choose_weights, combine, run_ensemble, weight_grid
from mtscale.train.scores import read_scores, scores_file, write_scores

ROOT = Path(__file__).resolve().parents[2]
K = 3


def _onehot(pred: list[int], conf: float = 0.8) -> np.ndarray:
    """Probabilities with ``conf`` on the predicted class and the rest spread evenly."""
    p = np.full((len(pred), K), (1 - conf) / (K - 1), dtype=np.float32)
    p[np.arange(len(pred)), pred] = conf
    return p


def _write(folder: Path, part: str, ids: list[str], labels: list[int], probs: np.ndarray, stream: str) -> Path:
    return write_scores(scores_file(folder, part), sample_ids=ids, rows=np.arange(len(ids)), labels=np.array(labels),
                        scores_NK=probs, run=str(folder), stream=stream, part=part, class_names=["a", "b", "c"],
                        store="stores/demo", split="demo")


VAL_IDS = [f"v{i}" for i in range(10)]
VAL_Y = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
TEST_IDS = [f"t{i}" for i in range(6)]
TEST_Y = [0, 1, 2, 0, 1, 2]


@pytest.fixture()
def runs(tmp_path) -> list[Path]:
    """Run a (joint) right on validation samples 0-6, run b (bone) right on 7-9 only."""
    a, b = tmp_path / "a", tmp_path / "b"
    wrong = [(y + 1) % K for y in VAL_Y]
    _write(a, "val", VAL_IDS, VAL_Y, _onehot(VAL_Y[:7] + wrong[7:]), "joint")
    _write(b, "val", VAL_IDS, VAL_Y, _onehot(wrong[:7] + VAL_Y[7:], conf=0.9), "bone")
    _write(a, "test", TEST_IDS, TEST_Y, _onehot([0, 1, 2, 1, 2, 0]), "joint")  # 3 of 6 right
    _write(b, "test", TEST_IDS, TEST_Y, _onehot([0, 1, 2, 0, 1, 2], conf=0.9), "bone")  # 6 of 6 right
    return [a, b]


def test_scores_file_round_trip(tmp_path):
    p = _onehot([2, 0])
    f = _write(tmp_path, "test", ["x", "y"], [2, 1], p, "bone_motion")
    s = read_scores(f)
    assert s.sample_ids.tolist() == ["x", "y"] and s.labels.tolist() == [2, 1] and s.stream == "bone_motion"
    np.testing.assert_array_equal(s.scores_NK, p)
    import pyarrow.parquet as pq

    cols = pq.read_table(f).column_names
    assert cols == ["sample_id", "row", "label", "score_0", "score_1", "score_2", "run", "stream", "part"]


def test_auto_weights_come_from_validation_only(runs, tmp_path):
    res = run_ensemble([str(r) for r in runs], split="test", weights="auto", out_dir=str(tmp_path / "ens"))
    # By hand, with a's weight w: samples 0-6 are right iff .8w + .05(1-w) > .1w + .9(1-w), i.e. w > .548,
    # samples 7-9 iff w < .548; so the grid's w in {4/7, .6, 2/3, .75, .8, 1} get 7/10. Their summed
    # validation NLL, 7 -log(.75w + .05) + 3 -log(.9 - .8w): 7.60, 7.45, 7.19, 7.043, 7.057, 8.47 -> w = .75.
    # Test scores play no part: b alone is perfect on test.
    assert res["weights"] == [0.75, 0.25] and res["val_top1"] == pytest.approx(70.0)
    assert res["auto_val_nll"] == pytest.approx((-7 * np.log(.6125) - 3 * np.log(.3)) / 10, rel=1e-5)
    assert res["top1"] == pytest.approx(50.0)  # a's 3 test errors: .75 x .8 + .25 x .05 beats .75 x .1 + .25 x .9
    assert [r["test_top1"] for r in res["runs"]] == pytest.approx([50.0, 100.0])
    # changing the test scores (b now wrong everywhere, a perfect) leaves the weights unchanged
    _write(runs[1], "test", TEST_IDS, TEST_Y, _onehot([(y + 1) % K for y in TEST_Y]), "bone")
    _write(runs[0], "test", TEST_IDS, TEST_Y, _onehot(TEST_Y), "joint")
    again = run_ensemble([str(r) for r in runs], split="test", weights="auto", out_dir=str(tmp_path / "ens2"))
    assert again["weights"] == res["weights"] and again["val_top1"] == res["val_top1"]
    assert again["top1"] == pytest.approx(100.0)


def test_choose_weights_rule_and_ties():
    y = np.array(VAL_Y)
    # two identical runs: every weighting ties on top-1 and NLL -> the one closest to uniform
    p = _onehot(VAL_Y[:5] + [(v + 1) % K for v in VAL_Y[5:]])
    w, info = choose_weights(np.stack([p, p]), y)
    assert w.tolist() == [0.5, 0.5] and info["val_top1"] == pytest.approx(50.0)
    # each run alone is wrong everywhere (.45 on another class, .4 on the true one), every mix of the two is
    # right everywhere (.4 on the true class) with the same NLL -> the tie goes to the uniform mix
    pa, pb = np.zeros((10, K), np.float32), np.zeros((10, K), np.float32)
    for i, t in enumerate(VAL_Y):
        pa[i, t], pa[i, (t + 1) % K], pa[i, (t + 2) % K] = 0.4, 0.45, 0.15
        pb[i, t], pb[i, (t + 1) % K], pb[i, (t + 2) % K] = 0.4, 0.15, 0.45
    w, info = choose_weights(np.stack([pa, pb]), y)
    assert w.tolist() == [0.5, 0.5] and info["val_top1"] == pytest.approx(100.0)
    assert (pa.argmax(1) != y).all() and (pb.argmax(1) != y).all()
    assert (combine(np.stack([pa, pb]), [0.75, 0.25]).argmax(1) == y).all()
    # {0, .25, .5, .75, 1}^2 less (0, 0), normalised, duplicates dropped: a's share in
    # {0, 1, 1/2, 1/3, 1/4, 1/5, 2/3, 2/5, 3/7, 3/4, 3/5, 4/5, 4/7}
    grid = weight_grid(2)
    assert info["combinations"] == len(grid) == 13
    assert sorted(np.round(grid[:, 0], 6)) == sorted(np.round([0, 1, 1 / 2, 1 / 3, 1 / 4, 1 / 5, 2 / 3, 2 / 5, 3 / 7,
                                                               3 / 4, 3 / 5, 4 / 5, 4 / 7], 6))
    assert grid.sum(1) == pytest.approx(np.ones(13))


def test_auto_weights_of_many_runs_are_shared_per_stream():
    """8 runs (4 streams x 2 seeds): one weight per stream, split equally between its runs; the
    choice is the 4-run rule on each stream's mean scores. 7 runs of 7 streams are refused."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, K, size=40)
    logits = rng.normal(size=(8, 40, K)) + 1.5 * np.eye(K)[y][None] * rng.uniform(0, 2, size=(8, 1, 1))
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    streams = ["joint", "bone", "joint_motion", "bone_motion"] * 2
    w, info = choose_weights(p, y, streams)
    w_G, info_G = choose_weights((p[:4] + p[4:]) / 2, y)
    np.testing.assert_allclose(w, np.tile(w_G / 2, 2), atol=1e-12)
    assert info["tied_by_stream"] == streams[:4] and info["val_top1"] == info_G["val_top1"]
    assert info["combinations"] == len(weight_grid(4)) and len(set(np.round(w_G, 6))) > 1  # not a uniform tie
    assert w.sum() == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="found 7 runs of 7 streams, expected at most 6"):
        choose_weights(p[:7], y, [f"s{i}" for i in range(7)])
    with pytest.raises(ConfigError, match=r"found 7 runs \(streams not given\), expected at most 6"):
        choose_weights(p[:7], y)


def test_given_weights_and_their_combination(runs, tmp_path):
    res = run_ensemble([str(r) for r in runs], split="test", weights="1,3", out_dir=str(tmp_path / "e"))
    assert res["weights"] == [0.25, 0.75] and res["weights_rule"] == "given"
    a = read_scores(scores_file(runs[0], "test")).scores_NK
    b = read_scores(scores_file(runs[1], "test")).scores_NK
    comb = 0.25 * a + 0.75 * b
    assert res["top1"] == pytest.approx(100.0 * (comb.argmax(1) == np.array(TEST_Y)).mean())
    out = read_scores(tmp_path / "e" / "scores_test.parquet")
    np.testing.assert_allclose(out.scores_NK, comb, atol=1e-6)
    assert out.stream == "ensemble(joint,bone)"
    for f in ("metrics.json", "confusion.csv", "confusion.png", "results.md", "scores_val.parquet"):
        assert (tmp_path / "e" / f).is_file(), f
    row = (tmp_path / "e" / "results.md").read_text().splitlines()[2]
    assert row.startswith("| joint + bone | 0.25, 0.75 | demo | demo/test |") and f"{res['top1']:.2f}" in row
    with pytest.raises(ConfigError, match="--weights: found '1,2,3'"):
        run_ensemble([str(r) for r in runs], weights="1,2,3", out_dir=str(tmp_path / "x"))


def test_mismatched_runs_are_refused_naming_the_first_mismatch(runs, tmp_path):
    c = tmp_path / "c"
    _write(c, "val", VAL_IDS, VAL_Y, _onehot(VAL_Y), "bone_motion")
    _write(c, "test", TEST_IDS[:5] + ["t9"], TEST_Y, _onehot(TEST_Y), "bone_motion")
    with pytest.raises(ConfigError, match=r"sample 't5' is in .*a/scores_test.parquet but not in .*c/scores_test"):
        run_ensemble([str(runs[0]), str(c)], weights="1,1", out_dir=str(tmp_path / "x"))
    _write(c, "test", TEST_IDS, [0, 1, 2, 0, 2, 2], _onehot(TEST_Y), "bone_motion")
    with pytest.raises(ConfigError, match=r"sample 't4' has label 1 in .* but 2 in .*c/scores_test"):
        run_ensemble([str(runs[0]), str(c)], weights="1,1", out_dir=str(tmp_path / "x"))
    # validation on other samples (another subset_seed): refused too, for auto weights
    _write(c, "test", TEST_IDS, TEST_Y, _onehot(TEST_Y), "bone_motion")
    _write(c, "val", ["w0"] + VAL_IDS[1:], VAL_Y, _onehot(VAL_Y), "bone_motion")
    with pytest.raises(ConfigError, match=r"validation scores: sample 'v0' is in"):
        run_ensemble([str(runs[0]), str(c)], weights="auto", out_dir=str(tmp_path / "x"))
    d = tmp_path / "d"
    _write(d, "test", TEST_IDS, TEST_Y, _onehot(TEST_Y), "bone")
    with pytest.raises(BadInputError, match="no scores_val.parquet"):
        run_ensemble([str(runs[0]), str(d)], weights="auto", out_dir=str(tmp_path / "x"))


def test_cli_json_and_one_line_errors(runs, tmp_path):
    cmd = mtscale_cmd("ensemble", *runs, "--split", "test", "--out", tmp_path / "cli", "--json")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["weights"] == [0.75, 0.25] and res["added"] == "softmax probabilities"
    assert set(res["per_class"]) == {"a", "b", "c"}
    r = subprocess.run(cmd[:4] + [str(tmp_path / "nope"), "--out", str(tmp_path / "cli")], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
