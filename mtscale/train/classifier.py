"""The fine-tuned classifier as a file: build it (from scratch or a pre-trained encoder,
keys checked exactly), save it, load it back for evaluate / predict.

A classifier checkpoint is a folder::

    model.safetensors   fp32 state dict of ``ClassifierHead`` (``encoder.*``, ``fc_norm.*``, ``head.*``;
                        ``fc_norm`` holds the hidden layer + BatchNorm with ``pool = "joint"``)
    meta.json           everything evaluate / predict need: model section, clip geometry
                        (clip_frames, num_bodies, num_joints, layout, in_chans), the input
                        ``stream`` (also in the data section), class names, the store's
                        preprocessing, the data section (crops), protocol, epoch, metrics

A linear probe (``head = "linear"``) has no ``fc_norm``: the feature standardisation it was
trained with is folded into ``head.weight`` / ``head.bias``, so it runs on raw features.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtscale.config import FinetuneConfig, ModelConfig, from_dict, to_dict
from mtscale.errors import BadInputError, ConfigError
from mtscale.models.encoder import ClassifierHead, MotionTransformer, resolve_size

log = logging.getLogger(__name__)

FORMAT = "mtscale-classifier/1"
WEIGHTS = "model.safetensors"
META = "meta.json"
# Model fields that only change how the architecture runs (not its weights): taken from the
# fine-tuning config even when the architecture comes from the pre-trained file.
RUNTIME_FIELDS = ("drop_path", "attn_backend", "checkpoint_activations", "compile", "attn_drop")
# Model fields that add new, zero-gated branches (models/layers.py; the encoder's time_proj): the
# fine-tuning config may turn them on over a pre-trained encoder built without them; the branches'
# parameters are then the only keys the file lacks, and the encoder starts exactly where
# pre-training left it.
ADDABLE_FIELDS = {"temporal_conv": 0, "joint_mix": "none", "time_index": False, "graph_stem": 0}
# ... and the fields that shape such a branch: taken from the fine-tuning config with it
ADDABLE_SHAPE = {"graph_stem": ("graph_stem_width", "graph_stem_pyramid")}


# --------------------------------------------------------------------------- encoder


def _encoder_file(path: Path) -> Path | None:
    """The exported encoder: ``path`` itself if a file, else ``path/encoder.safetensors`` (a run dir)."""
    if path.is_file():
        return path
    cand = path / "encoder.safetensors"
    return cand if cand.is_file() else None


def load_pretrained(path: str | Path, *, allow_partial: bool = False) -> tuple[MotionTransformer, dict[str, Any]]:
    """Encoder + meta from an exported ``.safetensors`` file, a pre-training run directory
    (its ``encoder.safetensors``, else its latest checkpoint, consolidated) or a checkpoint dir.
    Keys are checked exactly by ``mtscale.train.checkpoint.load_encoder``.

    A run directory without an exported encoder is an unfinished run (preempted, crashed or
    still running): refused unless ``allow_partial`` (config ``pretrained_partial``), and then
    loaded with a warning that names the step."""
    from mtscale.train.checkpoint import export_encoder, load_encoder

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"pretrained: found {str(p)!r}, which does not exist; expected an encoder "
                          ".safetensors file or a pre-training run / checkpoint directory")
    f = _encoder_file(p)
    if f is not None:
        return load_encoder(f)
    status = _run_status(p)
    if status.get("state") != "finished":
        what = (f"a {status['state']} pre-training run (step {status.get('step')})" if status.get("state")
                else "a pre-training run that has not finished (no status.json, no encoder.safetensors)")
        if not allow_partial:
            raise ConfigError(f"pretrained: found {str(p)!r}, {what}; expected a finished run (resume it first), "
                              "or --set pretrained_partial=true to fine-tune its latest checkpoint")
        log.warning("pretrained: %s is %s; using its latest checkpoint as asked (pretrained_partial)", p, what)
    with tempfile.TemporaryDirectory(prefix="mtscale-encoder-") as tmp:
        out = export_encoder(p, Path(tmp) / "encoder.safetensors")
        return load_encoder(out)


def _run_status(p: Path) -> dict[str, Any]:
    """``status.json`` of a pre-training run dir (or of the run above a checkpoints dir); {} if none."""
    for d in (p, p.parent, p.parent.parent):
        f = d / "status.json"
        if f.is_file():
            try:
                return json.loads(f.read_text())
            except ValueError:
                return {}
    return {}


def build_encoder(cfg: FinetuneConfig, *, num_joints: int, in_chans: int | None = None,
                  parents: tuple[int, ...] | None = None) -> tuple[MotionTransformer, dict[str, Any], str | None]:
    """The encoder this run trains, its resolved model section (dict) and the pre-trained
    source (None from scratch).

    With a pre-trained encoder the architecture is the file's (``cfg.model`` may differ only
    in runtime fields: drop_path, attn_backend, ..., or add a branch the file lacks:
    ``ADDABLE_FIELDS``), and the clip geometry must match the data section (position
    embeddings are per frame patch), and the input stream must be the file's (``check_stream``).
    ``in_chans``: None = 3 x the streams of ``data.stream``. ``parents``: the layout's tree
    (``joint_mix: adjacency``)."""
    if in_chans is None:
        from mtscale.data.streams import stream_channels

        in_chans = stream_channels(cfg.data.stream)
    if not cfg.needs_pretrained:
        enc = MotionTransformer.from_config(cfg.model, clip_frames=cfg.data.clip_frames,
                                            num_bodies=cfg.data.num_bodies, num_joints=num_joints, in_chans=in_chans,
                                            parents=parents)
        return enc, _resolved_model(cfg.model), None
    if not cfg.pretrained:
        raise ConfigError(f"pretrained: missing with protocol {cfg.protocol}, expected an exported encoder "
                          "(<pretrain run>/encoder.safetensors) or a pre-training run directory")
    src, meta = load_pretrained(cfg.pretrained, allow_partial=cfg.pretrained_partial)
    for name, want in (("clip_frames", cfg.data.clip_frames), ("num_bodies", cfg.data.num_bodies),
                       ("num_joints", num_joints)):
        if int(meta[name]) != int(want):
            raise ConfigError(f"data.{name}: found {want}, but the pre-trained encoder {cfg.pretrained} was "
                              f"trained with {name}={meta[name]}; expected the same")
    check_stream(cfg, meta)
    model_dict = dict(meta["model"])
    for k in RUNTIME_FIELDS:
        if hasattr(cfg.model, k):
            model_dict[k] = getattr(cfg.model, k)
    added = []
    for k, off in ADDABLE_FIELDS.items():
        want, have = getattr(cfg.model, k), model_dict.get(k, off)
        if want != off and want != have:
            if have != off:
                raise ConfigError(f"model.{k}: found {want!r}, but the pre-trained encoder {cfg.pretrained} was "
                                  f"built with {k}={have!r}; expected the same (or {off!r} to keep the file's)")
            model_dict[k] = want
            for extra in ADDABLE_SHAPE.get(k, ()):
                model_dict[extra] = getattr(cfg.model, extra)
            added.append(f"{k}={want!r}")
    if added and cfg.protocol == "linear":
        raise ConfigError(f"model: found {', '.join(added)} added over the pre-trained encoder with protocol linear, "
                          "where the encoder is frozen and the new branch would stay at its zero start; expected "
                          "the file's architecture for a linear probe (or protocol finetune / semi)")
    model_cfg = from_dict(ModelConfig, model_dict, "model")
    enc = MotionTransformer.from_config(model_cfg, clip_frames=cfg.data.clip_frames, num_bodies=cfg.data.num_bodies,
                                        num_joints=num_joints, in_chans=int(meta.get("in_chans", in_chans)),
                                        parents=parents)
    load_encoder_state(enc, src.state_dict(), str(cfg.pretrained), added)
    log.info("loaded pre-trained encoder %s (%s, step %s)", cfg.pretrained, meta.get("format"), meta.get("step"))
    resolved = _resolved_model(model_cfg)
    if cfg.encoder_blocks is not None:
        if cfg.encoder_blocks > enc.depth:
            raise ConfigError(f"encoder_blocks: found {cfg.encoder_blocks}, but the pre-trained encoder "
                              f"{cfg.pretrained} has {enc.depth} blocks; expected 1..{enc.depth}")
        log.info("using the first %d of the %d pre-trained blocks", cfg.encoder_blocks, enc.depth)
        truncate_blocks(enc, cfg.encoder_blocks)
        resolved["depth"] = enc.depth
    return enc, resolved, str(cfg.pretrained)


def check_stream(cfg: FinetuneConfig, meta: dict[str, Any]) -> None:
    """The fine-tuning stream (``data.stream``) against the pre-trained encoder's (its meta;
    ``joint`` for files that predate streams): equal, or ``allow_stream_mismatch`` with as many
    channels (logged), else a ConfigError naming both."""
    from mtscale.data.streams import stream_channels

    have, want = str(meta.get("stream", "joint")), cfg.data.stream
    if have == want:
        return
    c_have, c_want = int(meta.get("in_chans", stream_channels(have))), stream_channels(want)
    if cfg.allow_stream_mismatch and c_have == c_want:
        log.warning("data.stream=%s over the pre-trained encoder %s, which was trained on stream %s "
                    "(allow_stream_mismatch=true)", want, cfg.pretrained, have)
        return
    if c_have != c_want:
        raise ConfigError(f"data.stream: found {want!r} ({c_want} channels), but the pre-trained encoder "
                          f"{cfg.pretrained} was trained on stream {have!r} ({c_have} channels); expected "
                          f"--set data.stream={have}")
    raise ConfigError(f"data.stream: found {want!r}, but the pre-trained encoder {cfg.pretrained} was trained on "
                      f"stream {have!r}; expected --set data.stream={have} (or allow_stream_mismatch=true)")


def load_encoder_state(enc: MotionTransformer, state: dict[str, torch.Tensor], where: str,
                       added: list[str]) -> None:
    """Load a pre-trained encoder's ``state`` into ``enc``: exactly its keys, except the parameters
    of branches ``added`` over it (zero-gated), which must be the only missing keys; logs them."""
    expected = enc.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    new = [k for k in missing if ".tconv." in k or k.startswith(("time_proj.", "stem."))
           or k.endswith(("tconv_gate", "attn.mix", "attn.mix_gate"))]
    if unexpected or (set(missing) - set(new)) or (missing and not added):
        raise BadInputError(where, None, f"missing keys {missing[:8]}, unexpected keys {unexpected[:8]}",
                            "exactly the keys of the encoder described by its encoder.json")
    enc.load_state_dict(state, strict=False)
    if missing:
        log.info("added %s over the pre-trained encoder: %d new parameters, zero-gated: %s",
                 ", ".join(added), len(missing), ", ".join(missing))


def truncate_blocks(enc: MotionTransformer, n: int) -> None:
    """Keep the first ``n`` transformer blocks (and the final norm) in place: the encoder's
    output becomes block ``n``'s, normalised; a checkpoint of it loads as a depth-``n`` model."""
    enc.transformer.blocks = enc.transformer.blocks[:n]
    enc.depth = n


