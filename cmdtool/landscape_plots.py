"""The pictures and the Markdown of ``cmd landscape``: one contour plot per metric (matplotlib's Agg
backend) with the centre, the original checkpoint's projection and the chosen point marked."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .report.plots import DPI, MAX_METRIC_PANELS, plt


def plot_name(key: str, taken: set[str]) -> str:
    """``landscape_val_accuracy.png`` for ``val/accuracy``: one plain file name, whatever the metric is called."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("._")[:80] or "metric"
    name, n = f"landscape_{stem}.png", 1
    while name in taken:
        n += 1
        name = f"landscape_{stem}_{n}.png"
    taken.add(name)
    return name


def _axis_label(axis: dict) -> str:
    if axis["varied"] == "relative":
        return f"mode {axis['mode']}: change of r(t) = {axis['reference_value']:.4g} (%)"
    return f"mode {axis['mode']}: change of r(t) ≈ 0 in units of its scale {axis['unit']:.4g} (%)"


def contour(landscape: dict, key: str, path: Path) -> None:
    """``key``'s scores over the grid, offsets in percent on both axes."""
    x_axis, y_axis = landscape["axes"]
    x, y = 100 * np.array(x_axis["offsets"]), 100 * np.array(y_axis["offsets"])
    z = np.ma.masked_invalid(np.array(landscape["scores"][key], dtype=np.float64))
    fig, ax = plt.subplots(figsize=(6.0, 5.0))
    if z.count() and np.ptp(z.compressed()) > 0:
        filled = ax.contourf(x, y, z, levels=15, cmap="viridis")
        ax.contour(x, y, z, levels=filled.levels, colors="k", linewidths=0.3, alpha=0.5)
        fig.colorbar(filled, ax=ax, label=key)
    else:
        ax.pcolormesh(x, y, z, cmap="viridis", shading="nearest")
    ax.plot(0, 0, "P", color="white", markeredgecolor="black", markersize=11, label="centre (CMD weights)")
    original = landscape.get("original")
    if original is not None:
        ox, oy = (100 * v for v in original["projection"]["offsets"])
        if np.isfinite([ox, oy]).all():
            ax.plot(ox, oy, "X", color="tab:red", markeredgecolor="black", markersize=10,
                    label="original checkpoint (projection)")
    chosen = landscape.get("chosen")
    if chosen is not None:
        ax.plot(*(100 * v for v in chosen["offsets"]), "*", color="gold", markeredgecolor="black", markersize=16,
                label=f"chosen on {landscape['selection']['key']}")
    ax.set_xlabel(_axis_label(x_axis))
    ax.set_ylabel(_axis_label(y_axis))
    ax.set_title(f"{key} at {landscape['checkpoint']}", fontsize=10)
    ax.legend(loc="upper left", fontsize=7, framealpha=0.8)
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.11, top=0.93)
    fig.savefig(path, dpi=DPI, metadata={"Software": None})  # as the report's plots: no version in the file
    plt.close(fig)


def varying(landscape: dict) -> list[str]:
    """The metrics worth a picture: those not the same at every point (a sample count is not)."""
    out = []
    for key in landscape["keys"]:
        values = np.array(landscape["scores"][key], dtype=np.float64)
        finite = values[np.isfinite(values)]
        if finite.size < values.size or (finite.size and np.ptp(finite) > 0):
            out.append(key)
    return out


def draw(landscape: dict, folder: Path) -> dict[str, str]:
    """One contour plot per metric that varies (the first ``MAX_METRIC_PANELS``) into ``folder``:
    ``{metric: file name}``."""
    taken: set[str] = set()
    names = {}
    for key in varying(landscape)[:MAX_METRIC_PANELS]:
        names[key] = plot_name(key, taken)
        contour(landscape, key, folder / names[key])
    return names


def _scores(scores: dict, keys: list[str]) -> str:
    return " | ".join("–" if scores.get(k) is None or not np.isfinite(scores[k]) else f"{scores[k]:.4g}" for k in keys)


def markdown(landscape: dict) -> str:
    """A short ``landscape.md``: what was varied, the chosen point, the centre and the original side by side."""
    x_axis, y_axis = landscape["axes"]
    keys = landscape["keys"]
    lines = [f"# Landscape over modes {x_axis['mode']} and {y_axis['mode']} at {landscape['checkpoint']}", "",
             f"{landscape['grid']} × {landscape['grid']} grid, offsets from −{landscape['span']:.0%} to "
             f"+{landscape['span']:.0%}; {landscape['evaluations']} evaluations of `{landscape['function']}`.", ""]
    for axis in (x_axis, y_axis):
        how = ("r(t) · (1 + δ)" if axis["varied"] == "relative"
               else f"r(t) + δ · {axis['unit']:.4g} (r(t) is ~0, so δ is relative to the reference's scale)")
        lines.append(f"- mode {axis['mode']} (reference parameter `{axis['reference_parameter']}`): "
                     f"r(t) = {axis['reference_value']:.6g}, varied as {how}")
    lines += ["", "| point | offsets (mode " + f"{x_axis['mode']}, {y_axis['mode']}) | " + " | ".join(keys) + " |",
              "| --- | --- | " + " | ".join("---:" for _ in keys) + " |"]
    chosen, original = landscape.get("chosen"), landscape.get("original")
    if chosen is not None:
        dx, dy = chosen["offsets"]
        lines.append(f"| chosen on {landscape['selection']['key']} | {dx:+.0%}, {dy:+.0%} | "
                     f"{_scores(chosen['scores'], keys)} |")
    lines.append(f"| centre (CMD weights) | +0%, +0% | {_scores(landscape['centre']['scores'], keys)} |")
    if original is not None:
        ox, oy = original["projection"]["offsets"]
        lines.append(f"| original checkpoint | {ox:+.1%}, {oy:+.1%} (projection) | "
                     f"{_scores(original['scores'], keys)} |")
    lines.append("")
    for note in (landscape.get("selection_impossible"), landscape.get("original_note"),
                 landscape["clamped_running_var"]["note"]):
        if note:
            lines += [f"Note: {note}", ""]
    plots = landscape.get("plots", {})
    same = [key for key in keys if key not in varying(landscape)]
    if same:
        lines += [f"Not plotted, the same at every point: {', '.join(same)}.", ""]
    lines += [f"![{key}]({name})" for key, name in plots.items()]
    return "\n".join(lines) + "\n"

