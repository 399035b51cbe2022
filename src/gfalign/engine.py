"""The rule engine: one mechanism that computes every configuration's deltas and updates.

``FeedbackRule`` is a rule compiled for one model. It holds the resolved ``RuleConfig``, its
feedback parameters as buffers (saved in ``state_dict``, moved by ``.to``; learned ones as
parameters) and the ``Plan`` of typed operations that ``gfalign.plan`` compiled for the
model's structure. ``rule.backward(net, x, target)`` runs the forward pass, executes the plan
(``gfalign.execute``: the output error, every hidden delta in dependency order) and writes
every parameter's local update into ``.grad`` (``gfalign.updates``; DESIGN.md sections 2 and 9)

    grad theta^i = J_theta phi_i(h^{i-1})^T d^i,    d^L = e

(for a Linear block ``grad W^i = (d^i)^T h^{i-1}``, ``grad b^i = sum_n d^i_n``), without an
autograd graph and without stepping, so any ``torch.optim`` optimizer can apply it;
``rule.sgd_step`` applies a plain SGD step in place instead. A model is a
``gfalign.network.Network`` (an MLP from ``mlp``, a model of blocks from ``gfalign.models``).
The engine never looks at a rule's name: only at its terms' declared kinds.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

import torch
from torch import nn

from gfalign import feedback as feedback_families
from gfalign import updates
from gfalign.blocks import CONV2D, LINEAR
from gfalign.data.errors import DataError
from gfalign.execute import Step, deltas_of
from gfalign.feedback import FeedbackSpec
from gfalign.network import OBJECTIVES, mlp
from gfalign.plan import BlockShape, Plan, Slot, compile_plan, consumers_of, is_chain, structure_of
from gfalign.rules import ConfigError, RuleConfig, Term, resolve
from gfalign.terms import KINDS, SIGNALS, step_generator

__all__ = ["BlockShape", "FeedbackRule", "Plan", "Step", "structure_of"]


class FeedbackRule(nn.Module):
    """A credit-assignment rule for a model, with its fixed feedback parameters.

    Args:
        config: a preset name (``"bp"``, ``"fa"``, ``"dfa"``, ``"s1"`` ... ``"s3-aux"``), a
            configuration dictionary, or a ``RuleConfig`` (see ``gfalign.rules``).
        model: the model the rule trains (a ``gfalign.network.Network``: an ``mlp``, a model
            of blocks from ``gfalign.models``), or an MLP's widths ``[n_0, ..., n_L]``.
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
        >>> net = mlp([784, 800, 800, 10], activation="tanh", seed=0)
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
        given = model
        if not isinstance(model, nn.Module):
            try:
                model = mlp(model)  # a rule for an MLP of these widths: its structure alone
            except ValueError as problem:
                raise ConfigError(str(problem)) from None
        self.structure = shapes = structure_of(model)
        self.input_shape = tuple(model.input_shape)
        self.objective = model.objective.name if given is model else None
        self.pre_shapes = tuple(shape.pre for shape in shapes)
        self.sizes = (math.prod(self.input_shape), *(shape.width for shape in shapes))
        if len(shapes) < 2:
            raise ConfigError(
                f"a feedback rule needs at least one hidden layer; sizes {list(self.sizes)}"
            )
        self.config = resolve(config, len(shapes) - 1, feedback)
        if self.objective is not None and self.config.uses_auxiliary:
            self._check_labels(OBJECTIVES[self.objective])
        self.seed = seed
        self.seeds = (seed,)  # one per stacked member
        self.slots: dict[tuple[int, int], Slot] = {}

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
            width = math.prod(shapes[i - 1].post) if reads_post else shapes[i - 1].width
            stacked.append(self._draw(i, k, term, (n_out, width)))
            columns = slice(offset, offset + width)
            buffers: tuple[tuple[str, str], ...] = (("matrix", "direct"),)
            if signal.reads == "input":  # its own classifier C^i of the block's input
                if not shapes[i - 1].plain_input:
                    raise ConfigError(
                        f"layer {i}, term {k} (direct:{term.error}): a classifier of the "
                        f"block's input h^{i - 1}, but block {i} reads an edge of the graph; "
                        "allowed: a block that reads the block before it"
                    )
                reads = self.sizes[0] if i == 1 else math.prod(shapes[i - 2].post)
                name = f"layer{i}_term{k}_classifier"
                self.register_buffer(name, self._draw(i, k, term, (n_out, reads), "classifier"))
                buffers += (("classifier", name),)
            self.slots[i, k] = Slot(i, k, buffers, columns)
            if not signal.local:
                signals[term.error] = slice(signals.get(term.error, columns).start, columns.stop)
            offset += width
        self.register_buffer(
            "direct", torch.cat(stacked, dim=1) if stacked else torch.empty(n_out, 0)
        )

        chain = is_chain(shapes)
        shared: dict[tuple, Slot] = {}
        for i, layer in enumerate(self.config.layers, start=1):
            for k, term in enumerate(layer.terms):
                kind = KINDS[term.kind]
                if kind.part is None or not kind.has_parameters:
                    continue
                if kind.tiled and not chain:
                    raise ConfigError(
                        f"layer {i}, term {k} ({term.kind}): a tiled term runs the block above "
                        "on a chain of blocks; this model is a graph; allowed: direct"
                    )
                if chain or not kind.backward:
                    self.slots[i, k] = self._register(i, k, term)
                    continue
                # On a graph a term that runs parts backwards runs every consumer's, with the
                # consumer's one draw: every producer it reads through a term of the same kind
                # and family shares it, as a layer's feedback kernel is shared in biotorch's
                # layer replacement (DESIGN.md section 12).
                for c in consumers_of(shapes, i):
                    spec = term.feedback or self.config.feedback
                    signature = (c, term.kind, repr(spec), repr(term.mode))
                    if signature in shared:
                        self.slots[i, k, c] = replace(shared[signature], layer=i, index=k)
                    else:
                        shared[signature] = self._register(i, k, term, block=c)
                        self.slots[i, k, c] = shared[signature]
        self._live = _unique(slot for slot in self.slots.values() if slot.live)
        self._learned = _unique(slot for slot in self.slots.values() if slot.learned)
        self.decays = self._forward_decays()
        self.mirrored = frozenset(slot.block for slot in self._learned)
        if any(slot.mode.mode.redraw for slot in self._live):
            self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.plan = compile_plan(self.config, shapes, self.slots, tuple(signals.items()))
        self.stack_size = 0  # K for the rule of K stacked members (FeedbackRule.stack)
        self.to(device=device, dtype=dtype)
        if given is model and not model.is_chain_of_linear:
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
        # Two examples (a normalisation layer in training mode needs more than one), and the
        # model's statistics put back: the rehearsal trains nothing.
        x = torch.zeros(2, *self.input_shape, dtype=parameter.dtype, device=parameter.device)
        labels = torch.zeros(2, dtype=torch.int64, device=parameter.device)
        kept = {
            name: buffer.clone()
            for name, buffer in model.named_buffers()
            if not name.endswith("dropout_step")
        }
        try:
            self.deltas(model, x, labels)
        finally:
            with torch.no_grad():
                for name, value in kept.items():
                    model.get_buffer(name).copy_(value)

    @classmethod
    def stack(cls, rules: Sequence[FeedbackRule]) -> FeedbackRule:
        """K rules of one configuration structure as one rule whose fixed parameters are
        stacked, (K, ...) each, copied: the rule of ``Network.stack`` of their networks. Members may
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
            if [p.mode for p in rule.slots.values()] != [p.mode for p in first.slots.values()]:
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

    def _register(self, i: int, k: int, term: Term, block: int | None = None) -> Slot:
        """Draw and register the feedback parameters of a term that runs a block's part: block
        ``i + part`` of a chain, or the consumer ``block`` of a graph."""
        kind = KINDS[term.kind]
        consumer = block is not None
        block = i + kind.part if block is None else block
        stands_for = self.structure[block - 1]  # the block whose part it runs
        shapes = dict(stands_for.parameters)
        names = stands_for.transported
        if kind.tiled:  # a kernel of n_out output channels in place of the part's weight
            if stands_for.products not in (LINEAR, CONV2D):
                raise ConfigError(
                    f"layer {i}, term {k} ({term.kind}): block {block}'s part is neither a "
                    "Linear nor a Conv2d; allowed: a tiled term runs a Linear or Conv2d part"
                )
            names = ("weight",)
            shapes = {"weight": (self.sizes[-1], *shapes["weight"][1:])}
        base = f"layer{i}_term{k}_{term.kind}" + (f"_block{block}" if consumer else "")
        where = ("block", block) if consumer else ()
        # A Linear block run forwards keeps the matrix B_down = W~^T, (n_{i-1}, n_i) (Slot).
        product_layout = not kind.backward and stands_for.products is LINEAR
        mode = term.mode
        stored = "draw" if mode is None else mode.mode.stored
        buffers, magnitudes = [], []
        for name in names:
            shape = shapes[name][::-1] if product_layout else shapes[name]
            if names == ("weight",):
                buffer, labels = base, where
            else:
                buffer, labels = f"{base}_{name.replace('.', '_')}", (*where, name)
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
        return Slot(
            i,
            k,
            tuple(buffers),
            product_layout=product_layout,
            block=block,
            mode=mode,
            magnitudes=tuple(magnitudes),
            consumer=consumer,
        )

    def _forward_decays(self) -> dict[int, float]:
        """The decay of each block whose parameters learned feedback stands in for (both decay,
        as Kolen-Pollack's rule has it); two different decays for one block are refused."""
        decays: dict[int, float] = {}
        for slot in self._learned:
            decay = slot.mode.decay
            if decays.setdefault(slot.block, decay) != decay:
                raise ConfigError(
                    f"layer {slot.layer}, term {slot.index}: decay {decay:g} for block "
                    f"{slot.block}, which another learned term decays by "
                    f"{decays[slot.block]:g}; give them one decay"
                )
        return {block: decay for block, decay in decays.items() if decay}

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
        self, layer: int, index: int, net: nn.Module | None = None, *, consumer: int | None = None
    ) -> dict[str, torch.Tensor]:
        """The feedback parameters of term ``index`` (0-based) of hidden layer ``layer``
        (1-based): ``{"matrix": D^i}`` for a direct term; for an above or below term the
        parameters it puts in place of the forward ones, by the forward parameter's name and in
        its shape (``{"weight": ...}`` for a Linear or Conv2d part). A sign-concordant term's
        are made from ``net``'s live parameters (give ``net``; without it, those of the last
        step). On a model graph an above term holds parameters for each consumer block of
        ``layer``: ``consumer`` picks one (default: the first)."""
        place = self._place(layer, index, consumer)
        if place.live and net is not None:
            with torch.no_grad():
                self._refresh(net)
        if place.columns is not None:  # D^i, and an input classifier's C^i
            others = {name: getattr(self, buffer) for name, buffer in place.buffers[1:]}
            return {"matrix": self.direct[:, place.columns], **others}
        return {name: place.parameter(getattr(self, buffer)) for name, buffer in place.buffers}

    def set_feedback(
        self,
        layer: int,
        index: int,
        values: Mapping[str, torch.Tensor],
        *,
        consumer: int | None = None,
    ) -> None:
        """Replace a term's fixed parameters (to test reductions such as FA with the forward
        parameters, or to study one); ``values`` as ``feedback`` returns them."""
        current = self.feedback(layer, index, consumer=consumer)
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
        return {key: self.matrix(*key) for key in sorted(self.slots) if len(key) == 2}

    def _place(self, layer: int, index: int, consumer: int | None = None) -> Slot:
        key = (layer, index) if consumer is None else (layer, index, consumer)
        if key not in self.slots and consumer is None:  # a graph's term: its first consumer's
            key = next((s for s in sorted(self.slots) if s[:2] == (layer, index)), key)
        chain = self.slots.get((layer, index))
        if key not in self.slots and chain is not None and chain.block == consumer:
            key = (layer, index)  # a chain's term, named by its one consumer
        try:
            return self.slots[key]
        except KeyError:
            raise ConfigError(
                f"layer {layer}, term {index}: no fixed matrix there "
                f"(rule {self.config.name!r} has {sorted(self.slots)})"
            ) from None

    def learned_slots(self, block: int) -> tuple[Slot, ...]:
        """The slots of learned feedback standing in for ``block``'s parameters."""
        return tuple(slot for slot in self._learned if slot.block == block)

    def feedback_state(self, net: nn.Module) -> Mapping[str, torch.Tensor]:
        """Every feedback tensor by buffer name for this step, sign-concordant ones made from
        ``net``'s live parameters first."""
        if self._live:
            self._refresh(net)
        return self._buffers if not self._learned else {**self._buffers, **self._parameters}

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
        if (tuple(net.input_shape), tuple(net.pre_shapes)) != (self.input_shape, self.pre_shapes):
            if net.is_chain_of_linear and all(len(shape.pre) == 1 for shape in self.structure):
                raise ConfigError(
                    f"rule {self.config.name!r} was built for sizes {list(self.sizes)}, the "
                    f"network has {list(net.sizes)}"
                )
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
            return self._run(net, cache, x, target)

    def _run(self, net: nn.Module, cache, x: torch.Tensor, target: torch.Tensor) -> Step:
        """The plan on one forward pass, with labels out of range and inputs that are not
        finite named in one line instead of an index error or a quiet NaN loss."""
        labels = net.objective.uses_labels
        try:
            step = deltas_of(self, net, cache, self._target(net, x, target))
        except (RuntimeError, IndexError):
            if labels:
                self._check_labels_range(target)
            raise
        if not bool(torch.isfinite(step.loss).all()) and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise DataError(
                f"the inputs hold {bad} NaN or infinite values of {x.numel()}; allowed: finite "
                "numbers"
            )
        return step

    def _check_labels_range(self, target: torch.Tensor) -> None:
        classes = self.sizes[-1]
        if torch.is_floating_point(target) or torch.is_complex(target):
            raise ConfigError(
                f"labels of dtype {target.dtype}; allowed: integer class indices in [0, {classes})"
            )
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= classes:
            wrong = high if high >= classes else low
            raise ConfigError(
                f"label {wrong} is out of range; allowed: class indices in [0, {classes})"
            )

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
            step = self._run(net, cache, x, target)
            updates.write_gradients(self, net, cache, step.deltas, scale)
            self._advance()
        return step

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
        own gradient for any other part (``gfalign.updates.sgd_apply``). A Linear block's
        weight update is one ``addmm_`` into ``W^i``: no gradient tensor is written and no
        optimizer pass reads it back, which is most of the cost of a small batch besides the
        matrix products. Equal to ``backward`` followed by ``torch.optim.SGD(lr=lr).step()``
        up to rounding; ``.grad`` is left untouched. Every delta is computed before any
        parameter changes, so a backprop term reads the weights of before the step.

        Example:
            >>> net = mlp([784, 100, 10], seed=0)
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
            step = self._run(net, cache, x, target)
            updates.sgd_apply(self, net, cache, step.deltas, alpha, rates)
            self._advance()
        return step

    def _batch_size(self, x: torch.Tensor) -> int:
        return x.shape[1] if self.stack_size else x.shape[0]

    def _target(self, net: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return net.objective.target(x, labels, stacked=bool(self.stack_size))

    def _refresh(self, net: nn.Module) -> None:
        """Make every sign-concordant term's parameters from the live forward ones:
        ``M * sign(theta)`` with M a scale (uSF), a stored ``|R|`` (frSF) or one drawn for this
        step (brSF)."""
        parts = net.layers
        step = int(self.steps.reshape(-1)[0]) if "steps" in self._buffers else 0
        for place in self._live:
            spec = place.mode
            forward = dict(parts[place.block - 1].named_parameters())
            shapes = dict(self.structure[place.block - 1].parameters)
            magnitudes = dict(place.magnitudes)
            for name, buffer in place.buffers:
                value, theta = self.get_buffer(buffer), forward[name]
                torch.sign(place.stored(theta), out=value)
                if spec.mode.redraw:
                    value.mul_(self._redraw(place, name, tuple(value.shape), step))
                elif name in magnitudes:
                    value.mul_(self.get_buffer(magnitudes[name]))
                else:
                    value.mul_(spec.scale_for(shapes[name]))

    def _redraw(self, place: Slot, name: str, shape: tuple[int, ...], step: int) -> torch.Tensor:
        """brSF's ``|R|`` for one training step, from the term's family and a generator of the
        seed, the step and the place, one per stacked member; drawn on the rule's device in its
        dtype, so no host round trip."""
        term = self.config.layer(place.layer).terms[place.index]
        spec = term.feedback or self.config.feedback
        one = shape[1:] if self.stack_size else shape
        labels = ("layer", place.layer, "term", place.index, name)
        labels += ("block", place.block) if place.consumer else ()
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


def _scale(reduction: str, n: int) -> float:
    if reduction == "mean":
        return 1.0 / n
    if reduction == "sum":
        return 1.0
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _unique(slots: Iterable[Slot]) -> tuple[Slot, ...]:
    """``slots`` less those whose buffers an earlier one holds (a graph's shared draws), so
    that a shared buffer is made and learned once a step."""
    seen: set[tuple] = set()
    kept = []
    for slot in slots:
        if slot.buffers not in seen:
            seen.add(slot.buffers)
            kept.append(slot)
    return tuple(kept)
