"""The rule engine: one mechanism that computes every configuration's deltas and gradients.

``FeedbackRule`` holds a resolved ``RuleConfig`` and its fixed feedback parameters as buffers
(saved in ``state_dict``, moved by ``.to``). ``rule.backward(net, x, target)`` runs the forward
pass, the output error, every hidden delta in dependency order, and fills ``.grad`` of every
parameter with the local update (DESIGN.md sections 2 and 9)

    grad theta^i = J_theta phi_i(h^{i-1})^T d^i,    d^L = e

(for a Linear block ``grad W^i = (d^i)^T h^{i-1}``, ``grad b^i = sum_n d^i_n``), without an autograd
graph and without stepping, so any ``torch.optim`` optimizer can apply it. A model is an ``MLP``
or any model of blocks (``gfalign.models``): each term of section 9 is a product of a block's
pieces (``gfalign.blocks``), and a term between Linear blocks with identity tails is a matrix
product fused into its layer's running sum. The engine never looks at a rule's name: only at
its terms.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gfalign import feedback as feedback_families
from gfalign.blocks import GENERIC, LINEAR, LinearProducts, linear_products
from gfalign.feedback import FeedbackSpec
from gfalign.network import IDENTITY, MLP, OBJECTIVES, Activation, widths
from gfalign.network import tanh as network_tanh
from gfalign.rules import ConfigError, RuleConfig, Term, resolve
from gfalign.terms import KINDS, SIGNALS, ModeSpec, step_generator

__all__ = [
    "BlockShape",
    "FeedbackRule",
    "LayerPlan",
    "Plan",
    "PlannedTerm",
    "Step",
    "direct_values",
    "propagate",
    "structure_of",
    "times_slope",
]


@dataclass(frozen=True)
class Step:
    """What one call of the rule computed for a batch.

    Attributes:
        loss: the batch-mean loss of the network's output (0-d tensor).
        deltas: ``deltas[i]`` is ``d^i`` (shape (N, *a^i's shape)) for ``i = 1..L``;
            ``deltas[L]`` is ``e``.
        auxiliary_losses: ``{i: loss}`` of the auxiliary classifiers of layers using ``e^i``.
    """

    loss: torch.Tensor
    deltas: dict[int, torch.Tensor]
    auxiliary_losses: dict[int, torch.Tensor]


@dataclass(frozen=True)
class BlockShape:
    """What a rule knows of one block of the model it was built for.

    Attributes:
        products: the Jacobian products of its linear part (``gfalign.blocks``).
        parameters: (name, shape) of each parameter of its linear part, in order.
        pre: one example's ``a^i`` shape.
        post: one example's ``h^i`` shape (``()`` for the output block).
        plain_tail: the tail is the identity.
    """

    products: LinearProducts
    parameters: tuple[tuple[str, tuple[int, ...]], ...]
    pre: tuple[int, ...]
    post: tuple[int, ...]
    plain_tail: bool

    @property
    def transported(self) -> tuple[str, ...]:
        """The parameters a feedback term replaces by fixed ones: the weight of an affine part
        (its bias does not enter its input Jacobian), every parameter of any other."""
        names = tuple(name for name, _ in self.parameters)
        return ("weight",) if self.products is not GENERIC and "weight" in names else names

    @property
    def width(self) -> int:
        """``numel(a^i)`` of one example."""
        return _numel(self.pre)


def _numel(shape: Sequence[int]) -> int:
    total = 1
    for n in shape:
        total *= n
    return total


def structure_of(model: nn.Module | Sequence[int]) -> tuple[BlockShape, ...]:
    """The ``BlockShape`` of every block of ``model`` (an ``MLP``, a ``BlockNet``), or of the
    MLP with layer widths ``model``."""
    if not isinstance(model, nn.Module):
        sizes = widths(model)
        return tuple(
            BlockShape(
                LINEAR,
                (("weight", (n_out, n_in)), ("bias", (n_out,))),
                (n_out,),
                (n_out,) if i < len(sizes) - 2 else (),
                True,
            )
            for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
        )
    blocks = model.blocks
    return tuple(
        BlockShape(
            linear_products(block.linear),
            tuple((name, tuple(p.shape)) for name, p in block.linear.named_parameters()),
            tuple(model.pre_shapes[i]),
            tuple(model.post_shapes[i + 1]) if i + 1 < len(blocks) else (),
            not block.tail.modules,
        )
        for i, block in enumerate(blocks)
    )


@dataclass(frozen=True)
class _Place:
    """Where a term's fixed parameters live.

    ``buffers`` pairs each parameter name with its buffer; a direct term's matrix is ``columns``
    of the stacked ``direct`` buffer. ``transposed``: the buffer holds the weight's transpose
    (a Linear block's below term, kept as the matrix ``B_down`` that ``s @ B_down`` reads).
    """

    layer: int
    index: int
    buffers: tuple[tuple[str, str], ...]
    columns: slice | None = None
    transposed: bool = False
    block: int = 0  # the block whose forward parameters the feedback ones stand in for
    mode: ModeSpec | None = None  # None: fixed
    magnitudes: tuple[tuple[str, str], ...] = ()  # frSF's |R|, by parameter name

    @property
    def live(self) -> bool:
        return self.mode is not None and self.mode.mode.live

    @property
    def learned(self) -> bool:
        return self.mode is not None and self.mode.mode.learned


@dataclass(frozen=True)
class PlannedTerm:
    """One term of one hidden layer, resolved once for the hot loop.

    ``kind`` names its ``gfalign.terms.TermKind``; ``source`` the layer whose delta a product
    term reads (``L`` for the output error); ``final`` whether it reads the final delta ``d^j``
    (else the direct-only ``t^j``). A product of two Linear blocks with identity tails is a
    matrix product: ``buffer`` names its feedback matrix (empty for a term on the forward
    weight, which reads ``W^block``). Any other product term has ``parameters`` (name, buffer)
    and ``block``, the block whose linear part it runs, ``backward`` its direction and
    ``transported`` whether it runs the forward parameters. A direct term has ``columns`` in the
    stacked ``direct`` buffer and ``signal``, the error signal it projects; an auxiliary one
    ``reads`` its classifier's input, ``h^i`` (``"post"``) or ``a^i`` (``"pre"``).
    """

    index: int
    kind: str
    coefficient: float
    source: int = 0
    final: bool = True
    buffer: str = ""
    columns: slice | None = None
    auxiliary: bool = False
    matrix: bool = True
    block: int = 0
    parameters: tuple[tuple[str, str], ...] = ()
    signal: str = "output"
    reads: str = "post"
    backward: bool = True
    transported: bool = False


@dataclass(frozen=True)
class LayerPlan:
    """The terms of hidden layer ``layer``: direct values first, then products."""

    layer: int
    values: tuple[PlannedTerm, ...]
    products: tuple[PlannedTerm, ...]


@dataclass(frozen=True)
class Plan:
    """A rule's term loop, fixed at construction: what ``propagate`` executes every step.

    ``layers`` are in dependency order; ``direct_term[j]`` is the index of layer ``j``'s single
    direct term (defines ``t^j``) where it has exactly one; ``signals`` the column range of the
    ``direct`` buffer that each batch-wide error signal multiplies (the output error ``e``
    first: ``output_width`` columns).
    """

    hidden: int
    layers: tuple[LayerPlan, ...]
    direct: tuple[PlannedTerm, ...]
    direct_term: dict[int, int]
    signals: tuple[tuple[str, slice], ...]

    @property
    def output_width(self) -> int:
        return next((c.stop - c.start for name, c in self.signals if name == "output"), 0)


class FeedbackRule(nn.Module):
    """A credit-assignment rule for a model, with its fixed feedback parameters.

    Args:
        config: a preset name (``"bp"``, ``"fa"``, ``"dfa"``, ``"s1"`` ... ``"s3-aux"``), a
            configuration dictionary, or a ``RuleConfig`` (see ``gfalign.rules``).
        model: the model the rule trains (an ``MLP``, a ``gfalign.models.BlockNet``), or an
            MLP's layer widths ``[n_0, ..., n_L]`` (``net.sizes``).
        feedback: default family of the fixed parameters (``"uniform"``, ``"B1"``,
            ``"sparse:density=0.2"`` ...), overriding the configuration's.
        seed: every fixed parameter is drawn from its own generator derived from ``seed`` and
            its place (layer, term, parameter), so they are independent draws and reproducible.

    Fixed parameters (row convention): a direct term of layer ``i`` uses ``D^i`` of shape
    (n_L, numel(a^i)) (an auxiliary one (n_L, numel(h^i))), all of them stacked column-wise in
    one buffer so that the output error reaches every layer through a single matrix product.
    An above term holds parameters shaped like block ``i + 1``'s (for an MLP ``B_up^i``,
    (n_{i+1}, n_i)), a below term parameters shaped like block ``i``'s (for an MLP
    ``B_down^i``, (n_{i-1}, n_i)); for a conv block these are kernels.

    Example:
        >>> net = MLP([784, 800, 800, 10], activation="tanh", seed=0)
        >>> rule = FeedbackRule("s1", net, seed=0)
        >>> optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
        >>> x, y = torch.rand(32, 784), torch.randint(0, 10, (32,))
        >>> step = rule.backward(net, x, y)   # fills .grad, returns loss and deltas
        >>> optimizer.step()

    Any model of blocks, e.g. LeNet-5 (``gfalign.models``):

        >>> from gfalign.models import build
        >>> lenet = build("lenet5", seed=0)
        >>> step = FeedbackRule("fa", lenet).backward(lenet, torch.rand(8, 1, 32, 32),
        ...                                         torch.randint(0, 10, (8,)))
        >>> step.deltas[1].shape  # d^1 in the shape of the first convolution's output
        torch.Size([8, 6, 28, 28])
    """

    def __init__(
        self,
        config: str | Mapping | RuleConfig,
        model: nn.Module | Sequence[int],
        *,
        feedback: FeedbackSpec | str | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        try:
            self.structure = structure_of(model)
        except ValueError as problem:
            raise ConfigError(str(problem)) from None
        shapes = self.structure
        if isinstance(model, nn.Module):
            self.input_shape = tuple(model.input_shape)
            self.objective = model.objective.name
        else:
            self.input_shape, self.objective = (int(model[0]),), None
        self.sizes = (_numel(self.input_shape), *(shape.width for shape in shapes))
        if len(shapes) < 2:
            raise ConfigError(
                f"a feedback rule needs at least one hidden layer; sizes {list(self.sizes)}"
            )
        self.config = resolve(config, len(shapes) - 1, feedback)
        if self.objective is not None and self.config.uses_auxiliary:
            self._check_labels(OBJECTIVES[self.objective])
        self.seed = seed
        self.seeds = (seed,)  # one per stacked member
        self._order = self.config.order()
        self._places: dict[tuple[int, int], _Place] = {}

        n_out = self.sizes[-1]
        # Direct terms by signal, batch-wide signals first, so one product per signal reaches
        # every layer that projects it.
        direct = [
            (i, k, term)
            for i, layer in enumerate(self.config.layers, start=1)
            for k, term in enumerate(layer.terms)
            if KINDS[term.kind].is_direct
        ]
        direct.sort(key=lambda item: SIGNALS[item[2].error].order)
        stacked, offset, signals = [], 0, {}
        for i, k, term in direct:
            signal = SIGNALS[term.error]
            reads_post = signal.local and signal.reads == "post"
            width = _numel(shapes[i - 1].post) if reads_post else shapes[i - 1].width
            stacked.append(self._draw(i, k, term, (n_out, width)))
            columns = slice(offset, offset + width)
            self._places[i, k] = _Place(i, k, (("matrix", "direct"),), columns)
            if not signal.local:
                signals[term.error] = slice(signals.get(term.error, columns).start, columns.stop)
            offset += width
        self._signals = tuple(signals.items())
        self.register_buffer(
            "direct", torch.cat(stacked, dim=1) if stacked else torch.empty(n_out, 0)
        )

        for i, layer in enumerate(self.config.layers, start=1):
            for k, term in enumerate(layer.terms):
                kind = KINDS[term.kind]
                if kind.part is not None and kind.has_parameters:
                    self._places[i, k] = self._register(i, k, term)
        self._live = tuple(place for place in self._places.values() if place.live)
        self._learned = tuple(place for place in self._places.values() if place.learned)
        self._decays = self._forward_decays()
        self._mirrored = frozenset(place.block for place in self._learned)
        if any(place.mode is not None and place.mode.mode.redraw for place in self._live):
            self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.plan = self._make_plan()
        self._uses_auxiliary = self.config.uses_auxiliary
        self.stack_size = 0  # K for the rule of K stacked members (FeedbackRule.stack)
        self._shapes: tuple | None = None  # a block model's input and a^i shapes
        self.to(device=device, dtype=dtype)
        if isinstance(model, nn.Module) and not isinstance(model, MLP):
            self._shapes = (tuple(model.input_shape), tuple(model.pre_shapes))
            self._rehearse(model)

    def _rehearse(self, model: nn.Module) -> None:
        """Run every term once on a one-example batch of zeros, so that a term a block cannot
        take (a user module torch.func cannot differentiate, say) is refused now, naming the
        layer, the term and the block, instead of in the first step of training."""
        parameter = next(model.parameters(), None)
        if parameter is None or (parameter.dtype, parameter.device) != (
            self.direct.dtype,
            self.direct.device,
        ):
            return  # the model is elsewhere for now: its first step checks instead
        x = torch.zeros(1, *self.input_shape, dtype=parameter.dtype, device=parameter.device)
        labels = torch.zeros(1, dtype=torch.int64, device=parameter.device)
        self.deltas(model, x, labels)

    @classmethod
    def stack(cls, rules: Sequence[FeedbackRule]) -> FeedbackRule:
        """K rules of one configuration structure as one rule whose fixed parameters are
        stacked, (K, ...) each, copied: the rule of ``MLP.stack`` of their networks. Members may
        differ in seeds and feedback families, not in terms.

        Example:
            >>> rules = [FeedbackRule("s1", [4, 3, 3, 2], seed=s) for s in range(5)]
            >>> FeedbackRule.stack(rules).direct.shape
            torch.Size([5, 2, 6])
        """
        first = rules[0]
        for k, rule in enumerate(rules[1:], start=1):
            if rule.plan != first.plan or rule.structure != first.structure:
                raise ValueError(
                    f"rule {k} ({rule.config.name!r}) has other terms or another model than rule "
                    f"0 ({first.config.name!r}); stacked rules share their configuration "
                    "structure (they may differ in seeds and feedback families)"
                )
            if [p.mode for p in rule._places.values()] != [p.mode for p in first._places.values()]:
                raise ValueError(
                    f"rule {k} ({rule.config.name!r}) has other feedback modes than rule 0 "
                    f"({first.config.name!r}); stacked rules share them"
                )
        if any(shape.products is not LINEAR or not shape.plain_tail for shape in first.structure):
            raise ValueError("only rules of MLPs stack; train other models one after the other")
        stacked = cls.__new__(cls)
        nn.Module.__init__(stacked)
        fresh = set(stacked.__dict__)
        stacked.__dict__.update({k: v for k, v in first.__dict__.items() if k not in fresh})
        stacked.stack_size = len(rules)
        stacked.seeds = tuple(seed for rule in rules for seed in rule.seeds)
        with torch.no_grad():
            for name, _ in first.named_buffers():
                stacked.register_buffer(
                    name, torch.stack([rule.get_buffer(name) for rule in rules])
                )
            for name, _ in first.named_parameters():
                value = torch.stack([rule.get_parameter(name) for rule in rules])
                stacked.register_parameter(name, nn.Parameter(value, requires_grad=False))
        return stacked

    def _register(self, i: int, k: int, term: Term) -> _Place:
        """Draw and register the feedback parameters of a term that runs a block's part."""
        kind = KINDS[term.kind]
        block = i + kind.part
        stands_for = self.structure[block - 1]  # the block whose part it runs
        shapes = dict(stands_for.parameters)
        names = stands_for.transported
        base = f"layer{i}_term{k}_{term.kind}"
        # A Linear block run forwards keeps the matrix B_down = W~^T, (n_{i-1}, n_i).
        transposed = not kind.backward and stands_for.products is LINEAR
        mode = term.mode
        stored = "draw" if mode is None else mode.mode.stored
        buffers, magnitudes = [], []
        for name in names:
            shape = shapes[name][::-1] if transposed else shapes[name]
            if names == ("weight",):
                buffer, labels = base, ()
            else:
                buffer, labels = f"{base}_{name.replace('.', '_')}", (name,)
            value = self._draw(i, k, term, shape, *labels)
            if stored == "magnitude":
                self.register_buffer(f"{buffer}_magnitude", value.abs())
                magnitudes.append((name, f"{buffer}_magnitude"))
            if stored != "draw":
                value = torch.zeros_like(value)  # made from the forward parameters every step
            if mode is not None and mode.mode.learned:
                self.register_parameter(buffer, nn.Parameter(value, requires_grad=False))
            else:
                self.register_buffer(buffer, value)
            buffers.append((name, buffer))
        return _Place(
            i,
            k,
            tuple(buffers),
            transposed=transposed,
            block=block,
            mode=mode,
            magnitudes=tuple(magnitudes),
        )

    def _forward_decays(self) -> dict[int, float]:
        """The decay of each block whose parameters learned feedback stands in for (both decay,
        as Kolen-Pollack's rule has it); two different decays for one block are refused."""
        decays: dict[int, float] = {}
        for place in self._learned:
            decay = place.mode.decay
            if decays.setdefault(place.block, decay) != decay:
                raise ConfigError(
                    f"layer {place.layer}, term {place.index}: decay {decay:g} for block "
                    f"{place.block}, which another learned term decays by "
                    f"{decays[place.block]:g}; give them one decay"
                )
        return {block: decay for block, decay in decays.items() if decay}

    def _make_plan(self) -> Plan:
        hidden = len(self.structure) - 1
        shapes = self.structure
        direct_term = {
            j: next(k for k, term in enumerate(layer.terms) if KINDS[term.kind].is_direct)
            for j, layer in enumerate(self.config.layers, start=1)
            if sum(KINDS[term.kind].is_direct for term in layer.terms) == 1
        }
        planned: dict[tuple[int, int], PlannedTerm] = {}
        for i, layer in enumerate(self.config.layers, start=1):
            for k, (term, weight) in enumerate(zip(layer.terms, layer.coefficients(), strict=True)):
                kind = KINDS[term.kind]
                place = self._places.get((i, k))
                if kind.is_direct:
                    planned[i, k] = PlannedTerm(
                        k,
                        term.kind,
                        weight,
                        columns=place.columns,
                        auxiliary=SIGNALS[term.error].local,
                        signal=term.error,
                        reads=SIGNALS[term.error].reads,
                    )
                    continue
                # Backwards: block i+1's part, then back through block i's tail; forwards:
                # block i's part on block i-1's tail's linearisation. Either way the tail in
                # between is block - 1's.
                block = i + kind.part
                matrix = shapes[block - 1].products is LINEAR and shapes[block - 2].plain_tail
                j = i + kind.reads
                final = kind.always_final or j == hidden + 1 or term.source == "final"
                buffer = place.buffers[0][1] if kind.has_parameters and matrix else ""
                planned[i, k] = PlannedTerm(
                    k,
                    term.kind,
                    weight,
                    j,
                    final,
                    buffer,
                    matrix=matrix,
                    block=block,
                    parameters=() if place is None else place.buffers,
                    backward=kind.backward,
                    transported=not kind.has_parameters,
                )
        layers = []
        for i in self.config.order():
            terms = [planned[i, k] for k in range(len(self.config.layer(i).terms))]
            layers.append(
                LayerPlan(
                    i,
                    tuple(t for t in terms if t.columns is not None),
                    tuple(t for t in terms if t.columns is None),
                )
            )
        direct = tuple(
            sorted(
                (t for t in planned.values() if t.columns is not None),
                key=lambda t: t.columns.start,
            )
        )
        return Plan(hidden, tuple(layers), direct, direct_term, self._signals)

    def _draw(
        self, layer: int, index: int, term: Term, shape: tuple[int, ...], *labels: str
    ) -> torch.Tensor:
        spec = term.feedback or self.config.feedback
        generator = feedback_families.generator_for(
            self.seed, "layer", layer, "term", index, term.kind, *labels
        )
        try:
            return feedback_families.draw(spec, shape, generator)
        except (ValueError, RuntimeError) as problem:
            raise ConfigError(
                f"layer {layer}, term {index} ({term}): cannot draw feedback of shape "
                f"{list(shape)} from {spec}: {str(problem).splitlines()[0]}"
            ) from None

    # ------------------------------------------------------------------- fixed parameters

    def feedback(
        self, layer: int, index: int, net: nn.Module | None = None
    ) -> dict[str, torch.Tensor]:
        """The feedback parameters of term ``index`` (0-based) of hidden layer ``layer``
        (1-based): ``{"matrix": D^i}`` for a direct term; for an above or below term the
        parameters it puts in place of the forward ones, by the forward parameter's name and in
        its shape (``{"weight": ...}`` for a Linear or Conv2d part). A sign-concordant term's
        are made from ``net``'s live parameters (give ``net``; without it, those of the last
        step)."""
        place = self._place(layer, index)
        if place.live and net is not None:
            with torch.no_grad():
                self._refresh(net)
        if place.columns is not None:
            return {"matrix": self.direct[:, place.columns]}
        values = {name: getattr(self, buffer) for name, buffer in place.buffers}
        if place.transposed:
            values = {name: value.t() for name, value in values.items()}
        return values

    def set_feedback(self, layer: int, index: int, values: Mapping[str, torch.Tensor]) -> None:
        """Replace a term's fixed parameters (to test reductions such as FA with the forward
        parameters, or to study one); ``values`` as ``feedback`` returns them."""
        current = self.feedback(layer, index)
        term = self.config.layer(layer).terms[index]
        if set(values) != set(current):
            raise ConfigError(
                f"layer {layer}, term {index} ({term}): feedback for {sorted(values)}, "
                f"expected {sorted(current)}"
            )
        for name, value in values.items():
            if tuple(value.shape) != tuple(current[name].shape):
                raise ConfigError(
                    f"layer {layer}, term {index} ({term}): feedback {name!r} of shape "
                    f"{tuple(value.shape)}, expected {tuple(current[name].shape)}"
                )
        with torch.no_grad():
            for name, value in values.items():
                current[name].copy_(value)

    def matrix(self, layer: int, index: int) -> torch.Tensor:
        """The fixed matrix of term ``index`` of hidden layer ``layer``: ``D^i``, or for an
        MLP ``B_up^i`` (n_{i+1}, n_i) or ``B_down^i`` (n_{i-1}, n_i)."""
        place = self._place(layer, index)
        if place.columns is not None:
            return self.direct[:, place.columns]
        if len(place.buffers) != 1:
            raise ConfigError(
                f"layer {layer}, term {index}: its feedback is {len(place.buffers)} parameters, "
                "not one matrix; use rule.feedback(layer, index)"
            )
        return getattr(self, place.buffers[0][1])

    def set_matrix(self, layer: int, index: int, value: torch.Tensor) -> None:
        """Replace a fixed matrix (to test reductions such as FA with B = W, or to study one)."""
        current = self.matrix(layer, index)
        if tuple(value.shape) != tuple(current.shape):
            term = self.config.layer(layer).terms[index]
            raise ConfigError(
                f"layer {layer}, term {index} ({term}): feedback matrix of shape "
                f"{tuple(value.shape)}, expected {tuple(current.shape)}"
            )
        with torch.no_grad():
            current.copy_(value)

    def matrices(self) -> dict[tuple[int, int], torch.Tensor]:
        """Every fixed matrix of an MLP's rule, keyed by (layer, term index)."""
        return {key: self.matrix(*key) for key in sorted(self._places)}

    def _place(self, layer: int, index: int) -> _Place:
        try:
            return self._places[layer, index]
        except KeyError:
            raise ConfigError(
                f"layer {layer}, term {index}: no fixed matrix there "
                f"(rule {self.config.name!r} has {sorted(self._places)})"
            ) from None

    # ----------------------------------------------------------------------------- the rule

    def _check_labels(self, objective) -> None:
        if self.config.uses_auxiliary and not objective.uses_labels:
            raise ConfigError(
                f"rule {self.config.name!r} uses auxiliary errors, which need class labels; "
                f"the network's objective is {objective.name}"
            )

    def check(self, net: nn.Module, x: torch.Tensor | None = None) -> None:
        """Refuse a network this rule was not built for, and a batch ``x`` it cannot take."""
        lead = 2 if self.stack_size else 1  # (N, ...), or (K, N, ...) for stacked members
        if x is not None and (
            x.dim() <= lead
            or x.shape[lead - 1] == 0
            or x.shape[lead:] != self.input_shape
            or (self.stack_size and x.shape[0] != self.stack_size)
        ):
            problem = "an empty batch" if x.dim() > lead and x.shape[lead - 1] == 0 else "a batch"
            wanted = ", ".join(str(n) for n in self.input_shape)
            members = f"{self.stack_size}, " if self.stack_size else ""
            raise ConfigError(
                f"{problem} of shape {tuple(x.shape)}: give inputs of shape ({members}N, "
                f"{wanted}) with N >= 1"
            )
        if net.stack_size != self.stack_size:
            raise ConfigError(
                f"a rule of {self.stack_size or 'no'} stacked members for a network of "
                f"{net.stack_size or 'no'} stacked members"
            )
        if isinstance(net, MLP):
            if tuple(net.sizes) != self.sizes or self.input_shape != net.input_shape:
                raise ConfigError(
                    f"rule {self.config.name!r} was built for sizes {list(self.sizes)}, the "
                    f"network has {list(net.sizes)}"
                )
        elif (tuple(net.input_shape), tuple(net.pre_shapes)) != self._shapes:
            raise ConfigError(
                f"rule {self.config.name!r} was built for another model (blocks of shapes "
                f"{[list(shape.pre) for shape in self.structure]})"
            )
        self._check_labels(net.objective)

    def deltas(self, net: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Step:
        """Every delta ``d^1 .. d^L`` for a batch, without touching any ``.grad``.

        Args:
            net: the model this rule was built for.
            x: inputs, shape (N, *input shape).
            target: labels (N,) for classification, ignored for the autoencoder (its target
                is ``x``).
        """
        self.check(net, x)
        with torch.no_grad():
            cache = net.forward_cache(x)
            return self._deltas(net, cache, _target(net, x, target))

    def backward(
        self, net: nn.Module, x: torch.Tensor, target: torch.Tensor, *, reduction: str = "mean"
    ) -> Step:
        """Compute the rule's update for a batch and write it into ``.grad`` (overwriting).

        ``reduction="mean"`` gives ``grad W^i = (d^i)^T h^{i-1} / N`` (the batch-mean loss);
        ``"sum"`` drops the ``1/N``, so SGD with learning rate ``lr`` takes the step that ``N``
        per-example updates at ``lr`` take to first order (the paper's per-example SGD).
        """
        self.check(net, x)
        scale = _scale(reduction, self._batch_size(x))
        with torch.no_grad():
            cache = net.forward_cache(x)
            step = self._deltas(net, cache, _target(net, x, target))
            for i, (part, shape) in enumerate(zip(_parts(net), self.structure, strict=True), 1):
                d, h = step.deltas[i], cache.post[i - 1]
                if shape.products is LINEAR:
                    weight, bias = part.weight, part.bias
                    if weight.grad is None:
                        weight.grad = torch.empty_like(weight)
                    # (n_i, N) @ (N, n_{i-1}) straight into the existing buffer; beta=0 ignores it
                    _addmm_(weight.grad, d.transpose(-1, -2), h, beta=0.0, alpha=scale)
                    if bias is not None:
                        if bias.grad is None:
                            bias.grad = torch.empty_like(bias)
                        torch.sum(d, dim=-2, out=bias.grad)
                        if scale != 1.0:
                            bias.grad.mul_(scale)
                else:
                    grads = shape.products.param_vjp(part, h, d)
                    for name, parameter in part.named_parameters():
                        grad = grads[name] if scale == 1.0 else grads[name].mul_(scale)
                        if parameter.grad is None:
                            parameter.grad = grad.contiguous()
                        else:
                            parameter.grad.copy_(grad)
                if i in self._mirrored:
                    self._learn(i, part)
            self._advance()
        return step

    def _learn(self, block: int, part: nn.Module) -> None:
        """Learned feedback standing in for ``block``'s parameters gets their gradient (the
        rule's update), so an optimizer takes the same step on both."""
        self._decay(block, part)
        forward = dict(part.named_parameters())
        for place in self._learned:
            if place.block == block:
                for name, buffer in place.buffers:
                    grad = forward[name].grad
                    grad = grad.transpose(-1, -2) if place.transposed else grad
                    self.get_parameter(buffer).grad = grad.clone()

    def _decay(self, block: int, part: nn.Module) -> None:
        """Kolen-Pollack's decay, ``theta <- (1 - decay) theta`` on the learned feedback and the
        forward parameters it stands in for, once per training step, before the optimizer's
        step: together ``Delta theta = -eta g - decay theta`` for both (DESIGN.md section 10),
        so their difference shrinks by ``1 - decay`` every step whatever the optimizer."""
        decay = self._decays.get(block, 0.0)
        if not decay:
            return
        transported = self.structure[block - 1].transported
        for name, parameter in part.named_parameters():
            if name in transported:
                parameter.mul_(1.0 - decay)
        for place in self._learned:
            if place.block == block:
                for _, buffer in place.buffers:
                    self.get_parameter(buffer).mul_(1.0 - decay)

    def _advance(self) -> None:
        """One training step done: a redrawing term (brSF) draws anew next time."""
        if "steps" in self._buffers:
            self.steps.add_(1)

    def sgd_step(
        self,
        net: nn.Module,
        x: torch.Tensor,
        target: torch.Tensor,
        *,
        lr: float | torch.Tensor,
        reduction: str = "mean",
    ) -> Step:
        """One plain SGD step with the rule's update, applied in place without ``.grad``.

        ``W^i <- W^i - lr * scale * (d^i)^T h^{i-1}`` and ``b^i <- b^i - lr * scale * sum_n d^i_n``
        with ``scale = 1/N`` (``"mean"``) or ``1`` (``"sum"``), and the same with each block's
        own gradient for any other part. A Linear block's weight update is one ``addmm_`` into
        ``W^i``: no gradient tensor is written and no optimizer pass reads it back, which is
        most of the cost of a small batch besides the matrix products. Equal to ``backward``
        followed by ``torch.optim.SGD(lr=lr).step()`` up to rounding; ``.grad`` is left
        untouched. Every delta is computed before any parameter changes, so a backprop term
        reads the weights of before the step.

        Example:
            >>> net = MLP([784, 100, 10], seed=0)
            >>> rule = FeedbackRule("dfa", net)
            >>> x, y = torch.rand(32, 784), torch.randint(0, 10, (32,))
            >>> step = rule.sgd_step(net, x, y, lr=1e-3, reduction="sum")
            >>> sorted(step.deltas)
            [1, 2]
        """
        self.check(net, x)
        scale = _scale(reduction, self._batch_size(x))
        # Stacked members may each have their own rate: a (K, 1, 1) tensor scales their deltas.
        rates = lr if isinstance(lr, torch.Tensor) else None
        alpha = -scale if rates is not None else -lr * scale
        with torch.no_grad():
            cache = net.forward_cache(x)
            step = self._deltas(net, cache, _target(net, x, target))
            for i, (part, shape) in enumerate(zip(_parts(net), self.structure, strict=True), 1):
                d = step.deltas[i] if rates is None else step.deltas[i] * rates
                if shape.products is LINEAR and i not in self._mirrored:
                    _addmm_(part.weight, d.transpose(-1, -2), cache.post[i - 1], alpha=alpha)
                    if part.bias is not None:
                        part.bias.add_(d.sum(dim=-2), alpha=alpha)
                    continue
                self._mirrored_step(i, part, shape, cache.post[i - 1], d, alpha)
            self._advance()
        return step

    def _mirrored_step(
        self, block: int, part: nn.Module, shape, h: torch.Tensor, d: torch.Tensor, alpha: float
    ) -> None:
        """``sgd_step`` on a block whose parameters learned feedback mirrors (Kolen-Pollack).

        The forward parameter ``theta`` and its mirror ``V`` take the same step
        ``x <- (1 - decay) x + alpha g``, so only their difference needs the decay:
        ``V <- theta' + (1 - decay) (V - theta)``, with ``theta'`` the stepped parameter (the
        Kolen-Pollack theorem, DESIGN.md section 10). The forward step is fa's fused one (a
        Linear weight's is one ``addmm_`` with ``beta = 1 - decay``: no gradient tensor is
        written), and the mirror takes two element-wise passes, before and after it. Nothing
        is kept between steps but the parameters. Equal to ``backward``, the decay and
        ``torch.optim.SGD`` up to rounding."""
        decay = self._decays.get(block, 0.0)
        transported = self.structure[block - 1].transported
        forward = dict(part.named_parameters())
        mirrors = [  # (V, theta in V's layout)
            (self.get_parameter(buffer), forward[name].mT if place.transposed else forward[name])
            for place in self._learned
            if place.block == block
            for name, buffer in place.buffers
        ]
        for mirror, weight in mirrors:
            mirror.sub_(weight)  # V - theta, before theta moves
        if shape.products is LINEAR:  # the weight is transported and decays, the bias not
            _addmm_(part.weight, d.transpose(-1, -2), h, alpha=alpha, beta=1.0 - decay)
            if part.bias is not None:
                part.bias.add_(d.sum(dim=-2), alpha=alpha)
        else:
            grads = shape.products.param_vjp(part, h, d)
            if decay:
                torch._foreach_mul_([forward[n] for n in forward if n in transported], 1.0 - decay)
            torch._foreach_add_(list(forward.values()), [grads[n] for n in forward], alpha=alpha)
        for mirror, weight in mirrors:  # each stands for a transported parameter
            torch.add(weight, mirror, alpha=1.0 - decay, out=mirror)

    def _batch_size(self, x: torch.Tensor) -> int:
        return x.shape[1] if self.stack_size else x.shape[0]

    def _deltas(self, net: nn.Module, cache, target: torch.Tensor) -> Step:
        plan = self.plan
        loss, e = net.objective.error(cache.pre[-1], target)
        activations = _activations(net)
        activated = cache.activated or cache.post
        if cache.masks:  # dropout: the forward pass's mask multiplies the masked block's delta
            activated = _undropped(activations, cache.pre, activated, cache.masks)
        slope = times_slope(activations, cache.pre, activated)
        if cache.masks:
            slope = _masked(slope, cache.masks)
        if self._live:
            self._refresh(net)
        buffers = self._buffers if not self._learned else {**self._buffers, **self._parameters}
        through = None if not cache.tails else _Through(net, cache, self.structure, buffers)
        values, auxiliary_losses = direct_values(
            plan, e, buffers["direct"], cache, target, _auxiliary_error, through
        )
        weights = [None] + [
            part.weight if shape.products is LINEAR else None
            for part, shape in zip(_parts(net), self.structure, strict=True)
        ]
        d = propagate(plan, e, slope, values, buffers, weights, through)
        return Step(loss, d, auxiliary_losses)

    def _refresh(self, net: nn.Module) -> None:
        """Make every sign-concordant term's parameters from the live forward ones:
        ``M * sign(theta)`` with M a scale (uSF), a stored ``|R|`` (frSF) or one drawn for this
        step (brSF)."""
        parts = _parts(net)
        step = int(self.steps.reshape(-1)[0]) if "steps" in self._buffers else 0
        for place in self._live:
            spec = place.mode
            forward = dict(parts[place.block - 1].named_parameters())
            shapes = dict(self.structure[place.block - 1].parameters)
            magnitudes = dict(place.magnitudes)
            for name, buffer in place.buffers:
                value, theta = self.get_buffer(buffer), forward[name]
                torch.sign(theta.transpose(-1, -2) if place.transposed else theta, out=value)
                if spec.mode.redraw:
                    value.mul_(self._redraw(place, name, tuple(value.shape), step))
                elif name in magnitudes:
                    value.mul_(self.get_buffer(magnitudes[name]))
                else:
                    value.mul_(spec.scale_for(shapes[name]))

    def _redraw(self, place: _Place, name: str, shape: tuple[int, ...], step: int) -> torch.Tensor:
        """brSF's ``|R|`` for one training step, from the term's family and a generator of the
        seed, the step and the place, one per stacked member; drawn on the rule's device in its
        dtype, so no host round trip."""
        term = self.config.layer(place.layer).terms[place.index]
        spec = term.feedback or self.config.feedback
        one = shape[1:] if self.stack_size else shape
        labels = ("layer", place.layer, "term", place.index, name)
        dtype, device = self.direct.dtype, self.direct.device
        draws = [
            feedback_families.draw(
                spec,
                one,
                step_generator(seed, step, *labels, device=device),
                dtype=dtype,
                device=device,
            ).abs_()
            for seed in self.seeds
        ]
        return torch.stack(draws) if self.stack_size else draws[0]

    def extra_repr(self) -> str:
        config = self.config
        return f"config={config.name!r}, sizes={list(self.sizes)}, feedback={config.feedback}"


def _parts(net: nn.Module) -> list[nn.Module]:
    """The linear part of every block."""
    return list(net.layers) if isinstance(net, MLP) else [block.linear for block in net.blocks]


def _activations(net: nn.Module) -> Activation | tuple[Activation, ...]:
    if isinstance(net, MLP):
        return net.activation
    return tuple(block.activation for block in net.blocks)


def _target(net: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if net.objective.uses_labels:
        return target
    return x if isinstance(net, MLP) else x.flatten(1)  # an autoencoder's target is its input


class _Through:
    """The products of one forward pass that are not matrix products: a block's part with
    fixed (or its own) parameters, a tail's linearisation at the forward point."""

    def __init__(self, net: nn.Module, cache, structure, buffers: Mapping[str, torch.Tensor]):
        self.blocks, self.cache, self.structure, self.buffers = (
            net.blocks,
            cache,
            structure,
            buffers,
        )

    def tail_back(self, i: int, g: torch.Tensor) -> torch.Tensor:
        """``J_tau_i^T g``: from ``h^i``'s shape to ``a^i``'s."""
        if self.structure[i - 1].plain_tail:
            return g
        return self.blocks[i - 1].tail.vjp(self.cache.tails[i - 1], g)

    def term(self, layer: int, term: PlannedTerm, source: torch.Tensor) -> torch.Tensor:
        """The value of a product term of hidden layer ``layer`` on ``source`` (the delta it
        reads); a ``ConfigError`` naming the layer, the term and the block if the block's part
        cannot take it."""
        try:
            return self._term(term, source)
        except RuntimeError as problem:
            part = type(self.blocks[term.block - 1].linear).__name__
            raise ConfigError(
                f"layer {layer}, term {term.index} ({term.kind}): block {term.block}'s "
                f"{part} cannot run it: {str(problem).splitlines()[0]}"
            ) from None

    def _term(self, term: PlannedTerm, source: torch.Tensor) -> torch.Tensor:
        j = term.block
        block, shape = self.blocks[j - 1], self.structure[j - 1]
        if term.transported:
            params = dict(block.linear.named_parameters())
        else:
            params = {name: self.buffers[buffer] for name, buffer in term.parameters}
            if not term.backward and shape.products is LINEAR:  # kept as W~^T
                params = {name: value.t() for name, value in params.items()}
        point = self.cache.post[j - 1]
        if not term.backward:  # block j's part on block j-1's tail's linearisation
            lower = j - 1
            signal = source
            if not self.structure[lower - 1].plain_tail:
                signal = self.blocks[lower - 1].tail.jvp(self.cache.tails[lower - 1], source)
            return shape.products.input_jvp(block.linear, params, point, signal)
        # block j's part backwards, then back through block j-1's tail
        return self.tail_back(j - 1, shape.products.input_vjp(block.linear, params, point, source))


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


def _addmm_(
    c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, alpha: float, beta: float = 1.0
) -> torch.Tensor:
    """``c <- beta c + alpha a @ b`` in place."""
    if a.dim() == 2:
        return c.addmm_(a, b, beta=beta, alpha=alpha)
    return c.baddbmm_(a, b, beta=beta, alpha=alpha)


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
    activation: Activation | Sequence[Activation],
    pre: Sequence[torch.Tensor],
    post: Sequence[torch.Tensor],
) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """``slope(i, g) = g * f_i'(a^i)`` for a forward pass (``pre[i - 1] = a^i``).

    ``activation`` is every layer's, or one per block; ``post[i]`` must be ``f(a^i)`` (an MLP's
    ``h^i``, a block model's ``ForwardCache.activated``). A new tensor every call. ``f'(a^i)``
    itself is computed at most once per layer.
    """
    if isinstance(activation, Activation):
        fused = _FUSED_SLOPE.get(activation.function)
        if fused is not None:
            return lambda i, g: fused(g, pre[i - 1], post[i])
        derivatives: dict[int, torch.Tensor] = {}

        def slope(i: int, g: torch.Tensor) -> torch.Tensor:
            if i not in derivatives:
                derivatives[i] = activation.derivative(pre[i - 1], post[i])
            return g * derivatives[i]

        return slope
    activations = tuple(activation)
    derivatives: dict[int, torch.Tensor] = {}

    def block_slope(i: int, g: torch.Tensor) -> torch.Tensor:
        function, a = activations[i - 1], pre[i - 1]
        fused = _FUSED_SLOPE.get(function.function)
        if fused is not None:
            return fused(g, a, post[i])
        if i not in derivatives:
            derivatives[i] = function.derivative(a, post[i])
        return g * derivatives[i]

    return block_slope


def _undropped(
    activation: Activation | Sequence[Activation],
    pre: Sequence[torch.Tensor],
    activated: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None],
) -> list[torch.Tensor]:
    """``f(a^i)`` before dropout for every masked block (the cache keeps the dropped values),
    so that ``f'(a^i)`` is the activation's own slope."""
    values = list(activated)
    for i, mask in enumerate(masks, start=1):
        if mask is not None and i < len(values):
            function = activation if isinstance(activation, Activation) else activation[i - 1]
            values[i] = function.function(pre[i - 1])
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


def direct_values(
    plan: Plan,
    e: torch.Tensor,
    direct: torch.Tensor,
    cache,
    target: torch.Tensor,
    auxiliary_error: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    through: _Through | None = None,
) -> tuple[dict[tuple[int, int], torch.Tensor], dict[int, torch.Tensor]]:
    """``eps^i D^i`` of every direct term, keyed by (layer, term index), and auxiliary losses.

    Every term of a batch-wide signal (the output error ``e``, the one-hot target) is a column
    block of one product per signal, ``e @ D_stacked`` ((..., N, n_L) @ (..., n_L, sum n_i)),
    reshaped to its block's ``a^i``. An auxiliary term
    reads the layer's own logits ``flatten(h^i) (D^i)^T`` (DESIGN.md sections 4 and 9) and
    ``auxiliary_error(logits, labels)`` returns ``(loss, e^i)``; its value ``e^i D^i`` in
    ``h^i``'s shape goes back through the block's tail (``through``, for models with tails).
    One that reads ``a^i`` (``cache.pre``) has logits ``flatten(a^i) (D^i)^T`` and its value
    in ``a^i``'s shape, with no tail to go back through.
    """
    values: dict[tuple[int, int], torch.Tensor] = {}
    losses: dict[int, torch.Tensor] = {}
    stacked: dict[str, tuple[torch.Tensor, int]] = {}
    for name, columns in plan.signals:
        signal = SIGNALS[name].make(e, target, e.shape[-1])
        stacked[name] = (_mm(signal, direct[..., columns]), columns.start)
    for layer in plan.layers:
        i = layer.layer
        for term in layer.values:
            if term.auxiliary:
                D = direct[..., term.columns]  # (..., n_L, numel(h^i)) or numel(a^i)
                pre = term.reads == "pre"
                h = cache.a(i) if pre else cache.post[i]
                flat = h if through is None else h.flatten(1)
                losses[i], e_i = auxiliary_error(_mm(flat, D.transpose(-1, -2)), target)
                value = _mm(e_i, D)
                if through is not None:
                    value = value.view(h.shape)
                    value = value if pre else through.tail_back(i, value)
                values[i, term.index] = value
            else:
                product, start = stacked[term.signal]
                value = product[..., term.columns.start - start : term.columns.stop - start]
                if through is not None:
                    value = value.reshape(e.shape[0], *through.structure[i - 1].pre)
                values[i, term.index] = value
    return values, dict(sorted(losses.items()))


def propagate(
    plan: Plan,
    e: torch.Tensor,
    slope: Callable[[int, torch.Tensor], torch.Tensor],
    values: Mapping[tuple[int, int], torch.Tensor],
    matrices: Mapping[str, torch.Tensor],
    weights: Sequence[torch.Tensor | None],
    through: _Through | None = None,
) -> dict[int, torch.Tensor]:
    """Every hidden delta ``d^i = F_i(terms) * f'(a^i)`` in dependency order, and ``d^L = e``.

    Args:
        plan: the rule's ``Plan``.
        e: the output error, (..., N, n_L).
        slope: ``slope(i, g) = g * f'(a^i)`` for the hidden layers ``i = 1..L-1``
            (``times_slope``).
        values: ``direct_values``'s direct terms.
        matrices: the fixed parameters by buffer name.
        weights: ``weights[i] = W^i`` (a term on the forward weight, backprop's, reads
            ``W^{i+1}``; index 0 unused).
        through: the non-matrix products of this forward pass (models with tails or parts
            other than Linear).

    Each matrix-product term is an ``addmm`` onto the layer's running sum, so ``F_i``'s weights
    cost no separate pass: ``mean(direct, above)`` is ``addmm(eD, d B, beta=1/2, alpha=1/2)``.
    Any other term's value is added like a direct value.
    """
    d: dict[int, torch.Tensor] = {plan.hidden + 1: e}
    direct_only: dict[int, torch.Tensor] = {}
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

        for term in layer.values:
            add(values[i, term.index], term.coefficient)
        for term in layer.products:
            j = term.source
            if term.final:
                source = d[j]
            else:
                if j not in direct_only:
                    direct_only[j] = slope(j, values[j, plan.direct_term[j]])
                source = direct_only[j]
            if not term.matrix:
                add(through.term(i, term, source), term.coefficient)
                continue
            if term.transported:  # the forward weight W^block itself
                matrix = weights[term.block]
                if not term.backward:
                    matrix = matrix.transpose(-1, -2)
            else:
                matrix = matrices[term.buffer]
            if total is None:
                total, scale = _mm(source, matrix), term.coefficient
            else:
                total = _addmm(total, source, matrix, beta=scale, alpha=term.coefficient)
                scale = 1.0
        d[i] = slope(i, total) if scale == 1.0 else slope(i, total).mul_(scale)
    return dict(sorted(d.items()))
