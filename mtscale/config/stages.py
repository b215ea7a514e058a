"""The two stages' configs, composed of the shared sections: ``PretrainConfig`` (with its
step-scheduled, DeepSpeed-aware ``train`` section) and ``FinetuneConfig`` (epochs, protocol,
validation hold-out, classifier head)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mtscale.config.sections import DataConfig, ModelConfig, ObjectiveConfig, RunConfig, TrainConfig
from mtscale.errors import ConfigError


@dataclass
class PretrainTrainConfig(TrainConfig):
    """Pre-training's ``train`` section: the shared settings, its step schedule and cadence,
    and the DeepSpeed / ZeRO settings (written into the generated DeepSpeed config)."""

    max_steps: int = 1000
    warmup_steps: int = 100
    log_every: int = 10
    ckpt_every: int = 200
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    zero_bucket_size: int = 200_000_000
    """Elements per ZeRO all-gather / reduce bucket."""
    zero_overlap_comm: bool | None = None
    """Overlap ZeRO communication with compute; None = on for CUDA, off for CPU."""
    zero3_param_persistence_threshold: int = 100_000
    """ZeRO-3: parameters with fewer elements stay whole on every rank."""
    zero3_max_live_parameters: int = 1_000_000_000
    zero3_prefetch_bucket_size: int = 50_000_000

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.optimizer != "adamw":
            raise ConfigError(f"train.optimizer: found {self.optimizer!r}; pre-training runs DeepSpeed's AdamW, "
                              "expected adamw")
        if self.ckpt_every < 1 or self.log_every < 1:
            raise ConfigError("train.ckpt_every and train.log_every must be >= 1")
        if self.max_steps < 1:
            raise ConfigError(f"train.max_steps: found {self.max_steps}, expected >= 1")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps: found {self.warmup_steps}, expected >= 0")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage: found {self.zero_stage}, expected 0, 1, 2 or 3")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError(f"train.offload_params: needs train.zero_stage 3, found {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("train.offload_optimizer: needs train.zero_stage 1, 2 or 3, found 0")


@dataclass
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)
    run: RunConfig = field(default_factory=RunConfig)


@dataclass
class FinetuneConfig:
    """Supervised training of a classifier on an encoder (see mtscale/train/finetune.py).

    One loop, four protocols: ``finetune`` (pre-trained encoder, all weights train),
    ``linear`` (frozen pre-trained encoder, a linear head on standardised cached features),
    ``semi`` (``finetune`` on a class-stratified ``data.label_fraction`` < 1 of the labels),
    ``scratch`` (random-init encoder, all weights train). The schedule is in epochs
    (``epochs``, ``warmup_epochs``); ``train`` is the shared ``TrainConfig`` (no step counts,
    no DeepSpeed / ZeRO fields: fine-tuning runs DDP).
    """

    protocol: str = "finetune"
    """finetune | linear | semi | scratch."""
    pretrained: str | None = None
    """Exported encoder (``encoder.safetensors``) or a pre-training run / checkpoint dir;
    required by finetune, linear and semi; must be unset for scratch."""
    pretrained_partial: bool = False
    """Accept a pre-training run that has not finished (preempted or crashed: no exported
    encoder) and fine-tune its latest checkpoint; off, such a run is refused."""
    allow_stream_mismatch: bool = False
    """Fine-tune on ``data.stream`` although the pre-trained encoder was trained on another
    stream with as many channels (e.g. a joint encoder on the bone stream): logged as a
    warning; False: that is an error naming both streams."""
    encoder_blocks: int | None = None
    """Keep only the first N blocks of the pre-trained encoder (then its final norm): probe or
    fine-tune an intermediate layer's features. The classifier then has N blocks; None = all."""
    probe_views: int = 1
    """Linear probe only: clips cached per training sample. 1 = its centre crop (MAE's cached
    probe); K > 1 adds K - 1 training views (random crop, ``data.sampling``, ``data.augment``;
    seeded, so a resumed run caches the same ones), and each epoch every sample trains on one
    of its K views, drawn per (seed, epoch). Feature memory and extraction time grow K-fold."""
    epochs: int = 100
    warmup_epochs: float = 5.0
    """Linear warmup length, then cosine decay to ``train.min_lr`` at the last epoch."""
    layer_decay: float = 0.75
    """Layer-wise lr decay: block i of depth D trains at lr * layer_decay ** (D + 1 - (i + 1)); 1 = off."""
    label_smoothing: float = 0.1
    mixup: float = 0.0
    """Mixup Beta(alpha, alpha) on the training batch (0 = off)."""
    ema: float = 0.0
    """Exponential moving average of the weights, decay per optimizer step (e.g. 0.999; 0 = off;
    the decay ramps up as min(ema, (1 + step) / (10 + step))). When on, the averaged weights are
    what is validated, saved as the classifier, and scored on the test part (a rule fixed in
    advance, never chosen on the test split); training continues on the raw weights."""
    head_drop: float = 0.0
    """Dropout before the classifier (with ``pool=joint``: on the concatenated joint features)."""
    pool: str = "mean"
    """Classifier head: ``mean`` (mean over all tokens -> LayerNorm -> linear) or ``joint``
    (MAMP's fine-tuning head: mean over time per joint, joints concatenated -> linear to
    ``head_hidden`` + BatchNorm + ReLU -> linear). A linear probe is one linear layer on
    either: the mean (D features, MAMP's probe) or the concatenated joint columns (V x D)."""
    head_hidden: int = 2048
    """Hidden width of the ``joint`` head."""
    val_fraction: float = 0.1
    """Class-stratified, seeded share of the training part held out for validation (model
    selection never looks at the test part). Ignored when ``val_part`` is set; 0 = no validation."""
    val_group: list[str] | None = None
    """Manifest columns whose values tie samples together (e.g. ``[action, subject,
    environment]``: the views of one NW-UCLA take; ``[subject]``: a performer): the
    ``val_fraction`` hold-out takes whole groups, so no twin of a validation sample trains
    (chosen per class when each group holds one class, as takes do; among all groups at once
    when groups span classes, as performers do: ``data/subsets.grouped_fraction_subset``).
    None = single samples."""
    val_part: str | None = None
    """Use this value of the split column (e.g. ``val``) as validation instead of a held-out share."""
    val_where: str | None = None
    """Validate on the training part's rows matching this manifest filter (``data.where``'s syntax)
    instead of a held-out share; they leave training. ``"view == 2"`` on NW-UCLA's views 1+2 is a
    cross-view hold-out: the model trains on view 1 and is judged on a camera it never saw, as the
    test view judges the final model (the whole-take ``val_group`` hold-out only measures new takes
    from the training cameras). ``val_fraction`` / ``val_group`` are then ignored."""
    test_part: str | None = "test"
    """Value of the split column evaluated after the last epoch (None = no test evaluation)."""
    eval_clips: int = 1
    """Clips averaged per test sample (1 = the centre crop)."""
    eval_batch_size: int | None = None
    """Per-rank batch for evaluation / feature extraction (None = 2 x the training micro batch)."""
    keep_best: bool = True
    """Also keep the best-on-validation checkpoint and report its test accuracy."""
    seeds: list[int] | None = None
    """Run once per seed (``train.seed`` is replaced) and report mean ± std; None = [train.seed]."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.protocol not in ("finetune", "linear", "semi", "scratch"):
            raise ConfigError(f"protocol: found {self.protocol!r}, expected finetune|linear|semi|scratch")
        if self.protocol == "scratch" and self.pretrained:
            raise ConfigError(f"pretrained: found {self.pretrained!r} with protocol scratch, expected none")
        if self.protocol == "semi" and self.data.label_fraction >= 1.0:
            raise ConfigError("data.label_fraction: found 1.0 with protocol semi, expected a fraction < 1 (e.g. 0.1)")
        if self.encoder_blocks is not None and (self.protocol == "scratch" or self.encoder_blocks < 1):
            raise ConfigError(f"encoder_blocks: found {self.encoder_blocks} with protocol {self.protocol}, expected "
                              "null, or >= 1 with a pre-trained encoder (from scratch, set model.depth)")
        if self.probe_views < 1 or (self.probe_views > 1 and self.protocol != "linear"):
            raise ConfigError(f"probe_views: found {self.probe_views} with protocol {self.protocol}, expected 1, "
                              "or > 1 with protocol linear (the other protocols train on fresh views every epoch)")
        if self.epochs < 1:
            raise ConfigError(f"epochs: found {self.epochs}, expected >= 1")
        if not 0.0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError(f"warmup_epochs: found {self.warmup_epochs}, expected in [0, epochs={self.epochs}]")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"layer_decay: found {self.layer_decay}, expected in (0, 1]")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema: found {self.ema}, expected 0 (off) or a decay in (0, 1)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing: found {self.label_smoothing}, expected in [0, 1)")
        if self.mixup < 0.0:
            raise ConfigError(f"mixup: found {self.mixup}, expected >= 0")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction: found {self.val_fraction}, expected in [0, 1)")
        if self.val_where is not None and self.val_part is not None:
            raise ConfigError(f"val_where: found {self.val_where!r} together with val_part {self.val_part!r}, "
                              "expected one of them")
        if self.val_group is not None and not self.val_group:
            raise ConfigError("val_group: found an empty list, expected manifest column names (or null)")
        if self.eval_clips < 1:
            raise ConfigError(f"eval_clips: found {self.eval_clips}, expected >= 1")
        if self.pool not in ("mean", "joint"):
            raise ConfigError(f"pool: found {self.pool!r}, expected 'mean' or 'joint'")
        if self.head_hidden < 1:
            raise ConfigError(f"head_hidden: found {self.head_hidden}, expected >= 1")
        if self.seeds is not None and not self.seeds:
            raise ConfigError("seeds: found an empty list, expected at least one seed (or null)")

    @property
    def needs_pretrained(self) -> bool:
        return self.protocol in ("finetune", "linear", "semi")
