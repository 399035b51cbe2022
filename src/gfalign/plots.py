"""Figures from plain data: learning curves, panels of curves over seeds, reconstructions,
filters.

``plot_curves`` draws one line per run (``gfalign plot``); ``plot_panels`` draws subplots of
``Series`` (a configuration's seeds, every seed or their mean and band, baselines dashed) with
one legend outside the axes; ``plot_reconstructions`` and ``plot_filters`` draw the paper's
Figures 6 and 7. Every figure is at most ``WIDTH`` (7) inches wide and is written whole or not
at all. The report (``gfalign.report.figures``) chooses what to draw from the results store.
"""

from __future__ import annotations

import contextlib
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "WIDTH",
    "Panel",
    "Series",
    "mean_band",
    "panels_figure",
    "plot_curves",
    "plot_filters",
    "plot_panels",
    "plot_reconstructions",
]

_LABELS = {
    "test_error": "test error (%)",
    "train_error": "train error (%)",
    "validation_error": "validation error (%)",
    "test_loss": "test loss",
    "train_loss": "train loss",
    "batch_loss": "mean batch loss",
}


def plot_curves(
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    metric: str = "test_error",
    title: str | None = None,
) -> Path:
    """One line per run of ``metric`` against epoch, written as a PNG.

    Args:
        histories: ``{label: history}``, each history a list of epoch records (``read_metrics``).
        path: where to write the PNG (parent directories are created).
        metric: the record key to plot, ``test_error`` by default.
        title: the figure title; a default names the metric.

    Returns:
        The path written.

    Raises:
        ValueError: no history holds ``metric``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    curves: dict[str, tuple[list[float], list[float]]] = {}
    for label, history in histories.items():
        epochs, values = [], []
        for position, record in enumerate(history, start=1):
            value = record.get(metric)
            if value is None or not math.isfinite(float(value)):
                continue
            epochs.append(float(record.get("epoch", position)))
            values.append(float(value))
        if values:
            curves[label] = (epochs, values)
    if not curves:
        raise ValueError(f"no {metric!r} values in the histories of {', '.join(histories)}")

    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    for n, (label, (epochs, values)) in enumerate(curves.items()):
        marker = "o" if len(epochs) <= 30 else None
        ax.plot(epochs, values, color=f"C{n % 10}", marker=marker, markersize=3, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(_LABELS.get(metric, metric))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title or f"{_LABELS.get(metric, metric)} against epoch")
    return _write(figure, path)


# Baseline colours, so bp, fa and dfa look the same in every figure.
_BASELINE_COLOURS = ("black", "tab:gray", "tab:brown", "tab:olive", "tab:pink")
_ERROR_TICKS = (0.1, 0.2, 0.5, 1, 1.5, 2, 3, 4, 5, 7, 10, 15, 20, 30, 50, 70, 100, 200, 500, 1000)
_SYMLOG_TICKS = (0.0, 0.01, 0.1, 1.0, 10.0, 100.0)

WIDTH = 7.0
"""Every figure's width in inches: a page's text width, so no figure is shown shrunk."""

Curve = tuple[Sequence[float], Sequence[float]]


@dataclass(frozen=True)
class Series:
    """One configuration's seeds in a panel.

    Attributes:
        label: the legend entry.
        curves: per seed with a history, (epochs, values).
        finals: per seed without a history, (epoch, value) of its last epoch: drawn as a
            cross, and for a dashed series with no curve at all as a dashed level line.
        dashed: a baseline: dashed, in the baseline colours (black, grey, brown ...).
        seeds: draw every seed's curve (thin) and their mean (thick); otherwise the mean and
            the band from the minimum to the maximum over seeds.
        layer: ``"normal"``; ``"under"`` draws it wide and pale, so that a series drawn
            ``"over"`` it (dotted, on top) stays visible where the two coincide.
    """

    label: str
    curves: tuple[Curve, ...] = ()
    finals: tuple[tuple[float, float], ...] = ()
    dashed: bool = False
    seeds: bool = False
    layer: str = "normal"


@dataclass(frozen=True)
class Panel:
    """One subplot: its series, axis label and scale.

    Attributes:
        title: the subplot's title.
        series: what it draws, in legend order.
        ylabel: the y-axis label.
        scale: ``"log"`` (plain tick labels 1, 2, 5 ...; linear if a value is <= 0),
            ``"symlog"`` (linear below 0.01, so that zero shows) or ``"linear"``.
        reference: (y, label) of a dotted horizontal reference line, e.g. (90.0, "90°").
        note: a line printed under the title, e.g. which series coincide.
        bottom: the y-axis' lower limit (linear scale), e.g. 0 for angles.
        xlabel: the x-axis label: ``"epoch"`` (integer ticks), or what else x is, e.g.
            ``"learning rate"``.
        xscale: ``"linear"`` or ``"log"`` (for x other than epochs, e.g. a rate).
    """

    title: str
    series: tuple[Series, ...]
    ylabel: str
    scale: str = "log"
    reference: tuple[float, str] | None = None
    note: str = ""
    bottom: float | None = None
    xlabel: str = "epoch"
    xscale: str = "linear"


def mean_band(curves: Sequence[Curve]) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per epoch over the curves that reach it: (epochs, mean, min, max).

    >>> mean_band([([1, 2], [4.0, 2.0]), ([1], [6.0])])
    ([1.0, 2.0], [5.0, 2.0], [4.0, 2.0], [6.0, 2.0])
    """
    by_epoch: dict[float, list[float]] = {}
    for epochs, values in curves:
        for epoch, value in zip(epochs, values, strict=True):
            by_epoch.setdefault(float(epoch), []).append(float(value))
    epochs = sorted(by_epoch)
    return (
        epochs,
        [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs],
        [min(by_epoch[e]) for e in epochs],
        [max(by_epoch[e]) for e in epochs],
    )


