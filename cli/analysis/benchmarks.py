"""The lab's speed comparison, measured by the project's benchmark modules.

Timing lives in ``bench.numpy_vs_torch`` (our NumPy CNN vs the same network in torch, on
the CPU: ``compare`` per case), ``bench.resnet_throughput`` (our ResNet50 vs torchvision's,
CPU: ``measure``) and ``bench.gpu_check`` (our ResNet50 on CUDA: ``synthetic_throughput``).
Only the CNN lacks a CUDA measurement; the one adapter below times the module's torch copy
of the network on the GPU the same way (warm-up, then the median step, device synchronised).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

#: Reduced measurement sizes for --quick (tens of seconds instead of minutes on 2 cores).
QUICK = {"cnn_budget_s": 2.0, "resnet_size": 64, "resnet_batch": 8, "resnet_pairs": 2,
         "resnet_warmup": 1, "cuda_steps": 5, "cuda_resnet_batch": 64}
FULL = {"cnn_budget_s": 12.0, "resnet_size": 112, "resnet_batch": 8, "resnet_pairs": 8,
        "resnet_warmup": 2, "cuda_steps": 20, "cuda_resnet_batch": 256}


@dataclass
class BenchRow:
    benchmark: str        # "CNN (a) 1x28x28, batch 64" / "ResNet50 3x64x64, batch 8"
    implementation: str   # "NumPy (ours)", "PyTorch", "ours", "torchvision"
    device: str           # "cpu, 2 threads", "cpu, 1 thread (CPU time)", "cuda"
    ms_per_step: float
    images_per_second: float
    ratio: float | None   # speed relative to the baseline named in ``ratio_to`` (>1 faster)
    ratio_to: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_benchmarks(quick: bool = False, cuda: bool | None = None,
                   sizes: dict[str, Any] | None = None) -> list[BenchRow]:
    """Every row; ``cuda=None`` measures on CUDA when a device is present. ``sizes``
    overrides the QUICK / FULL measurement sizes."""
    import torch

    sizes = {**(QUICK if quick else FULL), **(sizes or {})}
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return _cnn_rows(sizes, cuda) + _resnet_rows(sizes, cuda)


def _cnn_rows(sizes: dict[str, Any], cuda: bool) -> list[BenchRow]:
    from labctl.bench import numpy_vs_torch as nvt
    from labctl.worker.numpy_cnn.parallel import num_threads

    threads = num_threads()
    # All threads (wall time), and one thread (its CPU time, which other processes on a
    # shared machine barely disturb), as the module measures them.
    settings = [(threads, _cpu_label(threads))]
    if threads > 1:
        settings.append((1, "cpu, 1 thread (CPU time)"))
    rows = []
    for case in nvt.CASES:
        name = f"CNN {case.label}"
        numpy_all_threads = None
        for count, device in settings:
            result = nvt.compare(case, count, sizes["cnn_budget_s"])
            numpy_ms, torch_ms = result["numpy_ms"], result["torch_ms"]
            numpy_all_threads = numpy_all_threads or numpy_ms
            rows.append(_row(name, "NumPy (ours)", device, numpy_ms, case.batch, 1.0, "NumPy"))
            rows.append(_row(name, "PyTorch", device, torch_ms, case.batch,
                             numpy_ms / torch_ms, "NumPy"))
        if cuda:  # against NumPy on all the CPU's threads: the best the CPU path does
            cuda_ms = _cnn_cuda_ms(nvt, case, sizes["cuda_steps"])
            rows.append(_row(name, "PyTorch", "cuda", cuda_ms, case.batch,
                             numpy_all_threads / cuda_ms, "NumPy"))
    return rows


def _resnet_rows(sizes: dict[str, Any], cuda: bool) -> list[BenchRow]:
    import torch

    from labctl.bench import resnet_throughput as rt

    batch, size = sizes["resnet_batch"], sizes["resnet_size"]
    name = f"ResNet50 3x{size}x{size}, batch {batch}"
    result = rt.measure(torch.channels_last, batch, size, sizes["resnet_pairs"],
                        sizes["resnet_warmup"])
    device = _cpu_label(torch.get_num_threads())
    rows = [_row(name, "ours", device, 1000 * batch / result["ours"], batch, result["ratio"],
                 "torchvision"),
            _row(name, "torchvision", device, 1000 * batch / result["torchvision"], batch, 1.0,
                 "torchvision")]
    if cuda:
        from labctl.bench import gpu_check

        batch = sizes["cuda_resnet_batch"]
        steps = sizes["cuda_steps"]
        result = gpu_check.synthetic_throughput(amp=True, channels_last=True,
                                                compile_model=False, batch=batch, size=224,
                                                steps=steps, warmup=3)
        rows.append(_row(f"ResNet50 3x224x224, batch {batch}, bf16", "ours", "cuda",
                         1000 * batch / result["images_per_s"], batch, None, "-"))
    return rows


def _cpu_label(threads: int) -> str:
    return f"cpu, {threads} thread{'s' if threads > 1 else ''}"


def _row(benchmark: str, implementation: str, device: str, ms: float, batch: int,
         ratio: float | None, ratio_to: str) -> BenchRow:
    return BenchRow(benchmark, implementation, device, ms, 1000 * batch / ms, ratio, ratio_to)


def _cnn_cuda_ms(nvt, case, steps: int) -> float:
    """The module's torch copy of the CNN, on CUDA (the module measures the CPU only)."""
    import torch
    import torch.nn.functional as F

    _, model, x, y = nvt.build_pair(case)
    model = model.cuda()
    optimizer = torch.optim.Adamax(model.parameters(), lr=2e-3)
    xt, yt = torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()

    def step() -> None:
        optimizer.zero_grad(set_to_none=False)
        F.cross_entropy(model(xt), yt).backward()
        optimizer.step()

    for _ in range(3):  # cuDNN autotuning and the allocator's first blocks
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()  # kernels are asynchronous: wait before reading the clock
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


HEADER = ["benchmark", "implementation", "device", "ms/step", "img/s", "speed ratio"]


def table_rows(rows: list[BenchRow]) -> list[list[str]]:
    return [[r.benchmark, r.implementation, r.device, f"{r.ms_per_step:.1f}",
             f"{r.images_per_second:.0f}",
             f"{r.ratio:.2f}x {r.ratio_to}" if r.ratio is not None else "n/a"] for r in rows]
