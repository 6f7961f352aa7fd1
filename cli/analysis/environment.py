"""The machine a report (or benchmark) was produced on: versions, device, CPU."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    # platform.processor() is empty on most Linux builds; /proc/cpuinfo names the part.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment() -> dict[str, Any]:
    import numpy

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpus": usable_cpus(),
        "labctl_commit": git_commit(),
    }
    try:
        import torch
    except ImportError:
        info.update(torch=None, device="CPU (torch not installed)")
        return info
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        info["device"] = f"CUDA: {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    else:
        info["device"] = "CPU only (no CUDA device)"
    return info


def environment_markdown(info: dict[str, Any]) -> str:
    labels = [("python", "Python"), ("numpy", "NumPy"), ("torch", "PyTorch"),
              ("device", "Device"), ("cpu", "CPU"), ("cpus", "usable CPU cores"),
              ("torch_threads", "torch threads"), ("platform", "OS"),
              ("labctl_commit", "labctl commit")]
    return "\n".join(f"- {label}: {info[key]}" for key, label in labels
                     if info.get(key) is not None)
