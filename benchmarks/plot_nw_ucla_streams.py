"""NW-UCLA: each input stream from scratch, pre-trained (2,000 steps on its own stream; 6,000
steps on joint / bone, the motion streams fine-tuned from those encoders; 6,000 steps on joint
with the time index, every stream fine-tuned from that one encoder; from scratch with the graph
stem), and the ensembles of their
softmax scores, as one grouped bar chart (benchmarks/README.md; issue 27).

The run directories are not kept, so the measured values are recorded here with their date;
rerun the commands in benchmarks/README.md to reproduce them, then re-draw:

    python benchmarks/plot_nw_ucla_streams.py --out benchmarks/nw_ucla_streams.png

Protocol: views 1+2 -> view 3 (464 clips), configs/finetune/nw_ucla.yaml from scratch
(``--protocol scratch --set layer_decay=1.0``) or from a pre-trained encoder, seed 0,
whole-take validation, last epoch, one clip.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# 2026-12-06, AMD EPYC 2-core VM, torch 2.13.0+cpu, ~1,000 CPU-s per stream
STREAMS = {"joint": 81.9, "bone": 71.3, "joint_motion": 80.8, "bone_motion": 71.1}
ENSEMBLES = {
    "joint + bone\n(auto weights)": 78.0,
    "joint + bone\n(equal weights)": 84.5,
    "4 streams\n(auto weights)": 88.4,
    "4 streams\n(equal weights)": 88.4,
}
# 2026-12-06, AMD EPYC Zen 4 2-core VM (bf16 autocast), 2,000-step pre-training per stream
PRETRAINED = {"joint": 84.9, "bone": 82.5, "joint_motion": 77.8, "bone_motion": 58.2,
              "joint + bone\n(auto weights)": 88.6, "4 streams\n(auto weights)": 88.6,
              "4 streams\n(equal weights)": 90.1}
# 2026-12-07, Intel Xeon with AMX 2-core VM (fp32): joint and bone pre-trained 6,000 steps on their own
# stream; joint_motion fine-tuned from the joint encoder, bone_motion from the bone encoder
# (allow_stream_mismatch); auto weights 0.4 / 0.4 / 0.2 / 0
PRETRAINED_6K = {"joint": 87.7, "bone": 78.4, "joint_motion": 81.9, "bone_motion": 79.7,
                 "joint + bone\n(equal weights)": 87.7, "4 streams\n(auto weights)": 89.4,
                 "4 streams\n(equal weights)": 89.0}
# 2026-12-07 (second session), same Xeon, fp32: one joint encoder pre-trained 6,000 steps with
# model.time_index; every stream fine-tuned from it with data.sampling=random over whole clips;
# auto weights 0 / 0.57 / 0.29 / 0.14
TIME_INDEX_6K = {"joint": 88.8, "bone": 86.6, "joint_motion": 84.5, "bone_motion": 87.1,
                 "4 streams\n(auto weights)": 90.3, "4 streams\n(equal weights)": 91.2}
# 2026-12-07 (sixth session), AMD EPYC 2-core VM, fp32: every stream from scratch with the time index,
# whole-clip frames and the 6-block graph stem (model.graph_stem=6), ~1,800 CPU-s per stream
STEM_SCRATCH = {"joint": 89.7, "bone": 88.4, "joint_motion": 86.6, "bone_motion": 86.0,
                "joint + bone\n(auto weights)": 91.8, "joint + bone\n(equal weights)": 92.5,
                "4 streams\n(auto weights)": 92.2, "4 streams\n(equal weights)": 92.2}
REFERENCE = {"ST-GCN reference (benchmarks/ref_gcn_nw_ucla.py)": 91.2, "issue 27 target (pre-trained, 4 streams)": 94.5}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).with_name("nw_ucla_streams.png")))
    a = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scratch = {**STREAMS, **ENSEMBLES}
    names = list(scratch)
    fig, ax = plt.subplots(figsize=(11, 6.4))
    series_all = (("from scratch", scratch, "tab:blue"),
                  ("pre-trained, 2,000 steps on each stream (bf16, Zen 4)", PRETRAINED, "tab:orange"),
                  ("pre-trained, 6,000 steps on joint / bone; motion streams from those encoders (fp32, Xeon)",
                   PRETRAINED_6K, "tab:green"),
                  ("pre-trained 6,000 steps on joint with the time index; every stream from that encoder, "
                   "whole-clip frames (fp32, Xeon)", TIME_INDEX_6K, "tab:red"),
                  ("from scratch with the time index, whole-clip frames and the graph stem (fp32, EPYC)",
                   STEM_SCRATCH, "tab:purple"))
    for off, (label, series, color) in zip((-0.32, -0.16, 0.0, 0.16, 0.32), series_all):
        xs = [i + off for i, n in enumerate(names) if n in series]
        vs = [series[n] for n in names if n in series]
        bars = ax.bar(xs, vs, width=0.16, color=color, label=label)
        for b, v in zip(bars, vs):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.3, f"{v:.1f}", ha="center", va="bottom", fontsize=5)
    for (label, y), style in zip(REFERENCE.items(), ("--", ":")):
        ax.axhline(y, color="grey", linestyle=style, linewidth=1)
        ax.text(len(names) - 0.5, y + 0.3, label, ha="right", va="bottom", fontsize=8, color="dimgrey")
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylim(50, 104)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1, fontsize=7, frameon=False)
    ax.set_ylabel("test top-1 on view 3 (%)")
    ax.set_title("NW-UCLA, seed 0: single streams and softmax ensembles, from scratch and pre-trained", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
