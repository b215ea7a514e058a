"""Build and run (or resume) a Ray Tune sweep of fine-tuning from a ``TuneConfig``."""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtscale.config import FinetuneConfig, from_dict, get_dotted, read_yaml_mapping, set_dotted, to_dict
from mtscale.errors import ConfigError
from mtscale.tuning.settings import TuneConfig
from mtscale.tuning.space import Dim, flatten_overrides, parse_space, pbt_mutations, to_param_space

log = logging.getLogger(__name__)

PATH_KEYS = ("data.store", "pretrained")
"""Fine-tuning keys holding local paths: made absolute, since trials run in their own dirs."""


def is_url(path: str) -> bool:
    return "://" in path


def absolute(path: str) -> str:
    return path if is_url(path) else str(Path(path).expanduser().resolve())


@dataclass
class Sweep:
    """A resolved sweep: everything the Tuner needs, checked before Ray starts."""

    cfg: TuneConfig
    base: dict
    """Resolved base fine-tuning config (plain dict, absolute paths, validated)."""
    dims: list[Dim]
    max_t: int
    experiment_dir: str
    """``<storage_path>/<name>`` (absolute path or URL)."""


def resolve(cfg: TuneConfig, config_path: str | Path | None = None) -> Sweep:
    """Load the base fine-tuning YAML, apply overrides / pretrained, make paths absolute and
    check that every value the space can take builds a valid ``FinetuneConfig``."""
    base_path = Path(cfg.base).expanduser()
    if not base_path.is_absolute() and config_path is not None:
        base_path = Path(config_path).resolve().parent / base_path
    if not base_path.is_file():
        raise ConfigError(f"base: {base_path}: fine-tuning config not found")
    base = read_yaml_mapping(base_path)
    for key, value in flatten_overrides(cfg.overrides).items():
        set_dotted(base, key, value, where="overrides")
    if cfg.pretrained is not None:
        base["pretrained"] = cfg.pretrained
    if base.get("seeds"):
        log.warning("seeds %s in the base config: a trial runs one seed; using train.seed=%s "
                    "(sweep seeds with space: {train.seed: {grid: [...]}})", base["seeds"], base["seeds"][0])
        set_dotted(base, "train.seed", base["seeds"][0])
    base["seeds"] = None
    for key in PATH_KEYS:
        value = get_dotted(base, key)
        if isinstance(value, str) and value:
            set_dotted(base, key, absolute(value))
    base.setdefault("run", {})
    # Validate the base and every edge of the space now, not inside a Ray worker.
    resolved = to_dict(from_dict(FinetuneConfig, copy.deepcopy(base)))
    dims = parse_space(cfg.space)
    for d in dims:
        for v in d.values:  # every listed value, or the two ends of a range
            probe = copy.deepcopy(base)
            set_dotted(probe, d.key, v, where="space")
            try:
                from_dict(FinetuneConfig, probe)
            except ConfigError as e:
                raise ConfigError(f"space.{d.key}: value {v!r} makes an invalid fine-tuning config ({e})") from None
    if cfg.pretrained is None and resolved.get("protocol") != "scratch" and not resolved.get("pretrained"):
        raise ConfigError("pretrained: missing, expected the pre-trained weights every trial starts from "
                          "(or protocol: scratch in the base config)")
    max_t = cfg.scheduler.max_t or int(resolved["epochs"])
    if max_t > int(resolved["epochs"]):
        raise ConfigError(f"scheduler.max_t: found {max_t}, expected <= the fine-tuning epochs {resolved['epochs']}")
    storage = absolute(cfg.storage_path)
    return Sweep(cfg=cfg, base=base, dims=dims, max_t=max_t, experiment_dir=f"{storage.rstrip('/')}/{cfg.name}")


# --------------------------------------------------------------------------- Ray objects


def _need(module: str, algorithm: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"search.algorithm: {algorithm} needs the {module} package, "
                          f"found it missing; install mtscale[search] (pip install 'mtscale[search]')")


def build_search_alg(sweep: Sweep) -> Any:
    """Ray searcher for ``search.algorithm`` (Optuna / HyperOpt imported only when asked for)."""
    cfg = sweep.cfg
    algo = cfg.search.algorithm
    if algo in ("random", "grid"):
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(random_state=cfg.search.seed)
    if algo == "optuna":
        _need("optuna", algo)
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=cfg.search.seed))
    if algo == "hyperopt":
        _need("hyperopt", algo)
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(random_state_seed=cfg.search.seed)
    raise AssertionError(algo)


def build_scheduler(sweep: Sweep) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = sweep.cfg.scheduler
    if s.kind == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=sweep.max_t, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor, brackets=s.brackets)
    if s.kind == "pbt":
        if sweep.cfg.search.algorithm not in ("random", "grid"):
            raise ConfigError(f"scheduler.kind: pbt works with search.algorithm random or grid, "
                              f"found {sweep.cfg.search.algorithm}")
        return PopulationBasedTraining(
            time_attr="training_iteration", perturbation_interval=s.perturbation_interval,
            hyperparam_mutations=pbt_mutations(sweep.dims), quantile_fraction=s.quantile_fraction,
            resample_probability=s.resample_probability, synch=False,
        )
    return FIFOScheduler()


def build_trainable(sweep: Sweep) -> Any:
    from ray import tune

    from mtscale.tuning.trainable import finetune_trainable

    r = sweep.cfg.resources
    base = dict(sweep.base)
    base["train"] = dict(base.get("train", {}), device=r.trial_device(base.get("train", {}).get("device", "auto")))
    fn = tune.with_parameters(finetune_trainable, base=base, cpus_per_trial=r.cpus_per_trial,
                              fail_first_attempt=sweep.cfg.fail_first_attempt)
    return tune.with_resources(fn, {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial})


