"""mtscale.malloc.tune_malloc: freed batch-sized buffers are reused instead of being returned
to the kernel and faulted in again (glibc only; measured in fresh processes)."""

import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import numpy as np
from mtscale.malloc import tune_malloc
applied = tune_malloc()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # two 20 MB batch buffers, written, then both freed (the loader's pattern)
    a = np.ones(5 << 20, np.float32); b = np.ones(5 << 20, np.float32); del a, b
for _ in range(3):
    step()
f0 = faults()
for _ in range(10):
    step()
print(int(applied), (faults() - f0) / 10)
"""


def _probe(enabled: str) -> tuple[bool, float]:
    env = {**os.environ, "MTSCALE_TUNE_MALLOC": enabled}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, check=True, capture_output=True, text=True)
    applied, faults = out.stdout.split()
    return applied == "1", float(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_tuned_malloc_reuses_freed_batch_buffers():
    applied, faults = _probe("1")
    off_applied, off_faults = _probe("0")
    assert applied and not off_applied
    # 40 MB of fresh pages per step is ~10,000 4 KiB pages (fewer faults with fault-around /
    # huge pages, still hundreds); reused heap memory takes none
    assert off_faults > 200, off_faults
    assert faults < 20, faults
