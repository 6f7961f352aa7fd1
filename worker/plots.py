"""PNG plots of one job: loss, accuracy/F1 and the confusion matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # workers and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from labctl.shared.artifacts import atomic_path  # noqa: E402


def save_figure(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_job_plots(plots_dir: Path, rows: list[dict[str, Any]], cm: np.ndarray,
                    class_names: list[str]) -> list[Path]:
    """Write loss.png, accuracy_f1.png and confusion_matrix.png; return their paths."""
    epochs = [r["epoch"] for r in rows]
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    ax.plot(epochs, [r["test_loss"] for r in rows], "s-", label="test")
    ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, plots_dir / "loss.png")
    written.append(plots_dir / "loss.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["test_accuracy"] for r in rows], "o-", label="accuracy")
    ax.plot(epochs, [r["test_f1_macro"] for r in rows], "s-", label="macro-F1")
    if rows and "test_top5_accuracy" in rows[0]:
        ax.plot(epochs, [r["test_top5_accuracy"] for r in rows], "^-", label="top-5")
    ax.set(xlabel="epoch", ylabel="test score", title="Accuracy and macro-F1", ylim=(0, 1.02))
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, plots_dir / "accuracy_f1.png")
    written.append(plots_dir / "accuracy_f1.png")

    written.append(plot_confusion_matrix(cm, class_names, plots_dir / "confusion_matrix.png"))
    return written


def plot_confusion_matrix(cm: np.ndarray, class_names: list[str], path: Path) -> Path:
    """Row-normalised, so rare classes are as visible as common ones."""
    support = cm.sum(axis=1, keepdims=True)
    normalised = np.divide(cm, support, out=np.zeros(cm.shape), where=support > 0)
    size = min(12, 3 + 0.3 * len(cm))
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    if len(cm) <= 20:  # 196 Stanford Cars labels would be unreadable
        ax.set_xticks(range(len(cm)), class_names, rotation=90)
        ax.set_yticks(range(len(cm)), class_names)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (row-normalised)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    save_figure(fig, path)
    return path
