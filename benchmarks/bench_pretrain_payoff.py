"""Does self-supervised pre-training pay off? Side by side, in one run, on synthetic NTU-format
data split by performer (``split_xsub60``: no test performer is seen in training):

1. pre-train an encoder (``mtscale pretrain``, masked motion, no labels) on the training part;
2. linear probe on the pre-trained encoder's frozen features  vs  on a random-init encoder
   of the same architecture (target: >= 20 points better);
3. with 10 % of the training labels (class-stratified), fine-tune from the pre-trained
   weights  vs  train from scratch with the same schedule (target: >= 5 points better).

Every accuracy is the test part at the last epoch (model selection never sees it). Each linear
probe's lr is chosen per encoder on a validation hold-out of whole performers (``val_group``,
like the test split) from ``--probe-lrs``: one fixed lr favours whichever encoder's features
happen to suit it (lr 0.1, the old fixed setting, is ~100x too high for AdamW on NW-UCLA).

    python benchmarks/bench_pretrain_payoff.py --quick --json /tmp/payoff.json
    python benchmarks/bench_pretrain_payoff.py --workdir /tmp/payoff           # full run

Writes a flat JSON object (``--json``) and prints a markdown row for benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = {
    # samples, classes, pre-training steps (batch 32), linear-probe epochs, semi epochs
    "quick": dict(num_samples=600, num_classes=8, pretrain_steps=150, linear_epochs=100, semi_epochs=15),
    "full": dict(num_samples=3000, num_classes=12, pretrain_steps=1500, linear_epochs=100, semi_epochs=40),
}
MODEL = ["model.size=tiny", "model.dim=96", "model.depth=3", "model.heads=4", "model.patch_frames=4"]
"""The encoder of every run; ``--tokenization`` adds ``model.tokenization``."""
PROBE_LRS = "1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1"
"""The linear probes' lr grid (AdamW, no weight decay); the best validation top-1 is reported."""
VAL = ["val_fraction=0.1", "val_group=[performer]"]
"""Validation: 10 % of the training part, whole performers per class (the test split is by performer)."""
DATA = ["data.clip_frames=32", "data.num_bodies=2", "data.split=xsub60", "data.part=train", "data.num_workers=0",
        "data.crop_min=0.5", "data.crop_max=1.0", "data.augment.rotate_deg=15", "data.augment.scale=0.1"]


