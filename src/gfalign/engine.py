"""The rule engine: one mechanism that computes every configuration's deltas and gradients.

``FeedbackRule`` holds a resolved ``RuleConfig`` and its fixed feedback matrices as buffers
(saved in ``state_dict``, moved by ``.to``). ``rule.backward(net, x, target)`` runs the forward
pass, the output error, every hidden delta in dependency order, and fills ``.grad`` of every
weight and bias with the local update (DESIGN.md section 2)

    grad W^i = (d^i)^T h^{i-1} / N,    grad b^i = mean_n d^i_n,    d^L = e,

without an autograd graph and without stepping, so any ``torch.optim`` optimizer can apply it.
The engine never looks at a rule's name: only at its terms.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gfalign import feedback as feedback_families
from gfalign.feedback import FeedbackSpec
from gfalign.network import MLP, OBJECTIVES, Activation, widths
from gfalign.network import tanh as network_tanh
from gfalign.rules import ConfigError, RuleConfig, Term, resolve

__all__ = [
    "FeedbackRule",
    "LayerPlan",
    "Plan",
    "PlannedTerm",
    "Step",
    "direct_values",
    "propagate",
    "times_slope",
]


@dataclass(frozen=True)
class Step:
    """What one call of the rule computed for a batch.

    Attributes:
        loss: the batch-mean loss of the network's output (0-d tensor).
        deltas: ``deltas[i]`` is ``d^i`` (shape (N, n_i)) for ``i = 1..L``; ``deltas[L]`` is ``e``.
        auxiliary_losses: ``{i: loss}`` of the auxiliary classifiers of layers using ``e^i``.
    """

    loss: torch.Tensor
    deltas: dict[int, torch.Tensor]
    auxiliary_losses: dict[int, torch.Tensor]


@dataclass(frozen=True)
class _Matrix:
    """Where a term's fixed matrix lives: a buffer, or columns of the stacked direct buffer."""

    layer: int
    index: int
    shape: tuple[int, int]
    buffer: str
    columns: slice | None = None


@dataclass(frozen=True)
class PlannedTerm:
    """One term of one hidden layer, resolved once for the hot loop.

    ``kind`` is ``direct``, ``above``, ``below`` or ``backprop``; ``source`` the layer whose
    delta a product term reads (``L`` for the output error); ``final`` whether it reads the final
    delta ``d^j`` (else the direct-only ``t^j``); ``buffer`` the fixed matrix's buffer name and
    ``columns`` its columns in the stacked ``direct`` buffer.
    """

    index: int
    kind: str
    coefficient: float
    source: int = 0
    final: bool = True
    buffer: str = ""
    columns: slice | None = None
    auxiliary: bool = False


@dataclass(frozen=True)
class LayerPlan:
    """The terms of hidden layer ``layer``: direct values first, then matrix products."""

    layer: int
    values: tuple[PlannedTerm, ...]
    products: tuple[PlannedTerm, ...]


@dataclass(frozen=True)
class Plan:
    """A rule's term loop, fixed at construction: what ``propagate`` executes every step.

    ``layers`` are in dependency order; ``direct_term[j]`` is the index of layer ``j``'s single
    direct term (defines ``t^j``) where it has exactly one; ``output_width`` the number of
    columns of the ``direct`` buffer that the output error ``e`` multiplies.
    """

    hidden: int
    layers: tuple[LayerPlan, ...]
    direct: tuple[PlannedTerm, ...]
    direct_term: dict[int, int]
    output_width: int


