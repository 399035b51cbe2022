"""Look inside a rule: how well its updates and its feedback agree with backpropagation.

Three families of measures, all angles in degrees (0: same direction, 90: unrelated, 180:
opposite), for every hidden layer ``i = 1..L-1``:

Gradient alignment, measured on a fixed probe batch with the network's current weights:

    update_angle_i   angle between the rule's weight update (d^i)^T h^{i-1} and backprop's
                     (delta^i)^T h^{i-1}, both summed over the probe batch (weights only, no bias)
    delta_angle_i    angle between the rule's d^i_n and backprop's delta^i_n for every example n,
                     averaged over the examples (examples where either is zero are left out)

Weight alignment, from the weights and the fixed matrices alone:

    weight_angle_i_above    angle between W^{i+1} and B_up^i (both (n_{i+1}, n_i)): FA's
                            alignment (Lillicrap et al.), for every ``above`` term
    weight_angle_i_direct   angle between the product W^L W^{L-1} ... W^{i+1} and D^i (both
                            (n_L, n_i)): the linear part of the backprop path against the direct
                            feedback, the weight alignment of DFA theory (Nokland; Refinetti et
                            al.), for every ``direct`` term on the output error e. DFA's other
                            measure, the angle between its update and backprop's, is
                            ``update_angle_i``.

``below`` terms have no counterpart in backprop and ``backprop`` terms use ``W`` itself, so they
add no weight angle; a direct term on an auxiliary error neither (its ``D^i`` is the layer's own
classifier, not a stand-in for the layers above).

``backprop`` here is computed from the same forward pass, weights and batch, independently of
the rule engine: ``delta^L = e``, ``delta^i = (delta^{i+1} W^{i+1}) * f'(a^i)``.

Feedback-matrix diagnostics (``diagnose``): rank, condition number, the two pseudo-inverse
identities and how much of the possible output errors a matrix carries; see
``FeedbackDiagnostics``.

Example:
    >>> probe = alignment_metric(data, size=1000)          # a fixed batch of training examples
    >>> trainer = Trainer(net, rule, data, config, metrics=[probe])
    >>> history = trainer.fit()
    >>> history[-1]["update_angle_1"]
    >>> plot_alignment({"dfa": history}, "alignment.png", kind="update")
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gfalign.engine import FeedbackRule
from gfalign.network import MLP

if TYPE_CHECKING:
    from gfalign.data import Dataset
    from gfalign.train import Trainer

__all__ = [
    "ERROR_SPACES",
    "PLOT_KINDS",
    "AlignmentProbe",
    "FeedbackDiagnostics",
    "alignment_metric",
    "angle",
    "backprop_deltas",
    "diagnose",
    "measure",
    "plot_alignment",
    "row_angles",
    "rule_diagnostics",
    "weight_alignment",
]

# plot kind -> prefix of its record keys
PLOT_KINDS: dict[str, str] = {
    "update": "update_angle_",
    "delta": "delta_angle_",
    "weight": "weight_angle_",
}

ERROR_SPACES = ("softmax", "any")


# ----------------------------------------------------------------------------------- angles


def _kahan_angle(u: torch.Tensor, v: torch.Tensor, dim: int) -> torch.Tensor:
    """Angle between unit vectors as ``2 atan2(|u - v|, |u + v|)``: exact near 0 and 180.

    ``acos`` of a cosine loses half the digits there (an angle of 1e-8 rad reads as 0 or 1e-8
    depending on the last bit of the cosine).
    """
    return 2.0 * torch.atan2(
        torch.linalg.vector_norm(u - v, dim=dim), torch.linalg.vector_norm(u + v, dim=dim)
    )


def angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """The angle in degrees between two tensors of the same shape, read as flat vectors.

    ``angle(a, b) = arccos(<a, b> / (|a| |b|))``, computed in float64 by a formula that stays
    accurate near 0 and 180 degrees. NaN when either tensor is zero.

    Example:
        >>> angle(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))
        45.0...
    """
    if a.shape != b.shape:
        raise ValueError(f"angle needs tensors of the same shape, got {a.shape} and {b.shape}")
    a, b = a.detach().reshape(-1).double(), b.detach().reshape(-1).double()
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if norm_a == 0 or norm_b == 0:
        return math.nan
    return math.degrees(float(_kahan_angle(a / norm_a, b / norm_b, dim=0)))


def row_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The angle in degrees between ``a[n]`` and ``b[n]`` for every row ``n``; float64, (N,).

    Rows where either vector is zero give NaN.
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"row_angles needs two (N, n) tensors, got {a.shape} and {b.shape}")
    a, b = a.detach().double(), b.detach().double()
    norm_a = torch.linalg.vector_norm(a, dim=1, keepdim=True)
    norm_b = torch.linalg.vector_norm(b, dim=1, keepdim=True)
    result = torch.rad2deg(_kahan_angle(a / norm_a, b / norm_b, dim=1))
    zero = (norm_a == 0).squeeze(1) | (norm_b == 0).squeeze(1)
    return result.masked_fill(zero, math.nan)


# ------------------------------------------------------------------------ gradient alignment


def backprop_deltas(net: MLP, cache, target: torch.Tensor) -> dict[int, torch.Tensor]:
    """Backprop's deltas ``delta^1 .. delta^L`` for a forward pass ``cache`` of ``net``.

    ``delta^L = e`` and ``delta^i = (delta^{i+1} W^{i+1}) * f'(a^i)``; ``delta[i]`` has shape
    (N, n_i). ``target`` is the labels (classification) or the input (autoencoder).
    """
    with torch.no_grad():
        _, e = net.objective.error(cache.pre[-1], target)
        deltas = {net.depth: e}
        for i in range(net.depth - 1, 0, -1):
            slope = net.activation.derivative(cache.a(i), cache.h(i))
            deltas[i] = (deltas[i + 1] @ net.weight(i + 1)) * slope
    return dict(sorted(deltas.items()))


def weight_alignment(net: MLP, rule: FeedbackRule) -> dict[str, float]:
    """The weight angles of every hidden layer's ``above`` and output-error ``direct`` terms.

    Keys ``weight_angle_{i}_above`` (angle of ``W^{i+1}`` and ``B_up^i``) and
    ``weight_angle_{i}_direct`` (angle of ``W^L ... W^{i+1}`` and ``D^i``); a second term of the
    same kind in one layer gets its term index appended.
    """
    rule.check(net)
    record: dict[str, float] = {}
    with torch.no_grad():
        # products[i] = W^L W^{L-1} ... W^{i+1}, shape (n_L, n_i)
        products = {net.depth - 1: net.weight(net.depth)}
        for i in range(net.depth - 2, 0, -1):
            products[i] = products[i + 1] @ net.weight(i + 1)
        for i, layer in enumerate(rule.config.layers, start=1):
            for k, term in enumerate(layer.terms):
                if term.kind == "above":
                    reference = net.weight(i + 1)
                elif term.kind == "direct" and term.error == "output":
                    reference = products[i]
                else:
                    continue
                key = f"weight_angle_{i}_{term.kind}"
                if key in record:
                    key = f"{key}_{k}"
                record[key] = angle(rule.matrix(i, k), reference)
    return record


def measure(
    net: MLP,
    rule: FeedbackRule,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    weights: bool = True,
) -> dict[str, float]:
    """Every alignment angle of ``rule`` on ``net`` for the batch ``(x, y)``.

    Changes no state and consumes no random numbers: one forward pass for backprop, the rule's
    own ``deltas`` (which never touches ``.grad``), and products of the results.

    Args:
        net: the network, with its current weights.
        rule: the rule built for ``net.sizes``.
        x: probe inputs, shape (N, n_0).
        y: labels (N,) for classification; ignored (may be ``None``) for the autoencoder.
        weights: also record the weight angles (``weight_alignment``).

    Returns:
        ``{"update_angle_i": ..., "delta_angle_i": ..., "weight_angle_i_above": ...}`` in
        degrees, ``i`` over the hidden layers.
    """
    rule.check(net)
    if net.objective.uses_labels and y is None:
        raise ValueError(f"the {net.objective.name} objective needs labels y for the probe")
    target = y if net.objective.uses_labels else x
    record: dict[str, float] = {}
    with torch.no_grad():
        cache = net.forward_cache(x)
        reference = backprop_deltas(net, cache, target)
        ours = rule.deltas(net, x, target).deltas
        for i in range(1, net.depth):
            h = cache.h(i - 1)  # (N, n_{i-1})
            record[f"update_angle_{i}"] = angle(ours[i].t() @ h, reference[i].t() @ h)
            record[f"delta_angle_{i}"] = float(row_angles(ours[i], reference[i]).nanmean())
    if weights:
        record.update(weight_alignment(net, rule))
    return record


class AlignmentProbe:
    """A ``Trainer`` metric measuring every alignment angle on a fixed batch at each epoch end.

    ``probe(trainer)`` returns ``measure(trainer.net, trainer.rule, x, y)``: flat, CSV-friendly
    keys ``update_angle_i``, ``delta_angle_i``, ``weight_angle_i_above``,
    ``weight_angle_i_direct``. It consumes no random numbers and changes no state, so a run
    with the probe follows exactly the trajectory of a run without it.

    Args:
        x: probe inputs, shape (N, n_0), on the network's device and dtype.
        y: probe labels (N,); ``None`` for the autoencoder.
        weights: also record the weight angles.

    Example:
        >>> probe = AlignmentProbe(data.train.x[:1000], data.train.y[:1000])
        >>> Trainer(net, rule, data, config, metrics=[probe]).fit()
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor | None = None, *, weights: bool = True
    ) -> None:
        if y is not None and len(y) != len(x):
            raise ValueError(f"probe x has {len(x)} examples, y has {len(y)}")
        self.x, self.y, self.weights = x, y, weights

    def measure(self, net: MLP, rule: FeedbackRule) -> dict[str, float]:
        return measure(net, rule, self.x, self.y, weights=self.weights)

    def __call__(self, trainer: Trainer) -> dict[str, float]:
        return self.measure(trainer.net, trainer.rule)

    def __repr__(self) -> str:
        return f"AlignmentProbe(examples={len(self.x)}, weights={self.weights})"


