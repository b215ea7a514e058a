"""What the quickstart runs: the demo on synthetic data, or a recipe sized for the user's own data.

* **Demo** (``mtscale quickstart``, no ``--data``): the label-scarce case that self-supervised
  pre-training is for. Pre-training sees every training clip without labels; scratch, fine-tuning
  and the linear probe get the same 10 % of the labels, the same epochs, batch and seeds. The
  settings (patch tokens, masked reconstruction of 75 % of the patches, see ``DEMO_OBJECTIVE``)
  are fixed in the code, the same every run (how they were chosen: benchmarks/README.md).
* **Real data** (``--data``): the NW-UCLA recipe (``configs/*/nw_ucla.yaml``: patch tokens, MAMP's
  per-joint head, view-normalised store, rotation + scale augmentation; plus each token's time in
  the recording, ``model.time_index``, and whole-clip sampling in the supervised stages, the
  settings of the best pre-trained recipe measured, benchmarks/README.md), its schedule sized from
  the number of training clips and ``--minutes``: a few training steps of the very model are
  timed on this machine first, and the budget is split between pre-training (2 processes), then
  scratch and fine-tuning side by side (one core each), then the linear probe.

``demo_recipe`` / ``data_recipe`` return a :class:`Recipe`; the pipeline prints its ``why`` lines
before running.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# Demo sizes (--quick: the CI variant, a smoke test of the same stages).
DEMO = {
    "default": dict(samples=1200, classes=8, clip=32, labels=0.1, pre_steps=300, pre_batch=32, ft_epochs=15,
                    ft_batch=8, lin_epochs=100, tune_epochs=6, tune_samples=2,
                    model=["model.size=tiny", "model.dim=96", "model.depth=3", "model.heads=4"]),
    "quick": dict(samples=240, classes=4, clip=16, labels=0.25, pre_steps=40, pre_batch=16, ft_epochs=4,
                  ft_batch=8, lin_epochs=20, tune_epochs=2, tune_samples=2, model=["model.size=tiny"]),
}
# Masked reconstruction of 75 % of the patches: on synthetic clips the masked-motion target is mostly
# the generator's 4 mm joint noise (its loss stays near 0.85 for 600 steps, and fine-tuning from it
# lost 5.4 points to scratch at 10 % labels, validation agreeing), while coordinates are learnable
# (loss 0.95 -> 0.13 in 300 steps); benchmarks/README.md, "Pre-training pay-off".
DEMO_OBJECTIVE = ["objective.kind=masked_recon", "objective.mask_ratio=0.75", "objective.masking=motion_aware",
                  "objective.decoder_dim=64", "objective.decoder_depth=1", "objective.decoder_heads=4"]
DEMO_AUGMENT = ["data.crop_min=0.5", "data.crop_max=1.0", "data.augment.rotate_deg=15", "data.augment.scale=0.1"]

# --data: shares of the time budget (the rest: start-up, evaluation, the seconds of the linear
# probe on cached features), and the bounds of the schedule it buys.
SHARE_PRETRAIN, SHARE_SUPERVISED = 0.40, 0.50
EPOCHS_MIN, EPOCHS_MAX = 10, 60
PRE_STEPS_MIN, PRE_STEPS_MAX = 100, 12000


@dataclass
class Recipe:
    name: str
    why: list[str]
    pretrain_config: Path
    finetune_config: Path
    pretrain_sets: list[str]
    common_sets: list[str]          # every supervised stage (data geometry, split, labels)
    scratch_sets: list[str]
    finetune_sets: list[str]
    linear_sets: list[str]
    labels: float                   # share of the training labels the supervised stages see
    side_by_side: bool = False      # scratch and fine-tuning at once, one core each
    tune_epochs: int = 0
    tune_samples: int = 0
    synth: dict = field(default_factory=dict)  # samples / classes of the synthetic data (demo only)


def demo_recipe(quick: bool) -> Recipe:
    p = DEMO["quick" if quick else "default"]
    labels = p["labels"]
    data = [f"data.clip_frames={p['clip']}", *DEMO_AUGMENT]
    sup = [*data, f"data.label_fraction={labels}", f"train.batch_size={p['ft_batch']}", f"epochs={p['ft_epochs']}",
           "warmup_epochs=1"]
    return Recipe(
        name="label-scarce demo" + (" (quick)" if quick else ""),
        why=[f"synthetic data: {p['samples']} clips of {p['classes']} classes, split by performer",
             f"pre-training sees every training clip without labels ({p['pre_steps']} steps of {p['pre_batch']}); "
             f"scratch, fine-tuning and the linear probe get the same {labels:.0%} of the labels",
             "settings fixed in the code (mtscale/recipes.py), the same every run; no seed picked"],
        pretrain_config=CONFIGS / "pretrain" / "tiny_cpu.yaml", finetune_config=CONFIGS / "finetune" / "tiny_cpu.yaml",
        pretrain_sets=[*data, *p["model"], *DEMO_OBJECTIVE, f"train.max_steps={p['pre_steps']}",
                       f"train.batch_size={p['pre_batch']}", "train.lr=1.5e-3",
                       f"train.warmup_steps={max(1, p['pre_steps'] // 10)}",
                       f"train.ckpt_every={max(10, p['pre_steps'] // 3)}", "train.log_every=5"],
        common_sets=sup, scratch_sets=[*p["model"], "layer_decay=1.0", "train.lr=1.0e-3"],
        finetune_sets=["layer_decay=0.75", "train.lr=1.0e-3"],
        linear_sets=[f"epochs={p['lin_epochs']}", "train.lr=0.01", "train.weight_decay=0.0", "layer_decay=1.0"],
        labels=labels, tune_epochs=p["tune_epochs"], tune_samples=p["tune_samples"],
        synth={"samples": p["samples"], "classes": p["classes"]})


def data_recipe(store: str, split: str, minutes: float, procs: int) -> Recipe:
    """The NW-UCLA recipe, its schedule sized from the training clips and ``minutes`` (see module doc)."""
    from mtscale.data.store import Store

    st = Store.open(store)
    info = st.info()
    cols = info.get("columns", [])
    n_train = info.get("splits", {}).get(split, {}).get("train") or info["num_samples"]
    bodies = max(1, min(2, max(st.manifest.column("num_bodies").to_pylist(), default=2)))
    group = val_group(cols, split)
    geometry = ["data.clip_frames=32", f"data.num_bodies={bodies}"]
    timed = ["model.time_index=true"]  # each token's time in the recording, both stages (benchmarks/README.md)
    whole = ["data.sampling=random", "data.crop_min=1.0", "data.crop_max=1.0"]  # supervised: whole clips
    pre_cfg, ft_cfg = CONFIGS / "pretrain" / "nw_ucla.yaml", CONFIGS / "finetune" / "nw_ucla.yaml"
    ft_rate, pre_rate = calibrate(pre_cfg, ft_cfg, num_joints=info["num_joints"], num_bodies=bodies)
    budget = minutes * 60.0
    ft_s, pre_s = SHARE_SUPERVISED * budget, SHARE_PRETRAIN * budget
    epochs = int(min(EPOCHS_MAX, max(EPOCHS_MIN, ft_s * ft_rate / n_train)))
    pre_batch = min(64, 2 ** int(math.log2(max(n_train // 2, 2 * procs))))  # >= 1 batch per rank per epoch
    pre_steps = int(min(PRE_STEPS_MAX, max(PRE_STEPS_MIN, pre_s * pre_rate * procs / pre_batch)))
    lin_epochs = 60
    why = [f"{n_train} training clips, {info['num_classes']} classes, {bodies} bod{'y' if bodies == 1 else 'ies'} "
           f"per clip, split {split!r}; validation: " + (f"whole {'/'.join(group)} groups" if group else "stratified"),
           "model and augmentation of configs/finetune/nw_ucla.yaml (patch tokens, per-joint head, rotation "
           "30 deg, scale 0.2); store view-normalised; each token's time in the recording embedded "
           "(model.time_index), supervised clips drawn over the whole recording (data.sampling=random)",
           f"measured here: fine-tuning {ft_rate:.0f} clips/s on one core, pre-training {pre_rate:.0f} clips/s "
           f"per process",
           f"--minutes {minutes:g}: pre-training {pre_steps} steps of {pre_batch} ({SHARE_PRETRAIN:.0%} of the "
           f"budget, {procs} processes), then scratch and fine-tuning side by side for {epochs} epochs each "
           f"({SHARE_SUPERVISED:.0%}; bounds {EPOCHS_MIN}-{EPOCHS_MAX}), then a {lin_epochs}-epoch linear probe"]
    ft_batch = min(32, 2 ** int(math.log2(max(2, int(n_train * 0.8)))))  # the NW-UCLA batch, or what the data allows
    common = [*geometry, *timed, *whole, f"epochs={epochs}", f"train.batch_size={ft_batch}",
              f"warmup_epochs={max(1, epochs // 12)}", "run.progress=false",
              f"val_group={'[' + ','.join(group) + ']' if group else 'null'}"]
    return Recipe(
        name=f"real data, {minutes:g}-minute budget", why=why, pretrain_config=pre_cfg, finetune_config=ft_cfg,
        pretrain_sets=[*geometry, *timed, f"train.max_steps={pre_steps}", f"train.batch_size={pre_batch}",
                       f"train.warmup_steps={max(10, pre_steps // 40)}", f"train.ckpt_every={max(50, pre_steps // 5)}",
                       "train.log_every=10"],
        common_sets=common, scratch_sets=["layer_decay=1.0"], finetune_sets=[],
        linear_sets=[f"epochs={lin_epochs}", "train.lr=1e-4", "train.weight_decay=0.0", "layer_decay=1.0"],
        labels=1.0, side_by_side=True)


def val_group(columns: list[str], split: str) -> list[str]:
    """Manifest columns whose values identify one recording session ("take"), so that validation
    holds out whole takes: a cross-view split keeps both views of a take on one side (on NW-UCLA,
    82 % of random validation clips had their other view in training); a cross-subject split
    holds out whole performers. [] when the manifest has none (stratified random hold-out)."""
    if "view" in split or "camera" in split:
        return [c for c in ("action", "subject", "performer", "environment", "setup", "replication") if c in columns]
    return performer_group(columns)


def performer_group(columns: list[str]) -> list[str]:
    """The manifest column naming the performer (``subject`` or ``performer``), as a one-item
    list; [] when there is none."""
    return [c for c in ("subject", "performer") if c in columns][:1]


def calibrate(pre_cfg: Path, ft_cfg: Path, *, num_joints: int, num_bodies: int,
              batch: int = 32, steps: int = 3) -> tuple[float, float]:
    """Clips per second of a fine-tuning step and of a pre-training step of the recipe's model on
    one thread of this machine (forward + backward + AdamW, after one warm-up step)."""
    import torch

    from mtscale.config import FinetuneConfig, PretrainConfig, load_config
    from mtscale.models.encoder import ClassifierHead, MotionTransformer
    from mtscale.models.objectives import build_pretrain_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ft = load_config(FinetuneConfig, ft_cfg)
        pre = load_config(PretrainConfig, pre_cfg)
        T = ft.data.clip_frames
        x = torch.randn(batch, T, num_bodies, num_joints, 3) * 0.3
        y = torch.randint(0, 10, (batch,))
        enc = MotionTransformer.from_config(ft.model, clip_frames=T, num_bodies=num_bodies, num_joints=num_joints)
        clf = ClassifierHead(enc, 10, ft.head_drop, pool=ft.pool, hidden=ft.head_hidden)
        pm = build_pretrain_model(pre.model, pre.objective, clip_frames=T, num_bodies=num_bodies,
                                  num_joints=num_joints)
        rates = []
        for i, model in enumerate((clf, pm)):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            t0 = 0.0
            for s in range(steps + 1):
                if s == 1:
                    t0 = time.perf_counter()
                loss = (torch.nn.functional.cross_entropy(model(x), y) if i == 0
                        else model(x, None, torch.arange(batch), step=s, seed=0)[0])
                opt.zero_grad()
                loss.backward()
                opt.step()
            rates.append(batch * steps / (time.perf_counter() - t0))
        return rates[0], rates[1]
    finally:
        torch.set_num_threads(threads)


def binomial_half_width(p_percent: float, n: int) -> float:
    """Two standard errors of an accuracy measured on ``n`` clips, in points."""
    p = min(max(p_percent / 100.0, 0.0), 1.0)
    return 200.0 * math.sqrt(max(p * (1 - p), 1e-4) / max(n, 1))
