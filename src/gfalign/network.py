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
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

from gfalign.blocks import Block, check_dropout_rate

__all__ = [
    "ACTIVATIONS",
    "BIAS_INITS",
    "IDENTITY",
    "OBJECTIVES",
    "WEIGHT_INITS",
    "Activation",
    "DropoutState",
    "ForwardCache",
    "MLP",
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


IDENTITY = Activation("identity", lambda a: a, _ones_like)
"""No nonlinearity (f(a) = a): a block whose linear part feeds the next directly."""

ACTIVATIONS: dict[str, Activation] = {
    activation.name: activation
    for activation in (
        Activation("tanh", tanh, lambda a, h: 1.0 - h * h),
        Activation("sigmoid", torch.sigmoid, lambda a, h: h * (1.0 - h)),
        Activation("relu", torch.relu, lambda a, h: (a > 0).to(a.dtype)),
    )
}


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

    def a(self, layer: int) -> torch.Tensor:
        return self.pre[layer - 1]

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
            >>> net = MLP([4, 3, 2], dropout_hidden=0.5, seed=0)
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


class MLP(DropoutState):
    """A fully connected network ``sizes[0] -> ... -> sizes[-1]`` of any depth.

    Weights are ordinary ``nn.Linear`` parameters, so any ``torch.optim`` optimizer trains them
    and ``forward`` is differentiable by autograd (the reference the rules are tested against).

    Args:
        sizes: layer widths ``[n_0, n_1, ..., n_L]``, at least two entries.
        activation: hidden nonlinearity, one of ``ACTIVATIONS`` (tanh, relu, sigmoid).
        objective: ``"classification"`` (softmax output, cross-entropy) or ``"autoencoder"``
            (sigmoid output, squared reconstruction error).
        weight_init: ``"xavier_uniform"`` (Glorot, the paper's), ``"xavier_normal"`` or
            ``"default"`` (PyTorch's ``nn.Linear`` initialisation).
        bias_init: ``"normal"`` (N(0, 1), as the paper writes), ``"zeros"`` or ``"default"``.
        seed: seeds the initialisation and the dropout masks; the same seed gives the same
            weights on any run.
        dropout_input, dropout_hidden: the probability p in [0, 1) of dropping an input unit
            and a hidden unit in training mode (see the module docstring); 0 (the default)
            computes exactly what a network without dropout computes.

    Example:
        >>> net = MLP([784, 800, 800, 10], activation="tanh", seed=0)
        >>> net(torch.zeros(2, 784)).shape
        torch.Size([2, 10])
        >>> noisy = MLP([4, 3, 2], dropout_hidden=0.5, seed=0)
        >>> noisy.forward_cache(torch.ones(6, 4)).masks[0].shape  # m^1, in a^1's shape
        torch.Size([6, 3])
    """

    def __init__(
        self,
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
    ) -> None:
        super().__init__()
        sizes = list(widths(sizes))
        if len(sizes) < 2:
            raise ValueError(f"sizes must list at least two positive widths, got {sizes}")
        if weight_init not in WEIGHT_INITS:
            raise ValueError(
                f"unknown weight_init {weight_init!r}; known: {', '.join(WEIGHT_INITS)}"
            )
        if bias_init not in BIAS_INITS:
            raise ValueError(f"unknown bias_init {bias_init!r}; known: {', '.join(BIAS_INITS)}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.sizes = tuple(sizes)
        self.activation = _lookup(ACTIVATIONS, activation, "activation")
        self.objective = _lookup(OBJECTIVES, objective, "objective")
        if self.objective.name == "autoencoder" and sizes[0] != sizes[-1]:
            raise ValueError(f"an autoencoder needs sizes[0] == sizes[-1], got {sizes}")
        self.weight_init, self.bias_init, self.seed = weight_init, bias_init, seed
        self.stack_size = 0  # K for a network of K stacked members (MLP.stack)
        hidden_rate = check_dropout_rate(dropout_hidden, "dropout_hidden")
        self._setup_dropout(dropout_input, [hidden_rate] * (len(sizes) - 2) + [0.0], int(seed))

        generator = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            layer = nn.Linear(fan_in, fan_out, dtype=torch.float64)
            with torch.no_grad():
                if weight_init != "default":
                    bound = math.sqrt(6.0 / (fan_in + fan_out))
                    if weight_init == "xavier_uniform":
                        layer.weight.uniform_(-bound, bound, generator=generator)
                    else:
                        layer.weight.normal_(0.0, bound / math.sqrt(3.0), generator=generator)
                else:
                    limit = 1.0 / math.sqrt(fan_in)
                    layer.weight.uniform_(-limit, limit, generator=generator)
                if bias_init == "normal":
                    layer.bias.normal_(0.0, 1.0, generator=generator)
                elif bias_init == "zeros":
                    layer.bias.zero_()
                else:
                    limit = 1.0 / math.sqrt(fan_in)
                    layer.bias.uniform_(-limit, limit, generator=generator)
            self.layers.append(layer)
        # Drawn in float64 and then cast, so float32 and float64 networks share their values.
        self.to(device=device, dtype=dtype)

    @property
    def depth(self) -> int:
        """``L``, the number of weight layers (hidden layers are 1..L-1)."""
        return len(self.layers)

    @property
    def dropout_hidden(self) -> float:
        """The hidden layers' dropout rate."""
        return self.dropout_rates[0] if len(self.dropout_rates) > 1 else 0.0

    @property
    def blocks(self) -> tuple[Block, ...]:
        """The layers as blocks (DESIGN.md section 9): ``nn.Linear`` parts, identity tails."""
        last = len(self.layers) - 1
        return tuple(
            Block(layer, self.activation if i < last else IDENTITY, dropout=rate)
            for i, (layer, rate) in enumerate(zip(self.layers, self.dropout_rates, strict=True))
        )

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.sizes[0],)

    @property
    def pre_shapes(self) -> tuple[tuple[int, ...], ...]:
        """One example's ``a^i`` shape, i = 1..L."""
        return tuple((n,) for n in self.sizes[1:])

    @property
    def post_shapes(self) -> tuple[tuple[int, ...], ...]:
        """One example's ``h^i`` shape, i = 0..L-1."""
        return tuple((n,) for n in self.sizes[:-1])

    def weight(self, layer: int) -> torch.Tensor:
        """``W^i`` for the 1-based layer number ``i``; shape (n_i, n_{i-1})."""
        return self.layers[layer - 1].weight

    def bias(self, layer: int) -> torch.Tensor:
        return self.layers[layer - 1].bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The output logits ``a^L`` (shape (N, n_L); stacked: (K, N, n_L)); differentiable.

        In training mode with dropout it applies the masks ``forward_cache`` would draw at this
        step, and advances the step counter as it does.
        """
        return self._logits(x, self._step_masks())

    def _logits(self, x: torch.Tensor, masks: StepMasks | None) -> torch.Tensor:
        h = x
        if masks is not None:
            h = apply_mask(h, masks.draw(self.dropout_input, h))
        if self.stack_size:
            for layer, rate in zip(self.layers[:-1], self.dropout_rates[:-1], strict=True):
                h = self.activation.function(_stacked_affine(layer, h))
                if masks is not None:
                    h = apply_mask(h, masks.draw(rate, h))
            return _stacked_affine(self.layers[-1], h)
        for layer, rate in zip(self.layers[:-1], self.dropout_rates[:-1], strict=True):
            h = self.activation.function(layer(h))
            if masks is not None:
                h = apply_mask(h, masks.draw(rate, h))
        return self.layers[-1](h)

    def forward_cache(self, x: torch.Tensor) -> ForwardCache:
        """Every ``a^i`` and ``h^i`` of a forward pass, computed without an autograd graph.

        In training mode with dropout, ``h^i`` are the dropped values and ``masks`` the masks
        (see ``ForwardCache``); the step counter advances by one.
        """
        pre: list[torch.Tensor] = []
        with torch.no_grad():
            masks = self._step_masks()
            drawn: list[torch.Tensor | None] = []
            post = [x if masks is None else apply_mask(x, masks.draw(self.dropout_input, x))]
            for index, layer in enumerate(self.layers):
                if self.stack_size:
                    a = _stacked_affine(layer, post[-1])
                else:
                    a = torch.addmm(layer.bias, post[-1], layer.weight.t())
                pre.append(a)
                if index < len(self.layers) - 1:
                    h = self.activation.function(a)
                    if masks is not None:
                        drawn.append(masks.draw(self.dropout_rates[index], h))
                        h = apply_mask(h, drawn[-1])
                    post.append(h)
        if any(mask is not None for mask in drawn):
            return ForwardCache(pre, post, masks=(*drawn, None))
        return ForwardCache(pre, post)

    @classmethod
    def stack(cls, nets: Sequence[MLP]) -> MLP:
        """K networks of one shape as one network of stacked parameters, copied: ``W^i`` of
        shape (K, n_i, n_{i-1}), ``b^i`` (K, n_i), inputs (K, N, n_0). The rule engine trains it
        as K members at once (``gfalign.ensemble``); ``stack_size`` is K.

        Example:
            >>> nets = [MLP([4, 3, 2], seed=s) for s in range(5)]
            >>> MLP.stack(nets).weight(1).shape
            torch.Size([5, 3, 4])
        """
        first = nets[0]
        stacked = cls.__new__(cls)
        nn.Module.__init__(stacked)
        stacked.sizes, stacked.activation, stacked.objective = (
            first.sizes,
            first.activation,
            first.objective,
        )
        stacked.weight_init, stacked.bias_init, stacked.seed = (
            first.weight_init,
            first.bias_init,
            None,
        )
        stacked.stack_size = len(nets)
        for k, net in enumerate(nets):
            if (net.dropout_input, net.dropout_rates) != (first.dropout_input, first.dropout_rates):
                raise ValueError(
                    f"stacked member {k} has dropout rates {net.dropout_input:g} (input) and "
                    f"{net.dropout_hidden:g} (hidden), member 0 {first.dropout_input:g} and "
                    f"{first.dropout_hidden:g}; stacked members share their rates"
                )
        # Each member draws its masks from its own seed and step, as it would alone.
        stacked._setup_dropout(
            first.dropout_input, first.dropout_rates, tuple(net.dropout_seed for net in nets)
        )
        with torch.no_grad():
            torch.stack([net.dropout_step for net in nets], out=stacked.dropout_step)
        stacked.layers = nn.ModuleList()
        with torch.no_grad():
            for i in range(1, first.depth + 1):
                layer = nn.Linear(1, 1, device="meta")
                layer.weight = nn.Parameter(torch.stack([net.weight(i) for net in nets]))
                layer.bias = nn.Parameter(torch.stack([net.bias(i) for net in nets]))
                stacked.layers.append(layer)
        return stacked

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``g(a^L)``: class probabilities or the reconstruction, never dropped (in either
        mode, and the step counter stays as it is)."""
        with torch.no_grad():
            return self.objective.output(self._logits(x, None))

    def extra_repr(self) -> str:
        dropout = (
            f", dropout_input={self.dropout_input:g}, dropout_hidden={self.dropout_hidden:g}"
            if self.dropout_active
            else ""
        )
        return (
            f"sizes={list(self.sizes)}, activation={self.activation.name}, "
            f"objective={self.objective.name}{dropout}"
        )
