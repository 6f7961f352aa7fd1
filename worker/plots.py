"""PNG plots of one job: loss, accuracy/F1 and the confusion matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # workers and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from labctl.shared.artifacts import atomic_path  # noqa: E402

#: The image formats a plot may be written as, by file extension.
FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".pdf": "pdf", ".svg": "svg"}
#: Past this many points a marker per point is a smear: lines only.
MARKERS_UP_TO = 40
#: With more classes than this, cells are too small to label: the largest confusions are.
LABELLED_CLASSES_UP_TO = 20
LARGEST_CONFUSIONS = 10


class UnsupportedFormat(ValueError):
    pass


def image_format(path: Path) -> str:
    """The format ``path``'s extension names; :class:`UnsupportedFormat` for any other, so
    a ``.jpg`` never holds PNG bytes."""
    try:
        return FORMATS[Path(path).suffix.lower()]
    except KeyError:
        raise UnsupportedFormat(f"{Path(path).name}: write .png, .jpg, .pdf or .svg "
                                f"(not {Path(path).suffix or 'no extension'})") from None


def save_figure(fig: plt.Figure, path: Path) -> None:
    """Write ``fig`` atomically in the format of ``path``'s extension."""
    fmt = image_format(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=110, bbox_inches="tight")
    plt.close(fig)


def marker(style: str, points: int) -> str:
    """``style`` ("o", "s", ...) while points are few enough to tell apart, else none."""
    return style if points <= MARKERS_UP_TO else ""


def write_job_plots(plots_dir: Path, rows: list[dict[str, Any]], cm: np.ndarray,
                    class_names: list[str]) -> list[Path]:
    """Write loss.png, accuracy_f1.png and confusion_matrix.png; return their paths."""
    written = []
    save_figure(loss_figure(rows), plots_dir / "loss.png")
    written.append(plots_dir / "loss.png")
    save_figure(scores_figure(rows), plots_dir / "accuracy_f1.png")
    written.append(plots_dir / "accuracy_f1.png")
    written.append(plot_confusion_matrix(cm, class_names, plots_dir / "confusion_matrix.png"))
    return written


def loss_figure(rows: list[dict[str, Any]]) -> plt.Figure:
    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["train_loss"] for r in rows], marker("o", len(rows)) + "-",
            label="train")
    ax.plot(epochs, [r["test_loss"] for r in rows], marker("s", len(rows)) + "-",
            label="test")
    ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def scores_figure(rows: list[dict[str, Any]]) -> plt.Figure:
    """Accuracy as a wide solid line, macro-F1 as a narrower dashed one drawn over it: on a
    balanced test set the two often coincide, and then both must still show."""
    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["test_accuracy"] for r in rows], marker("o", len(rows)) + "-",
            linewidth=3.5, markersize=7, alpha=0.55, label="accuracy", zorder=2)
    ax.plot(epochs, [r["test_f1_macro"] for r in rows], marker("s", len(rows)) + "--",
            linewidth=1.5, markersize=4, markerfacecolor="none", label="macro-F1",
            zorder=3)
    if rows and "test_top5_accuracy" in rows[0]:
        ax.plot(epochs, [r["test_top5_accuracy"] for r in rows],
                marker("^", len(rows)) + ":", label="top-5", zorder=3)
    ax.set(xlabel="epoch", ylabel="test score", title="Accuracy and macro-F1", ylim=(0, 1.02))
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def confusion_figure(cm: np.ndarray, class_names: list[str]) -> plt.Figure:
    """Row-normalised colours, so rare classes are as visible as common ones, and the
    counts written in: every non-zero cell's for a few classes, the largest off-diagonal
    confusions for many (196 Stanford Cars classes)."""
    support = cm.sum(axis=1, keepdims=True)
    normalised = np.divide(cm, support, out=np.zeros(cm.shape), where=support > 0)
    size = min(12, 3 + 0.3 * len(cm))
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    if len(cm) <= LABELLED_CLASSES_UP_TO:
        ax.set_xticks(range(len(cm)), class_names, rotation=90)
        ax.set_yticks(range(len(cm)), class_names)
        cells = [(i, j) for i, j in zip(*np.nonzero(cm), strict=True)]
        title = "Confusion matrix (colour: row-normalised; numbers: counts)"
    else:
        off = cm.astype(float).copy()
        np.fill_diagonal(off, 0)
        order = np.argsort(off, axis=None)[::-1][:LARGEST_CONFUSIONS]
        cells = [tuple(np.unravel_index(k, cm.shape)) for k in order if off.flat[k] > 0]
        title = (f"Confusion matrix (row-normalised; the {len(cells)} largest confusions "
                 "counted)")
    for i, j in cells:
        # Dark text on light cells, white on dark ones: a 3% error stays readable.
        ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                fontsize=8 if len(cm) <= 10 else 6,
                color="white" if normalised[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    return fig


def plot_confusion_matrix(cm: np.ndarray, class_names: list[str], path: Path) -> Path:
    save_figure(confusion_figure(cm, class_names), path)
    return path
