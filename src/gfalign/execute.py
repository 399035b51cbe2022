"""Executing a rule's plan on one forward pass: every delta ``d^i``, in dependency order.

``deltas_of`` is the whole of it: the output error, the direct values of every layer (one
product per batch-wide signal, ``direct_values``), then each layer's products and its
``F_i`` (``propagate``), ``d^i = F_i(terms) * f'(a^i)``. It reads the plan's typed operations
(``gfalign.plan``) and the rule's feedback state; it writes nothing but the deltas, so the
updates (``gfalign.updates``) are a step of their own.

Every function here is written for any leading batch dimensions: a single network's tensors
(N, n) and matrices (rows, cols), or stacked members' (K, N, n) and (K, rows, cols)
(``gfalign.ensemble``), so both run the same mechanism.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.func import vjp

from gfalign.blocks import LINEAR, forward_mode
from gfalign.network import IDENTITY, OBJECTIVES, Activation
from gfalign.network import tanh as network_tanh
from gfalign.plan import (
    GraphAbove,
    GraphBelow,
    PartProduct,
    Plan,
    ProjectLocal,
    Slot,
    TiledProduct,
)
from gfalign.rules import ConfigError
from gfalign.terms import SIGNALS

__all__ = ["Step", "deltas_of", "direct_values", "propagate", "times_slope"]


@dataclass(frozen=True)
class Step:
    """What one call of the rule computed for a batch.

    Attributes:
        loss: the batch-mean loss of the network's output (0-d tensor; stacked: (K,)).
        deltas: ``deltas[i]`` is ``d^i`` (shape (N, *a^i's shape)) for ``i = 1..L``;
            ``deltas[L]`` is ``e``.
        auxiliary_losses: ``{i: loss}`` of the auxiliary classifiers of layers using ``e^i``.
    """

    loss: torch.Tensor
    deltas: dict[int, torch.Tensor]
    auxiliary_losses: dict[int, torch.Tensor]


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mm(a, b) if a.dim() == 2 else torch.bmm(a, b)


def addmm(
    c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: float, alpha: float
) -> torch.Tensor:
    if a.dim() == 2:
        return torch.addmm(c, a, b, beta=beta, alpha=alpha)
    return torch.baddbmm(c, a, b, beta=beta, alpha=alpha)


def addmm_(
    c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, alpha: float, beta: float = 1.0
) -> torch.Tensor:
    """``c <- beta c + alpha a @ b`` in place."""
    if a.dim() == 2:
        return c.addmm_(a, b, beta=beta, alpha=alpha)
    return c.baddbmm_(a, b, beta=beta, alpha=alpha)


class Through:
    """The products of one forward pass that are not matrix products: a block's part with
    feedback (or its own) parameters, a tail's linearisation at the forward point."""

    def __init__(
        self,
        net,
        cache,
        structure,
        buffers: Mapping[str, torch.Tensor],
        slots: Mapping[tuple[int, int], Slot],
    ):
        self.blocks, self.cache, self.structure = net.blocks, cache, structure
        self.buffers, self.slots = buffers, slots
        self.edges = net.edges
        self._pullbacks: dict[int, Callable] = {}
        self._pulled: dict[int, tuple] = {}  # the last signal pulled back through each edge
        self._fed: dict[tuple, tuple] = {}  # (consumer, feedback) -> (signal, its product)
        self._own: dict[int, torch.Tensor] = {}  # J_phi_c(theta_c)^T d^c, shared by producers

    def tail_back(self, i: int, g: torch.Tensor) -> torch.Tensor:
        """``J_tau_i^T g``: from ``h^i``'s shape to ``a^i``'s."""
        if self.structure[i - 1].plain_tail:
            return g
        return self.blocks[i - 1].tail.vjp(self.cache.tails[i - 1], g)

    def tail_forward(self, i: int, v: torch.Tensor) -> torch.Tensor:
        """``J_tau_i v``: from ``a^i``'s shape to ``h^i``'s."""
        if self.structure[i - 1].plain_tail:
            return v
        return self.blocks[i - 1].tail.jvp(self.cache.tails[i - 1], v)

    def edge_back(self, c: int, i: int, g: torch.Tensor) -> torch.Tensor:
        """``J_{G_c, h^i}^T g``: a signal at block ``c``'s input back to producer ``i``'s
        output, through the edge's linearisation at the forward point (summed where the edge
        reads ``h^i`` more than once)."""
        shape = self.structure[c - 1]
        if shape.plain_input or self.edges[c - 1].function is None:
            return g  # it reads h^i itself
        if c not in self._pullbacks:
            edge = self.edges[c - 1]
            primals = [self.cache.post[p] for p in edge.producers]
            self._pullbacks[c] = vjp(edge.function, *primals)[1]
        pulled = self._pulled.get(c)
        if pulled is None or pulled[0] is not g:  # one pullback per signal, for every producer
            pulled = self._pulled[c] = (g, self._pullbacks[c](g))
        parts = pulled[1]
        total = None
        for p, part in zip(shape.producers, parts, strict=True):
            if p == i:
                total = part if total is None else total + part
        return total

    def edge_forward(self, c: int, tangents: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """``J_{G_c}`` applied to every producer's signal at once (zero for the input): the
        signal at block ``c``'s input."""
        shape = self.structure[c - 1]
        if shape.plain_input or self.edges[c - 1].function is None:
            return tangents[shape.producers[0]]
        edge = self.edges[c - 1]
        primals = tuple(self.cache.post[p] for p in edge.producers)
        directions = tuple(
            tangents[p] if p in tangents else torch.zeros_like(x)
            for p, x in zip(edge.producers, primals, strict=True)
        )
        return forward_mode(edge.function, primals, directions)

    def parameters_for(self, layer: int, index: int, block: int, names) -> dict:
        """The parameters a term runs block ``block``'s part with: its feedback, in the
        parameters' own layout, or (``names`` empty) the forward ones."""
        if not names:
            return dict(self.blocks[block - 1].linear.named_parameters())
        key = (layer, index, block) if (layer, index, block) in self.slots else (layer, index)
        slot = self.slots[key]
        return {name: slot.parameter(self.buffers[buffer]) for name, buffer in names}

    def graph_above(self, layer: int, op: GraphAbove, sources) -> torch.Tensor:
        total = None
        for (c, names), s in zip(op.consumers, sources, strict=True):
            graph = self.cache.graphs.get(c) if self.cache.graphs else None
            if not names and c in self._own:  # the forward parameters': one product a step
                g = self._own[c]
            elif not names and graph is not None:  # with block c's own update, at once
                g = self._own[c] = graph.pull(s, inputs=True)[1]
            elif (c, names) in self._fed and self._fed[c, names][0] is s:
                g = self._fed[c, names][1]  # the consumer's shared draw on the same signal
            else:
                params = self.parameters_for(layer, op.index, c, names)
                g = None if graph is None else graph.feedback_vjp(params, s)
                if g is None:
                    run = self.structure[c - 1].products.input_vjp
                    g = self._guarded(layer, op, c, run, params, self.cache.input(c), s)
                if not names:
                    self._own[c] = g
                else:
                    self._fed[c, names] = (s, g)
            g = self.edge_back(c, layer, g)
            total = g if total is None else total + g
        return self.tail_back(layer, total)

    def graph_below(self, layer: int, op: GraphBelow, sources) -> torch.Tensor:
        carried = {p: self.tail_forward(p, s) for p, s in zip(op.producers, sources, strict=True)}
        signal = self.edge_forward(layer, carried)
        params = self.parameters_for(layer, op.index, layer, op.parameters)
        run = self.structure[layer - 1].products.input_jvp
        return self._guarded(layer, op, layer, run, params, self.cache.input(layer), signal)

    def _guarded(self, layer: int, op, block: int, run, params, point, signal) -> torch.Tensor:
        """``run(part, params, point, signal)`` for block ``block``'s part, or a
        ``ConfigError`` naming the layer, the term and the block where the part cannot."""
        part = self.blocks[block - 1].linear
        try:
            return run(part, params, point, signal)
        except RuntimeError as problem:
            raise ConfigError(
                f"layer {layer}, term {op.index} ({op.kind}): block {block}'s "
                f"{type(part).__name__} cannot run it: {str(problem).splitlines()[0]}"
            ) from None

    def tiled(self, layer: int, op: TiledProduct, e: torch.Tensor) -> torch.Tensor:
        """``J_tau_{j-1}^T J_phi_j(K)^T tile(e)`` for ``j = op.block``: ``e`` (..., N, n_out)
        repeated over every position of ``a^j`` (n_out channels in place of its own), run back
        through block ``j``'s part with the kernel ``K``, then through block ``j - 1``'s tail."""
        j = op.block
        block, shape = self.blocks[j - 1], self.structure[j - 1]
        positions = shape.pre[1:]  # a conv's (H, W)
        signal = e.reshape(*e.shape, *(1 for _ in positions)).expand(*e.shape, *positions)
        slot = self.slots[layer, op.index]
        params = {name: slot.parameter(self.buffers[buffer]) for name, buffer in op.parameters}
        try:
            back = shape.products.input_vjp(
                block.linear, params, self.cache.input(j), signal.contiguous()
            )
        except RuntimeError as problem:
            raise ConfigError(
                f"layer {layer}, term {op.index} (tiled): block {j}'s "
                f"{type(block.linear).__name__} cannot run it: {str(problem).splitlines()[0]}"
            ) from None
        return self.tail_back(j - 1, back)

    def term(self, layer: int, op: PartProduct, source: torch.Tensor) -> torch.Tensor:
        """The value of a part product of hidden layer ``layer`` on ``source`` (the delta it
        reads); a ``ConfigError`` naming the layer, the term and the block if the block's part
        cannot take it."""
        try:
            return self._term(layer, op, source)
        except RuntimeError as problem:
            part = type(self.blocks[op.block - 1].linear).__name__
            raise ConfigError(
                f"layer {layer}, term {op.index} ({op.kind}): block {op.block}'s {part} cannot "
                f"run it: {str(problem).splitlines()[0]}"
            ) from None

    def _term(self, layer: int, op: PartProduct, source: torch.Tensor) -> torch.Tensor:
        j = op.block
        block, shape = self.blocks[j - 1], self.structure[j - 1]
        if op.transported:
            params = dict(block.linear.named_parameters())
        else:
            slot = self.slots[layer, op.index]
            params = {name: slot.parameter(self.buffers[buffer]) for name, buffer in op.parameters}
        point = self.cache.input(j)
        if not op.backward:  # block j's part on block j-1's tail's linearisation
            lower = j - 1
            signal = source
            if not self.structure[lower - 1].plain_tail:
                signal = self.blocks[lower - 1].tail.jvp(self.cache.tails[lower - 1], source)
            return shape.products.input_jvp(block.linear, params, point, signal)
        # block j's part backwards, then back through block j-1's tail
        return self.tail_back(j - 1, shape.products.input_vjp(block.linear, params, point, source))


# g * f'(a) in one pass by aten's kernels for autograd's own backward, where the activation is
# one of torch's (three passes otherwise: f'(a) = 1 - h * h is two, the product a third).
_FUSED_SLOPE: dict[Callable, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    network_tanh: lambda g, a, h: torch.ops.aten.tanh_backward(g, h),
    torch.tanh: lambda g, a, h: torch.ops.aten.tanh_backward(g, h),
    torch.sigmoid: lambda g, a, h: torch.ops.aten.sigmoid_backward(g, h),
    torch.relu: lambda g, a, h: torch.ops.aten.threshold_backward(g, a, 0),
    IDENTITY.function: lambda g, a, h: g.clone(),  # a new tensor, as every slope returns
}


def times_slope(
    activations: Sequence[Activation],
    pre: Sequence[torch.Tensor],
    post: Sequence[torch.Tensor],
) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """``slope(i, g) = g * f_i'(a^i)`` for a forward pass (``pre[i - 1] = a^i``).

    ``activations`` has one entry per block; ``post[i]`` must be ``f(a^i)`` (a forward cache's
    ``activated``). A new tensor every call; ``f'(a^i)`` itself is computed at most once per
    layer, where no fused kernel takes the product in one pass.
    """
    activations = tuple(activations)
    derivatives: dict[int, torch.Tensor] = {}

    def slope(i: int, g: torch.Tensor) -> torch.Tensor:
        function, a = activations[i - 1], pre[i - 1]
        fused = _FUSED_SLOPE.get(function.function)
        if fused is not None:
            return fused(g, a, post[i])
        if i not in derivatives:
            derivatives[i] = function.derivative(a, post[i])
        return g * derivatives[i]

    return slope


def _undropped(
    activations: Sequence[Activation],
    pre: Sequence[torch.Tensor],
    activated: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None],
) -> list[torch.Tensor]:
    """``f(a^i)`` before dropout for every masked block (the cache keeps the dropped values),
    so that ``f'(a^i)`` is the activation's own slope."""
    values = list(activated)
    for i, mask in enumerate(masks, start=1):
        if mask is not None and i < len(values):
            values[i] = activations[i - 1].function(pre[i - 1])
    return values


def _masked(
    slope: Callable[[int, torch.Tensor], torch.Tensor], masks: Sequence[torch.Tensor | None]
) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """``slope(i, g) * m^i``: dropout's mask ``m^i`` (0 or 1/(1-p), in ``a^i``'s shape) on
    every delta of block ``i``, final and direct-only (DESIGN.md section 11)."""

    def masked(i: int, g: torch.Tensor) -> torch.Tensor:
        mask = masks[i - 1]
        return slope(i, g) if mask is None else slope(i, g).mul_(mask)

    return masked


def _auxiliary_error(logits: torch.Tensor, labels: torch.Tensor):
    return OBJECTIVES["classification"].error(logits, labels)


def _against_prediction(logits: torch.Tensor, output: torch.Tensor):
    """The mean cross-entropy of ``softmax(logits)`` against the network's own prediction
    ``p = softmax(output)`` (held fixed), and its error ``softmax(logits) - p``."""
    p = torch.softmax(output, dim=-1)
    log_q = torch.log_softmax(logits, dim=-1)
    return (p * log_q).sum(-1).mean(-1).neg(), log_q.exp() - p


def direct_values(
    plan: Plan,
    e: torch.Tensor,
    direct: torch.Tensor,
    cache,
    target: torch.Tensor,
    through: Through,
) -> tuple[dict[tuple[int, int], torch.Tensor], dict[int, torch.Tensor]]:
    """``eps^i D^i`` of every direct term, keyed by (layer, term index), and auxiliary losses.

    Every term of a batch-wide signal (the output error ``e``, the one-hot target) is a column
    block of one product per signal, ``e @ D_stacked`` ((..., N, n_L) @ (..., n_L, sum n_i)),
    reshaped to its block's ``a^i``. An auxiliary term reads the layer's own logits
    ``flatten(h^i) (D^i)^T`` (DESIGN.md sections 4 and 9); its value ``e^i D^i`` in ``h^i``'s
    shape goes back through the block's tail. One that reads ``a^i`` has logits
    ``flatten(a^i) (D^i)^T`` and its value in ``a^i``'s shape, with no tail to go back through.
    """
    values: dict[tuple[int, int], torch.Tensor] = {}
    losses: dict[int, torch.Tensor] = {}
    stacked: dict[str, tuple[torch.Tensor, int]] = {}
    lead = e.shape[:-1]  # (N,) or (K, N)
    for name, columns in plan.signals:
        signal = SIGNALS[name].make(e, target, e.shape[-1])
        stacked[name] = (mm(signal, direct[..., columns]), columns.start)
    for layer in plan.layers:
        i = layer.layer
        pre = through.structure[i - 1].pre
        for op in layer.values:
            if isinstance(op, ProjectLocal):
                D = direct[..., op.columns]  # (..., n_L, numel(h^i)) or numel(a^i)
                if op.reads == "input":  # C^i on h^{i-1}; D^i takes its error to a^i
                    flat = cache.input(i).flatten(len(lead))
                    logits = mm(flat, through.buffers[op.classifier].transpose(-1, -2))
                    losses[i], e_i = _auxiliary_error(logits, target)
                    values[i, op.index] = mm(e_i, D).reshape(*lead, *through.structure[i - 1].pre)
                    continue
                h = cache.a(i) if op.reads == "pre" else cache.post[i]
                flat = h.flatten(len(lead))
                logits = mm(flat, D.transpose(-1, -2))
                if op.against == "prediction":
                    losses[i], e_i = _against_prediction(logits, cache.pre[-1])
                else:
                    losses[i], e_i = _auxiliary_error(logits, target)
                value = mm(e_i, D).view(h.shape)
                values[i, op.index] = value if op.reads == "pre" else through.tail_back(i, value)
            else:
                product, start = stacked[op.signal]
                value = product[..., op.columns.start - start : op.columns.stop - start]
                if len(pre) > 1:
                    value = value.reshape(*lead, *pre)
                values[i, op.index] = value
    return values, dict(sorted(losses.items()))


def propagate(
    plan: Plan,
    e: torch.Tensor,
    slope: Callable[[int, torch.Tensor], torch.Tensor],
    values: Mapping[tuple[int, int], torch.Tensor],
    matrices: Mapping[str, torch.Tensor],
    weights: Sequence[torch.Tensor | None],
    through: Through,
) -> dict[int, torch.Tensor]:
    """Every hidden delta ``d^i = F_i(terms) * f'(a^i)`` in dependency order, and ``d^L = e``.

    Args:
        plan: the rule's ``Plan``.
        e: the output error, (..., N, n_L).
        slope: ``slope(i, g) = g * f'(a^i)`` for the hidden layers (``times_slope``).
        values: ``direct_values``'s direct terms.
        matrices: the feedback parameters by buffer name.
        weights: ``weights[j] = W^j`` where block ``j`` is Linear (index 0 unused).
        through: the part products of this forward pass.

    Each matrix product is an ``addmm`` onto the layer's running sum, so ``F_i``'s weights
    cost no separate pass: ``mean(direct, above)`` is ``addmm(eD, d B, beta=1/2, alpha=1/2)``.
    A part product's value is added like a direct value.
    """
    d: dict[int, torch.Tensor] = {plan.hidden + 1: e}
    direct_only: dict[int, torch.Tensor] = {}

    def signal(j: int, final: bool) -> torch.Tensor:
        if final or j == plan.hidden + 1:
            return d[j]
        if j not in direct_only:
            direct_only[j] = slope(j, values[j, plan.direct_term[j]])
        return direct_only[j]

    for layer in plan.layers:
        i = layer.layer
        # The layer's F_i is ``scale * total``.
        total: torch.Tensor | None = None
        scale = 1.0

        def add(value: torch.Tensor, coefficient: float) -> None:
            nonlocal total, scale
            if total is None:
                total, scale = value, coefficient
            elif coefficient == 1.0:
                total, scale = torch.add(value, total, alpha=scale), 1.0
            else:
                total, scale = total.mul(scale).add_(value, alpha=coefficient), 1.0

        for op in layer.values:
            add(values[i, op.index], op.coefficient)
        for op in layer.products:
            if isinstance(op, GraphAbove):
                sources = [signal(c, op.final) for c, _ in op.consumers]
                add(through.graph_above(i, op, sources), op.coefficient)
                continue
            if isinstance(op, GraphBelow):
                sources = [signal(p, op.final) for p in op.producers]
                add(through.graph_below(i, op, sources), op.coefficient)
                continue
            if isinstance(op, TiledProduct):
                add(through.tiled(i, op, e), op.coefficient)
                continue
            j = op.source
            if op.final:
                source = d[j]
            else:
                if j not in direct_only:
                    direct_only[j] = slope(j, values[j, plan.direct_term[j]])
                source = direct_only[j]
            if isinstance(op, PartProduct):
                add(through.term(i, op, source), op.coefficient)
                continue
            if op.buffer:
                matrix = matrices[op.buffer]
            else:  # the forward weight W^block itself
                matrix = weights[op.weight_of]
                matrix = matrix.transpose(-1, -2) if op.forwards else matrix
            if total is None:
                total, scale = mm(source, matrix), op.coefficient
            else:
                total = addmm(total, source, matrix, beta=scale, alpha=op.coefficient)
                scale = 1.0
        d[i] = slope(i, total) if scale == 1.0 else slope(i, total).mul_(scale)
    return dict(sorted(d.items()))


def deltas_of(rule, net, cache, target: torch.Tensor) -> Step:
    """Run ``rule``'s plan on ``net``'s forward ``cache``: the loss, every delta and the
    auxiliary losses. ``target`` is the objective's (``Objective.target``)."""
    plan = rule.plan
    loss, e = net.objective.error(cache.pre[-1], target)
    activations = net.activations
    activated = cache.activated
    if cache.masks:  # dropout: the forward pass's mask multiplies the masked block's delta
        activated = _undropped(activations, cache.pre, activated, cache.masks)
    slope = times_slope(activations, cache.pre, activated)
    if cache.masks:
        slope = _masked(slope, cache.masks)
    buffers = rule.feedback_state(net)
    through = Through(net, cache, rule.structure, buffers, rule.slots)
    values, auxiliary_losses = direct_values(plan, e, buffers["direct"], cache, target, through)
    weights = [None] + [
        part.weight if shape.products is LINEAR else None
        for part, shape in zip(net.layers, rule.structure, strict=True)
    ]
    d = propagate(plan, e, slope, values, buffers, weights, through)
    return Step(loss, d, auxiliary_losses)
