"""Checkpoints: save / resume a DeepSpeed engine with our client state (loader cursor, RNG
states, step, resolved config), keep the last K, and export the encoder as one consolidated
fp32 safetensors file (+ ``encoder.json``) that ``load_encoder`` reads back exactly.

Layout of a run directory::

    <run>/checkpoints/latest            tag of the newest complete checkpoint (DeepSpeed writes it last)
    <run>/checkpoints/step00000040/     DeepSpeed files of every rank (model, optimizer shards)
    <run>/encoder.safetensors           the exported encoder (end of run)

Loading never unpickles arbitrary objects: DeepSpeed 0.19.8 calls ``torch.load(...,
weights_only=False)`` in its checkpoint engine and in ``zero_to_fp32``; we run those calls
under ``safe_torch_load()``, which forces ``weights_only=True`` and allows only the few
DeepSpeed / Python types its checkpoint files hold.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mtscale.errors import BadInputError, ConfigError
from mtscale.files import atomic_path, atomic_write
from mtscale.train.state import prune_dirs

log = logging.getLogger(__name__)

CKPT_DIRNAME = "checkpoints"
META_KEY = "mtscale"


# --------------------------------------------------------------------------- safe loading


def _safe_globals() -> list[Any]:
    import argparse
    import collections

    out: list[Any] = [collections.OrderedDict, collections.defaultdict, dict, argparse.Namespace, set]
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        out.append(ZeroStageEnum)
    except ImportError:  # pragma: no cover
        pass
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        out += [LossScaler, DynamicLossScaler]
    except ImportError:  # pragma: no cover
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        out.append(fragment_address)
    except ImportError:  # pragma: no cover
        pass
    return out


@contextlib.contextmanager
def safe_torch_load() -> Iterator[None]:
    """Within this block every ``torch.load`` (DeepSpeed's included) is ``weights_only=True``,
    with an allow-list of the DeepSpeed types its checkpoints contain."""
    orig = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return orig(*args, **kwargs)

    torch.load = load  # DeepSpeed looks it up as ``torch.load`` at call time
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            yield
    finally:
        torch.load = orig


# --------------------------------------------------------------------------- save / resume


def ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CKPT_DIRNAME


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def latest_tag(root: str | Path) -> str | None:
    """Tag named by ``<root>/latest`` (None when there is no complete checkpoint)."""
    f = Path(root) / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if (Path(root) / tag).is_dir() else None


def save(engine: Any, run_dir: str | Path, step: int, client_state: dict[str, Any], keep: int) -> Path:
    """Collective: every rank calls it. Saves tag ``step########`` and prunes old tags on rank 0."""
    import torch.distributed as dist

    root = ckpt_root(run_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=True)
    if dist.is_initialized():
        dist.barrier()
    if engine.global_rank == 0:
        prune(root, keep)
    log.info("saved checkpoint %s", root / tag)
    return root / tag


def prune(root: Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` step tags (never the one ``latest`` names)."""
    return prune_dirs(root, "step*", keep, protect=latest_tag(root))


def resume(engine: Any, run_dir: str | Path) -> dict[str, Any] | None:
    """Load the latest loadable checkpoint of ``run_dir`` into ``engine`` (module, optimizer, LR
    schedule); returns our client state, or None when there is nothing to resume.

    The newest tag is tried first (the one ``latest`` names); a damaged one (truncated by a
    full disk, say) is reported in one warning and the next older tag is tried, so an intact
    previous checkpoint beside it is not lost. Every rank walks the same list, and a tag is
    kept only if every rank loaded it."""
    from mtscale.dist import all_reduce_flag

    root = ckpt_root(run_dir)
    newest = latest_tag(root)
    if newest is None:
        return None
    tags = [newest] + sorted((p.name for p in root.glob("step*") if p.is_dir() and p.name < newest), reverse=True)
    device = getattr(engine, "device", torch.device("cpu"))
    for tag in tags:
        path, client, err = None, None, None
        try:
            with safe_torch_load():
                path, client = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                                      load_lr_scheduler_states=True)
        except Exception as e:
            err = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        failed = all_reduce_flag(path is None or client is None, torch.device(device))
        if not failed:
            if tag != newest:
                log.warning("resumed from the older checkpoint %s: the newest, %s, could not be loaded", tag, newest)
            log.info("resumed from %s (step %s)", path, client.get("step"))
            return client
        log.warning("checkpoint %s could not be loaded (%s); trying the previous one", root / tag,
                    err or "DeepSpeed returned no checkpoint")
    raise BadInputError(str(root), None, f"none of the checkpoints {tags} could be loaded",
                        "an intact checkpoint written by mtscale pretrain (or remove the folder to start over)")


# --------------------------------------------------------------------------- export / load


def _resolve_ckpt(run_dir_or_ckpt: str | Path) -> tuple[Path, str]:
    """(checkpoint root, tag) from a run dir, a checkpoints dir or a tag dir."""
    p = Path(run_dir_or_ckpt)
    for root in (ckpt_root(p), p):
        tag = latest_tag(root)
        if tag is not None:
            return root, tag
    if p.is_dir() and p.name.startswith("step") and any(p.glob("*model_states.pt")):
        return p.parent, p.name
    raise BadInputError(str(p), None, "no DeepSpeed checkpoint found",
                        "a run directory, its checkpoints/ folder, or a step######## folder")


def _read_model_states(root: Path, tag: str) -> dict[str, Any]:
    files = sorted((root / tag).glob("mp_rank_00_model_states.pt")) or sorted((root / tag).glob("*model_states.pt"))
    if not files:
        raise BadInputError(str(root / tag), None, "no *model_states.pt file", "a DeepSpeed checkpoint folder")
    with safe_torch_load():
        return torch.load(files[0], map_location="cpu")


def consolidated_state_dict(run_dir_or_ckpt: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full fp32 state dict of the trained module (any ZeRO stage) and the checkpoint's client
    state. ZeRO 1-3 use the fp32 master weights (DeepSpeed's zero_to_fp32); stage 0 the module."""
    root, tag = _resolve_ckpt(run_dir_or_ckpt)
    states = _read_model_states(root, tag)
    stage = int(states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    if stage >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with safe_torch_load():
            sd = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    else:
        sd = states["module"]
    sd = {k: v.detach().to(torch.float32).contiguous() for k, v in sd.items()}
    client = {k: v for k, v in states.items() if k not in _DS_KEYS}
    return sd, client


_DS_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
            "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
            "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config",
            "ds_version", "ds_rank"}


def encoder_state(module_sd: dict[str, torch.Tensor], prefix: str = "encoder.") -> dict[str, torch.Tensor]:
    """The ``encoder.*`` entries of a pre-training state dict, prefix removed."""
    out = {k[len(prefix):]: v for k, v in module_sd.items() if k.startswith(prefix)}
    if not out:
        raise ConfigError(f"export: no '{prefix}*' keys in the checkpoint (found e.g. {sorted(module_sd)[:3]})")
    return out


def save_encoder(state: dict[str, torch.Tensor], meta: dict[str, Any], out_path: str | Path) -> Path:
    """Write ``out_path`` (safetensors, metadata ``mtscale`` = JSON ``meta``) and a sidecar
    ``<stem>.json`` with the same meta; both atomically."""
    from safetensors.torch import save_file

    out = Path(out_path)
    with atomic_path(out) as tmp:
        save_file({k: v.detach().cpu().to(torch.float32).contiguous() for k, v in state.items()}, str(tmp),
                  metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    atomic_write(out.with_suffix(".json"), json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def encoder_meta(cfg_dict: dict[str, Any], *, num_joints: int, layout: str | None, step: int) -> dict[str, Any]:
    """What ``load_encoder`` needs to rebuild the encoder: model section + clip geometry, and
    the input stream it was trained on (``data.stream``; fine-tuning checks it, and the encoder
    reads 3 x streams channels). A file without ``stream`` predates streams: ``joint``."""
    from mtscale import __version__
    from mtscale.data.streams import stream_channels

    data = cfg_dict.get("data", {})
    stream = str(data.get("stream", "joint"))
    return {
        "format": "mtscale-encoder/1", "mtscale_version": __version__, "model": cfg_dict["model"],
        "clip_frames": int(data.get("clip_frames", 120)), "num_bodies": int(data.get("num_bodies", 2)),
        "num_joints": int(num_joints), "in_chans": stream_channels(stream), "stream": stream, "layout": layout,
        "step": int(step), "objective": cfg_dict.get("objective"),
    }


def export_encoder(run_dir_or_ckpt: str | Path, out_path: str | Path) -> Path:
    """Consolidate the latest checkpoint of a run (any ZeRO stage) into one fp32 encoder file."""
    sd, client = consolidated_state_dict(run_dir_or_ckpt)
    meta = client.get("encoder_meta")
    if meta is None:
        raise BadInputError(str(run_dir_or_ckpt), None, "checkpoint has no encoder_meta client state",
                            "a checkpoint written by mtscale pretrain")
    meta = dict(meta, step=int(client.get("step", meta.get("step", 0))))
    return save_encoder(encoder_state(sd), meta, out_path)


def read_safetensors(path: Path, expected: str) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """(tensors, metadata) of a safetensors file; a truncated or foreign file is one BadInputError."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 - safe_open is not iterable
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, OSError) and getattr(e, "errno", None) is not None:
            raise
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadInputError(str(path), None, f"not a readable safetensors file ({reason}; truncated or another "
                            "format?)", expected) from None


def parse_meta(raw: str, where: str, required: tuple[str, ...]) -> dict[str, Any]:
    """JSON metadata with the ``required`` keys, or one BadInputError naming what is wrong."""
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise BadInputError(where, None, f"metadata that is not JSON ({e.msg} at char {e.pos})",
                            "the JSON mtscale wrote (re-export or re-train)") from None
    missing = [k for k in required if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise BadInputError(where, None, f"metadata without {missing}", f"the keys {list(required)}")
    return meta


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the MotionTransformer from an exported file and load its weights exactly:
    a missing, unexpected or mis-shaped key is an error naming them."""

    from mtscale.config import ModelConfig, from_dict
    from mtscale.models.encoder import MotionTransformer

    p = Path(path)
    if not p.is_file():
        raise BadInputError(str(p), None, "file not found", "an encoder .safetensors file")
    state, meta_raw = read_safetensors(p, "an encoder exported by mtscale pretrain (encoder.safetensors)")
    raw = (meta_raw or {}).get(META_KEY)
    if raw is None:
        side = p.with_suffix(".json")
        if not side.is_file():
            raise BadInputError(str(p), None, f"no '{META_KEY}' metadata and no {side.name}",
                                "a file written by mtscale export")
        raw = side.read_text()
    meta = parse_meta(raw, str(p), ("model", "clip_frames", "num_bodies", "num_joints"))
    model_cfg = from_dict(ModelConfig, meta["model"], "model")
    enc = MotionTransformer.from_config(model_cfg, clip_frames=meta["clip_frames"], num_bodies=meta["num_bodies"],
                                        num_joints=meta["num_joints"], in_chans=meta.get("in_chans", 3))
    expected = enc.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise BadInputError(str(p), None, f"missing keys {missing}, unexpected keys {unexpected}",
                            "exactly the encoder's keys")
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if bad:
        raise BadInputError(str(p), None, f"mis-shaped tensors {bad}", "the shapes of the configured encoder")
    enc.load_state_dict(state, strict=True)
    return enc.to(device), meta