class FeedbackRule(nn.Module):
    """A credit-assignment rule for an ``MLP`` of given sizes, with its fixed feedback matrices.

    Args:
        config: a preset name (``"bp"``, ``"fa"``, ``"dfa"``, ``"s1"`` ... ``"s3-aux"``), a
            configuration dictionary, or a ``RuleConfig`` (see ``gfalign.rules``).
        sizes: the network's layer widths ``[n_0, ..., n_L]`` (``net.sizes``).
        feedback: default family of the fixed matrices (``"uniform"``, ``"B1"``,
            ``"sparse:density=0.2"`` ...), overriding the configuration's.
        seed: every matrix is drawn from its own generator derived from ``seed`` and its place
            (layer, term), so matrices are independent draws and reproducible.

    Matrix shapes (row convention): a direct term of layer ``i`` uses ``D^i`` of shape
    (n_L, n_i), an above term ``B_up^i`` of shape (n_{i+1}, n_i), a below term ``B_down^i`` of
    shape (n_{i-1}, n_i). All direct matrices are stacked column-wise in one buffer, so the
    output error reaches every layer through a single matrix product.

    Example:
        >>> net = MLP([784, 800, 800, 10], activation="tanh", seed=0)
        >>> rule = FeedbackRule("s1", net.sizes, seed=0)
        >>> optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
        >>> x, y = torch.rand(32, 784), torch.randint(0, 10, (32,))
        >>> step = rule.backward(net, x, y)   # fills .grad, returns loss and deltas
        >>> optimizer.step()
    """

    def __init__(
        self,
        config: str | Mapping | RuleConfig,
        sizes: tuple[int, ...] | list[int],
        *,
        feedback: FeedbackSpec | str | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        try:
            self.sizes = widths(sizes)
        except ValueError as problem:
            raise ConfigError(str(problem)) from None
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        if len(self.sizes) < 3:
            raise ConfigError(
                f"a feedback rule needs at least one hidden layer; sizes {list(self.sizes)}"
            )
        self.config = resolve(config, len(self.sizes) - 2, feedback)
        self.seed = seed
        self._order = self.config.order()
        self._matrices: dict[tuple[int, int], _Matrix] = {}

        n_out = self.sizes[-1]
        # Direct terms on the output error first, so one product reaches all of them.
        direct = [
            (i, k, term)
            for i, layer in enumerate(self.config.layers, start=1)
            for k, term in enumerate(layer.terms)
            if term.kind == "direct"
        ]
        direct.sort(key=lambda item: item[2].error != "output")
        blocks, offset = [], 0
        for i, k, term in direct:
            shape = (n_out, self.sizes[i])
            blocks.append(self._draw(i, k, term, shape))
            columns = slice(offset, offset + shape[1])
            self._matrices[i, k] = _Matrix(i, k, shape, "direct", columns)
            offset += shape[1]
        self._output_width = sum(self.sizes[i] for i, _, t in direct if t.error == "output")
        self.register_buffer(
            "direct", torch.cat(blocks, dim=1) if blocks else torch.empty(n_out, 0)
        )

        for i, layer in enumerate(self.config.layers, start=1):
            for k, term in enumerate(layer.terms):
                if term.kind in ("above", "below"):
                    rows = self.sizes[i + 1] if term.kind == "above" else self.sizes[i - 1]
                    shape = (rows, self.sizes[i])
                    name = f"layer{i}_term{k}_{term.kind}"
                    self.register_buffer(name, self._draw(i, k, term, shape))
                    self._matrices[i, k] = _Matrix(i, k, shape, name)
        self.plan = self._make_plan()
        self._uses_auxiliary = self.config.uses_auxiliary
        self.to(device=device, dtype=dtype)

    def _make_plan(self) -> Plan:
        hidden = len(self.sizes) - 2
        direct_term = {
            j: next(k for k, term in enumerate(layer.terms) if term.kind == "direct")
            for j, layer in enumerate(self.config.layers, start=1)
            if sum(term.kind == "direct" for term in layer.terms) == 1
        }
        planned: dict[tuple[int, int], PlannedTerm] = {}
        for i, layer in enumerate(self.config.layers, start=1):
            for k, (term, weight) in enumerate(zip(layer.terms, layer.coefficients(), strict=True)):
                place = self._matrices.get((i, k))
                if term.kind == "direct":
                    planned[i, k] = PlannedTerm(
                        k,
                        "direct",
                        weight,
                        columns=place.columns,
                        auxiliary=term.error == "auxiliary",
                    )
                elif term.kind == "backprop":
                    planned[i, k] = PlannedTerm(k, "backprop", weight, source=i + 1)
                else:
                    j = i + 1 if term.kind == "above" else i - 1
                    final = j == hidden + 1 or term.source == "final"
                    planned[i, k] = PlannedTerm(k, term.kind, weight, j, final, place.buffer)
        layers = []
        for i in self.config.order():
            terms = [planned[i, k] for k in range(len(self.config.layer(i).terms))]
            layers.append(
                LayerPlan(
                    i,
                    tuple(t for t in terms if t.kind == "direct"),
                    tuple(t for t in terms if t.kind != "direct"),
                )
            )
        direct = tuple(
            sorted(
                (t for t in planned.values() if t.kind == "direct"),
                key=lambda t: t.columns.start,
            )
        )
        return Plan(hidden, tuple(layers), direct, direct_term, self._output_width)

    def _draw(self, layer: int, index: int, term: Term, shape: tuple[int, int]) -> torch.Tensor:
        spec = term.feedback or self.config.feedback
        generator = feedback_families.generator_for(
            self.seed, "layer", layer, "term", index, term.kind
        )
        return feedback_families.draw(spec, shape, generator)

    # ----------------------------------------------------------------------------- matrices

    def matrix(self, layer: int, index: int) -> torch.Tensor:
        """The fixed matrix of term ``index`` (0-based) of hidden layer ``layer`` (1-based)."""
        place = self._place(layer, index)
        tensor = getattr(self, place.buffer)
        return tensor[:, place.columns] if place.columns is not None else tensor

    def set_matrix(self, layer: int, index: int, value: torch.Tensor) -> None:
        """Replace a fixed matrix (to test reductions such as FA with B = W, or to study one)."""
        place = self._place(layer, index)
        if tuple(value.shape) != place.shape:
            term = self.config.layer(layer).terms[index]
            raise ConfigError(
                f"layer {layer}, term {index} ({term}): feedback matrix of shape "
                f"{tuple(value.shape)}, expected {place.shape}"
            )
        with torch.no_grad():
            self.matrix(layer, index).copy_(value)

    def matrices(self) -> dict[tuple[int, int], torch.Tensor]:
        """Every fixed matrix, keyed by (layer, term index)."""
        return {key: self.matrix(*key) for key in sorted(self._matrices)}

    def _place(self, layer: int, index: int) -> _Matrix:
        try:
            return self._matrices[layer, index]
        except KeyError:
            raise ConfigError(
                f"layer {layer}, term {index}: no fixed matrix there "
                f"(rule {self.config.name!r} has {sorted(self._matrices)})"
            ) from None

    # ----------------------------------------------------------------------------- the rule

    def check(self, net: MLP, x: torch.Tensor | None = None) -> None:
        """Refuse a network this rule was not built for, and a batch ``x`` it cannot take."""
        if x is not None and (x.dim() != 2 or x.shape[0] == 0 or x.shape[1] != self.sizes[0]):
            problem = "an empty batch" if x.dim() == 2 and x.shape[0] == 0 else "a batch"
            raise ConfigError(
                f"{problem} of shape {tuple(x.shape)}: give inputs of shape (N, {self.sizes[0]}) "
                "with N >= 1"
            )
        if tuple(net.sizes) != self.sizes:
            raise ConfigError(
                f"rule {self.config.name!r} was built for sizes {list(self.sizes)}, the network "
                f"has {list(net.sizes)}"
            )
        if self._uses_auxiliary and not net.objective.uses_labels:
            raise ConfigError(
                f"rule {self.config.name!r} uses auxiliary errors, which need class labels; "
                f"the network's objective is {net.objective.name}"
            )

    def deltas(self, net: MLP, x: torch.Tensor, target: torch.Tensor) -> Step:
        """Every delta ``d^1 .. d^L`` for a batch, without touching any ``.grad``.

        Args:
            net: the network, with ``net.sizes == rule.sizes``.
            x: inputs, shape (N, n_0).
            target: labels (N,) for classification, ignored for the autoencoder (its target
                is ``x``).
        """
        self.check(net, x)
        with torch.no_grad():
            cache = net.forward_cache(x)
            return self._deltas(net, cache, x if not net.objective.uses_labels else target)

    def backward(
        self, net: MLP, x: torch.Tensor, target: torch.Tensor, *, reduction: str = "mean"
    ) -> Step:
        """Compute the rule's update for a batch and write it into ``.grad`` (overwriting).

        ``reduction="mean"`` gives ``grad W^i = (d^i)^T h^{i-1} / N`` (the batch-mean loss);
        ``"sum"`` drops the ``1/N``, so SGD with learning rate ``lr`` takes the step that ``N``
        per-example updates at ``lr`` take to first order (the paper's per-example SGD).
        """
        self.check(net, x)
        scale = _scale(reduction, x.shape[0])
        with torch.no_grad():
            cache = net.forward_cache(x)
            step = self._deltas(net, cache, x if not net.objective.uses_labels else target)
            for i, layer in enumerate(net.layers, start=1):
                d, h = step.deltas[i], cache.post[i - 1]
                weight, bias = layer.weight, layer.bias
                if weight.grad is None:
                    weight.grad = torch.empty_like(weight)
                if bias.grad is None:
                    bias.grad = torch.empty_like(bias)
                # (n_i, N) @ (N, n_{i-1}) straight into the existing buffer, beta=0 ignores it.
                weight.grad.addmm_(d.t(), h, beta=0.0, alpha=scale)
                torch.sum(d, dim=0, out=bias.grad)
                if scale != 1.0:
                    bias.grad.mul_(scale)
        return step

    def sgd_step(
        self,
        net: MLP,
        x: torch.Tensor,
        target: torch.Tensor,
        *,
        lr: float,
        reduction: str = "mean",
    ) -> Step:
        """One plain SGD step with the rule's update, applied in place without ``.grad``.

        ``W^i <- W^i - lr * scale * (d^i)^T h^{i-1}`` and ``b^i <- b^i - lr * scale * sum_n d^i_n``
        with ``scale = 1/N`` (``"mean"``) or ``1`` (``"sum"``). The weight update is one
        ``addmm_`` into ``W^i``: no gradient tensor is written and no optimizer pass reads it
        back, which is most of the cost of a small batch besides the matrix products. Equal to
        ``backward`` followed by ``torch.optim.SGD(lr=lr).step()`` up to rounding; ``.grad``
        is left untouched. Every delta is computed before any weight changes, so a backprop
        term reads the weights of before the step.

        Example:
            >>> step = rule.sgd_step(net, x, y, lr=1e-3, reduction="sum")
        """
        self.check(net, x)
        scale = _scale(reduction, x.shape[0])
        with torch.no_grad():
            cache = net.forward_cache(x)
            step = self._deltas(net, cache, x if not net.objective.uses_labels else target)
            alpha = -lr * scale
            for i, layer in enumerate(net.layers, start=1):
                d = step.deltas[i]
                layer.weight.addmm_(d.t(), cache.post[i - 1], alpha=alpha)
                layer.bias.add_(d.sum(dim=0), alpha=alpha)
        return step

    def _deltas(self, net: MLP, cache, target: torch.Tensor) -> Step:
        plan = self.plan
        loss, e = net.objective.error(cache.pre[-1], target)
        slope = times_slope(net.activation, cache.pre, cache.post)
        buffers = self._buffers
        values, auxiliary_losses = direct_values(
            plan, e, buffers["direct"], cache.post, target, _auxiliary_error
        )
        weights = [None] + [layer.weight for layer in net.layers]
        d = propagate(plan, e, slope, values, buffers, weights)
        return Step(loss, d, auxiliary_losses)

    def extra_repr(self) -> str:
        config = self.config
        return f"config={config.name!r}, sizes={list(self.sizes)}, feedback={config.feedback}"


def _scale(reduction: str, n: int) -> float:
    if reduction == "mean":
        return 1.0 / n
    if reduction == "sum":
        return 1.0
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _auxiliary_error(logits: torch.Tensor, labels: torch.Tensor):
    return OBJECTIVES["classification"].error(logits, labels)


# The term loop below is written for any leading batch dimensions: a single network's tensors
# (N, n) and matrices (rows, cols), or an ensemble's stacked (K, N, n) and (K, rows, cols)
# (gfalign.ensemble), so both run the same mechanism.


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mm(a, b) if a.dim() == 2 else torch.bmm(a, b)


def _addmm(
    c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: float, alpha: float
) -> torch.Tensor:
    if a.dim() == 2:
        return torch.addmm(c, a, b, beta=beta, alpha=alpha)
    return torch.baddbmm(c, a, b, beta=beta, alpha=alpha)


# g * f'(a) in one pass by aten's kernels for autograd's own backward, where the activation is
# one of torch's (three passes otherwise: f'(a) = 1 - h * h is two, the product a third).
_FUSED_SLOPE: dict[Callable, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    network_tanh: lambda g, a, h: torch.ops.aten.tanh_backward(g, h),
    torch.tanh: lambda g, a, h: torch.ops.aten.tanh_backward(g, h),
    torch.sigmoid: lambda g, a, h: torch.ops.aten.sigmoid_backward(g, h),
    torch.relu: lambda g, a, h: torch.ops.aten.threshold_backward(g, a, 0),
}


def times_slope(
    activation: Activation, pre: Sequence[torch.Tensor], post: Sequence[torch.Tensor]
) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """``slope(i, g) = g * f'(a^i)`` for a forward pass (``pre[i - 1] = a^i``, ``post[i] = h^i``).

    A new tensor every call. ``f'(a^i)`` itself is computed at most once per layer.
    """
    fused = _FUSED_SLOPE.get(activation.function)
    if fused is not None:
        return lambda i, g: fused(g, pre[i - 1], post[i])
    derivatives: dict[int, torch.Tensor] = {}

    def slope(i: int, g: torch.Tensor) -> torch.Tensor:
        if i not in derivatives:
            derivatives[i] = activation.derivative(pre[i - 1], post[i])
        return g * derivatives[i]

    return slope


def direct_values(
    plan: Plan,
    e: torch.Tensor,
    direct: torch.Tensor,
    post: Sequence[torch.Tensor],
    target: torch.Tensor,
    auxiliary_error: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[dict[tuple[int, int], torch.Tensor], dict[int, torch.Tensor]]:
    """``eps^i D^i`` of every direct term, keyed by (layer, term index), and auxiliary losses.

    Every output-error term is a column block of one product ``e @ D_stacked``
    ((..., N, n_L) @ (..., n_L, sum n_i)). An auxiliary term reads the layer's own logits
    ``h^i (D^i)^T`` (DESIGN.md section 4) and ``auxiliary_error(logits, labels)`` returns
    ``(loss, e^i)``.
    """
    values: dict[tuple[int, int], torch.Tensor] = {}
    losses: dict[int, torch.Tensor] = {}
    if plan.output_width:
        stacked = _mm(e, direct[..., : plan.output_width])
    for layer in plan.layers:
        for term in layer.values:
            if term.auxiliary:
                D = direct[..., term.columns]  # (..., n_L, n_i)
                losses[layer.layer], e_i = auxiliary_error(
                    _mm(post[layer.layer], D.transpose(-1, -2)), target
                )
                values[layer.layer, term.index] = _mm(e_i, D)
            else:
                values[layer.layer, term.index] = stacked[..., term.columns]
    return values, dict(sorted(losses.items()))


def propagate(
    plan: Plan,
    e: torch.Tensor,
    slope: Callable[[int, torch.Tensor], torch.Tensor],
    values: Mapping[tuple[int, int], torch.Tensor],
    matrices: Mapping[str, torch.Tensor],
    weights: Sequence[torch.Tensor | None],
) -> dict[int, torch.Tensor]:
    """Every hidden delta ``d^i = F_i(terms) * f'(a^i)`` in dependency order, and ``d^L = e``.

    Args:
        plan: the rule's ``Plan``.
        e: the output error, (..., N, n_L).
        slope: ``slope(i, g) = g * f'(a^i)`` for the hidden layers ``i = 1..L-1``
            (``times_slope``).
        values: ``direct_values``'s direct terms.
        matrices: the fixed matrices by buffer name.
        weights: ``weights[i] = W^i`` (backprop terms read ``W^{i+1}``; index 0 unused).

    Each product term is an ``addmm`` onto the layer's running sum, so ``F_i``'s weights cost
    no separate pass: ``mean(direct, above)`` is ``addmm(eD, d B, beta=1/2, alpha=1/2)``.
    """
    d: dict[int, torch.Tensor] = {plan.hidden + 1: e}
    direct_only: dict[int, torch.Tensor] = {}
    for layer in plan.layers:
        i = layer.layer
        # The layer's F_i is ``scale * total``.
        total: torch.Tensor | None = None
        scale = 1.0
        for term in layer.values:
            value = values[i, term.index]
            if total is None:
                total, scale = value, term.coefficient
            elif term.coefficient == 1.0:
                total, scale = torch.add(value, total, alpha=scale), 1.0
            else:
                total, scale = total.mul(scale).add_(value, alpha=term.coefficient), 1.0
        for term in layer.products:
            j = term.source
            if term.final:
                source = d[j]
            else:
                if j not in direct_only:
                    direct_only[j] = slope(j, values[j, plan.direct_term[j]])
                source = direct_only[j]
            matrix = weights[j] if term.kind == "backprop" else matrices[term.buffer]
            if total is None:
                total, scale = _mm(source, matrix), term.coefficient
            else:
                total = _addmm(total, source, matrix, beta=scale, alpha=term.coefficient)
                scale = 1.0
        d[i] = slope(i, total) if scale == 1.0 else slope(i, total).mul_(scale)
    return dict(sorted(d.items()))
