"""Learning curves of runs, in the style of the paper's Figure 4 (test error against epoch)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_curves"]

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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path
