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

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from gfalign import feedback as feedback_families
from gfalign.feedback import FeedbackSpec
from gfalign.network import MLP, OBJECTIVES
from gfalign.rules import ConfigError, RuleConfig, Term, resolve

__all__ = ["FeedbackRule", "Step"]


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
        self.sizes = tuple(int(n) for n in sizes)
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
        self.to(device=device, dtype=dtype)

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

    def check(self, net: MLP) -> None:
        """Refuse a network this rule was not built for."""
        if tuple(net.sizes) != self.sizes:
            raise ConfigError(
                f"rule {self.config.name!r} was built for sizes {list(self.sizes)}, the network "
                f"has {list(net.sizes)}"
            )
        if self.config.uses_auxiliary and not net.objective.uses_labels:
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
        self.check(net)
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
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.check(net)
        with torch.no_grad():
            cache = net.forward_cache(x)
            step = self._deltas(net, cache, x if not net.objective.uses_labels else target)
            scale = 1.0 / x.shape[0] if reduction == "mean" else 1.0
            for i, layer in enumerate(net.layers, start=1):
                d, h = step.deltas[i], cache.h(i - 1)
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

    def _deltas(self, net: MLP, cache, target: torch.Tensor) -> Step:
        hidden = len(self.sizes) - 2
        loss, e = net.objective.error(cache.pre[-1], target)
        derivative = net.activation.derivative
        slope = {i: derivative(cache.a(i), cache.h(i)) for i in range(1, hidden + 1)}

        # (N, sum of n_i over output-error direct terms): e reaches every such layer at once.
        projected: dict[tuple[int, int], torch.Tensor] = {}
        if self._output_width:
            stacked = e @ self.direct[:, : self._output_width]
        auxiliary_losses: dict[int, torch.Tensor] = {}
        for (i, k), place in self._matrices.items():
            if place.buffer != "direct":
                continue
            D = self.direct[:, place.columns]  # (n_L, n_i)
            if place.columns.stop <= self._output_width:
                projected[i, k] = stacked[:, place.columns]
            else:
                # Auxiliary classifier read off the layer's own activity (DESIGN.md section 4).
                auxiliary_losses[i], e_i = OBJECTIVES["classification"].error(
                    cache.h(i) @ D.t(), target
                )
                projected[i, k] = e_i @ D

        direct_only: dict[int, torch.Tensor] = {}

        def t(j: int) -> torch.Tensor:
            if j not in direct_only:
                k = next(
                    k for k, term in enumerate(self.config.layer(j).terms) if term.kind == "direct"
                )
                direct_only[j] = projected[j, k] * slope[j]
            return direct_only[j]

        d: dict[int, torch.Tensor] = {hidden + 1: e}
        for i in self._order:
            layer = self.config.layer(i)
            total: torch.Tensor | None = None
            for k, (term, weight) in enumerate(zip(layer.terms, layer.coefficients(), strict=True)):
                if term.kind == "direct":
                    value = projected[i, k]
                elif term.kind == "backprop":
                    value = d[i + 1] @ net.weight(i + 1)
                else:
                    j = i + 1 if term.kind == "above" else i - 1
                    if j == hidden + 1 or term.source == "final":
                        source = d[j]
                    else:
                        source = t(j)
                    value = source @ self.matrix(i, k)
                if total is None:
                    total = value * weight if weight != 1.0 else value
                else:
                    total = total.add(value, alpha=weight)
            d[i] = total * slope[i]
        return Step(loss, dict(sorted(d.items())), auxiliary_losses)

    def extra_repr(self) -> str:
        config = self.config
        return f"config={config.name!r}, sizes={list(self.sizes)}, feedback={config.feedback}"
