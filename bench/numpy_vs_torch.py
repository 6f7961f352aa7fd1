"""Our NumPy CNN against the same network in PyTorch: time per training step on this CPU.

One training step is forward + softmax cross-entropy + backward + AdaMax update, on a fixed
batch, with the same initial weights in both frameworks and the same thread count (NumPy:
our Python threads over BLAS held to one thread; torch: ``torch.set_num_threads``):

    (a) 1x28x28,  batch 64: conv16 -> pool -> conv32 -> pool -> linear128 -> 10
    (b) 3x64x64,  batch 32: conv32 -> pool -> conv64 -> pool -> linear256 -> 196
    (c) lab-style, 1x28x28, batch 64: conv5x5 16 -> sigmoid -> conv3x3/2 32 -> sigmoid ->
        conv3x3/2 32 -> relu -> linear128 -> sigmoid -> 10
    (d) deeper, 3x32x32, batch 64: conv3x3 32, 32/2, 64, 64/2, each with relu -> linear 10

Steps run in alternating *blocks* (NumPy block, torch block, torch block, NumPy block, ...)
of a few tenths of a second, so load drift on a shared machine hits both alike while each
block keeps its caches warm. A framework's figure is the median of its block means; ratios
compare figures of the same run. Two figures per case: wall time on all the CPUs (the goal
is stated on it), and CPU time on one thread, which other processes barely disturb; the
second also times the NumPy layers run one by one, without the fused blocks.

    python -m bench.numpy_vs_torch               # ~1-2 minutes; updates docs/benchmarks.md
    python -m bench.numpy_vs_torch --no-write --no-second-run --budget 4

Where the environment sets OPENBLAS_CORETYPE, the measurement runs twice: as it is, and in
a subprocess without it (OpenBLAS then picks its kernels by CPU detection). Results go to
the ``numpy-vs-torch`` section of docs/benchmarks.md; other sections are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from labctl.bench.docs_page import BENCHMARKS_PAGE, write_section

REPO = Path(__file__).resolve().parent.parent
DOC = BENCHMARKS_PAGE
SECTION = "numpy-vs-torch"
GOAL, STRETCH = 1.0, 0.75


@dataclass(frozen=True)
class Case:
    key: str
    channels: int
    size: int
    batch: int
    classes: int
    #: "default" (build_default_cnn), "lab" or "deep" (see NETWORKS)
    network: str = "default"

    @property
    def label(self) -> str:
        name = "" if self.network == "default" else f"{self.network} net, "
        return f"({self.key}) {name}{self.channels}x{self.size}x{self.size}, batch {self.batch}"


CASES = [Case("a", 1, 28, 64, 10), Case("b", 3, 64, 32, 196),
         Case("c", 1, 28, 64, 10, "lab"), Case("d", 3, 32, 64, 10, "deep")]
#: Target length of one timed block of steps.
BLOCK_SECONDS = 0.4


def lab_network(case: Case, rng: np.random.Generator) -> list:
    """The lab-style network of issue 10: sigmoids, strided convolutions, no pooling."""
    from labctl.worker.numpy_cnn import Conv2D, Flatten, Linear, ReLU, Sigmoid

    side = (case.size + 1) // 2
    side = (side + 1) // 2
    return [Conv2D(case.channels, 16, 5, padding=2, rng=rng), Sigmoid(),
            Conv2D(16, 32, 3, stride=2, padding=1, rng=rng), Sigmoid(),
            Conv2D(32, 32, 3, stride=2, padding=1, rng=rng), ReLU(), Flatten(),
            Linear(32 * side * side, 128, rng=rng), Sigmoid(), Linear(128, case.classes, rng=rng)]


def deep_network(case: Case, rng: np.random.Generator) -> list:
    """Four 3x3 convolutions (32, 32, 64, 64 channels, stride 2 on the 2nd and 4th) with
    ReLU, then one Linear."""
    from labctl.worker.numpy_cnn import Conv2D, Flatten, Linear, ReLU

    side = (case.size + 1) // 2
    side = (side + 1) // 2
    return [Conv2D(case.channels, 32, 3, padding=1, rng=rng), ReLU(),
            Conv2D(32, 32, 3, stride=2, padding=1, rng=rng), ReLU(),
            Conv2D(32, 64, 3, padding=1, rng=rng), ReLU(),
            Conv2D(64, 64, 3, stride=2, padding=1, rng=rng), ReLU(), Flatten(),
            Linear(64 * side * side, case.classes, rng=rng)]


NETWORKS = {"lab": lab_network, "deep": deep_network}


def torch_twin(model):
    """The same layers as torch modules, with the NumPy network's weights copied in."""
    import torch
    from torch import nn

    from labctl.worker.numpy_cnn import Conv2D, Flatten, Linear, MaxPool2D, ReLU, Sigmoid

    def convert(layer):
        if isinstance(layer, Conv2D):
            return nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                             layer.stride, layer.padding)
        if isinstance(layer, Linear):
            return nn.Linear(layer.in_features, layer.out_features)
        if isinstance(layer, MaxPool2D):
            return nn.MaxPool2d(layer.kernel_size, layer.stride)
        return {ReLU: nn.ReLU, Sigmoid: nn.Sigmoid, Flatten: nn.Flatten}[type(layer)]()

    theirs = nn.Sequential(*(convert(layer) for layer in model.layers))
    theirs.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in model.state_dict().items()})
    return theirs


