"""Multilayer perceptrons and the two objectives of the paper.

Row convention, as in PyTorch (DESIGN.md section 2): for a batch ``X`` of shape (N, n_0)

    a^i = h^{i-1} (W^i)^T + b^i,    h^i = f(a^i) for i < L,    h^0 = X,

and the output is ``g(a^L)`` with ``g`` the softmax (classification) or the logistic sigmoid
(autoencoder). ``W^i`` has shape (n_i, n_{i-1}) like ``torch.nn.Linear.weight``.

Dropout (DESIGN.md section 11) multiplies the input by a mask ``m^0`` and each hidden
activation by a mask ``m^i`` in the shape of ``a^i``, inverted-dropout scaled:

    h^0 = m^0 * X,    h^i = m^i * f(a^i),    m^i_j = 1/(1 - p) with probability 1 - p, else 0,

in training mode only (``net.train()``; ``net.eval()`` applies no mask). The masks are
counter-based: a training-mode forward pass draws them from a generator seeded by the model's
seed and its step counter ``dropout_step`` (a buffer, checkpointed with the weights), then
advances the counter, so the masks of any step can be drawn again (``dropout_at``) and a
resumed run draws the masks it would have drawn.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional

from gfalign.blocks import GENERIC, Block, PartGraph, check_dropout_rate, linear_products

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "Network",
    "activation_named",
    "initialise",
    "mlp",
    "BIAS_INITS",
    "IDENTITY",
    "OBJECTIVES",
    "WEIGHT_INITS",
    "Activation",
    "DropoutState",
    "ForwardCache",
    "Objective",
    "dropout_generator",
    "dropout_mask",
    "widths",
]


@dataclass(frozen=True)
class Activation:
    """A hidden nonlinearity ``f`` and its derivative.

    ``derivative(a, h)`` receives both the pre-activation ``a`` and the activation ``h = f(a)``
    so that tanh and sigmoid reuse ``h`` instead of evaluating ``f`` again.
    """

    name: str
    function: Callable[[torch.Tensor], torch.Tensor]
    derivative: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    module: type[nn.Module] = nn.Identity


def tanh(a: torch.Tensor) -> torch.Tensor:
    """``tanh(a)``, as ``2 sigmoid(2a) - 1`` on the CPU.

    PyTorch's CPU sigmoid kernel is several times faster than its tanh kernel (at 128 x 800,
    float32, on two cores: 57 us against 135 us, the largest cost of a step besides the matrix
    products), and the identity is exact up to rounding: at most 2e-7 from ``torch.tanh`` in
    float32, 4e-16 in float64. Elsewhere (CUDA) ``torch.tanh`` is the faster of the two.
    """
    if not a.is_cpu:
        return torch.tanh(a)
    s = torch.sigmoid(a * 2.0)
    if s.requires_grad:  # autograd keeps sigmoid's output for its backward: no in-place ops
        return s * 2.0 - 1.0
    return s.mul_(2.0).sub_(1.0)


def _ones_like(a: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(a)


IDENTITY = Activation("identity", lambda a: a, _ones_like, nn.Identity)
"""No nonlinearity (f(a) = a): a block whose linear part feeds the next directly."""

ACTIVATIONS: dict[str, Activation] = {
    activation.name: activation
    for activation in (
        Activation("tanh", tanh, lambda a, h: 1.0 - h * h, nn.Tanh),
        Activation("sigmoid", torch.sigmoid, lambda a, h: h * (1.0 - h), nn.Sigmoid),
        Activation("relu", torch.relu, lambda a, h: (a > 0).to(a.dtype), nn.ReLU),
    )
}
"""The hidden nonlinearities by name, each with its derivative and its ``torch.nn`` module (a
user's ``nn.Tanh`` after a linear part is read as this table's ``tanh``)."""

ACTIVATION_MODULES: dict[type[nn.Module], Activation] = {
    activation.module: activation for activation in ACTIVATIONS.values()
}
"""``ACTIVATIONS`` by their ``torch.nn`` module type."""


def activation_named(name: str, where: str = "activation") -> Activation:
    """``identity`` (or ``none``) or one of ``ACTIVATIONS``, else a ``ConfigError`` naming the
    known ones.

    Example:
        >>> activation_named("tanh").module
        <class 'torch.nn.modules.activation.Tanh'>
    """
    from gfalign.rules import ConfigError

    if name in ("identity", "none"):
        return IDENTITY
    if name not in ACTIVATIONS:
        known = [*ACTIVATIONS, "identity"]
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}: unknown activation {name!r}{hint}; known: {', '.join(known)}")
    return ACTIVATIONS[name]


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of softmax(logits) and ``e = softmax(logits) - onehot(labels)``.

    Stacked members (``MLP.stack``) give logits (K, N, C) and labels (K, N): the loss is then
    every member's own, (K,).
    """
    if logits.dim() == 3:
        log_probabilities = torch.log_softmax(logits, dim=-1)
        index = labels.unsqueeze(-1)  # (K, N, 1)
        loss = log_probabilities.gather(-1, index).squeeze(-1).mean(dim=-1).neg_()
        error = log_probabilities.exp_()
        error.sub_(functional.one_hot(labels, logits.shape[-1]))
        return loss, error
    log_probabilities = torch.log_softmax(logits, dim=1)
    loss = functional.nll_loss(log_probabilities, labels)
    error = log_probabilities.exp_()
    # e[n, y_n] -= 1 in one kernel (an arange index costs four: arange, index, sub, index_put).
    minus_one = error.new_full((1, 1), -1.0).expand(len(labels), 1)
    error.scatter_add_(1, labels.unsqueeze(1), minus_one)
    return loss, error