def _colours(panels: Sequence[Panel]) -> dict[str, str]:
    """A colour per label, none repeated within a figure of up to 20 solid lines (one legend
    serves every panel): matplotlib's ten, else ``tab20``'s twenty."""
    solid = list(dict.fromkeys(s.label for p in panels for s in p.series if not s.dashed))
    if len(solid) <= 10:
        palette = [f"C{n}" for n in range(10)]
    else:
        from matplotlib import colormaps
        from matplotlib.colors import to_hex

        palette = [to_hex(c) for c in colormaps["tab20"].colors]
    colours = {label: palette[n % len(palette)] for n, label in enumerate(solid)}
    dashed = [s.label for p in panels for s in p.series if s.dashed and s.label not in colours]
    for n, label in enumerate(dict.fromkeys(dashed)):
        colours[label] = _BASELINE_COLOURS[n % len(_BASELINE_COLOURS)]
    return colours


def plot_panels(
    panels: Sequence[Panel],
    path: str | Path,
    *,
    title: str | None = None,
    columns: int | None = None,
) -> Path:
    """Curves against epoch, one subplot per panel, one legend below them all, as a PNG.

    Args:
        panels: the subplots, filled row by row.
        path: where to write the PNG (parent directories are created).
        title: the figure title.
        columns: subplots per row (default: all in one row, at most 3).

    Returns:
        The path written. The figure is ``WIDTH`` (7) inches wide whatever the panel count;
        the legend sits outside the axes, so it never hides a curve.

    Raises:
        ValueError: no panel has anything to draw.

    >>> import tempfile, pathlib
    >>> line = Series("s1", curves=(([1, 2, 3], [5.0, 3.0, 2.0]),))
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "f.png"
    >>> plot_panels([Panel("2x800 tanh", (line,), "test error (%)")], out).exists()
    True
    """
    return _save(panels_figure(panels, columns=columns), path, title)