def build_pair(case: Case, seed: int = 0, fuse: bool = True):
    """The NumPy network of ``case`` and a torch copy with the same weights, plus one batch."""
    from labctl.worker.numpy_cnn import Sequential, build_default_cnn

    rng = np.random.default_rng(seed)
    if case.network == "default":
        ours = build_default_cnn(case.channels, case.size, case.classes, rng, fuse=fuse)
    else:
        ours = Sequential(*NETWORKS[case.network](case, rng), fuse=fuse)
    theirs = torch_twin(ours)
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((case.batch, case.channels, case.size, case.size)).astype(np.float32)
    y = rng.integers(0, case.classes, case.batch)
    return ours, theirs, x, y


def step_flops(model, x: np.ndarray) -> float:
    """Floating-point operations of one training step's GEMM-shaped work (convolutions and
    linear layers: forward, weight gradient, input gradient; none for the first layer's
    input, which neither framework computes). Elementwise work is not counted. Runs the
    plain layers once for their shapes: pass a model whose caches do not matter."""
    from labctl.worker.numpy_cnn import Conv2D, Linear

    flops, out, first = 0.0, x, True
    for layer in model.layers:
        out = layer.forward(out)
        if isinstance(layer, Conv2D):
            kh, kw = layer.kernel_size
            macs = out.size * layer.in_channels * kh * kw
        elif isinstance(layer, Linear):
            macs = out.size * layer.in_features
        else:
            macs = 0
        if macs:
            flops += 2 * macs * (2 if first else 3)
            first = False
    return flops


def numpy_step(model, x: np.ndarray, y: np.ndarray) -> Callable[[], float]:
    from labctl.worker.numpy_cnn import AdaMax, softmax_cross_entropy

    optimizer = AdaMax(model.layers, lr=2e-3)

    def step() -> float:
        optimizer.zero_grad()
        loss, grad = softmax_cross_entropy(model.forward(x), y)
        model.backward(grad, input_grad=False)
        optimizer.step()
        return loss

    return step


def torch_step(model, x: np.ndarray, y: np.ndarray) -> Callable[[], float]:
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.Adamax(model.parameters(), lr=2e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def step() -> float:
        optimizer.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(xt), yt)
        loss.backward()
        optimizer.step()
        return loss.detach().item()

    return step


def time_blocks(steps: dict[str, Callable[[], float]], budget_s: float,
                clock: Callable[[], float] = time.perf_counter, min_blocks: int = 4,
                max_blocks: int = 12) -> dict[str, list[float]]:
    """Seconds per step of each block, blocks in ABBA order (A B, B A, A B, ...), until
    ``budget_s`` is spent (at least ``min_blocks`` each). A block is as many steps as the
    slower framework runs in about BLOCK_SECONDS (2 to 10), so a loaded machine, where
    torch's steps can take 20x longer, still finishes in bounded time."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    slowest = 0.0
    for name in names:  # warm-up: buffers, thread pools, OpenBLAS/oneDNN kernels
        steps[name]()
        start = time.perf_counter()
        steps[name]()
        slowest = max(slowest, time.perf_counter() - start)
    per_block = min(10, max(2, round(BLOCK_SECONDS / max(slowest, 1e-6))))
    started = time.perf_counter()
    for block in range(max_blocks):
        if block >= min_blocks and time.perf_counter() - started > budget_s:
            break
        for name in (names if block % 2 == 0 else names[::-1]):
            start = clock()
            for _ in range(per_block):
                steps[name]()
            times[name].append((clock() - start) / per_block)
    return times


@contextmanager
def thread_count(threads: int) -> Iterator[None]:
    """Both frameworks on ``threads`` threads for the duration."""
    import torch

    before_env, before_torch = os.environ.get("LABCTL_NUMPY_THREADS"), torch.get_num_threads()
    os.environ["LABCTL_NUMPY_THREADS"] = str(threads)  # read at every parallel call
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before_torch)
        if before_env is None:
            del os.environ["LABCTL_NUMPY_THREADS"]
        else:
            os.environ["LABCTL_NUMPY_THREADS"] = before_env


#: Side of the square float32 GEMM whose throughput is the roofline's 100%.
MATMUL_SIDE = 512


def matmul_gflops(threads: int, budget_s: float) -> float:
    """This machine's np.matmul float32 throughput (GFLOP/s) on ``threads`` threads, as our
    layers use it: BLAS on one thread, one independent square GEMM per pool thread; wall
    time with several threads, the thread's CPU time with one. Median of timed blocks."""
    from labctl.worker.numpy_cnn.parallel import parallel_map

    a = np.random.default_rng(0).standard_normal((MATMUL_SIDE, MATMUL_SIDE)).astype(np.float32)
    outs = [np.empty_like(a) for _ in range(threads)]

    def gemms() -> float:
        parallel_map(lambda out: np.matmul(a, a, out=out), outs)
        return 0.0

    clock = time.thread_time if threads == 1 else time.perf_counter
    with thread_count(threads):
        times = time_blocks({"matmul": gemms}, budget_s, clock)["matmul"]
    return threads * 2 * MATMUL_SIDE ** 3 / statistics.median(times) / 1e9