def alignment_metric(
    data: Dataset, size: int = 1000, *, seed: int | None = 0, weights: bool = True
) -> AlignmentProbe:
    """An ``AlignmentProbe`` on ``size`` examples of ``data.train``, fixed for the whole run.

    The examples are drawn without replacement by a private generator seeded with ``seed``
    (the global random state is not touched), or are the first ``size`` when ``seed`` is None.
    """
    train = data.train
    n = len(train)
    if size < 1:
        raise ValueError(f"the probe needs at least one example, got size={size}")
    size = min(size, n)
    if seed is None:
        index = torch.arange(size)
    else:
        index = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]
    index = index.sort().values.to(train.x.device)
    return AlignmentProbe(train.x[index], train.y[index], weights=weights)


# ------------------------------------------------------------------- feedback diagnostics


@dataclass(frozen=True)
class FeedbackDiagnostics:
    """What a fixed feedback matrix ``B`` (rows, cols) can and cannot transport.

    The row convention: a signal ``s`` of shape (N, rows) reaches the layer as ``s @ B``, so the
    *error space* is ``R^rows`` (restricted to errors that can occur) and the layer space
    ``R^cols``. For a direct matrix ``D^i`` (n_L, n_i) the error space is the output error's.

    Attributes:
        shape: ``(rows, cols)``.
        rank: numerical rank (singular values above ``max(shape) * eps * s_max``).
        singular_max, singular_min: largest and smallest of the ``min(shape)`` singular values.
        condition_number: ``singular_max / singular_min``; ``inf`` when rank-deficient.
        error_identity: ``B B^+ = I_rows``, i.e. ``rank == rows``: no signal reaching the
            matrix is lost. This is the condition Nokland and the paper write as
            ``B^+ B = I`` in the column convention, where their ``B`` is our ``B^T``.
        layer_identity: ``B^+ B = I_cols``, i.e. ``rank == cols``; impossible when
            ``rows < cols`` (any direct matrix of a hidden layer wider than the output).
        error_space: ``"softmax"`` (errors ``e = softmax - onehot`` have entries summing to
            zero: the subspace orthogonal to the ones vector) or ``"any"`` (all of R^rows).
        error_dimensions: dimension of the error space (rows - 1 or rows).
        error_rank: dimensions of the error space that ``B`` does not annihilate.
        error_dimensions_carried: ``error_rank / error_dimensions``.
        error_gain_min: ``min ||e B||`` over unit errors ``e`` of the error space (the
            smallest singular value of ``B`` restricted to it): 0 when some error is lost.
        error_gain_relative: ``error_gain_min / singular_max``.
        error_energy_fraction: ``||P B||_F^2 / ||B||_F^2`` with ``P`` the projector on the error
            space: the share of ``B``'s energy that acts on errors that can occur. It is
            ``error_dimensions / rows`` (0.9 for ten classes) for a matrix that treats every
            direction alike, 0 for a matrix of ones under softmax errors, and about
            ``(rows - 1) / rows * std^2 / (1 + std^2)`` for ones plus noise of deviation
            ``std`` (B1), which carries errors only through its noise.
    """

    shape: tuple[int, int]
    rank: int
    singular_max: float
    singular_min: float
    condition_number: float
    error_identity: bool
    layer_identity: bool
    error_space: str
    error_dimensions: int
    error_rank: int
    error_dimensions_carried: float
    error_gain_min: float
    error_gain_relative: float
    error_energy_fraction: float

    def to_data(self) -> dict[str, Any]:
        """A JSON-ready dictionary; an infinite condition number becomes ``None``."""
        data = asdict(self)
        data["shape"] = list(self.shape)
        for key, value in data.items():
            if isinstance(value, float) and not math.isfinite(value):
                data[key] = None
        return data


