"""Look inside a rule: how well its updates and its feedback agree with backpropagation.

Three families of measures, all angles in degrees (0: same direction, 90: unrelated, 180:
opposite), for every hidden block ``i = 1..L-1`` of any model of blocks (an ``MLP``, a
``gfalign.models.BlockNet``: conv nets, user modules; DESIGN.md section 9):

Gradient alignment, measured on a fixed probe batch with the model's current parameters:

    update_angle_i   angle between the rule's update of block i's weight and backprop's, both
                     summed over the probe batch. The rule's update is the block's local
                     gradient J_theta phi_i(h^{i-1})^T d^i (for a Linear block (d^i)^T h^{i-1},
                     for a Conv2d block PyTorch's kernel gradient); backprop's is autograd's
                     gradient of the summed loss. Weights only: the parameter named ``weight``
                     where the block's linear part has one (no bias), else every parameter of
                     the part, flattened and concatenated in ``named_parameters`` order.
    delta_angle_i    angle between the rule's d^i_n and backprop's delta^i_n for every example n,
                     each flattened (a conv block's delta is channels x height x width), averaged
                     over the examples (examples where either is zero are left out)

Weight alignment, from the parameters and the fixed feedback alone:

    weight_angle_i_above    angle between an ``above`` term's feedback parameters (as they are
                            now: fixed, made from the live signs, or learned) and the forward
                            parameters of block i+1 they stand for (both flattened; for an MLP
                            B_up^i against W^{i+1}, for a conv block kernel against kernel, for
                            any other part every parameter): FA's alignment (Lillicrap et al.);
                            for Kolen-Pollack it falls as the feedback learns the weights
    weight_angle_i_direct   angle between the product W^L W^{L-1} ... W^{i+1} and D^i (both
                            (n_L, numel(a^i))): the linear part of the backprop path against the
                            direct feedback, the weight alignment of DFA theory (Nokland;
                            Refinetti et al.), for every ``direct`` term on the output error e.
                            Only where that product is the path: blocks i+1..L are ``nn.Linear``
                            and the tails of blocks i..L-1 only flatten (always, in an MLP);
                            elsewhere (a conv or user block above i, a pooling tail) the key is
                            left out. DFA's other measure, the angle between its update and
                            backprop's, is ``update_angle_i``.

``below`` terms have no counterpart in backprop and ``backprop`` terms use the forward
parameters themselves, so they add no weight angle; a direct term on an auxiliary error or on
the target neither (its ``D^i`` is not a stand-in for the layers above).

Backprop here is ``torch.autograd`` through the whole model (``backprop_reference``),
independently of the rule engine: a forward pass on the model's own modules keeps every a^i in
the graph, and ``torch.autograd.grad`` takes the gradient of the loss summed over the batch with
respect to every a^i and every parameter.

Feedback-matrix diagnostics (``diagnose``): rank, condition number, the two pseudo-inverse
identities and how much of the possible output errors a matrix carries; see
``FeedbackDiagnostics``.

Example:
    >>> from gfalign import mlp, FeedbackRule
    >>> from gfalign.data import synthetic
    >>> from gfalign.train import TrainConfig, Trainer
    >>> data, net = synthetic(200, 50), mlp([784, 32, 32, 10], seed=0)
    >>> probe = alignment_metric(data, size=100)           # a fixed batch of training examples
    >>> rule, config = FeedbackRule("dfa", net), TrainConfig(epochs=2)
    >>> trainer = Trainer(net, rule, data, config, metrics=[probe])
    >>> history = trainer.fit()
    >>> 0 < history[-1]["update_angle_1"] < 180
    True
    >>> plot_alignment({"dfa": history}, "alignment.png", kind="update")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.func import functional_call

from gfalign.blocks import LINEAR
from gfalign.engine import FeedbackRule
from gfalign.terms import KINDS, SIGNALS

if TYPE_CHECKING:
    from gfalign.data import Dataset
    from gfalign.train import Trainer

__all__ = [
    "ERROR_SPACES",
    "PLOT_KINDS",
    "AlignmentProbe",
    "Backprop",
    "FeedbackDiagnostics",
    "alignment_metric",
    "angle",
    "backprop_deltas",
    "backprop_reference",
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


@dataclass(frozen=True)
class Backprop:
    """Backpropagation's deltas and parameter gradients for one batch: the reference.

    Attributes:
        deltas: ``deltas[i]`` is ``delta^i = d(sum_n loss_n) / d a^i`` in ``a^i``'s shape
            (N, *pre shape of block i), for ``i = 1..L``; ``deltas[L]`` is the output error e.
        gradients: ``gradients[i]`` maps the name of every parameter of block ``i``'s linear
            part (``named_parameters`` order) to ``d(sum_n loss_n) / d theta_i``, in its shape.
    """

    deltas: dict[int, torch.Tensor]
    gradients: dict[int, dict[str, torch.Tensor]]


def backprop_reference(net: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Backprop:
    """Backprop for the batch ``(x, target)`` by ``torch.autograd`` through the whole model.

    A forward pass runs every block's own modules, ``a^i = phi_i(h^{i-1}; theta_i)``,
    ``h^i = tau_i(f_i(a^i))``, keeping each ``a^i`` as a node of one graph; then
    ``torch.autograd.grad`` of the summed loss with respect to every ``a^i`` and every
    parameter. The graph starts at the logits ``a^L`` with the objective's output error
    ``e = d(sum_n loss_n) / d a^L`` (DESIGN.md section 2: softmax minus one-hot, or the
    autoencoder's ``(x_hat - x) x_hat (1 - x_hat)``) as the cotangent, so the reference and the
    rules share the definition of the loss and nothing else.

    Changes no state: the graph is built on detached copies of the parameters
    (``torch.func.functional_call``), so no ``.grad`` is written, and no random numbers are
    drawn (tails are deterministic, as the rules' forward pass assumes).

    Args:
        net: a ``gfalign.network.Network``.
        x: inputs, shape (N, *net.input_shape).
        target: labels (N,) for classification; the flattened input (N, n_0) for the
            autoencoder.

    Returns:
        A ``Backprop`` with every ``delta^i`` and every parameter gradient.

    Example:
        >>> from gfalign.models import build
        >>> net = build("lenet5")
        >>> x, y = torch.rand(4, 1, 32, 32), torch.randint(0, 10, (4,))
        >>> reference = backprop_reference(net, x, y)
        >>> reference.deltas[1].shape, reference.gradients[1]["weight"].shape
        (torch.Size([4, 6, 28, 28]), torch.Size([6, 1, 5, 5]))
    """
    blocks = net.blocks
    last = len(blocks)
    with torch.enable_grad():
        theta = [
            {name: p.detach().requires_grad_(True) for name, p in block.linear.named_parameters()}
            for block in blocks
        ]
        pre: list[torch.Tensor] = []
        outputs = [x.detach()]  # h^0, h^1, ...: a graph's blocks read them through edges
        for i, (block, params) in enumerate(zip(blocks, theta, strict=True), start=1):
            a = functional_call(block.linear, params, (net.block_input(i, outputs),))
            pre.append(a)
            if i < last:
                h = block.activation.function(a)
                for module in block.tail.modules:
                    h = module(h)
                outputs.append(h)
        _, e = net.objective.error(pre[-1].detach(), target)
        parameters = [p for params in theta for p in params.values()]
        grads = torch.autograd.grad(
            pre[-1], [*pre[:-1], *parameters], grad_outputs=e, allow_unused=True
        )
    grads = [
        torch.zeros_like(value) if grad is None else grad
        for value, grad in zip([*pre[:-1], *parameters], grads, strict=True)
    ]
    deltas = {i: grads[i - 1] for i in range(1, last)}
    deltas[last] = e
    gradients, offset = {}, last - 1
    for i, params in enumerate(theta, start=1):
        gradients[i] = dict(zip(params, grads[offset : offset + len(params)], strict=True))
        offset += len(params)
    return Backprop(deltas, gradients)


def backprop_deltas(net: nn.Module, cache, target: torch.Tensor) -> dict[int, torch.Tensor]:
    """Backprop's deltas ``delta^1 .. delta^L`` for the batch of a forward pass ``cache``.

    ``backprop_reference(net, cache.post[0], target).deltas``: autograd through the model on
    the cache's input ``h^0``; ``delta[i]`` has ``a^i``'s shape. ``target`` is the labels
    (classification) or the flattened input (autoencoder).
    """
    return backprop_reference(net, cache.post[0], target).deltas


def _compared(values: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """What an update angle compares: the ``weight`` where ``names`` has one, else every
    parameter of ``names`` flattened and concatenated in that order."""
    if "weight" in names:
        return values["weight"]
    return torch.cat([values[name].reshape(-1) for name in names])


def _flat(values: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    return torch.cat([values[name].reshape(-1) for name in names])


def _output_paths(net: nn.Module) -> dict[int, torch.Tensor]:
    """``W^L W^{L-1} ... W^{i+1}`` (n_L, numel(a^i)) for every hidden block ``i`` whose path to
    the output is linear but for the activations: blocks ``i+1..L`` are ``nn.Linear`` and the
    tails of blocks ``i..L-1`` only flatten (a reshape, which keeps ``a^i``'s entries in the
    order of ``D^i``'s columns)."""
    blocks = net.blocks
    products: dict[int, torch.Tensor] = {}
    if net.is_graph:
        return products  # a graph's paths to the output are not one product
    product: torch.Tensor | None = None
    for i in range(len(blocks) - 1, 0, -1):
        above, tail = blocks[i].linear, blocks[i - 1].tail.modules
        if type(above) is not nn.Linear or not all(type(m) is nn.Flatten for m in tail):
            break
        product = above.weight if product is None else product @ above.weight
        if product.shape[1] != math.prod(net.pre_shapes[i - 1]):
            break
        products[i] = product
    return products


def weight_alignment(net: nn.Module, rule: FeedbackRule) -> dict[str, float]:
    """The weight angles of every hidden block's feedback parameters and ``direct`` terms.

    Keys ``weight_angle_{i}_{kind}`` for every term that runs a block's part backwards with
    feedback parameters in place of backprop's (``above``; ``gfalign.terms.KINDS``): its
    parameters (as they are
    now: a sign-concordant term's from the live weights, a learned one's as learned) against
    the forward parameters of the block they stand in for, flattened and concatenated (``B_up^i``
    and ``W^{i+1}`` in an MLP); and ``weight_angle_{i}_direct`` (``W^L ... W^{i+1}`` against
    ``D^i``, only where the path above block ``i`` is a chain of Linear blocks with identity or
    flatten tails; the key is left out elsewhere). A second term of the same kind in one layer
    gets its term index appended.
    """
    rule.check(net)
    blocks = net.blocks
    record: dict[str, float] = {}
    with torch.no_grad():
        paths = _output_paths(net)
        for i, layer in enumerate(rule.config.layers, start=1):
            for k, term in enumerate(layer.terms):
                kind = KINDS[term.kind]
                if kind.tiled:  # a kernel of n_out channels: no forward parameter its shape
                    continue
                if kind.part is not None and kind.has_parameters and kind.backward:
                    # every block the term stands in for: one on a chain, each consumer on a graph
                    fixed, forward = [], []
                    for key, slot in sorted(rule.slots.items()):
                        if key[:2] != (i, k):
                            continue
                        mine = rule.feedback(i, k, net, consumer=key[2] if len(key) > 2 else None)
                        own = dict(blocks[slot.block - 1].linear.named_parameters())
                        fixed.append(_flat(mine, list(mine)))
                        forward.append(_flat(own, list(mine)))
                    value = angle(torch.cat(fixed), torch.cat(forward))
                elif kind.is_direct and term.error == "output" and i in paths:
                    value = angle(rule.feedback(i, k)["matrix"], paths[i])
                else:
                    continue
                key = f"weight_angle_{i}_{term.kind}"
                if key in record:
                    key = f"{key}_{k}"
                record[key] = value
    return record


def measure(
    net: nn.Module,
    rule: FeedbackRule,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    weights: bool = True,
) -> dict[str, float]:
    """Every alignment angle of ``rule`` on ``net`` for the batch ``(x, y)``.

    Changes no state and consumes no random numbers: autograd's backprop on detached copies of
    the parameters (``backprop_reference``), the rule's own ``deltas`` (which never touches
    ``.grad``) and each block's local parameter product (``param_vjp``) on them.

    Args:
        net: the model (a ``gfalign.network.Network``), with its current parameters.
        rule: the rule built for ``net``.
        x: probe inputs, shape (N, *net.input_shape).
        y: labels (N,) for classification; ignored (may be ``None``) for the autoencoder.
        weights: also record the weight angles (``weight_alignment``).

    Returns:
        ``{"update_angle_i": ..., "delta_angle_i": ..., "weight_angle_i_above": ...}`` in
        degrees, ``i`` over the hidden blocks.
    """
    rule.check(net, x)
    if net.objective.uses_labels and y is None:
        raise ValueError(f"the {net.objective.name} objective needs labels y for the probe")
    if net.training:  # measured without dropout, and without drawing training's masks
        net.eval()
        try:
            return measure(net, rule, x, y, weights=weights)
        finally:
            net.train()
    target = net.objective.target(x, y)
    reference = backprop_reference(net, x, target)
    record: dict[str, float] = {}
    with torch.no_grad():
        cache = net.forward_cache(x)
        ours = rule.deltas(net, x, target).deltas
        hidden = zip(net.blocks[:-1], rule.structure[:-1], strict=True)
        for i, (block, shape) in enumerate(hidden, start=1):
            names = [name for name, _ in shape.parameters]
            update = shape.products.param_vjp(block.linear, cache.input(i), ours[i])
            record[f"update_angle_{i}"] = angle(
                _compared(update, names), _compared(reference.gradients[i], names)
            )
            record[f"delta_angle_{i}"] = float(
                row_angles(ours[i].flatten(1), reference.deltas[i].flatten(1)).nanmean()
            )
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
        x: probe inputs, shape (N, *net.input_shape), on the network's device and dtype.
        y: probe labels (N,); ``None`` for the autoencoder.
        weights: also record the weight angles.

    Example:
        >>> from gfalign import mlp, FeedbackRule
        >>> from gfalign.data import synthetic
        >>> from gfalign.train import TrainConfig, Trainer
        >>> data, net = synthetic(200, 50), mlp([784, 32, 10], seed=0)
        >>> probe = AlignmentProbe(data.train.x[:100], data.train.y[:100])
        >>> history = Trainer(net, FeedbackRule("fa", net), data, metrics=[probe]).fit(1)
        >>> "delta_angle_1" in history[-1]
        True
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor | None = None, *, weights: bool = True
    ) -> None:
        if y is not None and len(y) != len(x):
            raise ValueError(f"probe x has {len(x)} examples, y has {len(y)}")
        self.x, self.y, self.weights = x, y, weights

    def measure(self, net: nn.Module, rule: FeedbackRule) -> dict[str, float]:
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
    every other matrix receives a hidden delta, an unconstrained signal. On a model of blocks
    only the fixed parameters that act as a matrix ``s @ B`` are diagnosed: every ``D^i``, and
    the above and below terms standing for a Linear block; a conv kernel or a user module's
    parameters are not one matrix and are left out.
    """
    top = len(rule.sizes) - 2
    result = {}
    for layer, config in enumerate(rule.config.layers, start=1):
        for index, term in enumerate(config.terms):
            kind = KINDS[term.kind]
            if not kind.has_parameters:  # it runs the forward parameters: nothing to diagnose
                continue
            if not kind.is_direct:
                stands_for = rule.structure[layer + kind.part - 1]
                if stands_for.products is not LINEAR:
                    continue
            # a direct term's signal, or the output error where the neighbour read is the output
            receives_error = kind.is_direct or kind.tiled or layer + kind.reads == top + 1
            softmax = receives_error and (
                objective == "classification" or SIGNALS[term.error].local
            )
            result[layer, index] = diagnose(
                rule.matrix(layer, index), "softmax" if softmax else "any"
            )
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