def _resolved_model(model_cfg: ModelConfig) -> dict[str, Any]:
    """Model section with the registry row's dim/depth/heads/mlp_ratio written out."""
    d = to_dict(model_cfg)
    s = resolve_size(model_cfg)
    d.update(dim=s.dim, depth=s.depth, heads=s.heads, mlp_ratio=s.mlp_ratio)
    return d


# --------------------------------------------------------------------------- classifier


def build_classifier(encoder: MotionTransformer, num_classes: int, *, head: str = "layernorm",
                     head_drop: float = 0.0, pool: str = "mean", hidden: int = 2048) -> ClassifierHead:
    """``ClassifierHead`` on ``encoder``: ``head="linear"`` is the linear probe's single layer,
    ``pool="joint"`` reads MAMP's per-joint features (see ``ClassifierHead``)."""
    return ClassifierHead(encoder, num_classes, head_drop, pool=pool, hidden=hidden, head=head)


def fold_standardisation(linear: nn.Linear, mean_D: torch.Tensor, std_D: torch.Tensor) -> None:
    """Make ``linear(x)`` equal ``linear_old((x - mean) / std)`` (in place)."""
    with torch.no_grad():
        w = linear.weight / std_D[None, :]
        linear.bias.sub_(w @ mean_D)
        linear.weight.copy_(w)


