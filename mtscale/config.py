"""Typed configuration: YAML -> nested dataclasses -> ``--set a.b=v`` overrides -> validation.

Unknown keys are errors naming the dotted field. The resolved config (``to_dict``) is written
beside every run's outputs and into every checkpoint. Each stage takes the section it needs.

Sections shared by pre-training and fine-tuning live here; ``PretrainConfig`` and
``FinetuneConfig`` compose them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mtscale.errors import ConfigError

T = TypeVar("T")


# --------------------------------------------------------------------------- sections


@dataclass
class AugmentConfig:
    """Batched augmentations, run as torch ops on the training device (see data/augment.py)."""

    rotate_deg: float = 0.0
    """Maximum absolute random rotation about each axis in ``rotate_axes``, degrees (0 = off)."""
    rotate_axes: str = "xyz"
    """Axes rotated by ``rotate_deg``: any of x, y, z (CTR-GCN's NW-UCLA feeder: ``xy``, with y
    the vertical axis, so views change in azimuth and elevation but the body stays upright)."""
    scale: float = 0.0
    """Random isotropic scale in [1 - scale, 1 + scale] (0 = off)."""
    shear: float = 0.0
    """Random shear magnitude (0 = off)."""
    jitter_std: float = 0.0
    """Std of Gaussian joint jitter, in the store's units (0 = off)."""
    body_swap_p: float = 0.0
    """Probability of swapping body order in a sample."""
    time_mask_frames: int = 0
    """Length of one random block of frames zeroed per sample (0 = off)."""
    drop_joint_p: float = 0.0
    """Probability that each joint of a sample is zeroed for the whole clip (SkateFormer's
    joint dropping; 0 = off)."""
    drop_axis_p: float = 0.0
    """Probability that a sample loses one coordinate axis (x, y or z drawn uniformly), zeroed in
    every frame (SkateFormer's axis dropping; 0 = off)."""

    def __post_init__(self) -> None:
        for name in ("drop_joint_p", "drop_axis_p"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"data.augment.{name}: found {getattr(self, name)}, expected in [0, 1)")
        if not self.rotate_axes or set(self.rotate_axes) - set("xyz") or len(set(self.rotate_axes)) != len(self.rotate_axes):
            raise ConfigError(
                f"data.augment.rotate_axes: found {self.rotate_axes!r}, expected distinct letters of 'xyz'"
            )


