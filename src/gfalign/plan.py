"""Compiling a rule for a model: what the engine executes every step, fixed once.

A rule (``gfalign.rules.RuleConfig``) names terms per hidden layer; a model's ``structure``
(one ``BlockShape`` per block) says what each block's linear part and tail are. ``compile_plan``
turns the two, with the places of the rule's feedback parameters (``Slot``), into a ``Plan``: per
hidden layer, in dependency order, a tuple of typed operations, each one small frozen
dataclass whose fields are all it means:

    Project        eps D^i for a batch-wide error signal (the output error, the target): a
                   column block of one product per signal
    ProjectLocal   e^i D^i, the layer's own auxiliary classifier's error
    MatrixProduct  s @ M fused into the layer's running sum (M a feedback matrix, or a forward
                   weight), where both blocks are Linear with an identity tail between them
    PartProduct    a block's part run on a neighbour's delta, backwards (a VJP, then back
                   through a tail) or forwards (a JVP on the lower tail's linearisation), with
                   feedback parameters or the forward ones

The executor (``gfalign.execute``) runs a plan; it reads only these types, never a rule's name.

Example:
    >>> from gfalign.network import mlp
    >>> from gfalign.engine import FeedbackRule
    >>> plan = FeedbackRule("s1", mlp([4, 3, 3, 2])).plan
    >>> [type(op).__name__ for layer in plan.layers for op in (*layer.values, *layer.products)]
    ['Project', 'Project', 'MatrixProduct']
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gfalign.blocks import GENERIC, LINEAR, LinearProducts, linear_products
from gfalign.rules import ConfigError, RuleConfig
from gfalign.terms import KINDS, SIGNALS, ModeSpec

__all__ = [
    "BlockShape",
    "GraphAbove",
    "GraphBelow",
    "LayerPlan",
    "MatrixProduct",
    "PartProduct",
    "Plan",
    "Project",
    "ProjectLocal",
    "Slot",
    "TiledProduct",
    "compile_plan",
    "structure_of",
]


@dataclass(frozen=True)
class BlockShape:
    """What a rule knows of one block of the model it was built for.

    Attributes:
        products: the Jacobian products of its linear part (``gfalign.blocks``).
        parameters: (name, shape) of each parameter of its linear part, in order.
        pre: one example's ``a^i`` shape.
        post: one example's ``h^i`` shape (``()`` for the output block).
        plain_tail: the tail is the identity.
        producers: the blocks whose outputs its input is made of (0: the network's input).
        plain_input: it reads its one producer's output itself (a chain's ``h^{i-1}``), not
            through an edge (``gfalign.network.Edge``).
        kept: the parameters of normalisation layers in its part, which feedback never
            replaces (DESIGN.md section 12).
    """

    products: LinearProducts
    parameters: tuple[tuple[str, tuple[int, ...]], ...]
    pre: tuple[int, ...]
    post: tuple[int, ...]
    plain_tail: bool
    producers: tuple[int, ...] = ()
    plain_input: bool = True
    kept: tuple[str, ...] = ()

    @property
    def transported(self) -> tuple[str, ...]:
        """The parameters a feedback term replaces by fixed ones: the weight of an affine part
        (its bias does not enter its input Jacobian), every parameter of any other but its
        normalisation layers'."""
        names = tuple(name for name, _ in self.parameters if name not in self.kept)
        return ("weight",) if self.products is not GENERIC and "weight" in names else names

    @property
    def width(self) -> int:
        """``numel(a^i)`` of one example."""
        return math.prod(self.pre)


NORMALISATIONS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
)
"""The normalisation layers a block's part may hold, whose parameters feedback keeps."""


def _kept(part: nn.Module) -> tuple[str, ...]:
    return tuple(
        f"{name}.{own}" if name else own
        for name, module in part.named_modules()
        if isinstance(module, NORMALISATIONS)
        for own, _ in module.named_parameters(recurse=False)
    )


def structure_of(model: nn.Module) -> tuple[BlockShape, ...]:
    """The ``BlockShape`` of every block of ``model`` (a ``gfalign.network.Network``)."""
    blocks = model.blocks
    lead = 1 if model.stack_size else 0  # stacked parameters carry the members first
    edges = model.edges or [None] * len(blocks)
    shapes = []
    for i, (block, edge) in enumerate(zip(blocks, edges, strict=True)):
        producers = (i,) if edge is None else tuple(edge.producers)
        shapes.append(
            BlockShape(
                linear_products(block.linear),
                tuple((n, tuple(p.shape[lead:])) for n, p in block.linear.named_parameters()),
                tuple(model.pre_shapes[i]),
                tuple(model.post_shapes[i + 1]) if i + 1 < len(blocks) else (),
                not block.tail.modules,
                producers,
                edge is None or (edge.function is None and producers == (i,)),
                _kept(block.linear),
            )
        )
    return tuple(shapes)


