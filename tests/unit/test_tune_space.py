"""Search-space parsing (tune YAML -> Ray param_space) and TuneConfig validation."""

from __future__ import annotations

import math

import pytest
import yaml

from mtscale.config import apply_overrides, from_dict, load_config, set_dotted
from mtscale.errors import ConfigError
from mtscale.tuning.settings import TuneConfig
from mtscale.tuning.space import flatten_overrides, grid_size, parse_space, pbt_mutations, to_param_space
from mtscale.tuning.trainable import _scalar_metrics, trial_finetune_dict

SPACE = {
    "train.lr": {"loguniform": [1e-5, 1e-2]},
    "train": {"weight_decay": {"uniform": [0.0, 0.1], "q": 0.01}},
    "layer_decay": {"choice": [0.65, 0.75]},
    "train.seed": {"grid": [0, 1, 2]},
    "data.clip_frames": {"randint": [16, 33]},
    "label_smoothing": 0.1,
}


def test_parse_flattens_nested_and_dotted_keys_in_order():
    dims = parse_space(SPACE)
    assert [d.key for d in dims] == ["train.lr", "train.weight_decay", "layer_decay", "train.seed",
                                     "data.clip_frames", "label_smoothing"]
    kinds = {d.key: d.kind for d in dims}
    assert kinds == {"train.lr": "loguniform", "train.weight_decay": "uniform", "layer_decay": "choice",
                     "train.seed": "grid", "data.clip_frames": "randint", "label_smoothing": "const"}
    assert dims[1].q == 0.01 and dims[0].values == (1e-5, 1e-2)
    assert grid_size(dims) == 3 and grid_size(dims, "grid") == 6


def test_param_space_samples_inside_bounds_with_the_right_types():
    from ray import tune

    space = to_param_space(parse_space(SPACE))
    assert space["label_smoothing"] == 0.1
    assert space["train.seed"] == tune.grid_search([0, 1, 2])
    lr = [space["train.lr"].sample() for _ in range(200)]
    assert all(1e-5 <= v < 1e-2 for v in lr)
    # log-uniform: about half the samples below the geometric mean 3.16e-4 (a uniform would put ~3 % there)
    assert 60 < sum(v < math.sqrt(1e-5 * 1e-2) for v in lr) < 140
    wd = [space["train.weight_decay"].sample() for _ in range(50)]
    assert all(0.0 <= v <= 0.1 and abs(v * 100 - round(v * 100)) < 1e-9 for v in wd)
    ints = {space["data.clip_frames"].sample() for _ in range(300)}
    assert all(isinstance(v, int) for v in ints) and min(ints) >= 16 and max(ints) <= 32 and 32 in ints
    assert {space["layer_decay"].sample() for _ in range(100)} == {0.65, 0.75}


def test_grid_algorithm_turns_choices_into_grid_axes_and_refuses_ranges():
    from ray import tune

    dims = parse_space({"layer_decay": {"choice": [0.65, 0.75]}, "train.seed": {"grid": [0, 1]}})
    space = to_param_space(dims, "grid")
    assert space["layer_decay"] == tune.grid_search([0.65, 0.75])
    with pytest.raises(ConfigError, match=r"space\.train\.lr: search.algorithm grid .* found loguniform"):
        to_param_space(parse_space({"train.lr": {"loguniform": [1e-5, 1e-2]}}), "grid")
    with pytest.raises(ConfigError, match=r"space\.train\.seed: grid is not supported with search.algorithm optuna"):
        to_param_space(dims, "optuna")


