"""The report's pictures (PNG, matplotlib's Agg backend: no display needed). Each function takes
arrays and a path, draws one figure and closes it.

Margins are set in inches from what each figure holds (``_layout``) instead of by
``tight_layout``, which measures every tick label in an extra draw: that halved the time of the
report's plots (measured on the ResNet-18 run: see benchmarks/README.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 100
MAX_METRIC_PANELS = 12  # an --eval with many metrics (per-class accuracy) plots the first ones; tables list all


def _layout(fig, rows: int = 1, cols: int = 1, *, left: float, right: float, bottom: float, top: float,
            wgap: float = 0.0, hgap: float = 0.0) -> None:
    """Place a ``rows × cols`` grid of axes with margins and gaps given in inches."""
    width, height = fig.get_size_inches()
    axes_w = (width - left - right - (cols - 1) * wgap) / cols
    axes_h = (height - top - bottom - (rows - 1) * hgap) / rows
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=wgap / max(axes_w, 1e-3), hspace=hgap / max(axes_h, 1e-3))


def _text_inches(text: str, fontsize: float) -> float:
    """About how long ``text`` runs in DejaVu Sans at ``fontsize`` points (0.55 em per character)."""
    return 0.55 * fontsize * len(text) / 72


def short(text: str, limit: int = 60) -> str:
    """A label of at most ``limit`` characters: a longer one (a tensor or metric name) keeps its
    start and end around an ellipsis. Names are whole in the report's tables; a plot has room for
    a label only as long as its figure."""
    text = str(text)
    if len(text) <= limit:
        return text
    keep = (limit - 1) // 2
    return text[:keep] + "…" + text[len(text) - (limit - 1 - keep):]


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    plt.close(fig)


def references(time: np.ndarray, raw: np.ndarray, sizes: Sequence[int], path: Path) -> None:
    """Each mode's reference trajectory r_m(t) (raw values), one small panel per mode."""
    M = raw.shape[0]
    cols = min(M, 5)
    rows = -(-M // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.0 * rows + 0.4), squeeze=False, sharex=True)
    for m, ax in enumerate(axes.flat):
        if m >= M:
            ax.axis("off")
            continue
        ax.plot(time, raw[m], color=f"C{m % 10}")
        ax.set_title(f"mode {m} ({sizes[m]:,} params)", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle("Reference trajectory of each mode, r_m(t)", fontsize=11)
    fig.supxlabel("checkpoint time", fontsize=9)
    _layout(fig, rows, cols, left=0.6, right=0.15, bottom=0.5, top=0.75, wgap=0.65, hgap=0.5)
    _save(fig, path)


def errors(time: np.ndarray, series: Mapping[str, np.ndarray], ylabel: str, path: Path,
           boundary: float | None = None) -> None:
    """Relative error per checkpoint, one line per model (CMD, PCA d=1, …), log scale."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, (label, values) in enumerate(series.items()):
        ax.plot(time, values, marker="o", markersize=3, label=label, color=f"C{i}")
    if boundary is not None:
        ax.axvline(boundary, color="grey", linestyle=":", label="warm-up end")
    ax.set_yscale("log")
    ax.set_xlabel("checkpoint time")
    ax.set_ylabel(ylabel)
    ax.set_title("How well each model reproduces every checkpoint (lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    _layout(fig, left=0.9, right=0.2, bottom=0.55, top=0.4)
    _save(fig, path)


def embedded(time: np.ndarray, fraction: Sequence[float], boundary: float | None, path: Path) -> None:
    """Embedded CMD: the share of the trainable parameters embedded after each checkpoint."""
    fig, ax = plt.subplots(figsize=(7, 3.0))
    ax.step(time, 100 * np.asarray(fraction), where="post", marker="o", markersize=3, color="C2")
    if boundary is not None:
        ax.axvline(boundary, color="grey", linestyle=":", label="warm-up end")
        ax.legend(loc="upper left")
    ax.set_ylim(0, 100)
    ax.set_xlabel("checkpoint time")
    ax.set_ylabel("embedded, % of trainable")
    ax.set_title("Embedded CMD: parameters taken out of training, by checkpoint")
    ax.grid(True, alpha=0.3)
    _layout(fig, left=0.9, right=0.2, bottom=0.55, top=0.4)
    _save(fig, path)


def mode_layers(counts: np.ndarray, layers: Sequence[str], path: Path) -> None:
    """Mode × layer heat map: the share of each layer's parameters that falls in each mode."""
    M, L = counts.shape
    layers = [short(name) for name in layers]
    share = counts / np.maximum(counts.sum(axis=0, keepdims=True), 1)
    bottom = 0.2 + _text_inches(max(layers, key=len, default=""), 7)  # the layer names, written upwards
    # at least a quarter inch per mode above the names (long names, such as a PEFT adapter's, take inches)
    fig, ax = plt.subplots(figsize=(min(2 + 0.28 * L, 30), max(1.6 + 0.32 * M, bottom + 0.35 + 0.25 * M)))
    image = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(M), [f"mode {m}" for m in range(M)], fontsize=8)
    ax.set_xticks(range(L), layers, rotation=90, fontsize=7)
    ax.set_title("Share of each layer's parameters in each mode (each column sums to 1)", fontsize=10)
    _layout(fig, left=0.25 + _text_inches(f"mode {M - 1}", 8), right=0.55, top=0.35, bottom=bottom)
    fig.colorbar(image, ax=ax, fraction=0.03)
    _save(fig, path)


def correlation(C: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """The |corr| matrix of the sampled parameters, ordered by mode (the paper's figure 1)."""
    order = np.argsort(labels, kind="stable")
    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    image = ax.imshow(C[np.ix_(order, order)], cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    edges = np.flatnonzero(np.diff(labels[order])) + 0.5
    for edge in edges:
        ax.axhline(edge, color="white", linewidth=0.6)
        ax.axvline(edge, color="white", linewidth=0.6)
    ax.set_title(f"|correlation| of {len(labels)} sampled parameters, grouped by mode", fontsize=10)
    ax.set_xlabel("sampled parameter (by mode)")
    ax.set_ylabel("sampled parameter (by mode)")
    _layout(fig, left=0.85, right=0.55, bottom=0.6, top=0.35)
    fig.colorbar(image, ax=ax, fraction=0.046)
    _save(fig, path)


def metric(time: np.ndarray, original: Mapping[str, Sequence[float]], cmd: Mapping[str, Sequence[float]],
           path: Path) -> None:
    """Each evaluated metric per checkpoint: the original weights against their CMD reconstruction.

    At most ``MAX_METRIC_PANELS`` panels, four to a row (the figure stays bounded however many
    metrics there are); the report's tables hold every metric."""
    names = list(original)[:MAX_METRIC_PANELS]
    cols = min(len(names), 4)
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    if len(original) > len(names):
        fig.suptitle(f"The first {len(names)} of {len(original)} metrics (all are in the tables)", fontsize=11)
    for ax, name in zip(axes.flat, names):
        ax.plot(time, original[name], marker="o", markersize=3, label="original")
        ax.plot(time, cmd[name], marker="s", markersize=3, label="CMD reconstruction")
        ax.set_title(short(name))
        ax.set_xlabel("checkpoint time")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    _layout(fig, 1, len(names), left=0.7, right=0.15, bottom=0.55, top=0.35, wgap=0.8)
    _save(fig, path)


def parameters(time: np.ndarray, original: np.ndarray, reconstructed: np.ndarray, titles: Sequence[str],
               path: Path) -> None:
    """A few sampled parameters over time: original against CMD reconstruction (columns of the arrays)."""
    k = original.shape[1]
    cols = min(k, 3)
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.5 * rows + 0.3), squeeze=False)
    for j, ax in enumerate(axes.flat):
        if j >= k:
            ax.axis("off")
            continue
        ax.plot(time, original[:, j], color="C0", label="original")
        ax.plot(time, reconstructed[:, j], color="C1", linestyle="--", label="CMD")
        ax.set_title(short(titles[j]), fontsize=8)
        ax.tick_params(labelsize=7)
        if j == 0:
            ax.legend(fontsize=7)
    fig.suptitle("Sampled parameters: original trajectory and CMD reconstruction", fontsize=11)
    _layout(fig, rows, cols, left=0.6, right=0.15, bottom=0.35, top=0.7, wgap=0.65, hgap=0.55)
    _save(fig, path)


def families(time: np.ndarray, series: Mapping[str, Mapping[str, Sequence[float]]], labels: Mapping[str, str],
             chosen: Mapping[str, int], path: Path) -> None:
    """Every candidate family per epoch, one panel per plotted metric (e.g. val and test accuracy);
    a star on each family's chosen epoch."""
    keys = list(next(iter(series.values())))
    fig, axes = plt.subplots(1, len(keys), figsize=(6.2 * len(keys), 4.0), squeeze=False, sharey=True)
    for ax, key in zip(axes.flat, keys):
        for i, (family, scores) in enumerate(series.items()):
            values = np.array([np.nan if v is None else v for v in scores[key]], dtype=np.float64)
            style = "-" if family in ("original", "cmd") else "--"
            ax.plot(time, values, style, marker="o", markersize=2.5, linewidth=1.2, label=labels[family],
                    color=f"C{i}")
            if family in chosen:
                ax.plot(time[chosen[family]], values[chosen[family]], "*", markersize=12, color=f"C{i}",
                        markeredgecolor="black", markeredgewidth=0.6)
        ax.set_title(short(key))
        ax.set_xlabel("checkpoint time")
        ax.grid(True, alpha=0.3)
    values = np.array([np.nan if v is None else v for scores in series.values() for key in keys for v in scores[key]],
                      dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) > 10:  # zoom on the better 90 % of the scores: the early epochs' are far off
        lower_is_better = keys[0].rpartition("/")[2].lower().find("loss") >= 0
        low, high = ((values.min(), np.percentile(values, 90)) if lower_is_better
                     else (np.percentile(values, 10), values.max()))
        margin = 0.05 * (high - low) or 0.01
        axes.flat[0].set_ylim(low - margin, high + margin)
        fig.suptitle("Scores below the 10th percentile (above the 90th for a loss) are off the chart", fontsize=8)
    axes.flat[0].legend(fontsize=8)
    _save(fig, path)