def is_chain(structure: Sequence[BlockShape]) -> bool:
    """Every block reads the block before it, directly: section 9's case."""
    return all(shape.plain_input and shape.producers == (i,) for i, shape in enumerate(structure))


def consumers_of(structure: Sequence[BlockShape], block: int) -> tuple[int, ...]:
    """The blocks whose input reads ``block``'s output (0: the network's input)."""
    return tuple(c for c, shape in enumerate(structure, start=1) if block in shape.producers)


@dataclass(frozen=True)
class Slot:
    """Where one term's feedback parameters live in the rule's state.

    ``buffers`` pairs each parameter name with its buffer (or, for learned feedback, its
    parameter); a direct term's matrix is ``columns`` of the stacked ``direct`` buffer.
    ``block`` is the block whose forward parameters the feedback ones stand in for, ``mode``
    how they are had each step (``None``: drawn once and fixed), ``magnitudes`` frSF's stored
    ``|R|`` by parameter name.

    ``product_layout``: the buffer holds the transpose of the parameter it stands for, the
    matrix ``s @ B`` reads. A Linear block's part run forwards is ``s @ W~^T``, so its below
    term keeps ``B_down = W~^T`` (n_{i-1}, n_i), the matrix of DESIGN.md section 3; every
    conversion between the two layouts is ``stored``/``parameter`` here.
    """

    layer: int
    index: int
    buffers: tuple[tuple[str, str], ...]
    columns: slice | None = None
    product_layout: bool = False
    block: int = 0
    mode: ModeSpec | None = None
    magnitudes: tuple[tuple[str, str], ...] = ()
    consumer: bool = False  # a graph's: one of several consumers a term runs (``block``)

    @property
    def live(self) -> bool:
        return self.mode is not None and self.mode.mode.live

    @property
    def learned(self) -> bool:
        return self.mode is not None and self.mode.mode.learned

    def parameter(self, value: torch.Tensor) -> torch.Tensor:
        """A stored value in the shape of the parameter it stands for."""
        return value.transpose(-1, -2) if self.product_layout else value

    stored = parameter  # the transpose is its own inverse: a parameter in the stored layout


@dataclass(frozen=True)
class Project:
    """``eps D^i`` of a batch-wide signal: ``columns`` of the signal's product."""

    index: int
    coefficient: float
    signal: str
    columns: slice


@dataclass(frozen=True)
class ProjectLocal:
    """``e^i D^i``: the auxiliary classifier of the layer's activity, ``h^i`` (``reads =
    "post"``, the value going back through the block's tail) or ``a^i`` (``"pre"``), through
    ``columns`` of the ``direct`` buffer, against the target or the network's prediction
    (``against``, ``gfalign.terms.Signal``)."""

    index: int
    coefficient: float
    columns: slice
    reads: str
    against: str = "target"
    classifier: str = ""  # the buffer of C^i, for a classifier on the input (reads "input")


@dataclass(frozen=True)
class MatrixProduct:
    """``s @ M`` onto the layer's running sum, ``s`` the delta of layer ``source`` (final, or
    its direct-only ``t``): ``M`` the feedback matrix in ``buffer``, or (``buffer`` empty) the
    forward weight of block ``weight_of``, transposed where the part runs forwards."""

    index: int
    coefficient: float
    source: int
    final: bool
    buffer: str = ""
    weight_of: int = 0
    forwards: bool = False


@dataclass(frozen=True)
class PartProduct:
    """Block ``block``'s linear part run on the delta of layer ``source``: backwards
    (``J^T s``, then back through block ``block - 1``'s tail) or forwards (``J`` on block
    ``block - 1``'s tail's linearisation of ``s``), with the feedback parameters ``parameters``
    (name, buffer) of slot (``layer``, ``index``), or the forward ones (``parameters`` empty).
    ``kind`` names the term's kind, for messages."""

    index: int
    coefficient: float
    source: int
    final: bool
    block: int
    backward: bool
    parameters: tuple[tuple[str, str], ...] = ()
    kind: str = ""

    @property
    def transported(self) -> bool:
        return not self.parameters


@dataclass(frozen=True)
class TiledProduct:
    """Block ``block``'s part backwards with the fixed kernel ``parameters`` (name, buffer) of
    ``n_out`` output channels, on the output error tiled over ``a^block``'s positions, then
    back through block ``block - 1``'s tail: biotorch's DFA for a conv layer."""

    index: int
    coefficient: float
    block: int
    parameters: tuple[tuple[str, str], ...]
    kind: str = "tiled"


