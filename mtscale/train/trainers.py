"""The two ways an epoch of fine-tuning trains (the rest of the loop is shared, see
``finetune_loop.py``):

- :class:`FullTrainer` (finetune / semi / scratch): the whole classifier trains on streamed,
  randomly cropped and augmented clips; AdamW with layer-wise lr decay (BEiT / MAE groups from
  ``param_groups_lrd``), linear warmup + cosine per optimizer step, label smoothing, optional
  mixup, gradient accumulation and clipping, DistributedDataParallel across ranks, autocast
  in bf16 / fp16 where configured (fp16 with a ``torch.amp.GradScaler``).
- :class:`LinearProbe` (linear): the encoder is frozen, so its features are computed once
  (centre crops, eval mode, exact across ranks; ``probe_views`` adds seeded augmented
  training views) and a linear head trains on the standardised cached features (MAE's
  BatchNorm-without-affine probe, as a fixed standardisation) -- each epoch costs a few
  matrix products instead of an encoder pass. For export the standardisation is folded into
  the head, so the saved classifier runs on raw features.

Both expose ``micro_batch_size``, ``train_epoch(epoch) -> metrics``, ``validate() -> metrics``,
``prepare_export()``, ``state_dict()`` / ``load_state_dict()``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mtscale.config import FinetuneConfig, TrainConfig
from mtscale.data.loader import model_mask
from mtscale.dist import all_reduce_flag
from mtscale.errors import ConfigError
from mtscale.models.encoder import param_groups_lrd
from mtscale.train.classifier import fold_standardisation, unwrap
from mtscale.train.engine import batch_geometry
from mtscale.train.evaluate import classifier_forward, score_rows
from mtscale.train.finetune_data import Splits, rows_loader
from mtscale.train.metrics import classification_metrics
from mtscale.train.runtime import Runtime
from mtscale.train.schedule import warmup_cosine

log = logging.getLogger(__name__)


def soft_cross_entropy(logits_NK: Tensor, target_NK: Tensor) -> Tensor:
    return -(target_NK * F.log_softmax(logits_NK.float(), dim=1)).sum(dim=1).mean()


def smoothed_targets(labels_N: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """One-hot with label smoothing: 1 - s + s / K on the label, s / K elsewhere."""
    t = torch.full((labels_N.shape[0], num_classes), smoothing / num_classes, device=labels_N.device)
    return t.scatter_(1, labels_N[:, None], 1.0 - smoothing + smoothing / num_classes)


def _schedule(cfg: FinetuneConfig, steps_per_epoch: int):
    """Multiplier of the base lr after ``step`` optimizer steps (warmup + cosine to min_lr)."""
    return warmup_cosine(warmup=int(round(cfg.warmup_epochs * steps_per_epoch)),
                         total=max(cfg.epochs * steps_per_epoch, 1), floor=cfg.train.min_lr / cfg.train.lr)


def make_optimizer(params: Any, train: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """``train.optimizer`` over ``params`` (tensors or param groups, whose own ``weight_decay``
    wins): AdamW, fused on CUDA, or SGD with momentum (Nesterov by default). The lr is set each
    step by the schedule."""
    impl = "fused" if device.type == "cuda" else "foreach"
    extra = {impl: True}
    if train.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=train.lr, momentum=train.momentum, nesterov=train.nesterov and train.momentum > 0,
            weight_decay=train.weight_decay, **extra)
    else:
        opt = torch.optim.AdamW(params, lr=train.lr, betas=tuple(train.betas), eps=train.adam_eps,
                                weight_decay=train.weight_decay, **extra)
    log.info("optimizer %s (%s)", type(opt).__name__, impl)
    return opt


def _set_lr(opt: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    for g in opt.param_groups:
        g["lr"] = base_lr * g.get("lr_scale", 1.0) * factor
    return base_lr * factor


def _mean_over_ranks(total: Tensor | float, count: float, device: torch.device) -> float:
    t = torch.stack([torch.as_tensor(total, dtype=torch.float64, device=device),
                     torch.tensor(float(count), dtype=torch.float64, device=device)])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return float(t[0] / t[1].clamp_min(1))


def _check_finite(losses: list[Tensor], ids: list[Tensor], epoch: int, first_micro: int) -> None:
    """Raise NonFiniteLossError naming the epoch's first micro-batch with a non-finite loss and its
    samples (one host sync per epoch; before, fine-tuning logged NaN every epoch and exited 0)."""
    if not losses:
        return
    bad = (~torch.isfinite(torch.stack(losses).float())).nonzero()
    if bad.numel():
        from mtscale.errors import NonFiniteLossError

        k = int(bad[0])
        raise NonFiniteLossError.of_batch(f"epoch {epoch}, micro-batch {first_micro + k}", float(losses[k]),
                                          ids[k].reshape(-1).cpu().tolist())


def _val_metrics(logits_NK: np.ndarray, labels_N: np.ndarray) -> dict[str, float]:
    m = classification_metrics(logits_NK, labels_N, prefix="val_")
    m["val_loss"] = float(F.cross_entropy(torch.from_numpy(logits_NK).float(), torch.from_numpy(labels_N)))
    return m


class FullTrainer:
    """All weights train on streamed clips (see the module docstring)."""

    def __init__(self, cfg: FinetuneConfig, model: nn.Module, store: Any, splits: Splits, rt: Runtime):
        self.cfg, self.store, self.splits, self.rt = cfg, store, splits, rt
        geo = batch_geometry(cfg.train, rt.world.world_size)
        self.micro_batch_size, self.accum = geo.micro_batch_size, geo.grad_accum_steps
        if splits.train.size < geo.global_batch_size:
            raise ConfigError(f"train.batch_size: found {geo.global_batch_size}, but only {splits.train.size} "
                              "training samples are selected; expected at most that many")
        self.loader = rows_loader(store, cfg.data, splits.train, batch_size=self.micro_batch_size,
                                  seed=cfg.train.seed, rank=rt.world.rank, world_size=rt.world.world_size,
                                  train=True, device=rt.device)
        self.steps_per_epoch = len(self.loader) // self.accum
        self.model = model
        enc = unwrap(model).encoder
        groups = param_groups_lrd(model, enc.depth, cfg.train.weight_decay, cfg.layer_decay)
        self.opt = make_optimizer(groups, cfg.train, rt.device)
        self.lr_factor = _schedule(cfg, self.steps_per_epoch)
        self.step = 0
        self.ddp: nn.Module = model
        if rt.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
        if cfg.model.compile:
            self.ddp = torch.compile(self.ddp)
        self.num_classes = int(unwrap(model).head.out_features)
        # fp16 autocast needs loss scaling (bf16 and fp32 do not): a disabled scaler is a no-op.
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.precision == "fp16")
        # EMA of every floating-point entry of the state dict (weights and BatchNorm statistics)
        self.ema: dict[str, Tensor] | None = None
        if cfg.ema > 0:
            self.ema = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items() if v.is_floating_point()}

    def _ema_update(self) -> None:
        decay = min(self.cfg.ema, (1 + self.step) / (10 + self.step))
        sd = unwrap(self.model).state_dict()
        keys = list(self.ema)
        torch._foreach_lerp_([self.ema[k] for k in keys], [sd[k].detach() for k in keys], 1.0 - decay)

    @contextlib.contextmanager
    def export_context(self):
        """Within it the model holds the weights to validate, save as the classifier and score:
        the EMA when ``cfg.ema`` is on (the raw weights are put back on exit), else the model's."""
        if self.ema is None:
            yield
            return
        model = unwrap(self.model)
        raw = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.ema}
        model.load_state_dict(self.ema, strict=False)
        try:
            yield
        finally:
            model.load_state_dict(raw, strict=False)

    def train_epoch(self, epoch: int, stop: Any = None, partial: dict[str, Any] | None = None) -> dict[str, Any]:
        """One epoch (or its rest, from ``partial``). With ``stop`` (a StopFlag) raised, returns at
        the next optimizer-step boundary ``{"stopped": True, "partial": state}``: what
        :meth:`train_epoch` needs (with the loader and trainer state) to finish the epoch exactly
        as an uninterrupted run would."""
        cfg, rt = self.cfg, self.rt
        self.model.train()
        if partial is None:
            self.loader.set_epoch(epoch)
        else:  # the rest of an interrupted epoch: the loader resumes at the next sample
            self.loader.load_state_dict(partial["loader"])
        n_micro = self.steps_per_epoch * self.accum
        # Sums stay on the device: one host sync per epoch, not per micro-batch (issue 25, item 6).
        loss_sum = torch.tensor(partial["loss_sum"] if partial else 0.0, dtype=torch.float64, device=rt.device)
        correct = torch.tensor(partial["correct"] if partial else 0.0, dtype=torch.float64, device=rt.device)
        seen = int(partial["seen"]) if partial else 0
        i0 = int(partial["micro"]) if partial else 0
        lr = float(partial["lr"]) if partial else 0.0
        bar = tqdm(total=self.steps_per_epoch, initial=i0 // self.accum, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   unit="step", leave=False, disable=not (cfg.run.progress and rt.world.is_main))
        show = not getattr(bar, "disable", True)
        check_every = 1 if not rt.distributed else 10  # a collective (+ host sync) when distributed
        step_losses: list[Tensor] = []  # per micro-batch, on the device; checked once at the end
        step_ids: list[Tensor] = []
        for i, batch in enumerate(self.loader, start=i0):
            if i >= n_micro:
                break
            x, mask, y, time = batch["x"], model_mask(batch), batch["label"], batch.get("time")
            target = smoothed_targets(y, self.num_classes, cfg.label_smoothing)
            if cfg.mixup > 0:
                g = np.random.default_rng([cfg.train.seed, epoch, i, rt.world.rank])
                lam = float(g.beta(cfg.mixup, cfg.mixup))
                perm = torch.from_numpy(g.permutation(x.shape[0])).to(x.device)
                x = lam * x + (1 - lam) * x[perm]
                mask = None if mask is None else mask | mask[perm]
                time = None if time is None else lam * time + (1 - lam) * time[perm]
                target = lam * target + (1 - lam) * target[perm]
            sync = (i + 1) % self.accum == 0
            ctx = self.ddp.no_sync() if (rt.distributed and not sync and hasattr(self.ddp, "no_sync")) \
                else contextlib.nullcontext()
            with ctx:
                with rt.autocast():
                    logits = self.ddp(x, mask, time)
                loss = soft_cross_entropy(logits, target)
                self.scaler.scale(loss / self.accum).backward()
            step_losses.append(loss.detach())
            step_ids.append(batch["index"])
            loss_sum += loss.detach().double() * y.shape[0]
            correct += (logits.detach().argmax(1) == y).sum().double()
            seen += y.shape[0]
            if sync:
                lr = _set_lr(self.opt, cfg.train.lr, self.lr_factor(self.step))
                if cfg.train.grad_clip > 0:
                    self.scaler.unscale_(self.opt)  # clip the true gradients
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
                self.scaler.step(self.opt)  # skipped (and the scale lowered) on inf / NaN gradients in fp16
                self.scaler.update()
                self.opt.zero_grad(set_to_none=True)
                self.step += 1
                if self.ema is not None:
                    self._ema_update()
                bar.update(1)
                if show and self.step % 10 == 0:  # a host sync: only for a visible bar, every 10 steps
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{lr:.2e}")
                if stop is not None and i + 1 < n_micro and self.step % check_every == 0 \
                        and all_reduce_flag(stop.raised, rt.device):
                    bar.close()
                    return {"stopped": True, "partial": {
                        "loader": self.loader.state_dict(), "micro": i + 1, "loss_sum": float(loss_sum),
                        "correct": float(correct), "seen": seen, "lr": lr}}
        bar.close()
        _check_finite(step_losses, step_ids, epoch, i0)
        return {"train_loss": _mean_over_ranks(loss_sum, seen, rt.device),
                "train_top1": 100.0 * _mean_over_ranks(correct, seen, rt.device), "lr": lr, "step": self.step}

    def validate(self) -> dict[str, float]:
        if self.splits.val.size == 0:
            return {}
        with self.export_context():
            if self.rt.distributed:  # each rank's BatchNorm statistics took in its own last batch: score every
                for b in unwrap(self.model).buffers():  # share with rank 0's, the ones that are saved
                    dist.broadcast(b, 0)
            logits = score_rows(classifier_forward(unwrap(self.model), probs=False), self.store, self.cfg.data,
                                self.splits.val, self.rt,
                                batch_size=self.cfg.eval_batch_size or 2 * self.micro_batch_size,
                                seed=self.cfg.train.seed, progress=self.cfg.run.progress, desc="val")
        return _val_metrics(logits, np.asarray(self.store.labels)[self.splits.val])

    def prepare_export(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        out = {"optimizer": self.opt.state_dict(), "step": self.step, "scaler": self.scaler.state_dict()}
        if self.ema is not None:  # the classifier file holds the EMA: keep the raw weights here
            out["ema"] = {k: v.cpu() for k, v in self.ema.items()}
            out["raw"] = {k: v.detach().cpu() for k, v in unwrap(self.model).state_dict().items()}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if "ema" not in state:
                raise ConfigError("ema: found on, but the checkpoint was written without it; expected the same "
                                  "ema setting to resume")
            dev = self.rt.device
            unwrap(self.model).load_state_dict({k: v.to(dev) for k, v in state["raw"].items()}, strict=True)
            self.ema = {k: v.to(dev) for k, v in state["ema"].items()}


class LinearProbe:
    """A linear head on frozen, cached, standardised features (see the module docstring)."""

    def __init__(self, cfg: FinetuneConfig, model: nn.Module, store: Any, splits: Splits, rt: Runtime):
        self.cfg, self.store, self.splits, self.rt, self.model = cfg, store, splits, rt, model
        geo = batch_geometry(cfg.train, rt.world.world_size)
        self.micro_batch_size = geo.micro_batch_size
        clf = unwrap(model)
        clf.encoder.requires_grad_(False)
        clf.encoder.eval()

        def features(x: Tensor, mask: Tensor | None, time: Tensor | None = None) -> Tensor:
            return clf.features(x, mask, time)  # (N, D), or (N, V * D) with pool=joint

        bs = cfg.eval_batch_size or 2 * self.micro_batch_size
        labels = np.asarray(store.labels)
        views = cfg.probe_views
        f_train = [score_rows(features, store, cfg.data, splits.train, rt, batch_size=bs, progress=cfg.run.progress,
                              desc="features train")]
        for k in range(1, views):  # training views, seeded apart from multi-clip testing's crops
            f_train.append(score_rows(features, store, cfg.data, splits.train, rt, batch_size=bs,
                                      seed=cfg.train.seed * 1_000_003 + 104_729 * k, augment=True,
                                      progress=cfg.run.progress, desc=f"features train view {k + 1}/{views}"))
        f_all = np.concatenate(f_train)  # (K * N, D): the standardisation sees every view
        self.mean = torch.from_numpy(f_all.mean(0)).to(rt.device)
        self.std = torch.from_numpy(f_all.std(0) + 1e-6).to(rt.device)
        self.f_train = self._standardise(f_all).view(views, *f_train[0].shape)  # (K, N, D)
        del f_all
        self.y_train = torch.from_numpy(labels[splits.train]).to(rt.device)
        if splits.val.size:
            f_val = score_rows(features, store, cfg.data, splits.val, rt, batch_size=bs, progress=cfg.run.progress,
                               desc="features val")
            self.f_val, self.y_val = self._standardise(f_val), labels[splits.val]
        head = unwrap(model).head
        self.head = nn.Linear(head.in_features, head.out_features).to(rt.device)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.opt = make_optimizer(self.head.parameters(), cfg.train, rt.device)
        self.batch_size = min(cfg.train.batch_size, self.f_train.shape[1])
        self.steps_per_epoch = -(-self.f_train.shape[1] // self.batch_size)
        self.lr_factor = _schedule(cfg, self.steps_per_epoch)
        self.step = 0
        log.info("linear probe: cached %d train view(s) x %d samples, dim %d (%.0f MB)", *self.f_train.shape,
                 self.f_train.numel() * 4 / 1e6)

    def _standardise(self, f: np.ndarray) -> Tensor:
        return (torch.from_numpy(f).to(self.rt.device) - self.mean) / self.std

    def train_epoch(self, epoch: int, stop: Any = None, partial: dict[str, Any] | None = None) -> dict[str, Any]:
        """One epoch on the cached features (milliseconds: a signal is honoured at the epoch's end)."""
        cfg = self.cfg
        views, n = self.f_train.shape[:2]
        # Every rank holds all features and runs the same deterministic steps: no communication.
        g = torch.Generator().manual_seed(int(cfg.train.seed) * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g).to(self.rt.device)
        view = torch.randint(views, (n,), generator=g).to(self.rt.device)  # one view per sample (all 0 if K = 1)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.rt.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.rt.device)
        lr = 0.0
        for b in range(self.steps_per_epoch):
            idx = perm[b * self.batch_size:(b + 1) * self.batch_size]
            f, y = self.f_train[view[idx], idx], self.y_train[idx]
            logits = self.head(f)
            loss = soft_cross_entropy(logits, smoothed_targets(y, self.head.out_features, cfg.label_smoothing))
            lr = _set_lr(self.opt, cfg.train.lr, self.lr_factor(self.step))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.step += 1
            loss_sum += loss.detach().double() * idx.numel()
            correct += (logits.detach().argmax(1) == y).sum().double()
        return {"train_loss": float(loss_sum) / n, "train_top1": 100.0 * float(correct) / n, "lr": lr,
                "step": self.step}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        if self.splits.val.size == 0:
            return {}
        return _val_metrics(self.head(self.f_val).float().cpu().numpy(), self.y_val)

    @contextlib.contextmanager
    def export_context(self):
        yield  # the exported head is prepare_export's fold; no weight average here

    @torch.no_grad()
    def prepare_export(self) -> None:
        """Copy the head into the classifier with the standardisation folded in."""
        out = unwrap(self.model).head
        out.weight.copy_(self.head.weight)
        out.bias.copy_(self.head.bias)
        fold_standardisation(out, self.mean.to(out.weight.device), self.std.to(out.weight.device))

    def state_dict(self) -> dict[str, Any]:
        return {"head": self.head.state_dict(), "optimizer": self.opt.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.opt.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.prepare_export()