def build_run_config(sweep: Sweep) -> Any:
    from ray import tune

    cfg = sweep.cfg
    return tune.RunConfig(
        name=cfg.name, storage_path=absolute(cfg.storage_path),
        failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        stop={"training_iteration": sweep.max_t},
        verbose=cfg.verbose,
    )


def build_tuner(sweep: Sweep) -> Any:
    from ray import tune

    cfg = sweep.cfg
    return tune.Tuner(
        build_trainable(sweep),
        param_space=to_param_space(sweep.dims, cfg.search.algorithm),
        tune_config=tune.TuneConfig(
            metric=cfg.metric, mode=cfg.mode, search_alg=build_search_alg(sweep),
            scheduler=build_scheduler(sweep), num_samples=cfg.num_samples,
            max_concurrent_trials=cfg.max_concurrent_trials, time_budget_s=cfg.time_budget_s,
            reuse_actors=cfg.reuse_actors,
        ),
        run_config=build_run_config(sweep),
    )


# --------------------------------------------------------------------------- Ray instance


def init_ray(cfg: TuneConfig, address: str | None) -> bool:
    """Connect to ``address`` (``auto`` / ``HOST:PORT``) or start a local instance; the dashboard,
    when on, listens on 127.0.0.1 only (it has no authentication). Returns whether this call
    connected (so the caller shuts it down again)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    import ray

    if ray.is_initialized():
        return False
    address = address or cfg.ray.address
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, TimeoutError, RuntimeError) as e:
            from mtscale.errors import ConfigError

            raise ConfigError(f"--address: found {address!r}, which Ray could not reach ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160] if str(e) else ''}); expected a running Ray head "
                              "(ray start --head) or leave it out to start a local instance") from None
        log.info("connected to Ray at %s: %s", address, ray.cluster_resources())
        return True
    # "local": always a new instance of our own, whatever else runs here (a `ray start --head`,
    # even a dead one whose address file stays behind, or RAY_ADDRESS would otherwise be joined,
    # and Ray then refuses num_cpus / num_gpus); attaching to a cluster is what --address is for.
    ray.init(address="local", num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus,
             object_store_memory=cfg.ray.object_store_memory,
             include_dashboard=cfg.ray.include_dashboard, dashboard_host="127.0.0.1",
             _system_config={"worker_niceness": cfg.ray.worker_niceness})
    log.info("started a local Ray instance: %s (trial processes at nice %d)", ray.cluster_resources(),
             cfg.ray.worker_niceness)
    return True


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A ``HOST:PORT`` address must accept a TCP connection within ``timeout_s``: Ray itself keeps
    retrying an unreachable head for minutes before it gives up with a traceback."""
    import socket

    from mtscale.errors import ConfigError

    if address in ("auto", "local") or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return
    except (OSError, ValueError) as e:
        raise ConfigError(f"--address: found {address!r}, which Ray could not reach ({e}); expected a running Ray "
                          "head (ray start --head) or leave it out to start a local instance") from None


def experiment_exists(experiment_dir: str) -> bool:
    from ray import tune

    return bool(tune.Tuner.can_restore(experiment_dir))


def run_sweep(sweep: Sweep, *, resume: bool = False) -> Any:
    """Fit the sweep, or with ``resume`` restore an interrupted one and run what remained.
    Returns the Ray ``ResultGrid``."""
    from ray import tune

    if resume:
        if not experiment_exists(sweep.experiment_dir):
            raise ConfigError(f"--resume: {sweep.experiment_dir}: no sweep to resume there, "
                              "expected the experiment dir of an interrupted `mtscale tune`")
        log.info("resuming %s (unfinished and errored trials; finished ones are kept)", sweep.experiment_dir)
        tuner = tune.Tuner.restore(sweep.experiment_dir, trainable=build_trainable(sweep),
                                   resume_unfinished=True, resume_errored=True)
    else:
        if experiment_exists(sweep.experiment_dir):
            raise ConfigError(f"{sweep.experiment_dir}: a sweep named {sweep.cfg.name!r} already exists there, "
                              "expected --resume to continue it or another name (--set name=...)")
        tuner = build_tuner(sweep)
    grid = tuner.fit()
    if sweep.cfg.scheduler.kind != "pbt":  # PBT: a repeated iteration is a real report (an exploit)
        dropped = drop_superseded_reports(grid)
        if dropped:
            log.info("dropped %d epoch report(s) that the resumed trials reported again", dropped)
    return grid


def drop_superseded_reports(grid: Any) -> int:
    """Keep the last report of each ``training_iteration`` in every trial's ``metrics_dataframe``
    (what epochs.parquet and the plots are made of); returns how many rows were dropped.

    Tune logs a result before it registers the result's checkpoint (a separate ``save`` round
    trip to the trial), and a stop signal (SIGINT) ends the loop in between: the snapshot that
    ``--resume`` restores then has the trial's last result at epoch k but its latest checkpoint
    at epoch k - 1, so the resumed trial runs epoch k again and reports it a second time. The
    later report is the one the following epochs continue from (and the one the trial's own
    metrics.jsonl keeps). Ray's own result.json / progress.csv keep both rows."""
    dropped = 0
    for result in grid:
        df = result.metrics_dataframe
        if df is None or not len(df) or "training_iteration" not in getattr(df, "columns", []):
            continue
        keep = ~df["training_iteration"].duplicated(keep="last")
        if not keep.all():
            dropped += int((~keep).sum())
            result.metrics_dataframe = df[keep].reset_index(drop=True)
    return dropped