def _squared_reconstruction(
    logits: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Half the squared error of sigmoid(logits) against ``target``, summed over units.

    ``e = (x_hat - x) * x_hat * (1 - x_hat)``: the paper's autoencoder error. It is the exact
    gradient of ``0.5 * ||x_hat - x||^2``; the paper writes the loss without the 1/2 and drops the
    factor 2 in ``e``, so the loss reported here carries the 1/2 to keep ``e`` its gradient.
    """
    reconstruction = torch.sigmoid(logits)
    difference = reconstruction - target
    per_example = 0.5 * difference.square().sum(dim=-1)
    loss = per_example.mean() if logits.dim() == 2 else per_example.mean(dim=-1)  # stacked: (K,)
    error = difference.mul_(reconstruction).mul_(1.0 - reconstruction)
    return loss, error


@dataclass(frozen=True)
class Objective:
    """The output nonlinearity ``g`` and the loss whose gradient w.r.t. ``a^L`` is ``e``.

    ``error(logits, target)`` returns ``(loss, e)``: the batch-mean loss (a 0-d tensor) and the
    output error ``e = dL_n/da^L_n`` for every example ``n`` (shape (N, n_L)). ``target`` is the
    labels (N,) for classification and the input itself (N, n_0) for the autoencoder.
    """

    name: str
    output: Callable[[torch.Tensor], torch.Tensor]
    error: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    uses_labels: bool

    def target(self, x: torch.Tensor, labels: torch.Tensor, *, stacked: bool = False):
        """What ``error`` compares the logits with: the labels, or (an autoencoder) the input
        itself, one flat row per example (stacked members: (K, N, n))."""
        if self.uses_labels:
            return labels
        return x.flatten(2 if stacked else 1)


OBJECTIVES: dict[str, Objective] = {
    "classification": Objective(
        "classification", lambda a: torch.softmax(a, dim=1), _cross_entropy, uses_labels=True
    ),
    "autoencoder": Objective("autoencoder", torch.sigmoid, _squared_reconstruction, False),
}


@dataclass(frozen=True)
class ForwardCache:
    """What a forward pass leaves for the feedback rules.

    ``pre[i]`` is ``a^{i+1}`` (shape (N, n_{i+1})) for ``i = 0..L-1``, so ``pre[-1]`` is the output
    logits; ``post[i]`` is ``h^i`` for ``i = 0..L-1`` with ``post[0]`` the input. Both follow the
    paper's 1-based layer numbers through ``a(i)`` and ``h(i)``. For a model of blocks,
    ``tails[i]`` is the state of block ``i + 1``'s tail at this point (``gfalign.blocks.Tail``)
    and ``activated[i]`` is ``f(a^i)`` before its tail (``activated[0]`` the input); both are
    empty for an ``MLP``, whose tails are the identity (``f(a^i) = h^i``).

    Under dropout (a training-mode pass with a rate above 0), ``masks[i - 1]`` is block ``i``'s
    mask ``m^i`` (values 0 or 1/(1 - p), in ``a^i``'s shape; stacked members: (K, N, ...)) or
    ``None`` where block ``i`` drops nothing (always the output block), for ``i = 1..L``; a
    feedback rule multiplies that block's delta by it: ``d^i = F_i * f'(a^i) * m^i``. ``post``
    and ``activated`` then hold the dropped values, ``h^i = tau_i(m^i * f(a^i))`` (so weight
    gradients ``(d^{i+1})^T h^i`` see the mask, and ``f'(a^i)`` must be computed from ``a^i``,
    not from them), and ``post[0]`` is the input times its own mask. ``masks`` is empty when no
    block draws a mask (evaluation mode, every rate 0, or dropout on the input only).
    """

    pre: list[torch.Tensor]
    post: list[torch.Tensor]
    tails: tuple = ()
    activated: tuple = ()
    masks: tuple = ()
    inputs: tuple = ()
    graphs: Mapping[int, PartGraph] = field(default_factory=dict)

    def a(self, layer: int) -> torch.Tensor:
        return self.pre[layer - 1]

    def input(self, block: int) -> torch.Tensor:
        """``x^i``, what block ``i``'s part read: ``h^{i-1}`` on a chain, its edge's value on a
        graph (``inputs[i - 1]``, see ``Edge``)."""
        return self.inputs[block - 1] if self.inputs else self.post[block - 1]

    def h(self, layer: int) -> torch.Tensor:
        return self.post[layer]


WEIGHT_INITS = ("xavier_uniform", "xavier_normal", "default")
BIAS_INITS = ("normal", "zeros", "default")


def widths(sizes: Iterable[int]) -> tuple[int, ...]:
    """``sizes`` as a tuple of ints >= 1; a ``ValueError`` otherwise.

    A string, a float, a bool or a width below 1 is refused, never converted (``"32"`` is not a
    network of widths 3 and 2).
    """
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Iterable):
        raise ValueError(f"sizes must be a list of integer widths >= 1, got {sizes!r}")
    sizes = list(sizes)
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ValueError(
                f"sizes must be a list of integer widths >= 1, got {sizes!r} (entry {size!r})"
            )
    return tuple(int(size) for size in sizes)


def _lookup(table: dict, key: str, what: str):
    try:
        return table[key]
    except (KeyError, TypeError):
        raise ValueError(f"unknown {what} {key!r}; known: {', '.join(sorted(table))}") from None


# -------------------------------------------------------------------------------- dropout

_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    """SplitMix64's output function: a bijection of 64-bit integers that scatters neighbours."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def dropout_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of training step ``step``'s masks for a model of seed ``seed``.

    Its seed is a hash of the pair alone (two rounds of SplitMix64), so the masks of any step can
    be drawn again, in any order, and neighbouring steps or seeds give unrelated streams. The CPU
    generator keys on the low 32 bits of its seed, so two pairs may share their masks by chance,
    about once in 2^32.

    Example:
        >>> a = torch.rand(3, generator=dropout_generator(0, 7))
        >>> torch.equal(a, torch.rand(3, generator=dropout_generator(0, 7)))
        True
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(_splitmix64(_splitmix64(seed) ^ step))
    return generator


def dropout_mask(
    shape: Sequence[int],
    rate: float,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """An inverted-dropout mask of ``shape``: ``1/(1 - rate)`` where a uniform draw is at least
    ``rate`` (probability ``1 - rate``), else 0, on the generator's device.

    The uniforms are drawn in float64 whatever ``dtype`` is, so a float32 and a float64 model
    drop the same units.

    Example:
        >>> mask = dropout_mask((2, 3), 0.5, dropout_generator(0, 0), torch.float64)
        >>> sorted(set(mask.flatten().tolist())) in ([0.0, 2.0], [0.0], [2.0])
        True
    """
    uniform = torch.rand(
        tuple(shape), generator=generator, dtype=torch.float64, device=generator.device
    )
    return (uniform >= rate).to(dtype).mul_(1.0 / (1.0 - rate))


class StepMasks:
    """One training step's masks, drawn in the order asked from each member's own generator."""

    def __init__(self, generators: list[torch.Generator], stacked: bool) -> None:
        self.generators, self.stacked = generators, stacked

    def draw(self, rate: float, like: torch.Tensor) -> torch.Tensor | None:
        """A mask for ``like`` (stacked members: (K, N, ...), each member's its own), or
        ``None`` for rate 0, which draws nothing."""
        if rate == 0:
            return None
        if not self.stacked:
            return dropout_mask(like.shape, rate, self.generators[0], like.dtype)
        return torch.stack(
            [dropout_mask(like.shape[1:], rate, g, like.dtype) for g in self.generators]
        )


class DropoutState(nn.Module):
    """The dropout state an ``MLP`` and a ``gfalign.models.BlockNet`` share.

    Attributes:
        dropout_input: the input's rate p_0.
        dropout_rates: block ``i``'s rate at index ``i - 1``, ``i = 1..L`` (the output's is 0).
        dropout_seed: the seed of the masks (stacked members: one per member).
        dropout_step: the step counter, an int64 buffer ((K,) for stacked members). It is in
            ``state_dict`` when a rate is above 0, and stays on the CPU whatever device the
            model moves to: it seeds generators on the host, so reading it costs no device
            round trip.
    """

    def _setup_dropout(
        self, input_rate: float, rates: Sequence[float], seed: int | tuple[int, ...]
    ) -> None:
        self.dropout_input = check_dropout_rate(input_rate, "dropout_input")
        self.dropout_rates = tuple(rates)
        self.dropout_seed = seed
        self._pinned_step: int | tuple[int, ...] | None = None
        shape = (len(seed),) if isinstance(seed, tuple) else ()
        self.register_buffer(
            "dropout_step",
            torch.zeros(shape, dtype=torch.int64),
            persistent=self.dropout_active,
        )

    @property
    def dropout_active(self) -> bool:
        """Whether any rate is above 0 (training-mode passes then draw masks)."""
        return self.dropout_input > 0 or any(rate > 0 for rate in self.dropout_rates)

    @contextlib.contextmanager
    def dropout_at(self, step: int | Sequence[int]) -> Iterator[DropoutState]:
        """Within the block, every training-mode forward pass draws the masks of training step
        ``step`` and leaves ``dropout_step`` as it is; for stacked members ``step`` is one step
        for all or one per member.

        Example:
            >>> net = mlp([4, 3, 2], dropout_hidden=0.5, seed=0)
            >>> x = torch.rand(5, 4)
            >>> with net.dropout_at(3):
            ...     first, again = net.forward_cache(x), net.forward_cache(x)
            >>> torch.equal(first.masks[0], again.masks[0]), int(net.dropout_step)
            (True, 0)
        """
        members = len(self.dropout_seed) if isinstance(self.dropout_seed, tuple) else 0
        steps = [step] * (members or 1) if isinstance(step, numbers.Integral) else list(step)
        if (
            len(steps) != (members or 1)
            or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in steps)
            or min(steps) < 0
        ):
            wanted = f"or {members} of them, one per member" if members else "only"
            raise ValueError(f"dropout_at takes a step >= 0 ({wanted}), got {step!r}")
        previous = self._pinned_step
        self._pinned_step = tuple(int(s) for s in steps) if members else int(steps[0])
        try:
            yield self
        finally:
            self._pinned_step = previous

    def _step_masks(self) -> StepMasks | None:
        """The masks of this training-mode pass (advancing the counter unless it is pinned);
        ``None`` in evaluation mode or when every rate is 0, so nothing is drawn or changed."""
        if not self.training or not self.dropout_active:
            return None
        steps = self._pinned_step
        if steps is None:
            steps = self.dropout_step.tolist()
            self.dropout_step.add_(1)
        device = next(self.parameters()).device
        if isinstance(self.dropout_seed, tuple):
            generators = [
                dropout_generator(seed, step, device)
                for seed, step in zip(self.dropout_seed, steps, strict=True)
            ]
            return StepMasks(generators, stacked=True)
        return StepMasks([dropout_generator(self.dropout_seed, steps, device)], stacked=False)

    def _apply(self, fn, recurse=True):
        counter = self._buffers.get("dropout_step")
        module = super()._apply(fn, recurse)
        if counter is not None:
            self._buffers["dropout_step"] = counter  # stays on the CPU (see the class docstring)
        return module


def apply_mask(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``h * mask``, or ``h`` itself when nothing is dropped (no operation, no rounding)."""
    return h if mask is None else h * mask


def _stacked_affine(layer: nn.Linear, h: torch.Tensor) -> torch.Tensor:
    """``h W^T + b`` for stacked members: (K, N, n_in) -> (K, N, n_out), W (K, n_out, n_in)."""
    return torch.baddbmm(layer.bias.unsqueeze(1), h, layer.weight.transpose(1, 2))


@dataclass(frozen=True)
class Edge:
    """How a block of a model graph reads its input (DESIGN.md section 12).

    ``x^c = function(h^{p_1}, ..., h^{p_m})`` for ``producers = (p_1, ..., p_m)`` (0 is the
    network's input), ``function`` a parameter-free module (a traced piece of the user's
    model: a residual ``+``, a ``torch.cat``, a relu after an addition); ``None`` reads
    ``h^{p_1}`` itself.
    """

    producers: tuple[int, ...]
    function: nn.Module | None = None


class Network(DropoutState):
    """A network of blocks (DESIGN.md section 9); the last block's linear part gives the logits.

    Block ``i`` is a linear part ``phi_i`` (any module with parameters), an element-wise
    activation ``f_i`` and a parameter-free tail ``tau_i``:

        a^i = phi_i(h^{i-1}; theta_i),    h^i = tau_i(f_i(a^i)),    logits = a^L.

    An MLP is the chain of ``nn.Linear`` blocks with identity tails (``mlp``); a conv net or a
    user's ``nn.Sequential`` is built by ``gfalign.models``. ``forward`` is plain PyTorch,
    differentiable by autograd (the reference every rule is tested against);
    ``forward_cache`` keeps every ``a^i``, ``h^i`` and each tail's linearisation state for the
    rules.

    Args:
        blocks: the blocks in order; the last has no tail, and its activation is the
            objective's output (softmax or sigmoid). Each block's ``dropout`` rate drops units
            of its activation ``f(a^i)`` in training mode, before its tail.
        objective: ``"classification"`` or ``"autoencoder"``.
        input_shape: the shape of one example the first block receives, e.g. ``(1, 32, 32)``.
        dropout_input: the rate at which input units are dropped in training mode.
        seed: seeds the dropout masks (``DropoutState``).
        edges: for a model graph, how each block reads its input (``Edge``, one per block);
            ``None``, a chain: block ``i`` reads ``h^{i-1}``.

    Attributes:
        pre_shapes, post_shapes: the shape of one example's ``a^i`` and ``h^i`` (i = 1..L;
            ``post_shapes[0]`` is the input's).
        stack_size: K for a network of K stacked members (``Network.stack``), else 0.

    Example:
        >>> from gfalign.blocks import Block
        >>> net = Network([Block(nn.Linear(4, 3), ACTIVATIONS["tanh"]), Block(nn.Linear(3, 2),
        ...                IDENTITY)], input_shape=(4,))
        >>> net(torch.zeros(5, 4)).shape, net.sizes
        (torch.Size([5, 2]), (4, 3, 2))
    """

    def __init__(
        self,
        blocks: Sequence[Block],
        objective: str = "classification",
        *,
        input_shape: Sequence[int],
        dropout_input: float = 0.0,
        seed: int | tuple[int, ...] = 0,
        edges: Sequence[Edge] | None = None,
    ) -> None:
        from gfalign.rules import ConfigError

        super().__init__()
        self.edges = None if edges is None else tuple(edges)
        if self.edges is not None:
            if len(self.edges) != len(blocks):
                raise ConfigError(
                    f"{len(self.edges)} edges for {len(blocks)} blocks: give one each"
                )
            for c, edge in enumerate(self.edges, start=1):
                if not edge.producers or not all(0 <= p < c for p in edge.producers):
                    raise ConfigError(
                        f"block {c} reads blocks {list(edge.producers)}; allowed: earlier blocks "
                        f"(0 to {c - 1}, 0 the input), in topological order"
                    )
            self.edge_functions = nn.ModuleList(
                edge.function for edge in self.edges if edge.function is not None
            )
        blocks = tuple(blocks)
        if not blocks:
            raise ConfigError("a model needs at least one block")
        if blocks[-1].tail.modules:
            raise ConfigError(
                f"block {len(blocks)} is the output block: it has no tail, its output is the logits"
            )
        if blocks[-1].dropout:
            raise ConfigError(
                f"block {len(blocks)} is the output block: its logits are never dropped; "
                "allowed: dropout = 0 there"
            )
        if objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
        self.objective = OBJECTIVES[objective]
        self.layers = nn.ModuleList(block.linear for block in blocks)
        self.tails = nn.ModuleList(nn.Sequential(*block.tail.modules) for block in blocks)
        self.activations = tuple(block.activation for block in blocks)
        self._tails = tuple(block.tail for block in blocks)
        self.input_shape = tuple(int(n) for n in input_shape)
        self.seed = seed
        self.stack_size = len(seed) if isinstance(seed, tuple) else 0
        self._setup_dropout(dropout_input, [block.dropout for block in blocks], seed)
        self.pre_shapes, self.post_shapes = self._shapes()
        self._register_load_state_dict_pre_hook(_renamed_parts)

    @property
    def blocks(self) -> tuple[Block, ...]:
        return tuple(
            Block(part, activation, tail, dropout)
            for part, activation, tail, dropout in zip(
                self.layers, self.activations, self._tails, self.dropout_rates, strict=True
            )
        )

    @property
    def depth(self) -> int:
        """``L``, the number of blocks (weight layers; hidden blocks are 1..L-1)."""
        return len(self.layers)

    @property
    def is_graph(self) -> bool:
        """Some block reads other than the block before it (``Edge``): a model graph."""
        return self.edges is not None and any(
            edge.producers != (c - 1,) or edge.function is not None
            for c, edge in enumerate(self.edges, start=1)
        )

    @property
    def is_chain_of_linear(self) -> bool:
        """Every block is an ``nn.Linear`` part with an identity tail, in a chain (an MLP):
        the case that stacks (``Network.stack``) and has ``sizes``."""
        return (
            not self.is_graph
            and all(type(part) is nn.Linear for part in self.layers)
            and not any(tail.modules for tail in self._tails)
        )

    def block_input(self, block: int, post: Sequence[torch.Tensor]) -> torch.Tensor:
        """``x^c`` from the outputs ``post[i] = h^i`` so far: the edge's value on a graph."""
        if self.edges is None:
            return post[block - 1]
        edge = self.edges[block - 1]
        if edge.function is None:
            return post[edge.producers[0]]
        return edge.function(*(post[p] for p in edge.producers))

    @property
    def sizes(self) -> tuple[int, ...]:
        """An MLP's widths ``(n_0, n_1, ..., n_L)``; a ``ValueError`` for other models."""
        if not self.is_chain_of_linear or len(self.input_shape) != 1:
            raise ValueError("only a chain of Linear blocks (an MLP) has sizes")
        return (self.input_shape[0], *(shape[0] for shape in self.pre_shapes))

    @property
    def activation(self) -> Activation:
        """The hidden blocks' activation, where they share one (identity without hidden
        blocks); a ``ValueError`` where they differ."""
        hidden = set(self.activations[:-1])
        if len(hidden) > 1:
            raise ValueError("the hidden blocks have different activations; see .activations")
        return next(iter(hidden), IDENTITY)

    @property
    def dropout_hidden(self) -> float:
        """The first hidden block's dropout rate (every hidden block's, in an MLP)."""
        return self.dropout_rates[0] if len(self.dropout_rates) > 1 else 0.0

    def weight(self, layer: int) -> torch.Tensor:
        """``W^i`` for the 1-based layer number ``i``; shape (n_i, n_{i-1}) in an MLP."""
        return self.layers[layer - 1].weight

    def bias(self, layer: int) -> torch.Tensor:
        return self.layers[layer - 1].bias

    def _shapes(self) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
        from gfalign.rules import ConfigError

        parameter = next(self.parameters(), None)
        dtype = parameter.dtype if parameter is not None else torch.get_default_dtype()
        device = parameter.device if parameter is not None else None
        lead = (self.stack_size, 1) if self.stack_size else (1,)
        # A probe of one example in evaluation mode: no normalisation statistic moves.
        modes = {module: module.training for module in self.modules()}
        try:
            self.eval()
            x = torch.zeros(*lead, *self.input_shape, dtype=dtype, device=device)
            cache = self._cache(x, None)
        except RuntimeError as problem:
            raise ConfigError(
                f"the blocks do not fit an input of shape {list(self.input_shape)}: "
                f"{str(problem).splitlines()[0]}"
            ) from None
        finally:
            for module, training in modes.items():
                module.train(training)
        start = len(lead)
        return (
            tuple(tuple(a.shape[start:]) for a in cache.pre),
            tuple(tuple(h.shape[start:]) for h in cache.post),
        )

    def _affine(self, part: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return _stacked_affine(part, h) if self.stack_size else part(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits ``a^L`` (stacked: (K, N, n_L)); differentiable by autograd. In training
        mode with dropout it applies the masks ``forward_cache`` would draw at this step, and
        advances the step counter as it does."""
        return self._logits(x, self._step_masks())

    def _logits(self, x: torch.Tensor, masks: StepMasks | None) -> torch.Tensor:
        h = x if masks is None else apply_mask(x, masks.draw(self.dropout_input, x))
        last = self.depth - 1
        outputs = [h]
        for index, (part, activation, tail, rate) in enumerate(
            zip(self.layers, self.activations, self.tails, self.dropout_rates, strict=True)
        ):
            a = self._affine(
                part, h if self.edges is None else self.block_input(index + 1, outputs)
            )
            if index == last:
                return a
            z = activation.function(a)
            if masks is not None:
                z = apply_mask(z, masks.draw(rate, z))
            h = tail(z)
            if self.edges is not None:
                outputs.append(h)
        raise AssertionError("unreachable")

    def forward_cache(self, x: torch.Tensor) -> ForwardCache:
        """Every ``a^i``, ``h^i`` and tail state of a forward pass, without an autograd graph.

        In training mode with dropout, ``activated`` and ``post`` hold the dropped values and
        ``masks`` the masks (see ``ForwardCache``); the step counter advances by one.
        """
        with torch.no_grad():
            return self._cache(x, self._step_masks())

    def _cache(self, x: torch.Tensor, masks: StepMasks | None) -> ForwardCache:
        pre: list[torch.Tensor] = []
        drawn: list[torch.Tensor | None] = []
        x = x if masks is None else apply_mask(x, masks.draw(self.dropout_input, x))
        post, activated = [x], [x]
        states, inputs, graphs = [], [], {}
        last = self.depth - 1
        with torch.no_grad():
            for index, (part, activation, tail) in enumerate(
                zip(self.layers, self.activations, self._tails, strict=True)
            ):
                if self.edges is None:
                    a = self._affine(part, post[-1])
                else:
                    inputs.append(self.block_input(index + 1, post))
                    if linear_products(part) is GENERIC:  # kept for the step's products
                        graphs[index + 1] = PartGraph(part, inputs[-1])
                        a = graphs[index + 1].a.detach()
                    else:
                        a = part(inputs[-1])
                pre.append(a)
                if index < last:
                    z = activation.function(a)
                    if masks is not None:
                        drawn.append(masks.draw(self.dropout_rates[index], z))
                        z = apply_mask(z, drawn[-1])
                    activated.append(z)
                    h, state = tail.forward(z)
                    post.append(h)
                    states.append(state)
        masked = (*drawn, None) if any(mask is not None for mask in drawn) else ()
        return ForwardCache(
            pre, post, tuple(states), tuple(activated), masked, tuple(inputs), graphs
        )

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``g(a^L)``: class probabilities or the reconstruction, never dropped (in either
        mode, and the step counter stays as it is)."""
        with torch.no_grad():
            return self.objective.output(self._logits(x, None))

    @classmethod
    def stack(cls, nets: Sequence[Network]) -> Network:
        """K MLPs of one shape as one network of stacked parameters, copied: ``W^i`` of shape
        (K, n_i, n_{i-1}), ``b^i`` (K, n_i), inputs (K, N, n_0). The rule engine trains it as K
        members at once (``gfalign.ensemble``); ``stack_size`` is K.

        Example:
            >>> nets = [mlp([4, 3, 2], seed=s) for s in range(5)]
            >>> Network.stack(nets).weight(1).shape
            torch.Size([5, 3, 4])
        """
        first = nets[0]
        for k, net in enumerate(nets):
            if not net.is_chain_of_linear or net.stack_size:
                raise ValueError(
                    f"network {k} is not an MLP: only chains of Linear blocks stack; train "
                    "other models one after the other"
                )
            if (net.dropout_input, net.dropout_rates) != (first.dropout_input, first.dropout_rates):
                raise ValueError(
                    f"stacked member {k} has dropout rates {net.dropout_input:g} (input) and "
                    f"{net.dropout_hidden:g} (hidden), member 0 {first.dropout_input:g} and "
                    f"{first.dropout_hidden:g}; stacked members share their rates"
                )
            if (net.sizes, net.activations, net.objective) != (
                first.sizes,
                first.activations,
                first.objective,
            ):
                raise ValueError(
                    f"stacked member {k} is another network than member 0; stacked members "
                    "share their sizes, activation and objective"
                )
        parts = []
        with torch.no_grad():
            for i in range(1, first.depth + 1):
                layer = nn.Linear(1, 1, device="meta")
                layer.weight = nn.Parameter(torch.stack([net.weight(i) for net in nets]))
                layer.bias = nn.Parameter(torch.stack([net.bias(i) for net in nets]))
                parts.append(layer)
        blocks = [
            Block(part, block.activation, block.tail, block.dropout)
            for part, block in zip(parts, first.blocks, strict=True)
        ]
        # Each member draws its masks from its own seed and step, as it would alone.
        stacked = cls(
            blocks,
            first.objective.name,
            input_shape=first.input_shape,
            dropout_input=first.dropout_input,
            seed=tuple(net.dropout_seed for net in nets),
        )
        with torch.no_grad():
            torch.stack([net.dropout_step for net in nets], out=stacked.dropout_step)
        return stacked

    def extra_repr(self) -> str:
        dropout = ""
        if self.dropout_active:
            rates = ", ".join(f"{rate:g}" for rate in self.dropout_rates[:-1])
            dropout = f", dropout_input={self.dropout_input:g}, dropout=[{rates}]"
        stacked = f", stack_size={self.stack_size}" if self.stack_size else ""
        return (
            f"input_shape={list(self.input_shape)}, objective={self.objective.name}"
            f"{dropout}{stacked}"
        )


def _renamed_parts(module, state_dict, prefix, *args) -> None:
    """Checkpoints of block models named the linear parts ``parts.i``; they are ``layers.i``."""
    for key in [k for k in state_dict if k.startswith(prefix + "parts.")]:
        state_dict[prefix + "layers." + key[len(prefix + "parts.") :]] = state_dict.pop(key)


def initialise(
    part: nn.Module, weight_init: str, bias_init: str, generator: torch.Generator
) -> None:
    """Draw a Linear or Conv2d part's weight and bias from ``generator``, in that order.

    ``weight_init``: ``xavier_uniform`` (Glorot's U(+-sqrt(6 / (fan_in + fan_out)))),
    ``xavier_normal`` (the same variance, normal) or ``default`` (PyTorch's
    U(+-1/sqrt(fan_in))); ``bias_init``: ``normal`` (N(0, 1), as the paper writes), ``zeros`` or
    ``default`` (U(+-1/sqrt(fan_in))). Fans count a kernel's receptive field.
    """
    weight, bias = part.weight, part.bias
    receptive = math.prod(weight.shape[2:])
    fan_in, fan_out = weight.shape[1] * receptive, weight.shape[0] * receptive
    with torch.no_grad():
        if weight_init == "default":
            limit = 1.0 / math.sqrt(fan_in)
            weight.uniform_(-limit, limit, generator=generator)
        else:
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            if weight_init == "xavier_uniform":
                weight.uniform_(-bound, bound, generator=generator)
            else:
                weight.normal_(0.0, bound / math.sqrt(3.0), generator=generator)
        if bias is not None:
            if bias_init == "default":
                limit = 1.0 / math.sqrt(fan_in)
                bias.uniform_(-limit, limit, generator=generator)
            elif bias_init == "zeros":
                bias.zero_()
            else:
                bias.normal_(0.0, 1.0, generator=generator)


def mlp(
    sizes: Sequence[int],
    activation: str = "tanh",
    objective: str = "classification",
    *,
    weight_init: str = "xavier_uniform",
    bias_init: str = "normal",
    seed: int = 0,
    dropout_input: float = 0.0,
    dropout_hidden: float = 0.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Network:
    """A fully connected network ``sizes[0] -> ... -> sizes[-1]`` of any depth: the chain of
    ``nn.Linear`` blocks with identity tails.

    Args:
        sizes: layer widths ``[n_0, n_1, ..., n_L]``, at least two entries.
        activation: hidden nonlinearity, one of ``ACTIVATIONS`` (tanh, relu, sigmoid).
        objective: ``"classification"`` (softmax output, cross-entropy) or ``"autoencoder"``
            (sigmoid output, squared reconstruction error).
        weight_init, bias_init: see ``initialise``; the paper's are the defaults (Glorot
            uniform weights, N(0, 1) biases).
        seed: seeds the initialisation and the dropout masks; the same seed gives the same
            weights on any run (drawn in float64, then cast, so float32 and float64 networks
            share their values).
        dropout_input, dropout_hidden: the probability p in [0, 1) of dropping an input unit
            and a hidden unit in training mode (see the module docstring); 0 (the default)
            computes exactly what a network without dropout computes.

    Example:
        >>> net = mlp([784, 800, 800, 10], activation="tanh", seed=0)
        >>> net(torch.zeros(2, 784)).shape
        torch.Size([2, 10])
        >>> noisy = mlp([4, 3, 2], dropout_hidden=0.5, seed=0)
        >>> noisy.forward_cache(torch.ones(6, 4)).masks[0].shape  # m^1, in a^1's shape
        torch.Size([6, 3])
    """
    sizes = list(widths(sizes))
    if len(sizes) < 2:
        raise ValueError(f"sizes must list at least two positive widths, got {sizes}")
    if weight_init not in WEIGHT_INITS:
        raise ValueError(f"unknown weight_init {weight_init!r}; known: {', '.join(WEIGHT_INITS)}")
    if bias_init not in BIAS_INITS:
        raise ValueError(f"unknown bias_init {bias_init!r}; known: {', '.join(BIAS_INITS)}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    hidden = _lookup(ACTIVATIONS, activation, "activation")
    _lookup(OBJECTIVES, objective, "objective")
    if objective == "autoencoder" and sizes[0] != sizes[-1]:
        raise ValueError(f"an autoencoder needs sizes[0] == sizes[-1], got {sizes}")
    hidden_rate = check_dropout_rate(dropout_hidden, "dropout_hidden")
    generator = torch.Generator().manual_seed(seed)
    blocks = []
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layer = nn.Linear(fan_in, fan_out, dtype=torch.float64)
        initialise(layer, weight_init, bias_init, generator)
        last = index == len(sizes) - 2
        blocks.append(
            Block(layer, IDENTITY if last else hidden, dropout=0.0 if last else hidden_rate)
        )
    net = Network(
        blocks, objective, input_shape=(sizes[0],), dropout_input=dropout_input, seed=int(seed)
    )
    net.weight_init, net.bias_init = weight_init, bias_init
    return net.to(device=device, dtype=dtype)


MLP = mlp
"""The name ``mlp`` had in earlier releases, kept for code written against them."""