def save_classifier(model: nn.Module, meta: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``out_dir/{model.safetensors, meta.json}`` atomically (folder written beside, renamed)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(sd, str(tmp / WEIGHTS), metadata={"format": FORMAT})
    (tmp / META).write_text(json.dumps(dict(meta, format=FORMAT), indent=2, sort_keys=True, default=str) + "\n")
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def read_meta(path: str | Path) -> dict[str, Any]:
    d = Path(path)
    d = d.parent if d.is_file() else d
    f = d / META
    if not f.is_file():
        raise BadInputError(str(d), None, f"no {META}", "a classifier checkpoint folder written by mtscale finetune "
                            "(e.g. <run>/final or <run>/best)")
    from mtscale.train.checkpoint import parse_meta

    meta = parse_meta(f.read_text(), str(f), ("format",))
    if meta.get("format") != FORMAT:
        raise BadInputError(str(f), None, f"format {meta.get('format')!r}", repr(FORMAT))
    missing = [k for k in ("model", "clip_frames", "num_bodies", "num_joints", "num_classes") if k not in meta]
    if missing:
        raise BadInputError(str(f), None, f"no {missing}", "the meta.json mtscale finetune writes")
    return meta


def resolve_checkpoint(path: str | Path) -> Path:
    """A classifier folder from itself, its model.safetensors, or a fine-tuning run dir (its ``final``)."""
    p = Path(path)
    if p.is_file():
        p = p.parent
    if (p / META).is_file():
        return p
    for sub in ("final", "seed0/final"):
        if (p / sub / META).is_file():
            return p / sub
    finals = sorted(p.glob("seed*/final"))
    if finals:
        return finals[0]
    raise BadInputError(str(path), None, "no classifier checkpoint found",
                        "a folder with model.safetensors + meta.json, or a fine-tuning run dir with final/")


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[ClassifierHead, dict[str, Any]]:
    """Rebuild a classifier from a checkpoint folder (or run dir) and load it exactly."""
    d = resolve_checkpoint(path)
    meta = read_meta(d)
    from mtscale.data.streams import stream_channels

    model_cfg = from_dict(ModelConfig, {k: v for k, v in meta["model"].items()}, "model")
    stream, in_chans = meta_stream(meta), int(meta.get("in_chans", 3))
    if stream_channels(stream) != in_chans:
        raise BadInputError(str(d / META), None, f"stream {stream!r} with in_chans={in_chans}",
                            f"in_chans={stream_channels(stream)} (3 per stream)")
    enc = MotionTransformer.from_config(model_cfg, clip_frames=meta["clip_frames"], num_bodies=meta["num_bodies"],
                                        num_joints=meta["num_joints"], in_chans=in_chans)
    model = build_classifier(enc, int(meta["num_classes"]), head=meta.get("head", "layernorm"),
                             pool=meta.get("pool", "mean"), hidden=int(meta.get("head_hidden", 2048)))
    from mtscale.train.checkpoint import read_safetensors

    state, _ = read_safetensors(d / WEIGHTS, "the classifier weights mtscale finetune writes")
    check_keys(model, state, str(d / WEIGHTS))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), meta


def meta_stream(meta: dict[str, Any]) -> str:
    """The input stream a classifier was trained on (``joint`` for checkpoints that predate streams)."""
    return str(meta.get("stream") or (meta.get("data") or {}).get("stream") or "joint")


def check_keys(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Exactly the model's keys and shapes, else one error listing what is missing / unexpected."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise BadInputError(where, None, f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                            f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}",
                            "exactly the classifier's keys")
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if bad:
        raise BadInputError(where, None, f"mis-shaped tensors {bad[:4]}", "the shapes of the classifier in meta.json")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model
