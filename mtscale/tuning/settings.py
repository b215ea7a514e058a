"""Typed config of a sweep (``configs/tune/*.yaml``): what to search, how, and where results go.

A tune YAML names a base fine-tuning config (``base``, a path relative to the tune YAML),
constant ``overrides`` to it, the ``pretrained`` weights every trial starts from, the search
``space`` (see tuning/space.py), the search algorithm, the scheduler, per-trial resources, and
``storage_path`` + ``name`` of the experiment. Loaded with the same machinery as every other
config (unknown keys are errors; ``--set a.b=v`` overrides).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mtscale.errors import ConfigError


@dataclass
class SearchConfig:
    algorithm: str = "random"
    """random | grid (Ray's variant generator) | optuna | hyperopt (need ``mtscale[search]``)."""
    seed: int | None = 0
    """Seed of the sampler (random / optuna / hyperopt): the same seed proposes the same configs."""

    def __post_init__(self) -> None:
        if self.algorithm not in ("random", "grid", "optuna", "hyperopt"):
            raise ConfigError(f"search.algorithm: found {self.algorithm!r}, expected random|grid|optuna|hyperopt")


@dataclass
class SchedulerConfig:
    kind: str = "asha"
    """asha (stop bad trials early) | pbt (population based training) | fifo (run all to the end)."""
    max_t: int | None = None
    """Longest a trial runs, in epochs (ASHA's max_t); None = the fine-tuning config's ``epochs``."""
    grace_period: int = 1
    """ASHA: epochs every trial runs before it can be stopped."""
    reduction_factor: float = 2.0
    """ASHA: keep the top 1/reduction_factor at each rung."""
    brackets: int = 1
    """ASHA: number of brackets (1 = plain successive halving)."""
    perturbation_interval: int = 2
    """PBT: epochs between exploit / explore steps (each needs a checkpoint, reported every epoch)."""
    quantile_fraction: float = 0.25
    """PBT: bottom fraction that copies the top fraction."""
    resample_probability: float = 0.25
    """PBT: chance a mutated value is resampled from the space instead of perturbed."""

    def __post_init__(self) -> None:
        if self.kind not in ("asha", "pbt", "fifo"):
            raise ConfigError(f"scheduler.kind: found {self.kind!r}, expected asha|pbt|fifo")
        if self.grace_period < 1 or self.perturbation_interval < 1:
            raise ConfigError("scheduler.grace_period and scheduler.perturbation_interval must be >= 1")
        if self.max_t is not None and self.max_t < self.grace_period:
            raise ConfigError(f"scheduler.max_t: found {self.max_t}, expected >= grace_period {self.grace_period}")
        if self.reduction_factor <= 1.0:
            raise ConfigError(f"scheduler.reduction_factor: found {self.reduction_factor}, expected > 1")
        if not 0.0 < self.quantile_fraction <= 0.5:
            raise ConfigError(f"scheduler.quantile_fraction: found {self.quantile_fraction}, expected in (0, 0.5]")


@dataclass
class ResourcesConfig:
    cpus_per_trial: float = 1.0
    """CPUs reserved per trial; torch intra-op threads are limited to this (at least 1)."""
    gpus_per_trial: float = 0.0
    """GPUs per trial: 0 (the trial trains on CPU, even on a GPU node: the GPUs are Ray's to
    account for), a fraction (0.5, 0.25: several trials share one GPU) or 1. A trial is one
    process on one device, so more than 1 is refused rather than reserved and left idle."""

    def __post_init__(self) -> None:
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise ConfigError(
                f"resources: found cpus_per_trial={self.cpus_per_trial}, gpus_per_trial={self.gpus_per_trial}, "
                "expected cpus > 0 and gpus >= 0"
            )
        if self.gpus_per_trial > 1:
            raise ConfigError(f"resources.gpus_per_trial: found {self.gpus_per_trial}, expected 0, a fraction or 1 "
                              "(a trial trains on one device)")

    def trial_device(self, requested: str) -> str:
        """The ``train.device`` a trial runs with, given the base config's: cpu without GPUs (else
        every trial of a GPU node would land on cuda:0 outside Ray's accounting), the GPU Ray
        assigned (CUDA_VISIBLE_DEVICES) with them."""
        if self.gpus_per_trial == 0:
            if requested == "cuda":
                raise ConfigError("train.device: found 'cuda' with resources.gpus_per_trial=0, expected a GPU per "
                                  "trial (resources.gpus_per_trial > 0) or train.device cpu / auto")
            return "cpu"
        if requested == "cpu":
            raise ConfigError(f"train.device: found 'cpu' with resources.gpus_per_trial={self.gpus_per_trial}, "
                              "expected cuda or auto (or gpus_per_trial 0)")
        return "cuda"


@dataclass
class RayConfig:
    """How the driver reaches Ray. Only used when it starts a local instance (no --address)."""

    address: str | None = None
    """``auto`` / ``HOST:PORT`` of an existing cluster (``--address`` wins); None = start a local one."""
    num_cpus: int | None = None
    """Local instance: CPUs Ray may schedule (None = all)."""
    num_gpus: int | None = None
    object_store_memory: int | None = 200_000_000
    """Local instance: object store bytes (trials pass little data through it)."""
    include_dashboard: bool = False
    """Local instance: the dashboard has no authentication; it binds to 127.0.0.1 only."""
    worker_niceness: int = 0
    """Local instance: niceness Ray adds to its trial processes (over its own, 0 as a rule).
    Ray's default, 15, puts every trial behind any other process on the machine: next to two
    training runs a quickstart trial's epoch took 42 s instead of the 2.4 s of the same
    fine-tuning outside Ray. 0 = the same priority as the rest; raise it to keep the machine
    responsive to other work."""

    def __post_init__(self) -> None:
        if not 0 <= self.worker_niceness <= 19:
            raise ConfigError(f"ray.worker_niceness: found {self.worker_niceness}, expected 0..19 (a nice value)")


@dataclass
class TuneConfig:
    base: str = ""
    """Base fine-tuning YAML, relative to this tune YAML (or absolute)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Constant changes to the base config, dotted (``train.epochs: 3``) or nested."""
    pretrained: str | None = None
    """Pre-trained weights every trial starts from (sets the fine-tuning ``pretrained``)."""
    name: str = "tune"
    """Experiment name: results go to ``<storage_path>/<name>``."""
    storage_path: str = "runs/tune"
    """Local folder (made absolute) or a URL (``s3://``, ``gs://``) every node can reach."""
    metric: str = "val_top1"
    """Reported metric the scheduler and the best-trial choice use (val_top1, val_loss, ...)."""
    mode: str = "max"
    """max | min."""
    num_samples: int = 1
    """Samples of the space (times the number of grid points)."""
    max_concurrent_trials: int | None = None
    """Trials running at once (None = as many as resources allow)."""
    time_budget_s: float | None = None
    """Stop starting / running trials after this many seconds (None = no limit)."""
    space: dict[str, Any] = field(default_factory=dict)
    """Searched keys -> specs (see mtscale/tuning/space.py)."""
    search: SearchConfig = field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    reuse_actors: bool = True
    """Run the next trial in the finished trial's worker process (skips ~10 s of imports per trial)."""
    max_failures: int = 2
    """Times a failed trial is retried (from its last checkpoint) before it counts as errored."""
    keep_checkpoints: int = 2
    """Checkpoints Tune keeps per trial (the latest ones; PBT and retries restore from them)."""
    ray: RayConfig = field(default_factory=RayConfig)
    plots: bool = True
    """Write PNG plots (metric per epoch per trial; final metric against each hyper-parameter)."""
    verbose: int = 1
    """Ray Tune console verbosity (0 silent, 1 status table, 2 every result)."""
    fail_first_attempt: bool = False
    """FAULT INJECTION FOR TESTS: every trial raises after reporting its first epoch, once
    (a marker file in its trial dir remembers), so the retry path is exercised. Never in real use."""

    def __post_init__(self) -> None:
        if not self.base:
            raise ConfigError("base: missing, expected the path of a fine-tuning YAML")
        if self.mode not in ("max", "min"):
            raise ConfigError(f"mode: found {self.mode!r}, expected max or min")
        if self.num_samples < 1:
            raise ConfigError(f"num_samples: found {self.num_samples}, expected >= 1")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ConfigError(f"max_concurrent_trials: found {self.max_concurrent_trials}, expected >= 1 or null")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ConfigError(f"time_budget_s: found {self.time_budget_s}, expected > 0 or null")
        if self.max_failures < 0 or self.keep_checkpoints < 1:
            raise ConfigError("max_failures must be >= 0 and keep_checkpoints >= 1")
        if not self.name or "/" in self.name:
            raise ConfigError(f"name: found {self.name!r}, expected a non-empty name without '/'")