@dataclass
class DataConfig:
    """Which samples to read, and how clips are cut from them."""

    store: str = ""
    """Path or fsspec URL of a store written by ``mtscale prepare``."""
    split: str | None = None
    """Split column name without the ``split_`` prefix (e.g. ``xsub60``); None = all samples."""
    part: str = "train"
    """Value of the split column to select (``train``, ``test``, ``val``)."""
    where: str | None = None
    """Extra manifest filter, e.g. ``"performer in (1, 2) and num_bodies == 1"``."""
    label_fraction: float = 1.0
    """Class-stratified seeded subset of the labelled samples (semi-supervised protocols)."""
    clip_frames: int = 120
    """T: frames per clip after crop + resample."""
    num_bodies: int = 2
    """M: bodies per clip (at most the store's M)."""
    crop_min: float = 0.5
    """Training crops keep a random fraction in [crop_min, crop_max] of the valid frames."""
    crop_max: float = 1.0
    num_workers: int = 2
    """DataLoader worker processes (spawned or forkserver; each opens the store lazily)."""
    shuffle_buffer: int = 4096
    """Samples held in the bounded shuffle buffer (a window; each worker holds its raw frames,
    e.g. 4096 NTU samples ~ 100-200 MB in float16)."""
    eval_crop: float = 0.95
    """Evaluation clips: the centre ``eval_crop`` fraction of the valid frames (MAMP: 0.95)."""
    short_clips: str = "resample"
    """Crops shorter than T: ``resample`` (stretch to T, mask all valid) or ``pad`` (copy the
    frames, zero-pad to T, mask False on padding). Longer crops are always resampled."""
    sampling: str = "resample"
    """How a training crop becomes T frames: ``resample`` (linear resample, MAMP's feeder) or
    ``random`` (T frames drawn uniformly with replacement, in time order: CTR-GCN's NW-UCLA
    feeder; with ``crop_min = crop_max = 1`` over the whole sequence). Evaluation always
    resamples its centre crop."""
    subset_seed: int = 0
    """Seed of the label-fraction subset (independent of the training seed)."""
    normalize: str = "none"
    """Per-clip coordinate normalisation, after augmentation, in training, evaluation and
    prediction alike: ``none``, or ``minmax`` (each coordinate axis of each clip mapped to
    [-1, 1] over its present joints and valid frames, as CTR-GCN's NW-UCLA feeder does)."""
    stream: str = "joint"
    """Input stream, computed on the training device after augmentation and ``normalize``, in
    pre-training, fine-tuning, evaluation and prediction alike (see data/streams.py): ``joint``
    (coordinates), ``bone`` (joint minus its parent in the layout's tree; the root's is 0),
    ``joint_motion`` / ``bone_motion`` (x[t+1] - x[t]; 0 at the last valid frame and in padding),
    or several joined by ``+`` (e.g. ``joint+bone``: concatenated on C, the encoder reads 3 x
    streams channels). Recorded in the exported encoder and the classifier's meta.json."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if not 0.0 < self.label_fraction <= 1.0:
            raise ConfigError(f"data.label_fraction: found {self.label_fraction}, expected in (0, 1]")
        if not 0.0 < self.crop_min <= self.crop_max <= 1.0:
            raise ConfigError(
                f"data.crop_min/crop_max: found {self.crop_min}/{self.crop_max}, "
                "expected 0 < crop_min <= crop_max <= 1"
            )
        if self.clip_frames < 1 or self.num_bodies < 1:
            raise ConfigError("data.clip_frames and data.num_bodies must be >= 1")
        if not 0.0 < self.eval_crop <= 1.0:
            raise ConfigError(f"data.eval_crop: found {self.eval_crop}, expected in (0, 1]")
        if self.sampling not in ("resample", "random"):
            raise ConfigError(f"data.sampling: found {self.sampling!r}, expected resample|random")
        if self.short_clips not in ("resample", "pad"):
            raise ConfigError(f"data.short_clips: found {self.short_clips!r}, expected resample|pad")
        if self.normalize not in ("none", "minmax"):
            raise ConfigError(f"data.normalize: found {self.normalize!r}, expected none|minmax")
        from mtscale.data.streams import parse_stream

        parse_stream(self.stream, "data.stream")
        if self.num_workers < 0 or self.shuffle_buffer < 1:
            raise ConfigError(
                f"data.num_workers/shuffle_buffer: found {self.num_workers}/{self.shuffle_buffer}, "
                "expected num_workers >= 0 and shuffle_buffer >= 1"
            )


@dataclass
class ModelConfig:
    """Encoder architecture. ``size`` picks a row of the registry in models/encoder.py;
    fields left as None take that row's value."""

    size: str = "tiny"
    tokenization: str = "patch"
    """``frame``: one token per frame (all joints of all bodies); ``patch``: one token per
    (patch_frames frames x joint), MAMP-style."""
    patch_frames: int = 4
    dim: int | None = None
    depth: int | None = None
    heads: int | None = None
    mlp_ratio: float | None = None
    drop_path: float = 0.0
    attn_backend: str = "auto"
    """SDPA backend: auto | flash | efficient | cudnn | math."""
    checkpoint_activations: bool = False
    compile: bool = False
    qkv_bias: bool = True
    """Bias on the fused QKV projection (MAE/MAMP use one)."""
    rel_bias: bool = False
    """Patch tokens: a learned attention bias per head for every (joint, joint) pair and every
    temporal-patch offset, added to the attention logits of all blocks (zero at init; Swin-style
    relative position bias over the skeleton's joints). Costs one (B, H, L, L) bias on the
    masked encoder's visible tokens; meant for small data (NW-UCLA), off by default."""
    temporal_conv: int = 0
    """Width (odd, frames of tokens) of a depthwise temporal convolution over each joint's tokens
    in every encoder block, parallel to attention behind a zero-initialised gate (0 = off); see
    models/layers.py."""
    joint_mix: str = "none"
    """Per-head learned (V, V) joint mixing of the attention values, behind a zero-initialised
    gate (patch tokens): ``none`` | ``identity`` | ``adjacency`` (initialised to the layout's
    normalised skeleton adjacency)."""
    attn_drop: float = 0.0
    """Dropout on the attention weights of the encoder (training only; SkateFormer: 0.5)."""
    attention: str = "global"
    """Which tokens attend each other (patch tokens): ``global`` (all) | ``spatial`` (only the
    joints of the same temporal patch; time is then mixed by ``temporal_conv`` and the position
    embeddings, as in Hyperformer's / ST-GCN's factorised blocks). Changes what the weights
    compute: a fine-tuned model keeps its pre-trained encoder's choice."""
    time_index: bool = False
    """Add an embedding of each token's time in the recording to its input: the original frame
    index of its frames (the loader's ``batch["time"]``: crop start + resample position, or the
    drawn frame with ``data.sampling: random``), as sinusoidal features through a
    zero-initialised projection (SkateFormer encodes the original index of sampled frames). The
    learned temporal position says where a token sits in the T-frame clip, not how long the
    action took; this says that. Zero at init: an encoder without it loads and starts exactly
    where it was (the projection's weights are the only new keys)."""

    def __post_init__(self) -> None:
        if self.attention not in ("global", "spatial"):
            raise ConfigError(f"model.attention: found {self.attention!r}, expected global|spatial")
        if self.temporal_conv < 0 or (self.temporal_conv and self.temporal_conv % 2 == 0):
            raise ConfigError(f"model.temporal_conv: found {self.temporal_conv}, expected 0 (off) or an odd width")
        if self.joint_mix not in ("none", "identity", "adjacency"):
            raise ConfigError(f"model.joint_mix: found {self.joint_mix!r}, expected none|identity|adjacency")
        if not 0.0 <= self.attn_drop < 1.0:
            raise ConfigError(f"model.attn_drop: found {self.attn_drop}, expected in [0, 1)")
        if self.tokenization not in ("frame", "patch"):
            raise ConfigError(f"model.tokenization: found {self.tokenization!r}, expected 'frame' or 'patch'")
        if self.attn_backend not in ("auto", "flash", "efficient", "cudnn", "math"):
            raise ConfigError(
                f"model.attn_backend: found {self.attn_backend!r}, expected auto|flash|efficient|cudnn|math"
            )