def diagnose(matrix: torch.Tensor, error_space: str = "softmax") -> FeedbackDiagnostics:
    """Rank, conditioning, pseudo-inverse identities and error transport of one matrix.

    Args:
        matrix: a feedback matrix of shape (rows, cols) in the row convention (``s @ B``).
        error_space: ``"softmax"`` for matrices receiving a softmax/cross-entropy output error
            (entries sum to zero), ``"any"`` for an unconstrained signal (hidden deltas, the
            autoencoder's error).

    Example:
        >>> diagnose(torch.ones(10, 800)).error_rank      # ones annihilate softmax errors
        0
    """
    if error_space not in ERROR_SPACES:
        raise ValueError(f"unknown error space {error_space!r}; known: {', '.join(ERROR_SPACES)}")
    if matrix.dim() != 2 or 0 in matrix.shape:
        raise ValueError(f"a feedback matrix must be a non-empty 2-d tensor, got {matrix.shape}")
    B = matrix.detach().to("cpu", torch.float64)
    rows, cols = B.shape
    singular = torch.linalg.svdvals(B)  # descending, min(rows, cols) values
    singular_max = float(singular[0])
    tolerance = max(rows, cols) * torch.finfo(torch.float64).eps * singular_max
    rank = int((singular > tolerance).sum())
    singular_min = float(singular[-1])
    full = rank == min(rows, cols) and singular_min > 0
    condition = singular_max / singular_min if full else math.inf

    if error_space == "softmax" and rows > 1:
        projected = B - B.mean(dim=0, keepdim=True)  # P B, P = I - 1 1^T / rows
        dimensions = rows - 1
    else:
        projected = B
        dimensions = rows
    restricted = torch.linalg.svdvals(projected)[:dimensions]
    error_rank = int((restricted > tolerance).sum())
    gain_min = float(restricted[-1]) if error_rank == dimensions and len(restricted) else 0.0
    if dimensions > cols:  # more error dimensions than the layer has units: some are lost
        gain_min = 0.0
    total = float(B.square().sum())
    return FeedbackDiagnostics(
        shape=(rows, cols),
        rank=rank,
        singular_max=singular_max,
        singular_min=singular_min,
        condition_number=condition,
        error_identity=rank == rows,
        layer_identity=rank == cols,
        error_space=error_space if rows > 1 else "any",
        error_dimensions=dimensions,
        error_rank=error_rank,
        error_dimensions_carried=error_rank / dimensions if dimensions else 0.0,
        error_gain_min=gain_min,
        error_gain_relative=gain_min / singular_max if singular_max > 0 else 0.0,
        error_energy_fraction=float(projected.square().sum()) / total if total > 0 else 0.0,
    )


