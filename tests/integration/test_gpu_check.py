"""``benchmarks/gpu_check.py --dry-run``: the GPU machine check, end to end on the CPU (2 gloo
processes through the real ``deepspeed`` launcher, tiny models, fp32). Every check must be
there and none may fail; the CUDA-only lines are skipped with their reason; and the values
that would be wrong if the code were wrong are checked here: the loss falls, the resumed run
starts at the saved step, ZeRO-3 decays exactly the weight matrices of the model.

About 2-3 minutes on 2 shared cores (the first run also builds DeepSpeed's CPU Adam op, 1-2
minutes more, cached afterwards).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
CHECKS = ["device", "cuda_nccl_versions", "all_reduce", "bf16", "gemm", "sdpa_kernel", "loader", "pretrain_targets",
          "pretrain", "compile", "resume", "zero3_offload", "finetune", "evaluate", "scratch_stem", "throughput_tiny_frame",
          "throughput_tiny_patch"]
NEED_CUDA = {"cuda_nccl_versions", "bf16", "compile"}


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--json", str(out)],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=850)
    assert out.is_file(), f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    res = json.loads(out.read_text())
    res["_returncode"], res["_stdout"], res["_stderr"] = p.returncode, p.stdout, p.stderr
    return res


def test_every_check_present_none_failed(result: dict) -> None:
    failed = {c: result.get(f"detail_{c}") for c in CHECKS if result.get(f"check_{c}") == "fail"}
    assert not failed, failed
    assert result["_returncode"] == 0 and result["num_failed"] == 0, result["_stderr"][-3000:]
    for c in CHECKS:
        want = "skipped: no CUDA" if c in NEED_CUDA else "pass"
        assert str(result.get(f"check_{c}")).startswith(want), (c, result.get(f"check_{c}"), result.get(f"detail_{c}"))
        assert f"| {c} | {want}" in result["_stdout"], c  # the markdown table says the same
    assert result["dry_run"] is True and result["device"] == "cpu" and result["nproc"] == 2
    assert result["hw_cpu"] and isinstance(result["hw_avx512"], bool) and isinstance(result["hw_amx"], bool)


def test_collectives_attention_and_loader_on_cpu(result: dict) -> None:
    assert result["all_reduce_backend"] == "gloo" and result["pretrain_backend"] == "gloo"
    for L in (75, 750):
        for m in ("unmasked", "masked"):  # the CPU flash kernel takes the boolean key-padding mask
            assert result[f"sdpa_kernel_{L}_{m}"] == "flash" == result[f"sdpa_reported_{L}_{m}"]
            assert result[f"sdpa_max_err_{L}_{m}"] < 1e-4
    assert result["loader_rotation_norm_err"] < 1e-4
    for mode in ("bf16_params", "bf16_autocast"):  # bf16 never reaches the targets
        assert result[f"pretrain_targets_{mode}_x_dtype"] == "float32"
        assert result[f"pretrain_targets_{mode}_exact"] is True and result[f"pretrain_targets_{mode}_mask_exact"] is True
        assert result[f"pretrain_targets_{mode}_loss_rel_diff"] < 0.05


def test_pretrain_loss_finite_and_falling_then_resume(result: dict) -> None:
    first, last = result["pretrain_loss_first"], result["pretrain_loss_last"]
    assert math.isfinite(first) and math.isfinite(last)
    assert last < first and result["pretrain_loss_tail_mean"] < result["pretrain_loss_head_mean"]
    for k in ("samples_per_s", "tokens_per_s", "tflops", "mfu"):
        assert math.isfinite(result[f"pretrain_{k}"]) and result[f"pretrain_{k}"] > 0, k
    assert result["precision"] == result["pretrain_ds_precision"] == "fp32"  # no fast bf16 on the CI CPUs
    steps, final = result["pretrain_steps"], result["resume_final_step"]
    assert result["resume_from_step"] == steps and final > steps
    assert result["resume_latest_tag"] == f"step{final:08d}"


def test_zero3_weight_decay_groups_and_export(result: dict) -> None:
    """Under ZeRO-3 every parameter is an empty partition; the decayed group must still be
    exactly the weight matrices (here counted from the model itself)."""
    from mtscale.config import ModelConfig, ObjectiveConfig
    from mtscale.models.objectives import build_pretrain_model

    model = build_pretrain_model(ModelConfig(size="tiny", checkpoint_activations=True),
                                 ObjectiveConfig(kind="masked_recon", decoder_dim=64, decoder_depth=1, decoder_heads=4),
                                 clip_frames=16, num_bodies=2, num_joints=25)
    params = dict(model.named_parameters())
    matrices = [n for n, p in params.items() if n.endswith(".weight") and p.dim() >= 2]
    assert result["zero3_stage"] == 3 and result["zero3_optimizer"] == "DeepSpeedCPUAdam"
    assert result["zero3_checkpoint_activations"] is True
    assert result["zero3_partitioned"] == len(params)
    assert result["zero3_decay_params"] == len(matrices) > 0
    assert result["zero3_no_decay_params"] == len(params) - len(matrices) > 0
    assert result["zero3_decay_numel"] == sum(params[n].numel() for n in matrices)
    assert result["zero3_matrices_not_decayed"] == 0 and result["zero3_vectors_decayed"] == 0
    assert result["zero3_missing_from_groups"] == 0
    assert result["zero3_target_clip_dtypes"] == "float32"


def test_scratch_stem_recipe_trains(result: dict) -> None:
    assert result["scratch_stem_device"] == "cpu" and 0.0 <= result["scratch_stem_test_top1"] <= 100.0
    assert "SGD (foreach)" in result["detail_scratch_stem"]  # train.optimizer=sgd reached the trainer
    # 2 epochs of ~4 steps sit near chance (ln 4) on this store: finite losses, not a falling one, are the check
    losses = result["scratch_stem_losses"]
    assert len(losses) == 2 and all(math.isfinite(v) and 0.0 < v < 3.0 for v in losses), losses


def test_finetune_and_evaluate_agree(result: dict) -> None:
    assert result["finetune_device"] == "cpu" and result["finetune_test_samples"] > 0
    assert "AdamW (foreach)" in result["detail_finetune"]  # the default optimizer, named by the trainer's log
    assert 0.0 <= result["finetune_test_top1"] <= 100.0
    assert result["evaluate_top1"] == pytest.approx(result["finetune_test_top1"], abs=1e-6)
    assert result["evaluate_num_samples"] == result["finetune_test_samples"]
    for tok in ("frame", "patch"):
        assert result[f"throughput_tiny_{tok}_samples_per_s"] > 0 and result[f"throughput_tiny_{tok}_mfu"] > 0
        assert result[f"throughput_tiny_{tok}_sdpa_kernel"] == "flash"  # no mask reaches SDPA in the step
