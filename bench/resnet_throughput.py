"""Our ResNet50 against torchvision's: training images/s on this CPU.

One training step is forward + cross-entropy + backward + AdaMax update on a fixed random
batch. Both models run in the same process, interleaved step by step in ABBA order
(ours, theirs, theirs, ours, ...), so drift in the machine's load (other jobs, thermal
throttling) hits both equally. Each model's speed is the median of its step times, which
shrugs off the odd step a noisy neighbour stretched.

    python -m bench.resnet_throughput            # ~2 minutes on 2 cores; updates the docs
    python -m bench.resnet_throughput --no-write --pairs 4

The table goes into the ``resnet`` section of docs/benchmarks.md; other sections are kept.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision

from labctl.bench.docs_page import BENCHMARKS_PAGE, write_section
from labctl.worker.resnet import resnet50

DOC = BENCHMARKS_PAGE
SECTION = "resnet"
NUM_CLASSES = 10
#: Ours must train at least this fast relative to torchvision (the project's stated goal).
TARGET_RATIO = 0.98


@dataclass
class Trainee:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step_seconds: list[float]


def make_trainee(name: str, model: torch.nn.Module, memory_format: torch.memory_format
                 ) -> Trainee:
    model = model.to(memory_format=memory_format).train()
    return Trainee(name, model, torch.optim.Adamax(model.parameters(), lr=2e-3), [])


def train_step(trainee: Trainee, images: torch.Tensor, labels: torch.Tensor) -> float:
    started = time.perf_counter()
    loss = F.cross_entropy(trainee.model(images), labels)
    trainee.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trainee.optimizer.step()
    return time.perf_counter() - started


def measure(memory_format: torch.memory_format, batch: int, size: int, pairs: int,
            warmup: int) -> dict[str, float]:
    torch.manual_seed(0)
    theirs = torchvision.models.resnet50(num_classes=NUM_CLASSES)
    ours = resnet50(num_classes=NUM_CLASSES)
    ours.load_state_dict(theirs.state_dict())  # same numbers in, so the same work is done
    trainees = [make_trainee("ours", ours, memory_format),
                make_trainee("torchvision", theirs, memory_format)]
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=memory_format)
    labels = torch.randint(0, NUM_CLASSES, (batch,))
    for trainee in trainees:  # first steps allocate the optimizer state and warm the caches
        for _ in range(warmup):
            train_step(trainee, images, labels)
    ratios = []
    for pair in range(pairs):
        order = trainees if pair % 2 == 0 else trainees[::-1]
        for trainee in order + order[::-1]:
            trainee.step_seconds.append(train_step(trainee, images, labels))
        # ABBA: each model's two steps bracket the other's, so a load change during the
        # quartet cancels out of this ratio to first order.
        ours_pair, theirs_pair = (sum(t.step_seconds[-2:]) for t in trainees)
        ratios.append(theirs_pair / ours_pair)
    ours_s, theirs_s = (statistics.median(t.step_seconds) for t in trainees)
    return {"ours": batch / ours_s, "torchvision": batch / theirs_s,
            "ratio": statistics.median(ratios), "steps": len(trainees[0].step_seconds),
            "ratios": ratios}


def render(rows: list[tuple[str, dict[str, float]]], batch: int, size: int) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        "## ResNet50: ours vs torchvision (CPU training throughput)",
        "",
        f"`python -m bench.resnet_throughput`: forward + backward + AdaMax step, batch {batch} "
        f"at {size}x{size}, {torch.get_num_threads()} threads on {cpu}, torch "
        f"{torch.__version__}. Steps interleaved ABBA in one process; img/s from the median "
        "step time, the ratio is the median over ABBA quartets of (their time / our time).",
        "",
        "| memory format | ours (img/s) | torchvision (img/s) | ours / torchvision | steps each |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, r in rows:
        lines.append(f"| {label} | {r['ours']:.2f} | {r['torchvision']:.2f} | "
                     f"{r['ratio']:.3f} | {r['steps']} |")
    worst = min(r["ratio"] for _, r in rows)
    verdict = "met" if worst >= TARGET_RATIO else "NOT met"
    lines += ["", f"Goal ours >= {TARGET_RATIO}x torchvision: {verdict} (worst {worst:.3f})."]
    return "\n".join(lines)



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--pairs", type=int, default=10,
                        help="ABBA rounds per memory format; each runs 2 steps per model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (default: torch's, one per core)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave the docs")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for label, memory_format in (("contiguous (NCHW)", torch.contiguous_format),
                                 ("channels_last (NHWC)", torch.channels_last)):
        result = measure(memory_format, args.batch, args.size, args.pairs, args.warmup)
        print(f"{label}: ours {result['ours']:.2f} img/s, torchvision "
              f"{result['torchvision']:.2f} img/s, ratio {result['ratio']:.3f} (per quartet: "
              f"{' '.join(f'{r:.2f}' for r in result['ratios'])})", flush=True)
        rows.append((label, result))
    table = render(rows, args.batch, args.size)
    print(table)
    if not args.no_write:
        write_section(DOC, SECTION, table)
        print(f"wrote the {SECTION} section of {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