def rule_diagnostics(
    rule: FeedbackRule, objective: str = "classification"
) -> dict[tuple[int, int], FeedbackDiagnostics]:
    """``diagnose`` every fixed matrix of ``rule``, keyed by (layer, term index).

    A matrix receiving the output error (a direct term, or the top layer's above term) or an
    auxiliary error is diagnosed on softmax errors when ``objective`` is ``"classification"``;
    every other matrix receives a hidden delta, an unconstrained signal.
    """
    top = len(rule.sizes) - 2
    result = {}
    for (layer, index), matrix in rule.matrices().items():
        term = rule.config.layer(layer).terms[index]
        receives_error = term.kind == "direct" or (term.kind == "above" and layer == top)
        softmax = receives_error and (objective == "classification" or term.error == "auxiliary")
        result[layer, index] = diagnose(matrix, "softmax" if softmax else "any")
    return result


# ----------------------------------------------------------------------------------- plots

_KEY = re.compile(r"^(?P<prefix>[a-z]+_angle_)(?P<layer>\d+)(?:_(?P<term>\w+))?$")


def plot_alignment(
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    kind: str = "update",
    *,
    title: str | None = None,
) -> Path:
    """Angle-versus-epoch curves: one subplot per hidden layer, one line per rule.

    Args:
        histories: ``{label: history}``, each history a list of epoch records holding the keys
            of ``measure`` (``update_angle_1`` ...) and optionally ``epoch``.
        path: where to write the PNG.
        kind: ``"update"``, ``"delta"`` or ``"weight"`` (one line per rule and term kind).
        title: figure title; a default names the measure.

    Returns:
        The path written.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if kind not in PLOT_KINDS:
        raise ValueError(f"unknown alignment kind {kind!r}; known: {', '.join(PLOT_KINDS)}")
    prefix = PLOT_KINDS[kind]
    # layer -> label -> term -> (epochs, angles)
    curves: dict[int, dict[str, dict[str, tuple[list[float], list[float]]]]] = {}
    for label, history in histories.items():
        for position, record in enumerate(history, start=1):
            epoch = float(record.get("epoch", position))
            for key, value in record.items():
                match = _KEY.match(key)
                if match is None or match["prefix"] != prefix or value is None:
                    continue
                value = float(value)
                if not math.isfinite(value):
                    continue
                line = curves.setdefault(int(match["layer"]), {}).setdefault(label, {})
                epochs, angles = line.setdefault(match["term"] or "", ([], []))
                epochs.append(epoch)
                angles.append(value)
    if not curves:
        raise ValueError(f"no {prefix}* values in the histories of {', '.join(histories)}")

    layers = sorted(curves)
    figure = Figure(figsize=(4.6 * len(layers), 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(layers), squeeze=False)[0]
    palette = "tab10" if len(histories) <= 10 else "tab20"
    colours = {label: colormaps[palette](n % 20) for n, label in enumerate(histories)}
    styles = {"": "-", "above": "-", "direct": "--"}
    for ax, layer in zip(axes, layers, strict=True):
        for label, terms in curves[layer].items():
            for term, (epochs, angles) in sorted(terms.items()):
                name = f"{label} ({term})" if term else label
                ax.plot(
                    epochs,
                    angles,
                    styles.get(term, ":"),
                    color=colours[label],
                    marker="o" if len(epochs) <= 30 else None,
                    markersize=3,
                    label=name,
                )
        ax.axhline(90.0, color="0.6", linewidth=0.8, linestyle=":")
        ax.set_title(f"hidden layer {layer}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("angle to backprop (degrees)")
        ax.set_ylim(bottom=0.0)
        ax.legend(fontsize="small")
    names = {"update": "weight update", "delta": "delta (mean over examples)", "weight": "weights"}
    figure.suptitle(title or f"Alignment with backprop: {names[kind]}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path
