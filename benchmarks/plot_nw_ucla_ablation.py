"""NW-UCLA, joint stream, one model: every option measured for issue 26, from scratch and
pre-trained + fine-tuned, one dot per seed and a bar at the mean, against the reference ST-GCN
and the issue's targets (benchmarks/README.md has the tables, commands and CPU times).

The run directories are not kept, so the measured values are recorded here (rows marked AMD EPYC
ran on that CPU, the others on their session's machine, named in benchmarks/README.md: the same
seed gives other numbers on another CPU); rerun the commands in benchmarks/README.md to reproduce
them, then re-draw:

    python benchmarks/plot_nw_ucla_ablation.py --out benchmarks/nw_ucla_ablation.png

Protocol: views 1+2 -> view 3 (464 clips), configs/finetune/nw_ucla.yaml, whole-take validation
hold-out, last epoch, one clip, fp32 (bf16 where noted in the README). Only rows measured on
this protocol are drawn (the 2026-12-03 rows used another validation hold-out).
"""

from __future__ import annotations

import argparse
from pathlib import Path

# (label, test top-1 per seed 0, 1, 2 as measured), top to bottom
CTR_FEEDER = [89.0, 88.8, 90.5]
SCRATCH = [
    ("baseline (patch tokens, per-joint head)", [81.9, 83.0]),
    ("+ temporal conv 3 + joint mixing (adjacency)", [83.2, 81.9]),
    ("+ spatial attention + temporal conv 3", [84.7, 81.5]),
    ("+ drop-joint, drop-axis, EMA, attn-drop, drop-path 0.2", [82.8, 81.7]),
    ("frames drawn over the whole clip (sampling=random)", [83.2, 83.4]),
    ("+ time index (time_index=true)", [86.6, 86.6, 84.9]),
    ("+ graph stem, 3 blocks x 64 (graph_stem=3)", [88.8, 88.6]),
    ("+ graph stem, 6 blocks x 64 (graph_stem=6)", [90.5, 88.8, 88.8]),
    ("... the same on an AMD EPYC (other CPU, other numbers)", [89.7, 89.4]),
    ("... all 1,020 training clips (AMD EPYC)", [89.2, 91.4, 87.1]),
    ("... 52-frame clips (AMD EPYC)", [87.3]),
    ("... CTR-GCN's feeder: raw store, rotation xy 60, min-max (AMD EPYC)", CTR_FEEDER),
    ("... stem in ST-GCN's pyramid shape, 32-64-128 strided (AMD EPYC)", [89.7]),
    ("... mean head instead of the per-joint head (AMD EPYC)", [84.1]),
    ("... 1 transformer block instead of 4 (AMD EPYC)", [90.5]),
    ("... 2 transformer blocks instead of 4 (AMD EPYC)", [90.5, 89.7, 90.5]),
    ("... 2 blocks + EMA of the weights 0.998 (AMD EPYC)", [89.9]),
    ("... 2 blocks + the reference's SGD 0.1, Nesterov, batch 16 (AMD EPYC)", [84.1]),
    ("... 2 blocks, batch 16 (AMD EPYC)", [87.7]),
    ("... 2 blocks + drop-joint, drop-axis, attn-drop, drop-path 0.2 (AMD EPYC)", [88.6, 88.4, 86.6]),
    ("... 2 blocks, stem 96 channels instead of 64 (AMD EPYC)", [89.7]),
    ("time index alone (default crop + resample)", [86.4, 83.8]),
    ("CTR-GCN's feeder (raw store, rotation xy 60, min-max, T 52) + both", [85.3]),
    ("seed paper: frame tokens, mean head", [77.6]),
]
PRETRAINED = [
    ("masked motion 2,000 steps", [86.0]),
    ("... spatial attention + temporal conv 3 (both stages)", [86.4]),
    ("masked motion 6,000 steps", [87.7]),
    ("... fine-tuned on frames drawn over the whole clip", [88.4]),
    ("... + time index added at fine-tuning", [86.2]),
    ("... all 1,020 training clips (no hold-out)", [87.7]),
    ("6,000 steps, 8 blocks x 128 (not 4), whole-clip frames", [85.6, 87.3]),
    ("6,000 steps, 4 blocks x 192 (not 128), whole-clip frames", [88.8, 88.8]),
    ("6,000 steps with the time index, fine-tuned on whole-clip frames", [88.8, 88.6, 87.7]),
    ("... fine-tuned on the default crop + resample", [86.2]),
    ("... whole-clip frames + temporal conv 3 + joint mixing (adjacency)", [88.6, 88.8]),
    ("12,000 steps with the time index, whole-clip frames", [87.3, 87.3, 87.3]),
    ("masked motion 12,000 steps", [88.8, 89.7, 89.4]),
    ("... extended to 24,000 steps", [89.2, 89.9]),
    ("... second pre-training draw (same recipe)", [87.7, 87.7, 89.4]),
    ("... second draw, fine-tuned on whole-clip frames", [88.6, 90.1, 88.4]),
    ("... third draw (pre-training seed 1), whole-clip frames", [88.8, 89.7, 88.6]),
    ("... third draw + graph stem 6 blocks added at fine-tuning", [89.4, 88.6]),
    ("seed paper: frame tokens, motion flow 6,000 steps", [86.2]),
    ("... with the time index (both stages), whole-clip frames", [86.9]),
]
REFERENCE_GCN = 91.2  # benchmarks/ref_gcn_nw_ucla.py on the same pipeline
TARGETS = {"scratch": 91.2, "pre-trained": 93.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).with_name("nw_ucla_ablation.png")))
    a = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = (("from scratch", SCRATCH, "tab:blue", TARGETS["scratch"]),
              ("pre-trained on views 1+2, fine-tuned", PRETRAINED, "tab:orange", TARGETS["pre-trained"]))
    fig, axes = plt.subplots(2, 1, figsize=(10, 8.5), sharex=True,
                             gridspec_kw={"height_ratios": [len(SCRATCH) + 1, len(PRETRAINED) + 1]})
    for ax, (title, rows, color, target) in zip(axes, groups):
        ys = range(len(rows))[::-1]  # an empty row on top keeps the legend off the bars
        for y, (_label, vals) in zip(ys, rows):
            mean = sum(vals) / len(vals)
            ax.barh(y, mean, color=color, alpha=0.35, height=0.7)
            ax.plot(vals, [y] * len(vals), "o", color=color, ms=5)
            ax.text(max(vals) + 0.3, y, f"{mean:.1f} ({len(vals)} seed{'s' if len(vals) > 1 else ''})",
                    va="center", fontsize=8)
        ax.set_yticks(list(ys), [r[0] for r in rows], fontsize=8)
        ax.axvline(REFERENCE_GCN, color="k", ls="--", lw=1, label=f"ST-GCN reference, same pipeline ({REFERENCE_GCN})")
        ax.axvline(target, color="tab:red", ls=":", lw=1.5, label=f"issue 26 target ({target})")
        ax.set_ylim(-0.6, len(rows) + 0.4)
        ax.set_title(title, fontsize=10, loc="left")
        ax.legend(fontsize=7, loc="upper right", framealpha=1.0)
    axes[-1].set_xlim(75, 95)
    axes[-1].set_xlabel("NW-UCLA view 3 test top-1 (%), joint stream, last epoch, one clip")
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