@dataclass
class ObjectiveConfig:
    """Self-supervised objective; the loss is taken on masked / hidden tokens only."""

    kind: str = "masked_motion"
    """``motion_flow`` | ``masked_motion`` | ``masked_recon``."""
    mask_ratio: float = 0.9
    masking: str = "motion_aware"
    """``random`` | ``motion_aware`` (MAMP: sample masked tokens by motion magnitude)."""
    motion_aware_tau: float = 0.75
    decoder_dim: int = 256
    decoder_depth: int = 3
    decoder_heads: int = 8
    norm_target: str = "token"
    """``token``: normalise each token's target (mean 0, var 1 over its features), as MAMP / MAE
    do; ``global``: divide all targets by one scale, their RMS over the batch's loss tokens (keeps
    which joints move and by how much: per-token normalisation turns the motion of a still joint
    into unit-variance sensor noise; the scale is per micro-batch, so unlike ``token`` the loss is
    not exactly additive across ranks); ``none``: raw targets (metres)."""

    def __post_init__(self) -> None:
        if self.kind not in ("motion_flow", "masked_motion", "masked_recon"):
            raise ConfigError(
                f"objective.kind: found {self.kind!r}, expected motion_flow|masked_motion|masked_recon"
            )
        if self.masking not in ("random", "motion_aware"):
            raise ConfigError(f"objective.masking: found {self.masking!r}, expected random|motion_aware")
        if self.norm_target not in ("token", "global", "none"):
            raise ConfigError(f"objective.norm_target: found {self.norm_target!r}, expected token|global|none")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"objective.mask_ratio: found {self.mask_ratio}, expected in (0, 1)")


