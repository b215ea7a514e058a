"""What a resumed run restores besides its weights: the random number generators, and which
checkpoint folders are kept.

Both run kinds use these: pre-training stores ``capture_rng()`` in its DeepSpeed client state,
fine-tuning in each epoch's ``train_state.pt``; both prune old checkpoint folders with
``prune_dirs``.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch


def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch (and every CUDA device's) RNG states, as tensors / plain Python
    (loadable with ``torch.load(..., weights_only=True)``)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any] | None) -> None:
    """Undo ``capture_rng``. Also reads the fine-tuning checkpoints of mtscale before 2026-12-06
    (``{"torch", "numpy_seed"}``: torch's state and a NumPy reseed)."""
    if not state:
        return
    if "numpy_seed" in state:
        torch.set_rng_state(state["torch"])
        np.random.seed(int(state["numpy_seed"]))
        return
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def prune_dirs(root: Path, pattern: str, keep: int, protect: str | None = None) -> list[str]:
    """Delete all but the newest ``keep`` folders of ``root`` matching ``pattern`` (names sort
    by age: zero-padded steps / epochs), never ``protect``; returns the names removed."""
    names = sorted(p.name for p in Path(root).glob(pattern) if p.is_dir())
    removed = []
    for name in names[:-keep] if keep > 0 else []:
        if name != protect:
            shutil.rmtree(Path(root) / name, ignore_errors=True)
            removed.append(name)
    return removed