def panels_figure(panels: Sequence[Panel], *, columns: int | None = None):
    """The ``matplotlib.figure.Figure`` that ``plot_panels`` writes (untitled), for callers
    that add to it or inspect it.

    >>> figure = panels_figure([Panel("a", (Series("s1", finals=((5.0, 2.0),)),), "error")])
    >>> figure.get_figwidth() <= WIDTH and figure.axes[0].get_legend() is None
    True
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if not any(s.curves or s.finals for p in panels for s in p.series):
        raise ValueError("no panel has a curve or a final value to draw")
    columns = columns or min(len(panels), 3)
    rows = math.ceil(len(panels) / columns)
    colours = _colours(panels)
    labels = list(dict.fromkeys(s.label for p in panels for s in p.series))
    width = WIDTH if columns > 1 else 6.4
    # Legend columns that fit the width: about 15 characters of small text per inch.
    across = max(1, min(len(labels), int(15 * width) // (max(map(len, labels)) + 5)))
    legend_rows = math.ceil(len(labels) / across)
    height = (4.0 if columns == 1 else 2.9) * rows + 0.22 * legend_rows + 0.4
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    handles: dict[str, Line2D] = {}
    for ax, panel in zip(axes, panels, strict=False):
        if any(s.curves or s.finals for s in panel.series):
            _draw_panel(ax, panel, colours, handles)
        else:  # kept in its place, so that rows and columns keep their meaning
            ax.set_title(panel.title, fontsize="small")
            ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
    figure.legend(
        [handles[label] for label in labels if label in handles],
        [label for label in labels if label in handles],
        loc="outside lower center",
        ncols=across,
        fontsize="small",
        frameon=False,
    )
    return figure


def _style(series: Series) -> dict[str, Any]:
    if series.layer == "under":
        return {"linewidth": 4.0, "alpha": 0.35}
    if series.layer == "over":
        return {"linewidth": 1.4, "linestyle": ":"}
    return {"linewidth": 1.6, "linestyle": "--" if series.dashed else "-"}


def _draw_panel(ax, panel: Panel, colours: Mapping[str, str], handles: dict) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator

    values: list[float] = []
    epochs_seen: list[float] = []
    for series in panel.series:
        colour = colours[series.label]
        style = _style(series)
        curves = [c for c in series.curves if len(c[0])]
        if curves:
            epochs, mean, low, high = mean_band(curves)
            if series.seeds and len(curves) > 1:
                for seed_epochs, seed_values in curves:
                    ax.plot(seed_epochs, seed_values, color=colour, linewidth=0.7, alpha=0.5)
            elif len(curves) > 1:
                ax.fill_between(epochs, low, high, color=colour, alpha=0.15, linewidth=0)
            ax.plot(epochs, mean, color=colour, **style)
            values += low + high
            epochs_seen += epochs
        if series.finals:
            at = [e for e, _v in series.finals]
            level = [v for _e, v in series.finals]
            ax.plot(at, level, "x", color=colour, markersize=6, markeredgewidth=1.5)
            if series.dashed and not curves:
                ax.axhline(sum(level) / len(level), color=colour, **style)
            values += level
            epochs_seen += at
        # The legend keys colour and dashes; a coincidence's drawing is named on the panel.
        plain = "--" if series.dashed else "-"
        handles.setdefault(series.label, Line2D([], [], color=colour, linestyle=plain))
    if panel.reference is not None:
        y, text = panel.reference
        ax.axhline(y, color="0.55", linewidth=0.9, linestyle=":")
        ax.annotate(
            text,
            (0.005, y),
            xycoords=("axes fraction", "data"),
            fontsize="x-small",
            color="0.4",
            va="bottom",
        )
    first, last = min(epochs_seen), max(epochs_seen)
    if panel.xscale == "log":
        ax.set_xscale("log")
        ax.set_xlim(first / 2, last * 2)
        ax.xaxis.set_major_locator(FixedLocator(sorted(set(epochs_seen))))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter("{x:g}")
    elif last - first < 5:  # a few epochs: one tick each
        ax.set_xlim(first - 0.5, last + 0.5)
        ax.xaxis.set_major_locator(FixedLocator(range(math.ceil(first), int(last) + 1)))
    else:
        ax.set_xlim(0, last * 1.02)  # room for the crosses at the last epoch
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel, fontsize="small")
    note = textwrap.fill(panel.note, width=int(15 * ax.get_position().width * WIDTH))
    ax.set_title("\n".join(filter(None, (panel.title, note))), fontsize="small")
    ax.grid(True, which="major", alpha=0.3)
    ax.tick_params(labelsize="small")
    scale = panel.scale
    if scale == "log" and min(values) <= 0:
        scale = "linear"
    if scale == "log":
        low, high = min(values) * 0.9, max(values) * 1.1
        ax.set_yscale("log")
        ax.set_ylim(low, high)
        if high / low > 1000:  # many decades (norms): one tick a decade, as 10^k
            from matplotlib.ticker import LogLocator

            ax.yaxis.set_major_locator(LogLocator(base=10, numticks=8))
            ax.yaxis.set_minor_locator(NullLocator())
        else:
            ticks = [t for t in _ERROR_TICKS if low <= t <= high]
            if len(ticks) < 3:  # a narrow range: five evenly spaced ticks, two significant digits
                ticks = [float(f"{low + (high - low) * k / 4:.2g}") for k in range(5)]
            ax.yaxis.set_major_locator(FixedLocator(ticks))
            ax.yaxis.set_minor_locator(NullLocator())
            ax.yaxis.set_major_formatter("{x:g}")
    elif scale == "symlog":
        high = max(max(values) * 1.3, 0.02)
        ax.set_yscale("symlog", linthresh=0.01, linscale=0.5)
        ax.set_ylim(0, high)
        ax.yaxis.set_major_locator(FixedLocator([t for t in _SYMLOG_TICKS if t <= high]))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter("{x:g}")
    elif panel.bottom is not None:
        top = max(values + ([panel.reference[0]] if panel.reference else []))
        ax.set_ylim(panel.bottom, top * 1.05)


def _side(width: int) -> int:
    side = math.isqrt(width)
    if side * side != width:
        raise ValueError(f"cannot show vectors of {width} values as square images")
    return side


def _strip(images, gap: int = 2, fill: float = 0.0):
    """(count, side*side) images in [0, 1] side by side, ``gap`` columns apart, as one array."""
    import numpy

    images = numpy.asarray(images, dtype=float)
    side = _side(images.shape[1])
    out = numpy.full((side, len(images) * (side + gap) - gap), fill)
    for n, image in enumerate(images):
        out[:, n * (side + gap) : n * (side + gap) + side] = image.reshape(side, side)
    return out


def plot_reconstructions(
    originals, reconstructions: Mapping[str, Any], path: str | Path, *, title: str | None = None
) -> Path:
    """The paper's Figure 6: a row of images, then one row of reconstructions per rule.

    Args:
        originals: (count, side*side) images in [0, 1], e.g. ten test digits (784 = 28x28).
        reconstructions: ``{label: (count, side*side) reconstructions of originals}``.
        path: where to write the PNG.
        title: the figure title.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = {"test images": originals, **reconstructions}
    figure = Figure(figsize=(WIDTH, 0.8 * len(rows) + 0.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), 1, squeeze=False)[:, 0]
    for ax, (label, images) in zip(axes, rows.items(), strict=True):
        ax.imshow(_strip(images), cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize="medium")
        for spine in ax.spines.values():
            spine.set_visible(False)
    return _save(figure, path, title)


