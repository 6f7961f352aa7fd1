"""Plots of a tuning study: the optimisation history and learning rate vs score, one line
or colour per optimizer, from the study snapshot ``labctl tune`` writes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _finite_points(history: list[dict[str, Any]], key) -> tuple[list[float], list[float]]:
    points = [(key(t), t["value"]) for t in history
              if t["value"] is not None and math.isfinite(t["value"])]
    return [x for x, _ in points], [y for _, y in points]


def plot_study(snapshot: dict[str, Any], path: Path) -> Path:
    """Two panels: each trial's value by trial number with the best so far as a step line
    (left), and value against the trial's learning rate on a log axis (right). Trials
    that never reached a time-to-target are left out (they have no epoch to draw)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from labctl.worker.plots import save_figure

    maximise = snapshot["direction"] == "maximize"
    ylabel = ("best validation accuracy" if snapshot["objective"] == "accuracy"
              else f"epochs to {snapshot['target']:g} validation accuracy")
    fig, (history_ax, lr_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (opt, history) in enumerate(snapshot["history"].items()):
        colour = colours[i % len(colours)]
        numbers, values = _finite_points(history, lambda t: t["trial"])
        history_ax.plot(numbers, values, "o", color=colour, alpha=0.6, markersize=4)
        best, running = [], None
        for value in values:
            running = value if running is None else (max if maximise else min)(running, value)
            best.append(running)
        history_ax.step(numbers, best, where="post", color=colour, label=f"{opt} best so far")
        rates, values = _finite_points(history, lambda t: t["params"]["lr"])
        lr_ax.plot(rates, values, "o", color=colour, alpha=0.7, markersize=4, label=opt)
    history_ax.set(xlabel="trial", ylabel=ylabel, title="optimisation history")
    history_ax.xaxis.get_major_locator().set_params(integer=True)
    lr_ax.set(xscale="log", xlabel="learning rate", ylabel=ylabel, title="learning rate vs score")
    for ax in (history_ax, lr_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"study {snapshot['study']}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, Path(path))
    return Path(path)
