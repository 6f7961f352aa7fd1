"""Sequential keeps freed memory in the process: a training step's large arrays are re-used
from the heap instead of page-faulting afresh every step (worker/numpy_cnn/allocator.py).

Each check runs in a fresh interpreter, since malloc's settings are process-wide and the
first Sequential of a process sets them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="glibc's mallopt")

# 40 MiB is above glibc's own largest dynamic mmap threshold (32 MiB): without the setting
# every such array is a fresh mapping, so touching it page-faults 10,240 times in 4 KiB
# pages, or at least 20 times in 2 MiB huge pages (NumPy asks for them on large arrays).
PROBE = """
import json, resource, sys
import numpy as np
from labctl.worker.numpy_cnn import Conv2D, Sequential
from labctl.worker.numpy_cnn.allocator import keep_freed_memory
if sys.argv[1] == "sequential":
    Sequential(Conv2D(1, 2, 3))
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(10 * 1024 * 1024, np.float32)
    del a
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": keep_freed_memory(), "faults": faults[1:]}))
"""


def probe(mode: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", PROBE, mode], env={**environ, **env},
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_after_a_sequential_a_freed_large_array_is_reused_without_page_faults():
    plain = probe("plain")     # keep_freed_memory() at the end: after the allocations
    tuned = probe("sequential")
    assert tuned["applied"] is True
    assert max(tuned["faults"]) < 10, tuned
    assert min(plain["faults"]) >= 20, plain  # the probe measures what it claims


def test_a_user_setting_of_malloc_thresholds_is_left_alone():
    result = probe("sequential", MALLOC_MMAP_THRESHOLD_="131072")
    assert result["applied"] is False
    assert min(result["faults"]) >= 20, result