def sh(args: list[str], log: Path) -> float:
    """Run a command (logged to ``log``); returns its wall time. Fails loudly."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        r = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"bench_pretrain_payoff: {' '.join(args[:4])} ... failed (exit {r.returncode}); see {log}")
    return time.perf_counter() - t0


def finetune(name: str, work: Path, store: str, model: list[str], sets: list[str]) -> dict:
    from mtscale.config import FinetuneConfig, load_config
    from mtscale.train.finetune import run_finetune

    cfg = load_config(FinetuneConfig, ROOT / "configs" / "finetune" / "tiny_cpu.yaml",
                      [f"data.store={store}", f"run.dir={work / name}", "run.progress=false",
                       "run.tensorboard=false", "keep_best=false", *DATA, *model, *sets])
    t0 = time.perf_counter()
    res = run_finetune(cfg)
    res["wall_s"] = time.perf_counter() - t0
    print(f"  {name:<24} val top-1 {res['val_top1']:6.2f}%  test top-1 {res['test_top1']:6.2f}%  "
          f"({res['wall_s']:.0f} s, {res['train']} train samples)", flush=True)
    return res


def probe(name: str, work: Path, store: str, model: list[str], sets: list[str], lrs: list[float]) -> dict:
    """One linear probe per lr; returns the run with the best validation top-1 (ties: the smaller
    lr), with ``lr`` and the whole ``grid`` ({lr: [val, test]}) added."""
    runs = {lr: finetune(f"{name}_lr{lr:g}", work, store, model, sets + [f"train.lr={lr}"]) for lr in lrs}
    best = max(lrs, key=lambda lr: (runs[lr]["val_top1"], -lr))
    print(f"  {name}: lr {best:g} chosen on validation", flush=True)
    return dict(runs[best], lr=best, grid={f"{lr:g}": [r["val_top1"], r["test_top1"]] for lr, r in runs.items()})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small data and schedules (a few CPU minutes)")
    ap.add_argument("--workdir", default=None, help="where data and runs go (default: a temp dir)")
    ap.add_argument("--json", default=None, help="write the results as a flat JSON object")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--objective", default="masked_motion", choices=["masked_motion", "masked_recon", "motion_flow"],
                    help="pre-training objective")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="override the setting's pre-training steps")
    ap.add_argument("--tokenization", default="patch", choices=["patch", "frame"],
                    help="encoder tokens: patch (4 frames x 1 joint, MAMP) or frame (Motion-Transformer)")
    ap.add_argument("--mask-ratio", type=float, default=0.5,
                    help="objective.mask_ratio (0.5: 90 %% left too few of a 32-frame clip's tokens, README)")
    ap.add_argument("--posture", default="class", choices=["class", "shared"],
                    help="synthetic data: classes differ in base pose and motion (class) or in motion only (shared)")
    ap.add_argument("--norm-target", default="token", choices=["token", "global", "none"],
                    help="target normalisation of the objective (objective.norm_target)")
    ap.add_argument("--pool", default="mean", choices=["mean", "joint"],
                    help="classifier features: mean over tokens (MAMP's probe) or per-joint columns (MAMP's "
                         "fine-tuning head; the probe is then linear on V x D features)")
    ap.add_argument("--probe-lrs", default=PROBE_LRS,
                    help="comma-separated lr grid of the linear probes, chosen per encoder on validation")
    a = ap.parse_args(argv)
    lrs = [float(x) for x in a.probe_lrs.split(",")]
    s = dict(SETTINGS["quick" if a.quick else "full"])
    model = [*MODEL, f"model.tokenization={a.tokenization}"]
    if a.pretrain_steps:
        s["pretrain_steps"] = a.pretrain_steps
    import tempfile

    work = Path(a.workdir or tempfile.mkdtemp(prefix="mtscale-payoff-"))
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    t_all, c_all = time.perf_counter(), time.process_time()

    store = str(work / "store")
    if not (work / "store" / "manifest.parquet").exists():
        sh([py, "-m", "mtscale.cli", "synth", "--out", str(work / "raw"), "--num-samples", str(s["num_samples"]),
            "--num-classes", str(s["num_classes"]), "--seed", str(a.seed), "--posture", a.posture, "--quiet"],
           work / "synth.log")
        sh([py, "-m", "mtscale.cli", "prepare", "--format", "ntu", "--input", str(work / "raw"), "--out", store,
            "--quiet"], work / "prepare.log")

    pre = work / "pretrain"
    t_pre = 0.0
    if not (pre / "encoder.safetensors").exists():
        sets = [f"data.store={store}", f"run.dir={pre}", f"train.max_steps={s['pretrain_steps']}",
                "train.batch_size=32", "train.lr=1.5e-3", "train.warmup_steps=10", "train.ckpt_every=100000",
                "train.log_every=25", "run.progress=false", "run.tensorboard=false", f"train.seed={a.seed}",
                f"objective.kind={a.objective}", f"objective.mask_ratio={a.mask_ratio}",
                "objective.masking=motion_aware", f"objective.norm_target={a.norm_target}",
                "objective.decoder_dim=64", "objective.decoder_depth=1", "objective.decoder_heads=4", *DATA, *model]
        cmd = [py, "-m", "mtscale.pretrain", "--config", str(ROOT / "configs" / "pretrain" / "tiny_cpu.yaml")]
        t_pre = sh(cmd + [x for kv in sets for x in ("--set", kv)], work / "pretrain.log")
    print(f"  pre-training: {t_pre:.0f} s", flush=True)
    enc = str(pre / "encoder.safetensors")
    seed = [f"train.seed={a.seed}", f"pool={a.pool}"]
    # a converged probe (100 epochs on cached features), its lr chosen on validation per encoder
    lin = ["protocol=linear", f"epochs={s['linear_epochs']}", "warmup_epochs=1", "train.weight_decay=0.0",
           "train.batch_size=32", *VAL, *seed]
    # the random-init probe: the same linear-probe code path on a scratch encoder, frozen
    rnd = _random_encoder(work, pre)
    r_lin_pre = probe("linear_pretrained", work, store, model, lin + [f"pretrained={enc}"], lrs)
    r_lin_rnd = probe("linear_random", work, store, model, lin + [f"pretrained={rnd}"], lrs)
    # (its hold-out stays single samples, as in the recorded semi rows: it only decides which samples
    # train, since the last epoch is reported)
    semi = [f"epochs={s['semi_epochs']}", "warmup_epochs=1", "data.label_fraction=0.1", "train.batch_size=8",
            "val_fraction=0.1", *seed]
    r_ft = finetune("semi10_pretrained", work, store, model, semi + ["protocol=semi", f"pretrained={enc}",
                                                               "layer_decay=0.75", "train.lr=1.0e-3"])
    r_scr = finetune("semi10_scratch", work, store, model, semi + ["protocol=scratch", "layer_decay=1.0", "train.lr=1.0e-3"])

    out = {
        "linear_pretrained_top1": r_lin_pre["test_top1"], "linear_random_top1": r_lin_rnd["test_top1"],
        "linear_gain_points": r_lin_pre["test_top1"] - r_lin_rnd["test_top1"],
        "linear_pretrained_lr": r_lin_pre["lr"], "linear_random_lr": r_lin_rnd["lr"],
        "linear_pretrained_grid": r_lin_pre["grid"], "linear_random_grid": r_lin_rnd["grid"],
        "semi10_finetune_top1": r_ft["test_top1"], "semi10_scratch_top1": r_scr["test_top1"],
        "semi10_gain_points": r_ft["test_top1"] - r_scr["test_top1"],
        "chance_top1": 100.0 / s["num_classes"], "num_test": r_ft["test"], "num_train_semi10": r_ft["train"],
        "pretrain_wall_s": t_pre, "wall_s": time.perf_counter() - t_all, "cpu_s_this_process": time.process_time() - c_all,
        "quick": bool(a.quick), "posture": a.posture, "objective": a.objective, "norm_target": a.norm_target,
        "mask_ratio": a.mask_ratio, "tokenization": a.tokenization, "pool": a.pool, **{f"setting_{k}": v for k, v in s.items()},
        "hardware": _hardware(), "torch": _torch_version(), "workdir": str(work),
    }
    out["linear_target_met"] = out["linear_gain_points"] >= 20.0
    out["semi10_target_met"] = out["semi10_gain_points"] >= 5.0
    row = (f"| {'quick' if a.quick else 'full'} | {s['num_samples']} / {s['num_classes']} | "
           f"{out['linear_pretrained_top1']:.1f} vs {out['linear_random_top1']:.1f} (**{out['linear_gain_points']:+.1f}**) | "
           f"{out['semi10_finetune_top1']:.1f} vs {out['semi10_scratch_top1']:.1f} (**{out['semi10_gain_points']:+.1f}**) | "
           f"{out['wall_s'] / 60:.1f} min | {out['hardware']} |")
    out["markdown_row"] = row
    print(row)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    return 0


def _random_encoder(work: Path, pre: Path) -> str:
    """A randomly initialised encoder of the pre-trained one's architecture, in the export format."""
    import torch

    from mtscale.config import ModelConfig, from_dict
    from mtscale.models.encoder import MotionTransformer
    from mtscale.train.checkpoint import save_encoder

    meta = json.loads((pre / "encoder.json").read_text())
    torch.manual_seed(12345)
    enc = MotionTransformer.from_config(from_dict(ModelConfig, meta["model"], "model"), clip_frames=meta["clip_frames"],
                                        num_bodies=meta["num_bodies"], num_joints=meta["num_joints"])
    out = work / "random_encoder.safetensors"
    save_encoder(enc.state_dict(), dict(meta, step=0, note="random init"), out)
    return str(out)


def _hardware() -> str:
    from mtscale.train.metrics import hardware_summary

    return hardware_summary()


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