def compare(case: Case, threads: int, budget_s: float, layer_by_layer: bool = False) -> dict:
    """NumPy vs torch on ``case``: wall time with ``threads`` threads; with one thread, the
    thread's CPU time, which other processes on a shared machine barely disturb.
    ``layer_by_layer`` adds the unfused NumPy path (plain im2col/col2im layers)."""
    ours, theirs, x, y = build_pair(case)
    steps = {"numpy": numpy_step(ours, x, y), "torch": torch_step(theirs, x, y)}
    if layer_by_layer:
        plain = build_pair(case, fuse=False)[0]
        steps["layers"] = numpy_step(plain, x, y)
    clock = time.thread_time if threads == 1 else time.perf_counter
    with thread_count(threads):
        times = time_blocks(steps, budget_s, clock)
    ms = {name: statistics.median(values) * 1000 for name, values in times.items()}
    block_ratios = [a / b for a, b in zip(times["numpy"], times["torch"], strict=True)]
    result = {"numpy_ms": ms["numpy"], "torch_ms": ms["torch"],
              "ratio": ms["numpy"] / ms["torch"], "block_ratios": block_ratios,
              "blocks": len(block_ratios)}
    if layer_by_layer:
        result["layers_ms"] = ms["layers"]
        result["layers_ratio"] = ms["layers"] / ms["torch"]
    return result


#: Blocks of each thread count in :func:`thread_scaling`.
SCALING_BLOCKS = 8


def thread_scaling(case: Case, threads: int) -> dict:
    """The NumPy step's process CPU time and wall time on ``threads`` threads and on one,
    in interleaved blocks of one process: how much of the step's work the threads add
    (CPU time beyond one thread's) and how much they wait (wall time beyond an even split
    of that CPU time)."""
    ours, _, x, y = build_pair(case)
    step = numpy_step(ours, x, y)
    samples: dict[int, tuple[list[float], list[float]]] = {1: ([], []), threads: ([], [])}
    for block in range(SCALING_BLOCKS):
        for count in ((1, threads) if block % 2 == 0 else (threads, 1)):
            with thread_count(count):
                step()
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(3):
                    step()
                samples[count][0].append((time.perf_counter() - wall) / 3 * 1000)
                samples[count][1].append((time.process_time() - cpu) / 3 * 1000)
    return {str(count): {"wall_ms": statistics.median(wall), "cpu_ms": statistics.median(cpu)}
            for count, (wall, cpu) in samples.items()}


#: Seconds each process of :func:`split_over_processes` trains for.
SPLIT_SECONDS = 3.0