@pytest.mark.parametrize("spec, message", [
    ({"x": {"loguniform": [0, 1]}}, r"space\.x\.loguniform: found low=0, expected > 0"),
    ({"x": {"uniform": [2, 1]}}, r"space\.x\.uniform: found \[2, 1\], expected low < high"),
    ({"x": {"uniform": [1]}}, r"space\.x\.uniform: found 1 values, expected \[low, high\]"),
    ({"x": {"randint": [1.5, 4]}}, r"space\.x\.randint: found \[1.5, 4\], expected two integers"),
    ({"x": {"choice": []}}, r"space\.x\.choice: found an empty list"),
    ({"x": {"choice": [1], "grid": [2]}}, r"space\.x: found keys \['choice', 'grid'\], expected exactly one"),
    ({"x": {"choice": [1], "q": 1}}, r"space\.x\.q: only allowed with uniform or loguniform"),
    ({"x": {"uniform": "0, 1"}}, r"space\.x\.uniform: found '0, 1', expected a list"),
    ({"x": {"uniform": ["a", 1]}}, r"space\.x\.uniform: found 'a', expected a number"),
    ({"x": {}}, r"space\.x: found an empty mapping"),
])
def test_bad_specs_name_the_key_and_what_was_expected(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_space(spec)


def test_a_key_given_dotted_then_nested_takes_the_later_value():
    # the YAML writes ``train.lr`` dotted; ``--set space.train.lr=...`` adds it nested, later
    (dim,) = parse_space({"train.lr": {"choice": [1]}, "train": {"lr": {"grid": [2, 3]}}})
    assert (dim.key, dim.kind, dim.values) == ("train.lr", "grid", (2, 3))


def test_pbt_mutations_use_the_searched_keys_only():
    muts = pbt_mutations(parse_space(SPACE))
    assert set(muts) == {"train.lr", "train.weight_decay", "layer_decay", "train.seed", "data.clip_frames"}
    assert muts["layer_decay"] == [0.65, 0.75]
    with pytest.raises(ConfigError, match="pbt needs at least one searched"):
        pbt_mutations(parse_space({"label_smoothing": 0.1}))


def test_overrides_and_trial_dict_set_nested_keys_without_touching_the_base():
    base = {"train": {"lr": 1e-3, "seed": 0}, "run": {"dir": "x"}}
    assert flatten_overrides({"train": {"seed": 3}, "data.store": "/s"}) == {"train.seed": 3, "data.store": "/s"}
    with pytest.raises(ConfigError, match=r"overrides\.train\.lr: found a search spec"):
        flatten_overrides({"train.lr": {"choice": [1, 2]}})
    trial = trial_finetune_dict(base, {"train.lr": 0.5, "data.augment.rotate_deg": 10.0}, "/runs/t1")
    assert trial["train"] == {"lr": 0.5, "seed": 0} and trial["data"] == {"augment": {"rotate_deg": 10.0}}
    assert trial["run"]["dir"] == "/runs/t1" and base == {"train": {"lr": 1e-3, "seed": 0}, "run": {"dir": "x"}}
    with pytest.raises(ConfigError, match=r"space\.train\.lr\.x: lr is a value"):
        set_dotted({"train": {"lr": 1.0}}, "train.lr.x", 1, where="space")
    with pytest.raises(ConfigError, match=r"^--set train\.lr\.x: lr is a value \(1\.0\), expected a section"):
        apply_overrides({"train": {"lr": 1.0}}, ["train.lr.x=1"])  # --set goes through the same setter
    assert apply_overrides({"train": None}, ["train.lr=0.002", "data.augment.scale=0.1"]) == {
        "train": {"lr": 0.002}, "data": {"augment": {"scale": 0.1}}}


def test_scalar_metrics_drop_non_numbers_and_ray_reserved_names():
    out = _scalar_metrics(2, {"val_top1": 50, "train_loss": 1.5, "done": True, "names": ["a"], "epoch": 2})
    assert out == {"val_top1": 50.0, "train_loss": 1.5, "epoch": 2.0}


def test_tune_config_validation_and_overrides(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump({"base": "ft.yaml", "space": {"train.lr": {"loguniform": [1e-5, 1e-2]}}}))
    cfg = load_config(TuneConfig, p, ["scheduler.kind=pbt", "resources.gpus_per_trial=0.25",
                                      "space.layer_decay={choice: [0.6, 0.7]}"])
    assert cfg.scheduler.kind == "pbt" and cfg.resources.gpus_per_trial == 0.25
    assert [d.key for d in parse_space(cfg.space)] == ["train.lr", "layer_decay"]
    for bad, message in [
        ({"base": "x", "mode": "maximum"}, "mode: found 'maximum', expected max or min"),
        ({"base": "x", "scheduler": {"kind": "hyperband"}}, "scheduler.kind: found 'hyperband'"),
        ({"base": "x", "search": {"algorithm": "bayes"}}, "search.algorithm: found 'bayes'"),
        ({"base": "x", "nmu_samples": 3}, "nmu_samples: unknown key"),
        ({"space": {}}, "base: missing"),
        ({"base": "x", "resources": {"gpus_per_trial": 1.5}}, "resources.gpus_per_trial: found 1.5"),
        ({"base": "x", "name": "a/b"}, "name: found 'a/b'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            from_dict(TuneConfig, bad)


CONFIGS = sorted((__import__("pathlib").Path(__file__).resolve().parents[2] / "configs" / "tune").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_tune_configs_parse_and_resolve(path, tmp_path):
    from mtscale.tuning.driver import build_scheduler, resolve

    cfg = load_config(TuneConfig, path, [f"pretrained={tmp_path / 'enc.safetensors'}",
                                         f"storage_path={tmp_path}", "overrides.data.store=some/store"])
    dims = parse_space(cfg.space)
    assert dims and to_param_space(dims, cfg.search.algorithm)
    if not (path.parent / cfg.base).is_file():
        pytest.skip(f"{path.name}: base {cfg.base} not written yet")
    sweep = resolve(cfg, path)
    assert sweep.base["data"]["store"] == str((__import__("pathlib").Path("some/store")).resolve())
    assert sweep.base["pretrained"] == str(tmp_path / "enc.safetensors")
    assert sweep.experiment_dir == f"{tmp_path}/{cfg.name}" and sweep.max_t >= 1
    assert build_scheduler(sweep) is not None


def test_resolve_rejects_space_values_the_finetune_config_refuses(tmp_path):
    from mtscale.tuning.driver import resolve

    (tmp_path / "ft.yaml").write_text("protocol: scratch\nepochs: 2\nwarmup_epochs: 0\n")
    ok = from_dict(TuneConfig, {"base": "ft.yaml", "space": {"layer_decay": {"choice": [0.5, 0.9]}}})
    assert resolve(ok, tmp_path / "t.yaml").max_t == 2
    bad = from_dict(TuneConfig, {"base": "ft.yaml", "space": {"layer_decay": {"uniform": [0.5, 1.5]}}})
    with pytest.raises(ConfigError, match=r"space\.layer_decay: value 1.5 makes an invalid fine-tuning config "
                                          r"\(layer_decay: found 1.5, expected in \(0, 1\]\)"):
        resolve(bad, tmp_path / "t.yaml")
    with pytest.raises(ConfigError, match=r"base: .*nope.yaml: fine-tuning config not found"):
        resolve(from_dict(TuneConfig, {"base": "nope.yaml"}), tmp_path / "t.yaml")
    with pytest.raises(ConfigError, match="scheduler.max_t: found 5, expected <= the fine-tuning epochs 2"):
        resolve(from_dict(TuneConfig, {"base": "ft.yaml", "scheduler": {"max_t": 5}}), tmp_path / "t.yaml")
    (tmp_path / "ft2.yaml").write_text("protocol: finetune\nepochs: 2\nwarmup_epochs: 0\n")
    with pytest.raises(ConfigError, match="pretrained: missing"):
        resolve(from_dict(TuneConfig, {"base": "ft2.yaml"}), tmp_path / "t.yaml")


def test_missing_optuna_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    from mtscale.tuning.driver import build_search_alg, resolve

    (tmp_path / "ft.yaml").write_text("protocol: scratch\nepochs: 2\nwarmup_epochs: 0\n")
    sweep = resolve(from_dict(TuneConfig, {"base": "ft.yaml", "search": {"algorithm": "optuna"}}), tmp_path / "t")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else real(name, *a))
    with pytest.raises(ConfigError, match=r"search.algorithm: optuna needs the optuna package.*install mtscale\[search\]"):
        build_search_alg(sweep)


def test_trial_device_follows_the_gpus_ray_gives_it():
    """Issue 25, item 9: with gpus_per_trial 0 a trial trains on CPU even where CUDA is visible
    (before: every trial on cuda:0, outside Ray's accounting); more than one GPU is refused (a
    trial is one process on one device: the others would sit reserved and idle)."""
    from mtscale.tuning.settings import ResourcesConfig

    assert ResourcesConfig(gpus_per_trial=0).trial_device("auto") == "cpu"
    assert ResourcesConfig(gpus_per_trial=0.25).trial_device("auto") == "cuda"
    assert ResourcesConfig(gpus_per_trial=1).trial_device("cuda") == "cuda"
    with pytest.raises(ConfigError, match="gpus_per_trial=0"):
        ResourcesConfig(gpus_per_trial=0).trial_device("cuda")
    with pytest.raises(ConfigError, match="train.device: found 'cpu'"):
        ResourcesConfig(gpus_per_trial=1).trial_device("cpu")
    for n in (2, 1.5):
        with pytest.raises(ConfigError, match="one device"):
            ResourcesConfig(gpus_per_trial=n)
