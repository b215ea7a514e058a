"""One command that checks a GPU machine end to end for mtscale (issue 25): device, NCCL, bf16,
the loader, the SDPA kernels, pre-training through the real ``deepspeed`` launcher, resume,
ZeRO-3 + offload, fine-tuning, evaluation, and step throughput / MFU per model size.

    python benchmarks/gpu_check.py --json out/gpu_check_h100.json      # one GPU: < 5 min on an H100
    python benchmarks/gpu_check.py --quick --json out/gc.json          # throughput of `small` only
    python benchmarks/gpu_check.py --dry-run --json /tmp/gc.json       # CPU, CI-sized (~2-3 min, 2 cores)
    python benchmarks/gpu_check.py --only sdpa_kernel,loader --workdir /tmp/gc   # a few, keep the runs

Prints a markdown table (check | result | detail); ``--json PATH`` writes a flat JSON object:
``check_<name>`` (``pass``, ``fail`` or ``skipped: <why>``), ``detail_<name>`` (for a failure,
its one-line error), ``seconds_<name>``, the measured values (``pretrain_loss_first``,
``resume_from_step``, ``zero3_decay_params``, ``throughput_small_patch_mfu``, ...) and the
hardware (``hw_*``: GPU, CPU model, cores, CPU flags avx512 / amx). Every check is independent:
a failure is recorded and the next check runs; exit code 1 if any check that ran failed.

``--dry-run`` runs the same checks on the CPU in a CI-sized form: tiny models, few steps, 2
processes with gloo, fp32 (bf16 only on a CPU with avx512_bf16 / amx_bf16); the lines that
need CUDA (CUDA/NCCL versions, bf16 support) say ``skipped: no CUDA``. On a GPU the checks
assert what only a GPU can show: SDPA runs the flash kernel without a mask and the
memory-efficient one with a key-padding mask; the collectives go through NCCL; bf16 never
reaches the pre-training targets (checked in the model and, in the ZeRO-3 run, in the real
job). Importing this file makes no CUDA call.

Layout: the machine checks and the driver are here, the checks that run mtscale's code in
``gpu_check_runs.py``, the shared plan / context in ``gpu_check_base.py``. Logs of every
subprocess go to ``<workdir>/logs`` (kept with ``--workdir``, or when a check failed).

Data: a synthetic NTU-format store from ``mtscale.data.synthetic`` + ``mtscale.data.prepare``
(the code behind ``mtscale synth`` / ``mtscale prepare``). Pre-training uses
``configs/pretrain/small.yaml`` with ``objective.kind=masked_recon``: on synthetic clips the
per-token-normalised motion target of ``masked_motion`` sits near its noise floor for dozens of
steps (see configs/pretrain/tiny_cpu.yaml), so "the loss falls" would test luck, not the code.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_check_base / _runs, bench_model

from gpu_check_base import CheckError, Ctx, Plan, Skip, expect
from gpu_check_runs import (
    check_compile,
    check_evaluate,
    check_finetune,
    check_loader,
    check_pretrain,
    check_pretrain_targets,
    check_resume,
    check_scratch_stem,
    check_sdpa_kernel,
    check_zero3,
    make_throughput_check,
    prebuild_cpu_adam,
    pretrain_child,
)

# --------------------------------------------------------------------------- checks: machine


def check_device(ctx: Ctx) -> str:
    import torch

    if not ctx.plan.cuda:
        return f"no CUDA: CPU {ctx.values['hw_cpu']}, {ctx.values['hw_cpu_cores']} cores ({ctx.values['hw_cpu_flags']})"
    p = torch.cuda.get_device_properties(ctx.device)
    ctx.values.update(gpu_name=p.name, gpu_capability=f"{p.major}.{p.minor}", gpu_memory_bytes=p.total_memory,
                      gpu_count=torch.cuda.device_count())
    return f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} visible"


def check_cuda_nccl_versions(ctx: Ctx) -> str:
    import torch
    import torch.distributed as dist

    if not ctx.plan.cuda:
        raise Skip("no CUDA")
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if dist.is_nccl_available() else None
    ctx.values.update(cuda_version=torch.version.cuda, cudnn_version=torch.backends.cudnn.version(), nccl_version=nccl)
    expect(nccl is not None, "torch.distributed: NCCL not available in this torch build")
    return f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, NCCL {nccl}, torch {torch.__version__}"


def check_all_reduce(ctx: Ctx) -> str:
    """A 1-rank all-reduce through mtscale.dist.init_distributed (in a child process: a hung
    NCCL cannot hang this script)."""
    out, _ = ctx.run("all_reduce", [sys.executable, Path(__file__).resolve(), "--all-reduce-child", ctx.plan.device],
                     timeout=180)
    r = json.loads(out.strip().splitlines()[-1])
    want = "nccl" if ctx.plan.cuda else "gloo"
    ctx.values.update(all_reduce_backend=r["backend"], all_reduce_s=r["seconds"])
    expect(r["backend"] == want, f"backend {r['backend']}, expected {want}")
    expect(r["ok"], f"all_reduce returned {r['result']}, expected {r['expected']}")
    return f"{r['backend']} on {r['device']}: sum over 1 rank correct ({r['seconds'] * 1e3:.1f} ms)"


def all_reduce_child(device_name: str) -> int:
    import torch
    import torch.distributed as dist

    from mtscale.dist import World, free_port, init_distributed, select_device, shutdown

    device = select_device(World(), "cuda" if device_name.startswith("cuda") else "cpu")
    backend = init_distributed(World(master_port=free_port()), device, timeout_s=60)
    try:
        t = torch.arange(1.0, 1025.0, device=device)
        t0 = time.perf_counter()
        dist.all_reduce(t)
        res = t.cpu()
        sec = time.perf_counter() - t0
        want = torch.arange(1.0, 1025.0)
        print(json.dumps({"backend": dist.get_backend(), "device": str(device), "ok": bool(torch.equal(res, want)),
                          "result": res[:4].tolist(), "expected": want[:4].tolist(), "seconds": sec,
                          "init_backend": backend}))
    finally:
        shutdown()
    return 0


def check_bf16(ctx: Ctx) -> str:
    import torch

    if not ctx.plan.cuda:
        raise Skip("no CUDA")
    ok = torch.cuda.is_bf16_supported()
    ctx.values["bf16_supported"] = ok
    expect(ok, "torch.cuda.is_bf16_supported() is False: training falls back to fp32")
    return "torch.cuda.is_bf16_supported(): True"


def check_gemm(ctx: Ctx) -> str:
    """Square GEMM rate: bf16 8192^3 on CUDA (vs the vendor dense peak), fp32 on CPU."""
    import torch

    from mtscale.models.flops import gpu_peak_flops, measure_cpu_gemm_flops

    if not ctx.plan.cuda:
        n = 1024 if ctx.plan.dry else 2048
        rate = measure_cpu_gemm_flops(seconds=0.5, n=n)
        ctx.gemm_flops = rate
        ctx.values.update(gemm_tflops=rate / 1e12, gemm_dtype="float32")
        return f"fp32 {n}^3: {rate / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads)"
    n, dt = 8192, ctx.dtype
    a, b = (torch.randn(n, n, device=ctx.device, dtype=dt) for _ in range(2))
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(10):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        a @ b
        e1.record()
        e1.synchronize()
        best = min(best, e0.elapsed_time(e1) / 1e3)
    rate = 2 * n**3 / best
    peak = gpu_peak_flops(torch.cuda.get_device_name(ctx.device), dt)
    ctx.values.update(gemm_tflops=rate / 1e12, gemm_dtype=str(dt).removeprefix("torch."),
                      gemm_fraction_of_peak=rate / peak if peak else None)
    del a, b
    torch.cuda.empty_cache()
    frac = f" = {100 * rate / peak:.0f} % of the {peak / 1e12:.0f} TFLOP/s dense peak" if peak else " (peak unknown)"
    expect(not peak or rate >= 0.25 * peak, f"{rate / 1e12:.0f} TFLOP/s{frac}: below 25 %, expected far more")
    return f"{str(dt).removeprefix('torch.')} {n}^3: {rate / 1e12:.0f} TFLOP/s{frac}"


# --------------------------------------------------------------------------- driver


def checks_for(plan: Plan) -> list[tuple[str, Callable[[Ctx], str]]]:
    out = [("device", check_device), ("cuda_nccl_versions", check_cuda_nccl_versions), ("all_reduce", check_all_reduce),
           ("bf16", check_bf16), ("gemm", check_gemm), ("sdpa_kernel", check_sdpa_kernel), ("loader", check_loader),
           ("pretrain_targets", check_pretrain_targets), ("pretrain", check_pretrain), ("compile", check_compile),
           ("resume", check_resume),
           ("zero3_offload", check_zero3), ("finetune", check_finetune), ("evaluate", check_evaluate),
           ("scratch_stem", check_scratch_stem)]
    return out + [(f"throughput_{s}_{t}", make_throughput_check(s, t)) for s in plan.sizes for t in ("frame", "patch")]


def hardware_values(plan: Plan) -> dict[str, Any]:
    """``hw_*``: versions, GPU, CPU model, cores and CPU flags (bench_model.hardware)."""
    from importlib.metadata import version

    import torch
    from bench_model import hardware

    hw = hardware(torch.device(plan.device))
    return {"hw_" + k: v for k, v in hw.items() if k != "device"} | {"hw_deepspeed": version("deepspeed")}


def run_checks(ctx: Ctx, only: set[str] | None) -> list[dict[str, str]]:
    results = []
    checks = checks_for(ctx.plan)
    for i, (name, fn) in enumerate(checks, 1):
        if only and name not in only:
            status, detail, sec = "skipped: not selected (--only)", "", 0.0
        else:
            print(f"[{i}/{len(checks)}] {name} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                status, detail = "pass", fn(ctx)
            except Skip as e:
                status, detail = f"skipped: {e}", ""
            except Exception as e:
                status = "fail"
                detail = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                if not isinstance(e, CheckError):
                    (ctx.work / "logs").mkdir(exist_ok=True)
                    (ctx.work / "logs" / f"{name}.traceback").write_text(traceback.format_exc())
            sec = time.perf_counter() - t0
            print(f"    {status} ({sec:.1f} s) {detail}", file=sys.stderr, flush=True)
        ctx.values.update({f"check_{name}": status, f"detail_{name}": detail, f"seconds_{name}": round(sec, 2)})
        results.append({"name": name, "status": status, "detail": detail})
    return results


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--all-reduce-child"]:
        return all_reduce_child(argv[1])
    if "--pretrain-child" in argv:  # under the deepspeed launcher, which puts --local_rank=N first
        i = argv.index("--pretrain-child")
        return pretrain_child(argv[i + 1], argv[:i] + argv[i + 2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, CI-sized: tiny models, 2 gloo processes, fp32")
    ap.add_argument("--quick", action="store_true", help="throughput of the small model only")
    ap.add_argument("--json", default=None, help="write the flat JSON object here")
    ap.add_argument("--only", default=None, help="comma list of check names (the others are skipped)")
    ap.add_argument("--workdir", default=None, help="keep stores, runs and logs here (default: a temp dir, removed)")
    a = ap.parse_args(argv)
    if a.dry_run:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t_start = time.perf_counter()
    plan = Plan.make(a.dry_run, a.quick)
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(plan, work)
    ctx.values.update(hardware_values(plan))
    ctx.values.update(dry_run=plan.dry, quick=a.quick, device=plan.device, precision=plan.precision, nproc=plan.nproc,
                      date=time.strftime("%Y-%m-%d %H:%M"), load_avg_start=os.getloadavg()[0],
                      command=" ".join(["gpu_check.py"] + argv))
    only = set(a.only.split(",")) if a.only else None
    if only is None or "zero3_offload" in only:
        prebuild_cpu_adam(ctx)
    try:
        results = run_checks(ctx, only)
    finally:
        if ctx.cpu_adam is not None and ctx.cpu_adam.poll() is None:
            os.killpg(ctx.cpu_adam.pid, signal.SIGKILL)
    failed = [r["name"] for r in results if r["status"] == "fail"]
    if not a.workdir and not failed:
        shutil.rmtree(work, ignore_errors=True)
    elif failed:
        print(f"logs of the failed checks: {work}/logs", file=sys.stderr)
    ctx.values.update(num_failed=len(failed), failed=",".join(failed), load_avg_end=os.getloadavg()[0],
                      wall_s=round(time.perf_counter() - t_start, 1))
    print("| check | result | detail |\n|---|---|---|")
    for r in results:
        detail = r["detail"].replace("|", "\\|")
        print(f"| {r['name']} | {r['status'] if r['status'] != 'fail' else '**FAIL**'} | {detail} |")
    print(f"\n{len(results) - len(failed)} of {len(results)} checks did not fail, wall {ctx.values['wall_s']:.0f} s "
          f"({ctx.values.get('hw_gpu') or ctx.values['hw_cpu']}, {plan.device}, {plan.precision})")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(ctx.values, indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