@dataclass(frozen=True)
class GraphAbove:
    """On a model graph: ``J_tau_i^T sum_c J_{G_c, h^i}^T J_phi_c(params_c)^T s^c`` over the
    consumers ``c`` of block ``i``, each with its feedback parameters ``(name, buffer)`` (empty:
    the forward ones), ``s^c`` final or direct-only (DESIGN.md section 12)."""

    index: int
    coefficient: float
    final: bool
    consumers: tuple[tuple[int, tuple[tuple[str, str], ...]], ...]
    kind: str = ""


@dataclass(frozen=True)
class GraphBelow:
    """On a model graph: ``J_phi_i(params) J_{G_i}(J_tau_p s^p for each producer p)``: the
    producers' signals carried through their tails and block ``i``'s edge, then block ``i``'s
    part with the feedback parameters ``(name, buffer)``."""

    index: int
    coefficient: float
    final: bool
    producers: tuple[int, ...]
    parameters: tuple[tuple[str, str], ...]
    kind: str = ""


Value = Project | ProjectLocal
Product = MatrixProduct | PartProduct | TiledProduct | GraphAbove | GraphBelow


@dataclass(frozen=True)
class LayerPlan:
    """The operations of hidden layer ``layer``: direct values first, then products."""

    layer: int
    values: tuple[Value, ...]
    products: tuple[Product, ...]


@dataclass(frozen=True)
class Plan:
    """A rule's operations, fixed at construction.

    ``layers`` are in dependency order; ``direct_term[j]`` is the index of layer ``j``'s single
    direct term (it defines ``t^j``) where it has exactly one; ``signals`` the column range of
    the ``direct`` buffer that each batch-wide error signal multiplies (the output error ``e``
    first: ``output_width`` columns).
    """

    hidden: int
    layers: tuple[LayerPlan, ...]
    direct_term: dict[int, int]
    signals: tuple[tuple[str, slice], ...]

    @property
    def output_width(self) -> int:
        return next((c.stop - c.start for name, c in self.signals if name == "output"), 0)


def compile_plan(
    config: RuleConfig,
    structure: Sequence[BlockShape],
    slots: Mapping[tuple[int, int], Slot],
    signals: tuple[tuple[str, slice], ...],
) -> Plan:
    """The ``Plan`` of ``config`` on a model of ``structure``, its feedback in ``slots``.

    A term that runs a block's part is a ``MatrixProduct`` where that part is Linear and the
    tail between the two blocks is the identity (a product fused into the layer's sum), else a
    ``PartProduct``. Backwards: block i+1's part, then back through block i's tail; forwards:
    block i's part on block i-1's tail's linearisation. Either way the tail between is
    block - 1's.
    """
    if not is_chain(structure):
        return _compile_graph(config, structure, slots, signals)
    hidden = len(structure) - 1
    direct_term = {
        j: next(k for k, term in enumerate(layer.terms) if KINDS[term.kind].is_direct)
        for j, layer in enumerate(config.layers, start=1)
        if sum(KINDS[term.kind].is_direct for term in layer.terms) == 1
    }
    layers = []
    for i in config.order():
        layer = config.layer(i)
        values: list[Value] = []
        products: list[Product] = []
        for k, (term, weight) in enumerate(zip(layer.terms, layer.coefficients(), strict=True)):
            kind = KINDS[term.kind]
            slot = slots.get((i, k))
            if kind.is_direct:
                signal = SIGNALS[term.error]
                if signal.local:
                    values.append(_project_local(k, weight, slot, signal))
                else:
                    values.append(Project(k, weight, term.error, slot.columns))
                continue
            block = i + kind.part
            if kind.tiled:  # the output error e, tiled over a^block's positions
                if structure[block - 1].products is LINEAR and structure[block - 2].plain_tail:
                    # no positions to tile over: e K, K (n_out, n_i)
                    products.append(MatrixProduct(k, weight, hidden + 1, True, slot.buffers[0][1]))
                else:
                    products.append(TiledProduct(k, weight, block, slot.buffers))
                continue
            source = i + kind.reads
            final = kind.always_final or source == hidden + 1 or term.source == "final"
            matrix = structure[block - 1].products is LINEAR and structure[block - 2].plain_tail
            if matrix:
                if kind.has_parameters:
                    products.append(MatrixProduct(k, weight, source, final, slot.buffers[0][1]))
                else:
                    products.append(
                        MatrixProduct(
                            k, weight, source, final, weight_of=block, forwards=not kind.backward
                        )
                    )
            else:
                parameters = slot.buffers if kind.has_parameters else ()
                products.append(
                    PartProduct(
                        k, weight, source, final, block, kind.backward, parameters, term.kind
                    )
                )
        layers.append(LayerPlan(i, tuple(values), tuple(products)))
    return Plan(hidden, tuple(layers), direct_term, signals)