def _mosaic(filters, columns: int, gap: int = 1):
    """(count, side*side) filters, each scaled to [0, 1] on its own, as a tiled array."""
    import numpy

    filters = numpy.asarray(filters, dtype=float)
    side = _side(filters.shape[1])
    rows = math.ceil(len(filters) / columns)
    out = numpy.ones((rows * (side + gap) - gap, columns * (side + gap) - gap))
    for n, tile in enumerate(filters):
        span = tile.max() - tile.min()
        tile = (tile - tile.min()) / span if span > 0 else numpy.full_like(tile, 0.5)
        r, c = divmod(n, columns)
        top, left = r * (side + gap), c * (side + gap)
        out[top : top + side, left : left + side] = tile.reshape(side, side)
    return out


def plot_filters(
    panels: Mapping[str, Any], path: str | Path, *, title: str | None = None, columns: int = 6
) -> Path:
    """The paper's Figure 7: first-layer filters (rows of ``W^1``) as tiles, one panel per rule.

    Args:
        panels: ``{label: (count, side*side) filters}``, e.g. the first 36 rows of ``W^1``
            (shape (n_1, 784)); each tile is scaled to its own range (dark low, light high).
        path: where to write the PNG.
        title: the figure title.
        columns: tiles per row within a panel.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    across = min(3, len(panels))
    down = math.ceil(len(panels) / across)
    side = WIDTH / 3  # three panels fill the width; fewer keep the same tile size
    figure = Figure(figsize=(side * across, (side + 0.3) * down + 0.4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(down, across, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, (label, filters) in zip(axes, panels.items(), strict=False):
        ax.imshow(_mosaic(filters, columns), cmap="gray", vmin=0.0, vmax=1.0)
        ax.set_title(label)
    return _save(figure, path, title)


def _save(figure, path: str | Path, title: str | None) -> Path:
    """Title ``figure`` and write it to ``path`` as a PNG, creating the directory."""
    if title:  # wrapped to the figure's width: about 11 characters of its title an inch
        figure.suptitle(textwrap.fill(title, width=int(11 * figure.get_figwidth())))
    return _write(figure, path)


def _write(figure, path: str | Path) -> Path:
    """Write ``figure`` to ``path`` (its directory created; PNG unless the suffix names another
    format), whole or not at all: drawn beside it, then renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        figure.savefig(temporary, dpi=120, format=path.suffix[1:].lower() or "png")
        os.replace(temporary, path)
    except OSError as error:  # a write names no file: name the figure
        raise OSError(error.errno, error.strerror or str(error), str(path)) from None
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()
    return path
