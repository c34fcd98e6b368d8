"""PNG figures of the evaluation reports: reliability diagrams, confusion-matrix heat maps, level
distributions and sweep curves. matplotlib, headless (``Agg``), from ``requirements/modeller.txt``
(``make install-modeller``).

Every figure has a fixed size in pixels (``SIZES``: inches × ``DPI``, saved without a tight
bounding box), so a report's figures can be checked and laid out without looking at them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tools.modeller.evaluate.metrics import ECE_BINS, reliability_bins

if TYPE_CHECKING:  # matplotlib is optional: imported only when a figure is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 100
# (width, height) in inches; pixels are these × DPI.
SIZES = {
    "reliability": (6.0, 6.0),
    "confusion": (7.0, 6.0),
    "confusion_grid": (10.0, 9.0),
    "distribution": (10.0, 7.0),
    "sweep": (8.0, 5.0),
    "weights": (8.0, 5.0),
}
MISSING = (
    "tessera-evaluate draws its figures with matplotlib, which is not installed: "
    "`make install-modeller` (or `uv pip install -r requirements/modeller.txt`)"
)


class FiguresUnavailable(RuntimeError):
    """matplotlib is not installed."""


def pixel_size(kind: str) -> tuple[int, int]:
    """(width, height) in pixels of a figure kind."""
    w, h = SIZES[kind]
    return round(w * DPI), round(h * DPI)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise FiguresUnavailable(MISSING) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Figure, path: Path) -> Path:
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def reliability_diagram(
    path: Path, curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str, bins: int = ECE_BINS
) -> Path:
    """Accuracy against confidence per bin (the bins of the ECE) for each named set of
    probabilities (name → (probabilities, labels)), the diagonal, and the share of samples per bin
    (bars) of the first set."""
    plt = _pyplot()
    fig, (ax, hist) = plt.subplots(
        2, 1, figsize=SIZES["reliability"], gridspec_kw={"height_ratios": [3, 1]}, sharex=True
    )
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="calibrated")
    first = True
    for name, (probs, labels) in curves.items():
        edges, count, acc, conf = reliability_bins(probs, labels, bins)
        keep = count > 0
        ax.plot(conf[keep], acc[keep], marker="o", linewidth=1.5, label=name)
        if first:
            centres = (edges[:-1] + edges[1:]) / 2
            hist.bar(centres, count / count.sum(), width=1.0 / bins * 0.9, color="C0", alpha=0.6)
            first = False
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    hist.set_xlabel("confidence (top-1 probability)")
    hist.set_ylabel("share")
    fig.tight_layout()
    return _save(fig, path)


def _heatmap(ax: Axes, matrix: np.ndarray, names: Sequence[str], title: str) -> None:
    m = np.asarray(matrix, np.float64)
    rows = m.sum(axis=1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    k = len(names)
    ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    for i in range(k):
        for j in range(k):
            if m[i, j]:
                ax.text(
                    j,
                    i,
                    f"{int(m[i, j])}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black",
                )


def confusion_heatmap(path: Path, matrix: np.ndarray, names: Sequence[str], title: str) -> Path:
    """Counts in the cells, colour = share of the row (recall per true class)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZES["confusion"])
    _heatmap(ax, matrix, names, title)
    fig.tight_layout()
    return _save(fig, path)


def confusion_grid(path: Path, matrices: Mapping[str, np.ndarray], names: Sequence[str], title: str) -> Path:
    """Up to four confusion matrices side by side (2 × 2), e.g. one per affect."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=SIZES["confusion_grid"])
    for ax, (name, matrix) in zip(axes.flat, matrices.items(), strict=False):
        _heatmap(ax, matrix, names, name)
    for ax in list(axes.flat)[len(matrices) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def distribution_bars(
    path: Path, panels: Mapping[str, Mapping[str, Sequence[int]]], names: Sequence[str], title: str
) -> Path:
    """Per panel (e.g. affect), grouped bars: the count per class of each series (true, each model)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=SIZES["distribution"])
    x = np.arange(len(names))
    for ax, (panel, series) in zip(axes.flat, panels.items(), strict=False):
        width = 0.8 / max(1, len(series))
        for i, (label, counts) in enumerate(series.items()):
            ax.bar(x + (i - (len(series) - 1) / 2) * width, counts, width=width, label=label)
        ax.set_xticks(x, names, fontsize=8)
        ax.set_title(panel, fontsize=10)
        ax.set_ylabel("clips")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def sweep_curves(
    path: Path,
    x: Sequence[float],
    curves: Mapping[str, Sequence[float]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    marks: Mapping[str, float] | None = None,
) -> Path:
    """One line per curve over a shared x (e.g. macro-F1 per threshold, one line per affect);
    ``marks`` draws a vertical line per name (e.g. the shipped threshold)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZES["sweep"])
    for name, ys in curves.items():
        ax.plot(list(x), list(ys), marker=".", label=name)
    for name, value in (marks or {}).items():
        ax.axvline(value, color="0.5", linestyle="--", linewidth=1)
        ax.text(value, ax.get_ylim()[1], f" {name}", va="top", fontsize=8, color="0.3")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def ranked_bars(
    path: Path, labels: Sequence[str], values: Sequence[float], *, xlabel: str, title: str
) -> Path:
    """Horizontal bars, best first (e.g. the weight search's top candidates)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZES["weights"])
    y = np.arange(len(labels))
    ax.barh(y, list(values), color="C0")
    ax.set_yticks(y, list(labels), fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return _save(fig, path)