def _direct_terms(config: RuleConfig) -> dict[int, int]:
    """Each layer's single direct term, where it has exactly one (it defines ``t^j``)."""
    return {
        j: next(k for k, term in enumerate(layer.terms) if KINDS[term.kind].is_direct)
        for j, layer in enumerate(config.layers, start=1)
        if sum(KINDS[term.kind].is_direct for term in layer.terms) == 1
    }


def _project_local(k: int, weight: float, slot: Slot, signal) -> ProjectLocal:
    classifier = dict(slot.buffers).get("classifier", "")
    return ProjectLocal(k, weight, slot.columns, signal.reads, signal.against, classifier)


def _values(layer, i: int, slots) -> list[Value]:
    values: list[Value] = []
    for k, (term, weight) in enumerate(zip(layer.terms, layer.coefficients(), strict=True)):
        if KINDS[term.kind].is_direct:
            signal, slot = SIGNALS[term.error], slots[i, k]
            if signal.local:
                values.append(_project_local(k, weight, slot, signal))
            else:
                values.append(Project(k, weight, term.error, slot.columns))
    return values


def _neighbours(structure: Sequence[BlockShape], i: int, backward: bool) -> tuple[int, ...]:
    """The blocks a term of block ``i`` reads: its consumers (backwards), else its producers
    other than the network's input."""
    if backward:
        return consumers_of(structure, i)
    return tuple(p for p in structure[i - 1].producers if p > 0)


def graph_order(config: RuleConfig, structure: Sequence[BlockShape]) -> list[int]:
    """The hidden blocks in an order where every final delta a term reads is computed before
    it (consumers for terms that run backwards, producers for the rest); a ``ConfigError``
    naming the blocks of a cycle."""
    hidden = len(structure) - 1
    needs: dict[int, set[int]] = {i: set() for i in range(1, hidden + 1)}
    direct = _direct_terms(config)
    for i, layer in enumerate(config.layers, start=1):
        for k, term in enumerate(layer.terms):
            kind = KINDS[term.kind]
            if kind.is_direct:
                continue
            neighbours = _neighbours(structure, i, kind.backward)
            if not neighbours:
                raise ConfigError(
                    f"layer {i}, term {k} ({term.kind}): block {i} reads only the network's "
                    "input, so there is no lower delta to carry; allowed here: direct, above, "
                    "backprop"
                )
            final = kind.always_final or term.source == "final"
            for j in neighbours:
                if j > hidden:
                    continue  # the output block: its delta is e
                if final:
                    needs[i].add(j)
                elif j not in direct:
                    raise ConfigError(
                        f"layer {i}, term {k} ({term.kind}): it reads block {j}'s direct-only "
                        f"delta, but layer {j} has not exactly one direct term; allowed: one, "
                        "or source = 'final'"
                    )
    order: list[int] = []
    ready = sorted(i for i, wanted in needs.items() if not wanted)
    done: set[int] = set()
    while ready:
        i = ready.pop()  # the highest ready block first, as backpropagation goes
        order.append(i)
        done.add(i)
        ready = sorted(set(ready) | {j for j, w in needs.items() if j not in done and w <= done})
    if len(order) < hidden:
        cycle = sorted(set(needs) - done)
        raise ConfigError(
            f"the final deltas of layers {cycle} depend on each other on this graph (a cycle); "
            "make one of the terms read a direct-only delta (source = 'direct-only')"
        )
    return order


def _compile_graph(
    config: RuleConfig,
    structure: Sequence[BlockShape],
    slots: Mapping[tuple[int, ...], Slot],
    signals: tuple[tuple[str, slice], ...],
) -> Plan:
    hidden = len(structure) - 1
    layers = []
    for i in graph_order(config, structure):
        layer = config.layer(i)
        products: list[Product] = []
        for k, (term, weight) in enumerate(zip(layer.terms, layer.coefficients(), strict=True)):
            kind = KINDS[term.kind]
            if kind.is_direct:
                continue
            final = kind.always_final or term.source == "final"
            if kind.backward:
                consumers = tuple(
                    (c, slots[i, k, c].buffers if kind.has_parameters else ())
                    for c in consumers_of(structure, i)
                )
                products.append(GraphAbove(k, weight, final, consumers, term.kind))
            else:
                parameters = slots[i, k].buffers if kind.has_parameters else ()
                producers = _neighbours(structure, i, False)
                products.append(GraphBelow(k, weight, final, producers, parameters, term.kind))
        layers.append(LayerPlan(i, tuple(_values(layer, i, slots)), tuple(products)))
    return Plan(hidden, tuple(layers), _direct_terms(config), signals)