@dataclass
class TrainConfig:
    """Settings every training run has (fine-tuning's ``train`` section): seed, batch,
    optimiser, precision, device. Pre-training adds its step schedule and the DeepSpeed /
    ZeRO settings (``PretrainTrainConfig``); fine-tuning's schedule is in epochs
    (``FinetuneConfig.epochs`` / ``warmup_epochs``) and it runs DDP, not ZeRO."""

    seed: int = 0
    batch_size: int = 64
    """Global batch = micro_batch_size x world size x gradient accumulation steps."""
    micro_batch_size: int | None = None
    """Per-rank batch per step; None = batch_size / world size (no accumulation)."""
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    """Gradient norm clipping (0 = off)."""
    adam_eps: float = 1e-8
    precision: str = "auto"
    """auto (CUDA: bf16 where supported, else fp16; CPU: fp32, see train/engine.resolve_precision)
    | fp32 | bf16 | fp16."""
    keep_checkpoints: int = 2
    device: str = "auto"
    """auto (cuda:LOCAL_RANK when CUDA is visible, else cpu) | cpu | cuda."""

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device: found {self.device!r}, expected auto|cpu|cuda")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"train.keep_checkpoints: found {self.keep_checkpoints}, expected >= 1")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"train.precision: found {self.precision!r}, expected auto|fp32|bf16|fp16")
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size: found {self.batch_size}, expected >= 1")
        for name, ok, want in (("lr", self.lr > 0, "> 0"), ("min_lr", 0 <= self.min_lr <= self.lr, "in [0, train.lr]"),
                               ("weight_decay", self.weight_decay >= 0, ">= 0"),
                               ("grad_clip", self.grad_clip >= 0, ">= 0 (0 = off)"),
                               ("adam_eps", self.adam_eps > 0, "> 0"),
                               ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                                "two values in [0, 1)")):
            if not ok:
                raise ConfigError(f"train.{name}: found {getattr(self, name)!r}, expected {want}")


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
class RunConfig:
    dir: str = "runs/default"
    """Run directory: resolved config, metrics.jsonl, TensorBoard events, checkpoints, plots."""
    name: str = ""
    progress: bool = True
    export_encoder: bool = True
    """Write ``<dir>/encoder.safetensors`` (+ ``encoder.json``) at the end of the run."""
    tensorboard: bool = True


@dataclass
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)
    run: RunConfig = field(default_factory=RunConfig)


# --------------------------------------------------------------------------- machinery


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check / convert a YAML value to the annotated type; raise ConfigError naming path."""
    origin = typing.get_origin(tp)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: found {type(value).__name__}, expected a mapping")
        return from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: found {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}: found {value!r}, expected a list of {len(args)} values")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (list,):
        (a,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: found {value!r}, expected a list")
        return [_coerce(v, a, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: found {value!r}, expected a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: found {value!r}, expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: found {value!r}, expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: found {value!r}, expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: found {value!r}, expected a string")
    return value


def from_dict(cls: type[T], data: dict, path: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys raise ConfigError naming them."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key, expected one of {sorted(names)}")
    kwargs = {}
    for k, v in data.items():
        kwargs[k] = _coerce(v, hints[k], f"{path}.{k}" if path else k)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - missing required fields
        raise ConfigError(f"{path or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> Any:
    """Plain-data (YAML/JSON-safe) form of a config dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def set_dotted(data: dict, key: str, value: Any, where: str = "--set") -> None:
    """``data[a][b][c] = value`` for ``key = "a.b.c"``, creating sections as needed: the one
    dotted-key setter (``--set``, sweep spaces and overrides, trial configs). ``where`` names the
    source in errors."""
    node = data
    parts = key.strip().split(".")
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            name = f"{where} {key}" if where.startswith("--") else f"{where}.{key}"
            raise ConfigError(f"{name}: {p} is a value ({nxt!r}), expected a section")
        node = nxt
    node[parts[-1]] = value


def get_dotted(data: dict, key: str) -> Any:
    """``data[a][b][c]`` for ``key = "a.b.c"``; None where a part is missing."""
    node: Any = data
    for p in key.split("."):
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def apply_overrides(data: dict, sets: list[str] | None) -> dict:
    """Apply ``a.b=v`` overrides (v parsed as YAML) to a nested mapping, in place."""
    for item in sets or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=1e-3")
        key, raw = item.split("=", 1)
        set_dotted(data, key, yaml.safe_load(raw) if raw != "" else "")
    return data


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file whose top level is a mapping (empty file -> {}); one-line errors otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: found {type(data).__name__} at top level, expected a mapping")
    return data


def load_config(cls: type[T], path: str | Path | None = None, sets: list[str] | None = None) -> T:
    """YAML file (optional) + overrides -> validated ``cls`` instance."""
    data: dict = read_yaml_mapping(path) if path is not None else {}
    apply_overrides(data, sets)
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from mtscale.files import atomic_write

    atomic_write(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# --------------------------------------------------------------------------- fine-tuning


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
