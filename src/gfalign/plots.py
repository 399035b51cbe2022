"""Learning curves of runs, in the style of the paper's Figure 4 (test error against epoch)."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_curves", "plot_filters", "plot_mean_curves", "plot_reconstructions"]

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
_ERROR_TICKS = (0.1, 0.2, 0.5, 1, 1.5, 2, 3, 4, 5, 7, 10, 15, 20, 30, 50, 70, 100)


def _mean_band(
    histories: Sequence[Sequence[Mapping[str, Any]]], metric: str
) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per epoch over ``histories``: (epochs, mean, min, max) of ``metric``."""
    by_epoch: dict[float, list[float]] = {}
    for history in histories:
        for position, record in enumerate(history, start=1):
            value = record.get(metric)
            if value is None or not math.isfinite(float(value)):
                continue
            by_epoch.setdefault(float(record.get("epoch", position)), []).append(float(value))
    epochs = sorted(by_epoch)
    return (
        epochs,
        [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs],
        [min(by_epoch[e]) for e in epochs],
        [max(by_epoch[e]) for e in epochs],
    )


def plot_mean_curves(
    panels: Mapping[str, Mapping[str, Sequence[Sequence[Mapping[str, Any]]]]],
    path: str | Path,
    *,
    metric: str = "test_error",
    title: str | None = None,
    dashed: Sequence[str] = (),
    log: bool = True,
) -> Path:
    """Mean over seeds of ``metric`` against epoch with the min–max band, one subplot per panel.

    Args:
        panels: ``{panel title: {label: [history, ...]}}``: every label's histories are the
            seeds of one configuration, each a list of epoch records (``read_metrics``).
        path: where to write the PNG (parent directories are created).
        metric: the record key to plot, ``test_error`` by default.
        title: the figure title.
        dashed: labels drawn dashed, in the baseline colours (black, grey, brown ...).
        log: a logarithmic y-axis with plain tick labels (1, 2, 5 ...), so the low-error
            region stays readable beside high early-epoch errors; ignored if a value is <= 0.

    Returns:
        The path written.

    Raises:
        ValueError: no history holds ``metric``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator

    curves = {
        panel: {
            label: band
            for label, histories in lines.items()
            if (band := _mean_band(histories, metric))[0]
        }
        for panel, lines in panels.items()
    }
    curves = {panel: lines for panel, lines in curves.items() if lines}
    if not curves:
        raise ValueError(f"no {metric!r} values in the histories of {', '.join(panels)}")
    values = [v for lines in curves.values() for band in lines.values() for v in band[2] + band[3]]
    log = log and min(values) > 0

    solid = [label for lines in curves.values() for label in lines if label not in dashed]
    colours = {label: f"C{n % 10}" for n, label in enumerate(dict.fromkeys(solid))}
    for n, label in enumerate(d for d in dashed if d not in colours):
        colours[label] = _BASELINE_COLOURS[n % len(_BASELINE_COLOURS)]

    figure = Figure(figsize=(6.4 * len(curves), 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(curves), squeeze=False, sharey=True)[0]
    for ax, (panel, lines) in zip(axes, curves.items(), strict=True):
        for label, (epochs, mean, low, high) in lines.items():
            count = len(panels[panel][label])
            style = "--" if label in dashed else "-"
            ax.plot(
                epochs,
                mean,
                style,
                color=colours[label],
                marker="o" if len(epochs) <= 30 else None,
                markersize=3,
                label=f"{label} ({count} seed{'s' if count != 1 else ''})",
            )
            if count > 1:
                ax.fill_between(epochs, low, high, color=colours[label], alpha=0.15, linewidth=0)
        first = min(e for band in lines.values() for e in band[0])
        last = max(e for band in lines.values() for e in band[0])
        if last - first < 5:  # a few epochs: one tick each
            ax.set_xlim(first - 0.5, last + 0.5)
            ax.xaxis.set_major_locator(FixedLocator(range(math.ceil(first), int(last) + 1)))
        else:
            ax.set_xlim(0, last)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        if len(curves) > 1 or not title:
            ax.set_title(panel)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize="small")
    label = _LABELS.get(metric, metric)
    axes[0].set_ylabel(f"{label}, log scale" if log else label)
    if log:
        low, high = min(values) * 0.9, max(values) * 1.1
        axes[0].set_yscale("log")
        axes[0].set_ylim(low, high)
        ticks = [t for t in _ERROR_TICKS if low <= t <= high]
        if len(ticks) < 3:  # a narrow range: five evenly spaced ticks, two significant digits
            ticks = [float(f"{low + (high - low) * k / 4:.2g}") for k in range(5)]
        axes[0].yaxis.set_major_locator(FixedLocator(ticks))
        axes[0].yaxis.set_minor_locator(NullLocator())
        axes[0].yaxis.set_major_formatter("{x:g}")
    return _save(figure, path, title)


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
    figure = Figure(figsize=(8.0, 0.9 * len(rows) + 0.6), layout="constrained")
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
    figure = Figure(figsize=(3.4 * across, 3.6 * down + 0.4), layout="constrained")
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
    if title:
        figure.suptitle(title)
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
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()
    return path