def split_over_processes(case: Case, processes: int, seconds: float | None = None) -> float:
    """Wall ms per step when ``processes`` independent processes, started together, each train
    the case's network on its share of the batch on one thread (the slowest process's
    figure): what the threads could reach if running side by side cost only what the CPUs
    share (caches, memory bandwidth, clock), with no interpreter lock and no meeting points."""
    share = -(-case.batch // processes)
    seconds = SPLIT_SECONDS if seconds is None else seconds
    cmd = [sys.executable, "-m", "labctl.bench.numpy_vs_torch", "--split-step",
           json.dumps({**asdict(case), "batch": share}), "--seconds", str(seconds)]
    env = {**os.environ, "LABCTL_NUMPY_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    children = [subprocess.Popen(cmd, env=env, cwd=REPO, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    try:
        for child in children:  # each says "ready" once built and warmed up
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError("a split-step process failed to start")
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        return max(float(child.communicate(timeout=120)[0]) for child in children)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()


def split_step_child(case_fields: str, seconds: float) -> int:
    """The process side of :func:`split_over_processes`: prints "ready", waits for "go",
    trains for ``seconds`` and prints the median ms per step of its blocks."""
    case = Case(**json.loads(case_fields))
    ours, _, x, y = build_pair(case)
    step = numpy_step(ours, x, y)
    for _ in range(3):
        step()
    print("ready", flush=True)
    sys.stdin.readline()
    blocks, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(blocks) < 3:
        start = time.perf_counter()
        for _ in range(3):
            step()
        blocks.append((time.perf_counter() - start) / 3 * 1000)
    print(statistics.median(blocks), flush=True)
    return 0


def small_op_cpu_us(threads: int, calls: int = 20000) -> float:
    """CPU microseconds per small NumPy call (a 4 KiB multiply into a buffer) when
    ``threads`` threads make such calls at once, each on its own arrays: what one call's
    Python, GIL and dispatch overhead costs as the thread count grows."""
    import threading

    spent = [0.0] * threads

    def calls_on_own_arrays(index: int) -> None:
        a, out = np.ones((32, 32), np.float32), np.empty((32, 32), np.float32)
        start = time.thread_time()
        for _ in range(calls):
            np.multiply(a, a, out=out)
        spent[index] = time.thread_time() - start

    workers = [threading.Thread(target=calls_on_own_arrays, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return statistics.median(spent) / calls * 1e6


def profile_numpy(model, x: np.ndarray, y: np.ndarray, repeats: int) -> list[tuple[str, float]]:
    """Median CPU milliseconds of each phase of one NumPy training step (run it on one
    thread: the calling thread then does all the work)."""
    from labctl.worker.numpy_cnn import AdaMax, softmax_cross_entropy
    from labctl.worker.numpy_cnn.layers import Layer

    optimizer = AdaMax(model.layers, lr=2e-3)
    names = [type(step).__name__ if isinstance(step, Layer) else repr(step)
             for step in model.steps]
    samples: dict[str, list[float]] = {}

    def timed(phase: str, fn, *args, **kwargs):
        start = time.thread_time()
        result = fn(*args, **kwargs)
        samples.setdefault(phase, []).append(time.thread_time() - start)
        return result

    def layout(array: np.ndarray, nhwc: bool) -> np.ndarray:
        return timed("layout (NCHW<->NHWC)", np.ascontiguousarray,
                     array.transpose(0, 2, 3, 1) if nhwc else array.transpose(0, 3, 1, 2))

    for _ in range(repeats):
        optimizer.zero_grad()
        start = time.thread_time()
        out = x
        channels_last = False
        for name, step in zip(names, model.steps, strict=True):
            nhwc = getattr(step, "channels_last", False)
            if nhwc != channels_last:
                out, channels_last = layout(out, nhwc), nhwc
            out = timed(f"forward  {name}", step.forward, out)
        loss, grad = timed("loss", softmax_cross_entropy, out, y)
        for index in range(len(model.steps) - 1, -1, -1):
            step, name = model.steps[index], names[index]
            nhwc = getattr(step, "channels_last", False)
            if nhwc != channels_last:
                grad, channels_last = layout(grad, nhwc), nhwc
            if isinstance(step, Layer):
                grad = timed(f"backward {name}", step.backward, grad)
            else:
                grad = timed(f"backward {name}", step.backward, grad, input_grad=index > 0)
        timed("AdaMax step", optimizer.step)
        samples.setdefault("total", []).append(time.thread_time() - start)
    # Layout conversions happen several times per step; report their sum per step.
    return [(phase, statistics.median(values) * 1000 * (len(values) / repeats))
            for phase, values in samples.items()]


def profile_torch(model, x: np.ndarray, y: np.ndarray, repeats: int) -> list[tuple[str, float]]:
    """The torch ops taking the most self CPU time per step (ms), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    step = torch_step(model, x, y)
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / 1000 / repeats) for e in rows[:8]]


def measure(budget_s: float, profile_repeats: int) -> dict:
    """Everything one run reports, as JSON-ready data."""
    import torch
    from threadpoolctl import threadpool_info

    from labctl.worker.numpy_cnn.parallel import num_threads, use_single_threaded_blas

    threads = num_threads()
    use_single_threaded_blas()
    blas = [info for info in threadpool_info() if info.get("internal_api") == "openblas"]
    result = {"threads": threads, "coretype": os.environ.get("OPENBLAS_CORETYPE"),
              "openblas_arch": blas[0].get("architecture") if blas else None,
              "numpy": np.__version__, "torch": torch.__version__,
              "load_before": os.getloadavg()[0], "cases": []}
    for case in CASES:
        plain, _, x, _ = build_pair(case, fuse=False)
        entry = {"case": case.label, "params": plain.num_parameters(),
                 "step_gflop": step_flops(plain, x) / 1e9}
        # The roofline's GEMM throughput is measured next to each comparison, at its
        # thread count, so it sees the same load.
        for key, count, budget, layers in (("parallel", threads, budget_s, False),
                                           ("single", 1, budget_s / 2, True)):
            peak = matmul_gflops(count, min(2.0, budget / 4))
            entry[key] = compare(case, count, budget, layer_by_layer=layers)
            entry[key]["matmul_gflops"] = peak
            for name in ("numpy", "torch"):
                achieved = entry["step_gflop"] / (entry[key][f"{name}_ms"] / 1000)
                entry[key][f"{name}_roofline"] = achieved / peak
        if threads > 1:
            entry["scaling"] = thread_scaling(case, threads)
            entry["split_ms"] = split_over_processes(case, threads)
        if profile_repeats:
            ours, theirs, x, y = build_pair(case)
            with thread_count(1):
                entry["profile_numpy"] = profile_numpy(ours, x, y, profile_repeats)
                entry["profile_torch"] = profile_torch(theirs, x, y, profile_repeats)
        result["cases"].append(entry)
    if threads > 1:
        result["small_op_us"] = {"1": small_op_cpu_us(1), str(threads): small_op_cpu_us(threads)}
    result["load_after"] = os.getloadavg()[0]
    return result


def run_without_coretype(args: argparse.Namespace) -> dict | None:
    """The same measurement in a child process whose environment lacks OPENBLAS_CORETYPE
    (None where it is not set: the child would measure the same thing again)."""
    if "OPENBLAS_CORETYPE" not in os.environ:
        return None
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    cmd = [sys.executable, "-m", "labctl.bench.numpy_vs_torch", "--child", "--budget",
           str(args.budget / 2), "--profile-repeats", "0"]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        return None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def verdict(ratio: float) -> str:
    if ratio <= STRETCH:
        return "stretch goal met"
    return "goal met" if ratio <= GOAL else "goal missed"


def render(main: dict, second: dict | None) -> str:
    threads = main["threads"]
    coretype = main["coretype"] or "unset"
    lines = [
        "## NumPy CNN vs PyTorch (CPU, one training step)",
        "",
        f"`python -m bench.numpy_vs_torch` on {platform.machine()} ({os.cpu_count()} CPUs), "
        f"NumPy {main['numpy']} (OpenBLAS kernels: {main['openblas_arch']}), torch "
        f"{main['torch']}, OPENBLAS_CORETYPE {coretype}. A step is forward + cross-entropy + "
        "backward + AdaMax, same weights and batch in both. Steps run in alternating blocks; "
        "each figure is the median of the block means, and ratios compare figures of the same "
        f"run. Load average {main['load_before']:.1f} before, {main['load_after']:.1f} after. "
        f"Goal: NumPy <= {GOAL:.2f}x torch's time (stretch {STRETCH:.2f}x).",
        "",
        f"| case | params | GFLOP/step | NumPy ms | torch ms | **ratio, {threads} threads "
        "(wall)** | ratio, 1 thread (CPU time) | roofline NumPy / torch, "
        f"{threads} threads; 1 thread |"
        + (" same, OPENBLAS_CORETYPE removed |" if second else "") + " block ratios |",
        "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if second else "") + "---|",
    ]
    for i, case in enumerate(main["cases"]):
        par, one = case["parallel"], case["single"]
        other = ""
        if second:
            o = second["cases"][i]
            other = f" {o['parallel']['ratio']:.2f}x / {o['single']['ratio']:.2f}x |"
        roofline = (f"{par['numpy_roofline']:.0%} / {par['torch_roofline']:.0%}; "
                    f"{one['numpy_roofline']:.0%} / {one['torch_roofline']:.0%}")
        lines.append(
            f"| {case['case']} | {case['params']:,} | {case['step_gflop']:.2f} | "
            f"{par['numpy_ms']:.1f} | "
            f"{par['torch_ms']:.1f} | **{par['ratio']:.2f}x** ({verdict(par['ratio'])}) | "
            f"{one['ratio']:.2f}x ({one['numpy_ms']:.0f} vs {one['torch_ms']:.0f} ms, "
            f"{verdict(one['ratio'])}) | {roofline} |"
            f"{other} {min(par['block_ratios']):.2f}-{max(par['block_ratios']):.2f} "
            f"({par['blocks']} blocks) |")
    peaks = "; ".join(f"{c['case'].split()[0]} {c['parallel']['matmul_gflops']:.0f} / "
                      f"{c['single']['matmul_gflops']:.0f}" for c in main["cases"])
    lines += ["", "GFLOP/step counts the convolutions' and linear layers' multiply-adds (x2) "
              "in forward, weight gradient and input gradient (none for the first layer's "
              "input, which neither framework computes); elementwise work is not counted. "
              "Roofline: GFLOP/step divided by the step's time, as a fraction of np.matmul's "
              f"float32 throughput on {MATMUL_SIDE}x{MATMUL_SIDE} matrices (one per thread, BLAS "
              "on one thread, as our layers call it) measured in the same run just before each "
              f"comparison at the same thread count; GFLOP/s, {threads} threads / 1 thread: "
              f"{peaks}."]
    lines += ["", "Layer by layer (the same NumPy layers run one by one without the blocks: "
              "im2col + GEMM, col2im, max-pool with argmax), one thread, CPU time: "
              + "; ".join(f"{c['case']}: {c['single']['layers_ms']:.0f} ms, "
                          f"{c['single']['layers_ratio']:.2f}x torch" for c in main["cases"])
              + "."]
    if second:
        lines += ["", "The OPENBLAS_CORETYPE-removed figures come from a child process (OpenBLAS "
                  f"then detects {second['openblas_arch']}; load average "
                  f"{second['load_before']:.1f}); ratios are {threads} threads / 1 thread."]
    lines += ["", "On a shared machine the multi-threaded figure depends on the load: every "
              "torch op ends in an OpenMP barrier where libgomp's threads spin by default, so a "
              "descheduled or spinning thread stalls the op (alone on this machine at load ~5, "
              "torch's 2-thread step took 170-280 ms for case (a) against 36-57 ms on one "
              "thread, and 52-83 ms with OMP_WAIT_POLICY=PASSIVE); our pool threads sleep "
              "while they wait. The single-thread CPU-time ratio is the stable measure of the "
              "work each implementation does.", ""]
    lines += scaling_lines(main)
    lines += ["", "### Where the time goes (one thread, CPU time)", ""]
    for case in main["cases"]:
        if "profile_numpy" not in case:
            continue
        lines += [where_time_goes(case), ""]
        lines += [f"{case['case']}, NumPy phases (median ms per step):", "",
                  "| phase | ms |", "|---|---:|"]
        lines += [f"| {phase} | {ms:.2f} |" for phase, ms in case["profile_numpy"]]
        lines += ["", f"{case['case']}, torch ops by self CPU time (ms per step):", "",
                  "| op | ms |", "|---|---:|"]
        lines += [f"| `{op}` | {ms:.2f} |" for op, ms in case["profile_torch"]]
        lines.append("")
    return "\n".join(lines) + NOTES


def scaling_lines(main: dict) -> list[str]:
    """Where the multi-threaded NumPy step loses time against an even split of the work."""
    threads = main["threads"]
    cases = [case for case in main["cases"] if "scaling" in case]
    if not cases:
        return []
    key = str(threads)
    lines = [f"### Where the time goes with {threads} threads", "",
             f"The NumPy step on {threads} threads and on one, in interleaved blocks of one "
             "process (`thread_scaling`): the CPU time all threads spent, and the wall time "
             "against an even split of that CPU time.", "",
             f"| case | CPU ms, 1 thread | CPU ms, {threads} threads | work added | wall ms, "
             f"{threads} threads | even split of that CPU | waiting | {threads} processes, "
             f"1/{threads} of the batch each |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for case in cases:
        one, many = case["scaling"]["1"], case["scaling"][key]
        even = many["cpu_ms"] / threads
        split = case.get("split_ms")
        lines.append(f"| {case['case']} | {one['cpu_ms']:.1f} | {many['cpu_ms']:.1f} | "
                     f"{many['cpu_ms'] / one['cpu_ms'] - 1:+.0%} | {many['wall_ms']:.1f} | "
                     f"{even:.1f} | {max(0.0, many['wall_ms'] - even):.1f} ms | "
                     + (f"{split:.1f} |" if split else "- |"))
    small = main.get("small_op_us")
    if small:
        lines += ["", f"A small NumPy call (a 4 KiB multiply) cost {small['1']:.2f} us of CPU on "
                  f"one thread and {small[key]:.2f} us each with {threads} threads calling at "
                  "once on their own arrays (same run). Every NumPy call releases the GIL for its "
                  "loop and takes it back after; a thread that finds it taken sleeps, and "
                  "waking it takes tens of microseconds on this VM. About a sixth of a "
                  "one-thread step runs Python with the GIL held (py-spy --gil on cases (c) "
                  "and (d): 15-18%): the dispatch of a few hundred NumPy calls and the block "
                  "and chunk bookkeeping around them."]
    if any(case.get("split_ms") for case in cases):
        lines += ["", f"The last column is the bound for {threads} threads: {threads} independent "
                  "processes started together, each training the same network on its share "
                  "of the batch on one thread (the slowest one's step). They share only the "
                  "CPUs' caches, memory bandwidth and clock; the gap between it and the "
                  "threads' wall time is the interpreter lock and the threads' meeting points "
                  "(one per pass over a run of conv blocks, one per dense layer, and the "
                  "optimizer's). Memory-bound calls slow down most "
                  "when both CPUs are busy: on case (c) an im2col copy's median CPU time rose "
                  "from 35 to 48 us, a sigmoid-gradient pass from 10 to 19 us, a GEMM by 12% "
                  "(measured per call). Making the processes one data-parallel step (forked "
                  "helpers with the parameters in shared memory, gradients summed in the "
                  "parent) was no faster than the threads: loss, optimizer and gradient sum "
                  "then run in one process while the other waits, and each step pays two "
                  "round trips."]
    return lines


def where_time_goes(case: dict) -> str:
    """One sentence from a case's measurements: how much of the one-thread step the GEMMs
    would take at the measured np.matmul rate, and the phases that take the most."""
    one = case["single"]
    gemm_ms = case["step_gflop"] / one["matmul_gflops"] * 1000
    phases = sorted(((ms, phase.strip()) for phase, ms in case["profile_numpy"]
                     if phase != "total"), reverse=True)[:3]
    biggest = ", ".join(f"{' '.join(phase.split())} {ms:.1f} ms" for ms, phase in phases)
    return (f"**{case['case']}**: the step's {case['step_gflop']:.2f} GFLOP would take "
            f"{gemm_ms:.0f} ms of the NumPy step's {one['numpy_ms']:.0f} ms at np.matmul's "
            f"measured rate ({one['matmul_gflops']:.0f} GFLOP/s), so "
            f"{max(0.0, one['numpy_ms'] - gemm_ms):.0f} ms go to the GEMMs running below that "
            "rate on their narrower shapes, im2col copies, activations, pooling and the "
            f"optimizer; torch's step is {one['torch_ms']:.0f} ms. Largest phases: {biggest}.")


NOTES = """
Reading the profiles: in case (b) the second block's three GEMMs (forward, weight gradient,
input gradient; 0.6 G multiply-adds each, at roughly 30 GMAC/s per core with OpenBLAS) are
about 60 ms of the NumPy step, the 16384->256 linear layer's three GEMMs most of the
next 20 ms, AdaMax on 4.3 M parameters about 10 ms; the rest is im2col copies, pooling and
gradient routing. Torch spends comparable time in its convolutions (oneDNN) but also pays
for `max_pool2d_with_indices` and separate ReLU passes, which the fused block replaces with
three `np.maximum` calls on a quarter of the data.

What made the NumPy version fast, in order of effect (compare the layer-by-layer figures):

1. **Pooling-ordered im2col** (`worker/numpy_cnn/fused.py`): im2col rows are ordered so each
   2x2 pooling window is four contiguous blocks of the GEMM output; pooling is three
   `np.maximum` calls, and its backward routes gradients with boolean multiplies.
   ReLU and the bias run after pooling, on a quarter of the data.
2. **Cache blocking**: each chunk of images (about 1 MiB of im2col) goes im2col -> GEMM ->
   pool while hot; backward recomputes the chunk's im2col instead of storing it.
3. **Threads over batch chunks** with OpenBLAS held to one thread. It is set once per
   process: toggling OpenBLAS's thread count between calls made the next threaded GEMM
   10-30x slower. The calling thread works too and each thread claims the next chunk when
   it is free, so a block wakes each helper thread once (handing every chunk over as a
   future made case (d) 15% slower at two threads). The linear layers split their GEMMs by
   output columns instead. Consecutive conv blocks run as one pipeline
   (`parallel.run_stages`): a block's chunk starts as soon as the previous block has
   finished the images it reads, so the threads meet once per pass instead of after every
   block, and each block keeps its own chunk size (cases (b)-(d) 2-9% faster at two threads,
   none slower at one).
4. **Input gradient as a transposed convolution** (flipped kernel, one GEMM) rather than
   GEMM + col2im; the first block skips it.
5. **The same mechanisms for any network** (`worker/numpy_cnn/blocks.py`, cases (c) and
   (d)): every conv (any kernel, stride, padding) with its activation and pool is one
   chunked, threaded block on NHWC arrays; im2col is one strided-view copy; bias, pooling
   and the activation run in place on the GEMM output (after pooling, on the pooled data);
   the input gradient is a transposed convolution split by stride phase, one im2col + GEMM
   per row phase writing whole input rows (the column phases share one window of the
   gradient, a tap one lacks being a zero weight), instead of GEMM + col2im (measured 1.2x
   faster on the strided 3x3 blocks; merging the column phases another 20% on case (c)'s);
   each Linear and its activation is one block too.
6. Minor: channels-last activations between fused blocks; for a one-channel input, im2col
   built transposed (the copy runs along image rows); per-thread reused buffers (`as_strided`
   replaced by the ndarray constructor: 25 us a call adds up over chunks) and per-thread
   plans of a chunk shape's buffers and strided views (made once, not per chunk);
   optimizer updates in cache-sized slices spread over threads; float32 throughout.
7. Elementwise details that measured faster: ReLU as `np.maximum` against a row of zeros
   (NumPy's maximum has no SIMD loop for a scalar operand: 3x slower), the bias added along
   rows of whole images rather than (pixels, F) rows, sigmoid as (1 + tanh(x/2)) / 2 (tanh's
   loop is 2x as fast as exp's); the strided input gradient's column phases written
   interleaved into whole input rows, then copied as W*C-float runs.

8. **Freed memory stays in the process** (`worker/numpy_cnn/allocator.py`): glibc's malloc
   mapped each step's large arrays afresh and page-faulted them (~780 faults a step in
   cases (c) and (d), 5-7 ms of kernel time a step on two threads); raised mmap and trim
   thresholds stop that (case (d): 22% less wall time on two threads, 18% less CPU on one).
9. **GEMMs with small outputs through `np.dot`**: `np.matmul` keeps the GIL when its output
   has 500 elements or fewer (bias gradients, a 16x25 weight gradient), so the other thread
   stalled for the whole GEMM; `np.dot` releases it (cases (a) and (c) 10% faster at two
   threads). The bias rides in the convolution GEMM (a column of ones in im2col), which also
   sums its gradient.

Tried and dropped (slower at 1 thread, A/B in one process): keeping the padded input or the
whole im2col from forward for backward (re-padding and re-copying a chunk in cache beat
reading either back; again 1-4% slower on this machine), a separate coarser chunk loop for
the input gradient, handing a strided input gradient to the previous block as row phases
(its activation gradient then read a transposed view), other chunk sizes than 1 MiB of
im2col (384 KiB: 18-22% slower at two threads, 640 KiB 3-9%, 2 MiB 3-10%). At two threads: a
fixed half of the batch per thread, also with each thread pinned to its own CPU (no faster
than claiming chunks; case (d) 10% slower), chunk counts not rounded to a multiple of the
threads, freezing Python's garbage collector, a shorter GIL switch interval, no threads for
the optimizer and the small GEMMs (each within noise), taking batch shards through all of a
network's conv blocks with one chunk size for all (case (c) 2-4% faster, (d) 4-10% slower,
its lighter blocks then running 3x as many chunks), the pipeline taking the deepest ready
chunk first rather than the first (3% slower, one thread or two: each thread then spreads
over more blocks' buffers), and the forked data-parallel helpers described above. Winograd
F(2x2, 3x3) for the stride-1 3x3 convolutions (prototyped forward on case (d)'s 32->64
block): its GEMMs took 2.6 ms against im2col's 6.1, but its input and output transforms,
some twenty NumPy passes over tiles of 4x4, took most of that back (the block's forward
15-20% faster, the GEMMs saved being a third of one case's time); not pursued.
"""



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=12.0,
                        help="seconds of timed blocks per case (at least 4 blocks each)")
    parser.add_argument("--profile-repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--no-second-run", action="store_true",
                        help="skip the run without OPENBLAS_CORETYPE")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--split-step", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=SPLIT_SECONDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.split_step:
        return split_step_child(args.split_step, args.seconds)
    result = measure(args.budget, args.profile_repeats)
    if args.child:
        print(json.dumps(result))
        return 0
    second = None if args.no_second_run else run_without_coretype(args)
    body = render(result, second)
    print(body)
    if not args.no_write:
        write_section(DOC, SECTION, body)
        print(f"wrote the {SECTION} section of {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
