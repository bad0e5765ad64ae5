"""The report's figures, drawn with matplotlib (object-oriented API on the Agg canvas: headless, no pyplot state).

    write_roc_png(path, title, curves)                 ROC curves, each with its bootstrap band when given
    write_reliability_png(path, title, panels)         one reliability diagram per cell
    write_curve_png(path, title, series, target)       label-efficiency curves: AUROC against training images

Sized and lettered for a paper column (5.5 in wide at 200 dpi unless `size` pixels are asked for); written
atomically to a local or gs:// path (`files.write_atomic`).
"""

from __future__ import annotations

import io
import math

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from metachex_jax.core import files

DPI = 200
FONT = {"font.size": 9, "axes.titlesize": 10, "legend.fontsize": 7.5}


def _save(figure: Figure, path: str, size: int | None) -> None:
    """PNG bytes to `path`; cropped to the drawing unless an exact pixel width was asked for."""
    FigureCanvasAgg(figure)
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=figure.dpi, bbox_inches=None if size else "tight")
    files.write_atomic(path, png.getvalue())


def _figure(width_in: float, height_in: float, size: int | None) -> Figure:
    if size:  # an explicit pixel width
        return Figure(figsize=(size / 100, size / 100 * height_in / width_in), dpi=100)
    return Figure(figsize=(width_in, height_in), dpi=DPI)


def write_roc_png(path: str, title: str, curves: list[tuple], size: int | None = None) -> None:
    """`curves`: (label, fpr, tpr) or (label, fpr, tpr, (fpr_grid, tpr_low, tpr_high)), the last a pointwise
    95% bootstrap band drawn as a shaded area behind the curve."""
    with matplotlib.rc_context(FONT):
        figure = _figure(5.5, 5.5, size)
        ax = figure.add_subplot()
        ax.plot([0, 1], [0, 1], color="0.7", linewidth=0.8, linestyle="--", label="chance")
        for i, curve in enumerate(curves):
            label, fpr, tpr = curve[:3]
            color = f"C{i % 10}"
            if len(curve) > 3 and curve[3] is not None:
                grid, low, high = (np.asarray(v, np.float64) for v in curve[3])
                ax.fill_between(grid, low, high, step="post", color=color, alpha=0.15, linewidth=0)
            ax.step(np.asarray(fpr), np.asarray(tpr), where="post", color=color, linewidth=1.4, label=label)
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (1 - specificity)",
               ylabel="true positive rate (sensitivity)", title=title, aspect="equal")
        ax.grid(True, linewidth=0.4, color="0.9")
        ax.legend(loc="best", frameon=False)
        _save(figure, path, size)


def write_reliability_png(path: str, title: str, panels: list[dict], size: int | None = None) -> None:
    """`panels`: {"label", "reliability": metrics.reliability_curve(...), "brier": float, "ece": float} each;
    one diagram per panel (observed TB fraction against the mean predicted probability per bin, marker area
    by the number of images in the bin, the diagonal = perfect calibration)."""
    columns = min(3, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / columns))
    with matplotlib.rc_context(FONT):
        figure = _figure(2.6 * columns, 2.9 * rows + 0.3, size)
        figure.suptitle(title)
        for i, panel in enumerate(panels):
            ax = figure.add_subplot(rows, columns, i + 1)
            curve = panel["reliability"]
            counts = np.asarray(curve["count"], np.float64)
            ax.plot([0, 1], [0, 1], color="0.7", linewidth=0.8, linestyle="--")
            ax.plot(curve["mean_predicted"], curve["observed"], color=f"C{i % 10}", linewidth=1.0)
            ax.scatter(curve["mean_predicted"], curve["observed"], s=8 + 120 * counts / max(counts.sum(), 1),
                       color=f"C{i % 10}", zorder=3)
            ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), aspect="equal",
                   title=f"{panel['label']}\nBrier {panel['brier']:.3f}, ECE {panel['ece']:.3f}")
            if i % columns == 0:
                ax.set_ylabel("observed TB fraction")
            if i >= len(panels) - columns:
                ax.set_xlabel("mean predicted P(TB)")
            ax.grid(True, linewidth=0.4, color="0.9")
        figure.tight_layout(h_pad=1.2)
        _save(figure, path, size)


def write_curve_png(path: str, title: str, series: list[tuple], target: float | None = None,
                    size: int | None = None) -> None:
    """`series`: (label, n_train, mean, band_low, band_high, ci_low, ci_high), one value per size each: the mean
    AUROC over draws as a line with markers, the band across draws shaded, the bootstrap CI of the mean as error
    bars; the x axis (training images) is logarithmic, `target` a dotted horizontal line."""
    with matplotlib.rc_context(FONT):
        figure = _figure(5.5, 4.2, size)
        ax = figure.add_subplot()
        ticks = sorted({round(x) for s in series for x in s[1]})
        for i, (label, x, mean, low, high, ci_low, ci_high) in enumerate(series):
            x, mean = np.asarray(x, np.float64), np.asarray(mean, np.float64)
            color = f"C{i % 10}"
            ax.fill_between(x, low, high, color=color, alpha=0.15, linewidth=0)
            errors = np.stack([mean - np.asarray(ci_low), np.asarray(ci_high) - mean])
            ax.errorbar(x, mean, yerr=np.clip(errors, 0, None), color=color, marker="o", markersize=3.5,
                        linewidth=1.4, capsize=2.5, label=label)
        if target is not None:
            ax.axhline(target, color="0.5", linewidth=0.8, linestyle=":", label=f"AUROC {target:g}")
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set(ylim=(min(0.4, ax.get_ylim()[0]), 1.01), xlabel="labelled training images (log scale)",
               ylabel="AUROC (held-out images)", title=title)
        ax.grid(True, linewidth=0.4, color="0.9")
        ax.legend(loc="best", frameon=False)
        _save(figure, path, size)
