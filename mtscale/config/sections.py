"""The config sections shared by pre-training and fine-tuning: ``data`` (with ``augment``),
``model``, ``objective``, ``train`` and ``run``. Each field's docstring is its reference; each
section validates itself in ``__post_init__`` with a one-line error naming the dotted field."""

from __future__ import annotations

from dataclasses import dataclass, field

from mtscale.errors import ConfigError


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
    where it was (the projection's weights are the only new keys). In masked pre-training the
    MAE decoder gets the same term (its own zero-initialised projection), so hidden tokens'
    times reach the decoder too."""
    graph_stem: int = 0
    """Blocks of an ST-GCN-style stem (patch tokens; 0 = off): graph convolution over the
    layout's skeleton (learned adjacency) + width-9 temporal convolution on every frame, pooled
    per temporal patch and joint, added to the token embeddings through a zero-initialised
    projection (an encoder pre-trained without it loads and starts exactly where it was). It sees
    every frame, hidden tokens' too, so masked pre-training refuses it: a fine-tuning / from-scratch
    option (models/layers.py ``GraphStem``)."""
    graph_stem_width: int = 64
    """Channels of the graph stem's blocks (with ``graph_stem_pyramid``: of its first stage)."""
    graph_stem_pyramid: bool = False
    """The reference ST-GCN's shape for the stem: stages of width ``graph_stem_width`` x 1, 2, 4,
    ..., each later one opening with a temporal stride of 2, down to one step per temporal patch
    (log2(patch_frames) + 1 stages; 6 blocks over 4-frame patches: widths 64, 64, 128, 128, 256,
    256 at 1, 1, 1/2, 1/2, 1/4, 1/4 of the frame rate). False: every block at ``graph_stem_width``
    and the full frame rate, each patch's frames averaged."""

    def __post_init__(self) -> None:
        if self.attention not in ("global", "spatial"):
            raise ConfigError(f"model.attention: found {self.attention!r}, expected global|spatial")
        if self.temporal_conv < 0 or (self.temporal_conv and self.temporal_conv % 2 == 0):
            raise ConfigError(f"model.temporal_conv: found {self.temporal_conv}, expected 0 (off) or an odd width")
        if self.joint_mix not in ("none", "identity", "adjacency"):
            raise ConfigError(f"model.joint_mix: found {self.joint_mix!r}, expected none|identity|adjacency")
        if self.graph_stem < 0 or self.graph_stem_width < 1:
            raise ConfigError(f"model.graph_stem / graph_stem_width: found {self.graph_stem} / "
                              f"{self.graph_stem_width}, expected >= 0 blocks and a width >= 1")
        if self.graph_stem_pyramid and not self.graph_stem:
            raise ConfigError("model.graph_stem_pyramid: found true with graph_stem 0, expected graph_stem >= 1 "
                              "(the pyramid shapes the stem's blocks)")
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
    optimizer: str = "adamw"
    """adamw | sgd (momentum ``momentum``, Nesterov if ``nesterov``; weight decay coupled, as in
    torch.optim.SGD: the GCN recipes' lr 0.1, weight_decay 4e-4). Fine-tuning only: pre-training
    runs DeepSpeed's AdamW."""
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW only."""
    momentum: float = 0.9
    """SGD only."""
    nesterov: bool = True
    """SGD only (ignored at momentum 0)."""
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
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"train.optimizer: found {self.optimizer!r}, expected adamw|sgd")
        for name, ok, want in (("lr", self.lr > 0, "> 0"), ("min_lr", 0 <= self.min_lr <= self.lr, "in [0, train.lr]"),
                               ("weight_decay", self.weight_decay >= 0, ">= 0"),
                               ("grad_clip", self.grad_clip >= 0, ">= 0 (0 = off)"),
                               ("adam_eps", self.adam_eps > 0, "> 0"),
                               ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
                               ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                                "two values in [0, 1)")):
            if not ok:
                raise ConfigError(f"train.{name}: found {getattr(self, name)!r}, expected {want}")


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: resolved config, metrics.jsonl, TensorBoard events, checkpoints, plots."""
    name: str = ""
    progress: bool = True
    export_encoder: bool = True
    """Write ``<dir>/encoder.safetensors`` (+ ``encoder.json``) at the end of the run."""
    tensorboard: bool = True
