"""Overlaid learning curves: one line per group (mean over seeds) with a ±1 std band."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from labctl.cli.analysis.grouping import Block, Group

#: (metric key, axis label, dashed companion drawn without a band)
CURVES = {
    "loss": ("test_loss", "cross-entropy loss (test solid, train dashed)", "train_loss"),
    "accuracy": ("test_accuracy", "test accuracy", None),
    "f1": ("test_f1_macro", "test macro-F1", None),
}


def mean_curve(group: Group, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(epochs, mean, std) over the runs that reached each epoch; std is 0 with one run."""
    by_epoch: dict[int, list[float]] = {}
    for run in group.runs:
        for row in run.metrics:
            by_epoch.setdefault(row["epoch"], []).append(row[key])
    epochs = np.array(sorted(by_epoch))
    values = [by_epoch[e] for e in epochs]
    mean = np.array([np.mean(v) for v in values])
    std = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values])
    return epochs, mean, std


def plot_curves(blocks: list[Block], curves: list[str], path: Path,
                blocks_as_rows: bool = True) -> Path:
    """One subplot per (block, curve); ``blocks_as_rows=False`` lays blocks side by side."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers, CI or over ssh
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from labctl.worker.plots import marker, save_figure

    n_blocks, n_curves = len(blocks), len(curves)
    rows, cols = (n_blocks, n_curves) if blocks_as_rows else (n_curves, n_blocks)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.6 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for b, block in enumerate(blocks):
        for c, curve in enumerate(curves):
            ax = axes[b, c] if blocks_as_rows else axes[c, b]
            key, ylabel, companion = CURVES[curve]
            for g, group in enumerate(block.groups):
                colour = colours[g % len(colours)]
                epochs, mean, std = mean_curve(group, key)
                label = f"{group.label} (n={len(group.runs)})"
                ax.plot(epochs, mean, marker("o", len(epochs)) + "-", color=colour,
                        label=label, markersize=3)
                ax.fill_between(epochs, mean - std, mean + std, color=colour, alpha=0.2,
                                linewidth=0)
                if companion:
                    epochs, mean, _ = mean_curve(group, companion)
                    ax.plot(epochs, mean, "--", color=colour, alpha=0.8)
            ax.set(xlabel="epoch", ylabel=ylabel, title=block.label)
            if curve != "loss":
                ax.set_ylim(top=1.0)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("mean over seeds, band = ±1 std", fontsize=9)
    fig.tight_layout()
    save_figure(fig, Path(path))
    return Path(path)


def plot_boxes(blocks: list[Block], target: float, path: Path) -> Path:
    """Box plots across seeds, one column per block: final test accuracy (top) and epochs to
    ``target`` (bottom; a run that never reaches it is drawn at "never", one past the
    last epoch). Every run is a dot over its box, so ten seeds stay visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from labctl.cli.analysis.robust import epochs_to_target
    from labctl.worker.plots import save_figure

    fig, axes = plt.subplots(2, len(blocks), figsize=(max(4.0, 2.2 * len(blocks[0].groups)) *
                                                       len(blocks), 6.4), squeeze=False)
    for b, block in enumerate(blocks):
        labels = [group.label for group in block.groups]
        final = [[run.metrics[-1]["test_accuracy"] for run in g.runs] for g in block.groups]
        last = max(run.metrics[-1]["epoch"] for g in block.groups for run in g.runs)
        times = [[min(epochs_to_target(run.metrics, target), last + 1) for run in g.runs]
                 for g in block.groups]
        for ax, data, ylabel in ((axes[0, b], final, "final test accuracy"),
                                 (axes[1, b], times, f"epochs to {target:g} test accuracy")):
            ax.boxplot(data, tick_labels=labels, widths=0.5, showfliers=False)  # dots show all
            rng = np.random.default_rng(0)  # jitter only; fixed so the figure is stable
            for i, values in enumerate(data, start=1):
                ax.plot(i + rng.uniform(-0.08, 0.08, len(values)), values, "o", alpha=0.6,
                        markersize=4)
            ax.set(ylabel=ylabel, title=block.label)
            ax.grid(alpha=0.3, axis="y")
        axes[1, b].yaxis.get_major_locator().set_params(integer=True)
        axes[1, b].axhline(last + 1, color="grey", linestyle=":", linewidth=1)
        axes[1, b].annotate("never", (0.5, last + 1), fontsize=8, color="grey",
                            xytext=(2, 2), textcoords="offset points")
    fig.suptitle("across seeds: box = quartiles, line = median, dots = runs", fontsize=9)
    fig.tight_layout()
    save_figure(fig, Path(path))
    return Path(path)
