"""The quickstart pipeline behind ``mtscale quickstart`` (entry point: ``mtscale/quickstart.py``).

Each stage runs the real command a user would type (``mtscale synth | prepare``, ``deepspeed
mtscale/pretrain.py``, ``mtscale finetune | tune``) as a subprocess, its output teed to
``<workdir>/logs/<stage>.log``; a finished stage leaves ``<workdir>/.done/<stage>.json`` and is
skipped on re-run, a half-finished one resumes from its own checkpoints. ``run_quickstart``
runs them in order and writes ``summary.md`` / ``summary.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mtscale.errors import ConfigError, MtscaleError
from mtscale.files import atomic_write
from mtscale.recipes import CONFIGS, ROOT, Recipe, binomial_half_width, data_recipe, demo_recipe


class Pipeline:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.workdir).resolve()
        self.recipe: Recipe = demo_recipe(args.quick)  # replaced by data_recipe once a --data store exists
        self.done_dir = self.work / ".done"
        self.store = self.work / "store"
        self.split = args.split or ("view" if args.format == "nw-ucla" else "xsub120")
        self.log_dir = self.work / "logs"

    # ------------------------------------------------------------------ helpers
    def _done(self, stage: str) -> dict | None:
        f = self.done_dir / f"{stage}.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def _mark(self, stage: str, info: dict) -> dict:
        atomic_write(self.done_dir / f"{stage}.json", json.dumps(info, indent=2, default=str))
        return info

    def _run(self, stage: str, cmd: list[str], env: dict | None = None) -> None:
        """Run one stage's command, its output teed to logs/<stage>.log; fail with its tail."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{stage}.log"
        print(f"\n[{stage}] $ {shlex.join(cmd)}", flush=True)
        with open(log_path, "a", buffering=1) as log:  # line-buffered: the log shows a stage that hangs
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})}, cwd=self.work)
            assert proc.stdout is not None
            # newline="" keeps tqdm's "\r" updates apart from finished lines: a progress bar is
            # redrawn in place on a terminal, finished lines are filtered and printed.
            for line in io.TextIOWrapper(proc.stdout, encoding="utf-8", errors="replace", newline=""):
                log.write(line)
                if line.endswith("\r") or "\r" in line.rstrip("\n"):
                    if sys.stdout.isatty():
                        sys.stdout.write("\r  " + line.strip("\r\n")[:150].ljust(150) + "\r")
                        sys.stdout.flush()
                elif self._show(line):
                    sys.stdout.write(f"  [{stage}] {line}")
                    sys.stdout.flush()
            rc = proc.wait()
            if sys.stdout.isatty():
                sys.stdout.write("\r" + " " * 154 + "\r")
        if rc != 0:  # one line: the stage's own error line, else its last line (the log's tail on stdout)
            tail = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()][-15:]
            why = next((ln for ln in reversed(tail) if ln.startswith("mtscale ") and ": error: " in ln), None)
            if why is None:
                print("".join(f"  | {ln}\n" for ln in tail), end="", flush=True)
                why = tail[-1] if tail else "no output"
            raise MtscaleError(f"stage {stage} failed (exit {rc}): {why.strip()}; log {log_path}")

    @staticmethod
    def _show(line: str) -> bool:
        keep = ("step", "epoch", "top-1", "top1", "prepared", "wrote", "error", "Error", "resum", "trial", "best",
                "Trial", "samples")
        noise = ("DeprecationWarning", "[INFO]", "[WARNING]", "spawned with command",  # launcher chatter
                 "Checkpoint successfully created", "snapshotting", "You may want", "You can suppress")  # Ray's
        return any(k in line for k in keep) and not any(n in line for n in noise)

    def _mtscale(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "mtscale.cli", *args]

    def choose_data_recipe(self) -> Recipe:
        """The ``--data`` recipe, chosen once (its timing measurement) and kept for re-runs."""
        if (info := self._done("recipe")) is not None:
            return Recipe(**{k: Path(v) if k.endswith("_config") else v for k, v in info.items()})
        r = data_recipe(str(self.store), self.split, self.args.minutes, self.args.procs)
        self._mark("recipe", dataclasses.asdict(r))
        return r

    # ------------------------------------------------------------------ stages
    def synth(self) -> dict:
        raw = self.work / "raw"
        if self.args.data:
            return {"raw": str(Path(self.args.data).resolve()), "synthetic": False}
        if (info := self._done("synth")) is not None:
            return info
        shutil.rmtree(raw, ignore_errors=True)
        p = self.recipe.synth
        self._run("synth", self._mtscale("synth", "--out", str(raw), "--num-samples", str(p["samples"]),
                                         "--num-classes", str(p["classes"]), "--seed", "0", "--workers", "2"))
        return self._mark("synth", {"raw": str(raw), "synthetic": True})

    def prepare(self, raw: str) -> dict:
        if (info := self._done("prepare")) is not None:
            self.split = info.get("split", self.split)  # the split chosen on the first run
            return info
        real = ["--view-normalize", "--dtype", "float32"] if self.args.data else []  # the NW-UCLA store recipe
        self._run("prepare", self._mtscale("prepare", "--format", self.args.format, "--input", raw,
                                           "--out", str(self.store), "--workers", "2", *real))
        from mtscale.data.store import Store

        info = Store.open(str(self.store)).info()
        if self.args.data and self.args.split is None and not info.get("splits", {}).get(self.split):
            self.split = self._default_split(info)
            info = Store.open(str(self.store)).info()
        splits = info.get("splits", {}).get(f"split_{self.split}") or info.get("splits", {}).get(self.split)
        if not splits:
            raise ConfigError(f"--split: store {self.store} has no split {self.split!r}; "
                              f"found {sorted(info.get('splits', {}))}")
        return self._mark("prepare", {"num_samples": info["num_samples"], "num_frames": info["num_frames"],
                                      "splits": info.get("splits", {}), "num_classes": len(info["label_counts"]),
                                      "split": self.split})

    def _default_split(self, info: dict) -> str:
        """--data without --split: the format's usual split if the store has it, else the store's
        first split, else a stratified hold-out of 20 % made now (whole performers where known)."""
        from mtscale.data.subsets import HOLDOUT, add_holdout_split
        from mtscale.recipes import performer_group

        have = sorted(info.get("splits", {}))
        if have:
            print(f"split: the store has no {self.split!r}; using {have[0]!r} (of {have})", flush=True)
            return have[0]
        group = performer_group(info.get("columns", []))
        sizes = add_holdout_split(str(self.store), 0.2, group or None)
        what = f"of the {group[0]}s, whole," if group else "of each class"
        print(f"split: the data has none; held out 20 % {what} as the test set: {sizes}", flush=True)
        return HOLDOUT

    def pretrain(self) -> dict:
        run = self.work / "pretrain"
        if (info := self._done("pretrain")) is not None:
            return info
        r = self.recipe
        sets = [f"data.store={self.store}", f"run.dir={run}", f"data.split={self.split}", "data.part=train",
                *r.pretrain_sets]
        import torch

        gpus = torch.cuda.device_count()
        launcher = Path(sys.executable).with_name("deepspeed")
        if not launcher.exists():
            launcher = Path(shutil.which("deepspeed") or "deepspeed")
        nprocs = gpus if gpus > 0 else self.args.procs
        cmd = [str(launcher), "--num_gpus", str(nprocs), "--master_port", str(_free_port()),
               str(ROOT / "mtscale" / "pretrain.py"), "--config", str(r.pretrain_config)]
        for s in sets:
            cmd += ["--set", s]
        env = {} if gpus > 0 else {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nprocs))}
        self._run("pretrain", cmd, env)
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        rows = [r for r in rows if "loss" in r]
        tail = rows[-5:] if rows else []
        sps = [r["samples_per_s"] for r in tail if "samples_per_s" in r]
        return self._mark("pretrain", {
            "run_dir": str(run), "encoder": str(run / "encoder.safetensors"), "processes": nprocs,
            "steps": rows[-1].get("step") if rows else None,
            "loss_first": rows[0]["loss"] if rows else None, "loss_last": rows[-1]["loss"] if rows else None,
            "samples_per_s": sum(sps) / len(sps) if sps else None,
            "tokens_per_s": (sum(r["tokens_per_s"] for r in tail if "tokens_per_s" in r) / len(sps)) if sps else None,
            "loss_png": str(run / "loss.png")})

    def supervised_cmd(self, stage: str, protocol: str, encoder: str | None) -> list[str]:
        """The ``mtscale finetune`` command of a supervised stage (scratch | finetune | linear)."""
        r = self.recipe
        if protocol == "finetune" and r.labels < 1.0:
            protocol = "semi"  # fine-tuning on a class-stratified share of the labels
        sets = [f"data.store={self.store}", f"data.split={self.split}", f"run.dir={self.work / stage}",
                *r.common_sets, *{"scratch": r.scratch_sets, "finetune": r.finetune_sets, "linear": r.linear_sets}[stage]]
        args = ["finetune", "--config", str(r.finetune_config), "--protocol", protocol]
        for s in sets:
            args += ["--set", s]
        if encoder:
            args += ["--pretrained", encoder]
        return self._mtscale(*args)

    def finetune(self, stage: str, protocol: str, encoder: str | None, env: dict | None = None) -> dict:
        if (info := self._done(stage)) is not None:
            return info
        run = self.work / stage
        self._run(stage, self.supervised_cmd(stage, protocol, encoder), env)
        res = json.loads((run / "results.json").read_text())
        return self._mark(stage, {k: res.get(k) for k in ("test_top1", "test_top5", "test_top1_best", "val_top1",
                                                          "wall_s", "cpu_s", "epochs", "run_dir", "train", "val",
                                                          "test")}
                          | {"confusion_png": str(run / "final" / "test_confusion.png")})

    def side_by_side(self, jobs: list[tuple[str, str, str | None]]) -> dict[str, dict]:
        """Several supervised stages at once, one core each (2-core machines: scratch and fine-tuning)."""
        import threading

        out: dict[str, dict] = {}
        errors: list[BaseException] = []

        def one(stage: str, protocol: str, encoder: str | None) -> None:
            try:
                out[stage] = self.finetune(stage, protocol, encoder, {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
            except BaseException as e:  # re-raised below, after the other stage has finished
                errors.append(e)

        threads = [threading.Thread(target=one, args=job, name=job[0]) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return out

    def tune(self, encoder: str) -> dict:
        if (info := self._done("tune")) is not None:
            return info
        r = self.recipe
        storage = self.work / "tune"
        args = ["tune", "--config", str(CONFIGS / "tune" / "tiny_cpu.yaml"),
                "--set", f"overrides.data.store={self.store}", "--set", f"overrides.data.split={self.split}",
                "--set", f"pretrained={encoder}", "--set", f"storage_path={storage}",
                "--set", f"num_samples={r.tune_samples}", "--set", "name=quickstart"]
        for kv in [*r.common_sets, f"epochs={r.tune_epochs}"] + (["protocol=semi"] if r.labels < 1.0 else []):
            args += ["--set", f"overrides.{kv}"]
        if (storage / "quickstart").is_dir():
            args.append("--resume")
        self._run("tune", self._mtscale(*args), {"RAY_USAGE_STATS_ENABLED": "0"})
        exp = storage / "quickstart"
        best = json.loads((exp / "best_trial.json").read_text()) if (exp / "best_trial.json").is_file() else {}
        import pyarrow.parquet as pq

        trials = pq.read_table(exp / "trials.parquet").to_pandas()
        return self._mark("tune", {"experiment": str(exp), "num_trials": len(trials),
                                   "statuses": trials["status"].value_counts().to_dict(),
                                   "best": best, "plots": sorted(str(x) for x in (exp / "plots").glob("*.png"))})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fmt(v: Any, pct: bool = True) -> str:
    if v is None:
        return "n/a"
    return f"{v:.1f}%" if pct else f"{v:.1f}"


ROWS = (("scratch", "from scratch"), ("finetune", "fine-tuned from the pre-trained encoder"),
        ("linear", "linear probe on the pre-trained encoder"))


def verdict(stages: dict[str, dict], labels: float) -> str:
    """One plain sentence: did pre-training pay here (fine-tuned vs scratch, same labels and budget)?"""
    scr, ft, lin = (stages.get(k) or {} for k in ("scratch", "finetune", "linear"))
    if scr.get("test_top1") is None or ft.get("test_top1") is None:
        return "Pre-training: no comparison (a stage is missing)."
    gain = ft["test_top1"] - scr["test_top1"]
    noise = binomial_half_width(scr["test_top1"], int(scr.get("test") or 0))
    with_labels = (f"with {labels:.0%} of the labels ({scr.get('train')} labelled clips)" if labels < 1.0
                   else f"with all {scr.get('train')} labelled training clips")
    if gain > noise:
        head = f"Pre-training paid here: +{gain:.1f} points"
    elif gain < -noise:
        head = f"Pre-training did not pay here: {gain:+.1f} points"
    else:  # inside the band: neither claim is supported by one run
        head = f"Pre-training made no clear difference here: {gain:+.1f} points, inside the noise band"
    s = (f"{head} ({ft['test_top1']:.1f} % fine-tuned against {scr['test_top1']:.1f} % from scratch, {with_labels}, "
         f"same epochs, batch and seed; one run on {scr.get('test')} test clips, whose 2-standard-error band is "
         f"about +-{noise:.1f} points)")
    if lin.get("test_top1") is not None:
        s += f"; the frozen pre-trained encoder with a linear head reaches {lin['test_top1']:.1f} %"
    return s + "."


def plot_summary(stages: dict[str, dict], out: Path, title: str) -> Path | None:
    """Bar chart of the test top-1 of each supervised stage (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return None
    names = [(label, stages[k]["test_top1"]) for k, label in ROWS if stages.get(k, {}).get("test_top1") is not None]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    colours = ["#8c8c8c", "#dd8452", "#4c72b0"][:len(names)][::-1]  # scratch grey, pre-trained in colour
    bars = ax.barh([n for n, _ in names][::-1], [v for _, v in names][::-1], color=colours)
    for b, (_, v) in zip(bars, names[::-1]):
        ax.text(b.get_width() + 0.5, b.get_y() + b.get_height() / 2, f"{v:.1f} %", va="center")
    ax.set_xlim(0, 105)
    ax.set_xlabel("test top-1 (%), last epoch")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def summarize(work: Path, stages: dict[str, dict], wall_s: float, recipe: Recipe) -> str:
    pre, prep = stages["pretrain"], stages["prepare"]
    lines = [
        "# mtscale quickstart summary", "",
        f"Recipe: {recipe.name}. Data: {prep['num_samples']} samples, {prep['num_frames']} frames, "
        f"{prep['num_classes']} classes (store: `{work / 'store'}`)", "",
        verdict(stages, recipe.labels), "",
        "| protocol | labelled clips | test top-1 (last epoch) | test top-5 | val top-1 | epochs | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, label in ROWS:
        r = stages.get(name)
        if r:
            lines.append(f"| {label} | {r.get('train')} | {_fmt(r.get('test_top1'))} | {_fmt(r.get('test_top5'))} | "
                         f"{_fmt(r.get('val_top1'))} | {r.get('epochs')} | {_fmt(r.get('wall_s'), False)} |")
    lines += ["", f"Pre-training (no labels): {pre.get('steps')} steps on {pre.get('processes')} processes, loss "
              f"{pre.get('loss_first'):.4f} -> {pre.get('loss_last'):.4f}; "
              f"{_fmt(pre.get('samples_per_s'), False)} samples/s, {pre.get('tokens_per_s') or 0:.3g} tokens/s"
              if pre.get("loss_first") is not None else "Pre-training: no metrics found"]
    t = stages.get("tune")
    if t:
        best = t.get("best") or {}
        metric = best.get("value")
        lines += ["", f"Sweep (fine-tuning, same labels): {t['num_trials']} trials ({t['statuses']}); best "
                  f"{best.get('metric', 'val_top1')} = {_fmt(metric) if isinstance(metric, (int, float)) else metric} "
                  f"with {json.dumps(best.get('config', {}), default=str)}"]
    chart = plot_summary(stages, work / "summary.png", f"{recipe.name}: test top-1")
    plots = [str(chart) if chart else None, pre.get("loss_png")] + \
        [stages[s].get("confusion_png") for s, _ in ROWS if stages.get(s)] + (t.get("plots", []) if t else [])
    lines += ["", "Plots:"] + [f"- `{p}`" for p in plots if p and Path(p).exists()]
    lines += ["", f"Total wall time: {wall_s:.0f} s"]
    return "\n".join(lines) + "\n"


def run_quickstart(args: argparse.Namespace) -> str:
    """Every stage in order (see mtscale/quickstart.py); returns the summary text it wrote."""
    if not CONFIGS.is_dir():
        raise ConfigError(f"{CONFIGS}: configs folder not found; run the quickstart from a source checkout")
    if args.data is not None and not Path(args.data).exists():
        raise ConfigError(f"--data: {args.data} not found, expected a file or folder of raw recordings")
    if args.procs < 1:
        raise ConfigError(f"--procs: found {args.procs}, expected >= 1")
    if args.minutes <= 0:
        raise ConfigError(f"--minutes: found {args.minutes}, expected > 0")
    pipe = Pipeline(args)
    pipe.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stages: dict[str, dict] = {}
    raw = pipe.synth()["raw"]
    stages["prepare"] = pipe.prepare(raw)
    if args.data:
        pipe.recipe = pipe.choose_data_recipe()
    print(f"\nrecipe: {pipe.recipe.name}" + "".join(f"\n  - {w}" for w in pipe.recipe.why), flush=True)
    stages["pretrain"] = pipe.pretrain()
    encoder = stages["pretrain"]["encoder"]
    if pipe.recipe.side_by_side and (os.cpu_count() or 1) >= 2:
        stages.update(pipe.side_by_side([("scratch", "scratch", None), ("finetune", "finetune", encoder)]))
    else:
        stages["scratch"] = pipe.finetune("scratch", "scratch", None)
        stages["finetune"] = pipe.finetune("finetune", "finetune", encoder)
    stages["linear"] = pipe.finetune("linear", "linear", encoder)
    if not args.skip_tune and pipe.recipe.tune_samples > 0:
        stages["tune"] = pipe.tune(encoder)
    wall = time.perf_counter() - t0
    text = summarize(pipe.work, stages, wall, pipe.recipe)
    atomic_write(pipe.work / "summary.md", text)
    atomic_write(pipe.work / "summary.json", json.dumps({"recipe": {"name": pipe.recipe.name, "why": pipe.recipe.why},
                                                          "stages": stages, "wall_s": wall}, indent=2, default=str))
    return text
