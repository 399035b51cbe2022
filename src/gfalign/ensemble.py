"""Several networks trained as one stacked computation: seeds of a run in a single pass.

A network of the paper's small grid (2x200) cannot keep even two cores busy at batch 32: its
products are small and much of a step is per-operation overhead. ``EnsembleTrainer`` stacks K
members that share a configuration structure (the same sizes, activation, objective and rule
terms) and trains them together: ``Network.stack`` and ``FeedbackRule.stack`` give one network and
one rule whose parameters are (K, ...) tensors, and the rule engine's own step runs on them,
every product a ``torch.bmm`` / ``torch.baddbmm`` over (K, N, n) tensors. There is no second
copy of the rule here: K = 1 is the plain run.

Member ``k`` follows ``Trainer(nets[k], rules[k], data, configs[k])`` exactly, up to rounding:

- its own data order (``torch.randperm`` from a generator seeded by ``configs[k].seed``), each
  member gathering its own batch, stacked to (K, N, n_0);
- its own weights and fixed feedback matrices (members may differ in seeds, in feedback
  families and, under plain SGD, in learning rate);
- its optimizer: plain SGD is applied in place by ``FeedbackRule.sgd_step`` like ``Trainer``'s
  fused path; any other ``torch.optim`` optimizer of ``gfalign.train.OPTIMIZERS`` (momentum,
  Adam, RMSprop, ...) is element-wise, so one optimizer over the stacked parameters steps every
  member as its own would. Its state is stacked from the members' optimizers when an epoch
  begins and handed back when it ends, so a member can always continue alone.

Models of blocks other than MLPs (conv nets, user modules) do not stack: their members train
one after the other, each a plain engine step, in the same epochs and records.

Each member is a real ``Trainer`` (``ensemble.members``): its history has the same records as a
``Trainer``'s, its ``state_dict`` is a ``Trainer``'s, and it can continue alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gfalign.engine import FeedbackRule
from gfalign.network import Network
from gfalign.train import (
    DivergenceError,
    Metric,
    TrainConfig,
    Trainer,
    _plain_sgd_group,
    make_optimizer,
    stacking_problem,
)

if TYPE_CHECKING:
    from gfalign.data import Dataset

__all__ = ["EnsembleEpoch", "EnsembleTrainer"]


@dataclass(frozen=True)
class EnsembleEpoch:
    """An epoch in progress: the members it trains, their orders (K, n), the step count and
    the learning rate (``shared_rate``, or one per member as ``rate_vector`` (K, 1, 1))."""

    active: tuple[int, ...]
    orders: torch.Tensor
    steps: int
    shared_rate: float | None
    rate_vector: torch.Tensor | None


# TrainConfig fields that may differ between members; the others are shared by the stack.
_PER_MEMBER = ("lr", "seed")


class EnsembleTrainer:
    """Trains K networks of one configuration structure as a single stacked computation.

    Args:
        nets: the K networks, with equal sizes, activation, objective, dtype and device.
        rules: their rules, one per network, with the same terms (feedback matrices and
            families may differ).
        data: a ``gfalign.data.Dataset`` shared by every member.
        config: one ``TrainConfig`` for all, or one per member; members may differ only in
            ``lr`` (under plain SGD) and ``seed`` (the shuffling seed).
        metrics: as for ``Trainer``, run for every member with that member's ``Trainer``.

    Member ``k`` gives the results of ``Trainer(nets[k], rules[k], data, configs[k])`` up to
    rounding. Learning rates are read from the members' optimizers at the start of every epoch
    (a scheduler stepping per epoch works; one changing the rate within an epoch does not). A
    member whose loss stops being finite leaves the stack: its ``DivergenceError`` is kept in
    ``errors[k]``, the others go on.

    Example:
        >>> from gfalign.data import synthetic
        >>> from gfalign.network import mlp
        >>> data = synthetic(200, 50)
        >>> nets = [mlp([784, 50, 50, 10], seed=s) for s in range(3)]
        >>> rules = [FeedbackRule("s1", net, seed=s) for s, net in enumerate(nets)]
        >>> configs = [TrainConfig(epochs=2, lr=1e-3, seed=s, optimizer="adam") for s in range(3)]
        >>> histories = EnsembleTrainer(nets, rules, data, configs).fit()
        >>> [len(history) for history in histories]
        [2, 2, 2]
    """

    def __init__(
        self,
        nets: Sequence[Network],
        rules: Sequence[FeedbackRule],
        data: Dataset,
        config: TrainConfig | Sequence[TrainConfig],
        *,
        metrics: Sequence[Metric] = (),
    ) -> None:
        nets, rules = list(nets), list(rules)
        if len(rules) != len(nets):
            raise ValueError(f"{len(nets)} networks but {len(rules)} rules: give one rule each")
        configs = [config] * len(nets) if isinstance(config, TrainConfig) else list(config)
        if len(configs) != len(nets):
            raise ValueError(f"{len(nets)} networks but {len(configs)} configs")
        members = [
            Trainer(net, rule, data, member_config, metrics=metrics)
            for net, rule, member_config in zip(nets, rules, configs, strict=True)
        ]
        self._adopt(members)

    @classmethod
    def from_trainers(cls, trainers: Sequence[Trainer]) -> EnsembleTrainer:
        """Stack existing trainers (fresh or resumed, all at the same epoch) into an ensemble."""
        ensemble = cls.__new__(cls)
        ensemble._adopt(list(trainers))
        return ensemble

    # --------------------------------------------------------------------------- structure

    def _adopt(self, members: list[Trainer]) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        first = members[0]
        problem = stacking_problem(first.config)
        if problem is not None:
            raise ValueError(problem)
        for k, member in enumerate(members):
            where = f"ensemble member {k}"
            _check_config(where, member.config, first.config)
            if member.data is not first.data:
                raise ValueError(f"{where}: every member must train on the same dataset object")
            if member.epoch != first.epoch:
                raise ValueError(
                    f"{where} has finished {member.epoch} epochs, member 0 {first.epoch}"
                )
            _check_network(where, member.net, first.net)
            _check_rule(where, member.rule, first.rule)
        self.members = members
        self.data, self.config = first.data, first.config
        self.plan = first.rule.plan
        self.errors: dict[int, DivergenceError] = {}
        self.fused = all(_plain_sgd_group(member.optimizer) is not None for member in members)
        self.stacks = first.net.is_chain_of_linear
        if not self.fused and len({m.config.lr for m in members}) > 1:
            raise ValueError(
                "stacked members with optimizer "
                f"{first.config.optimizer!r} and its options need one learning rate; only plain "
                "SGD takes one rate per member"
            )
        self._stacked_for: tuple[int, ...] = ()

    @property
    def active(self) -> list[int]:
        """The members still training (those that have not diverged)."""
        return [k for k in range(len(self.members)) if k not in self.errors]

    @property
    def histories(self) -> list[list[dict[str, float]]]:
        """One ``Trainer`` history per member."""
        return [member.history for member in self.members]

    @property
    def epoch(self) -> int:
        """Epochs finished by the members still training."""
        active = self.active
        return self.members[active[0]].epoch if active else self.members[0].epoch

    def state_dict(self) -> dict[str, Any]:
        """Every member's ``Trainer.state_dict`` and the divergences; ``torch.load``-able."""
        return {
            "members": [member.state_dict() for member in self.members],
            "errors": {
                k: {"epoch": error.epoch, "step": error.step, "loss": error.loss}
                for k, error in self.errors.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if len(state["members"]) != len(self.members):
            raise ValueError(
                f"a state of {len(state['members'])} members for an ensemble of {len(self.members)}"
            )
        for member, member_state in zip(self.members, state["members"], strict=True):
            member.load_state_dict(member_state)
        self.errors = {
            int(k): DivergenceError(
                value["epoch"], value["step"], value["loss"], self.members[int(k)].history
            )
            for k, value in state["errors"].items()
        }
        self._stacked_for = ()

    def split(self) -> list[Trainer]:
        """The members as ordinary ``Trainer``s, to continue or save one by one."""
        return list(self.members)

    # ------------------------------------------------------------------ stacking the state

    def _stack(self, active: list[int]) -> None:
        """The active members' networks, rules and optimizer state as stacked ones."""
        members = [self.members[k] for k in active]
        if self._stacked_for != tuple(active):
            self._net = Network.stack([member.net for member in members])
            self._rule = FeedbackRule.stack([member.rule for member in members])
            self._stacked_for = tuple(active)
        else:
            with torch.no_grad():
                for stacked, *own in zip(
                    self._net.parameters(), *(m.net.parameters() for m in members), strict=True
                ):
                    torch.stack(own, out=stacked)
                for name, stacked in self._net.named_buffers():  # a dropout step counter
                    torch.stack([m.net.get_buffer(name) for m in members], out=stacked)
                for name, stacked in self._rule.named_buffers():
                    torch.stack([m.rule.get_buffer(name) for m in members], out=stacked)
                for name, stacked in self._rule.named_parameters():
                    torch.stack([m.rule.get_parameter(name) for m in members], out=stacked)
        self._optimizer = None
        if not self.fused:
            self._optimizer = self._stacked_optimizer(members)

    def _stacked_optimizer(self, members: list[Trainer]) -> torch.optim.Optimizer:
        """One optimizer over the stacked parameters, its state stacked from the members'."""
        optimizer = make_optimizer(members[0].config, _trained(self._net, self._rule))
        own = [_trained(member.net, member.rule) for member in members]
        for position, stacked in enumerate(_trained(self._net, self._rule)):
            states = [
                member.optimizer.state.get(params[position])
                for member, params in zip(members, own, strict=True)
            ]
            if all(not state for state in states):
                continue
            optimizer.state[stacked] = _stack_state(states, stacked)
        return optimizer

    def _unstack(self, active: list[int]) -> None:
        """Hand the stacked parameters (and optimizer state) back to the members."""
        members = [self.members[k] for k in active]
        own = [_trained(member.net, member.rule) for member in members]
        with torch.no_grad():
            for position, stacked in enumerate(_trained(self._net, self._rule)):
                for k, member in enumerate(members):
                    own[k][position].copy_(stacked[k])
                    if self._optimizer is not None and stacked in self._optimizer.state:
                        member.optimizer.state[own[k][position]] = _member_state(
                            self._optimizer.state[stacked], stacked, k
                        )
            for name, stacked in self._rule.named_buffers():  # a step counter, say
                for k, member in enumerate(members):
                    member.rule.get_buffer(name).copy_(stacked[k])
            for name, stacked in self._net.named_buffers():  # the dropout step counter
                for k, member in enumerate(members):
                    member.net.get_buffer(name).copy_(stacked[k])

    # --------------------------------------------------------------------------- training

    def train_epoch(
        self, on_batch: Callable[[int, int], None] | None = None
    ) -> dict[int, dict[str, float]]:
        """One pass over the training set for every active member; returns their records.

        ``seconds`` of each record is the time of the stacked steps, shared by all members.
        """
        if not self.active:
            return {}
        epoch = self.begin_epoch()
        step_losses: list[torch.Tensor] = []
        started = time.perf_counter()
        for step in range(epoch.steps):
            step_losses.append(self.train_step(epoch, step))
            if on_batch is not None:
                on_batch(step + 1, epoch.steps)
        losses = torch.stack(step_losses)  # (steps, K)
        torch.isfinite(losses).all().item()  # waits for the device before reading the clock
        seconds = time.perf_counter() - started
        return self.end_epoch(epoch, losses, seconds)

    def begin_epoch(self) -> EnsembleEpoch:
        """Stack the active members and draw every member's order for a new epoch."""
        active = self.active
        if self.stacks:
            self._stack(active)
        n, size = len(self.data.train), self.config.batch_size
        device = self.data.train.x.device
        members = [self.members[k] for k in active]
        # (K, n): every member's own permutation, from its own generator as in Trainer.
        orders = torch.stack(
            [torch.randperm(n, generator=member.generator) for member in members]
        ).to(device)
        rates = [member.optimizer.param_groups[0]["lr"] for member in members]
        shared = rates[0] if all(rate == rates[0] for rate in rates) else None
        vector = (
            None
            if shared is not None
            else torch.tensor(rates, dtype=self.data.train.x.dtype, device=device).view(-1, 1, 1)
        )
        if self._optimizer_in_use:
            for group in self._optimizer.param_groups:
                group["lr"] = rates[0]
        return EnsembleEpoch(tuple(active), orders, math.ceil(n / size), shared, vector)

    @property
    def _optimizer_in_use(self) -> bool:
        return self.stacks and not self.fused

    def train_step(self, epoch: EnsembleEpoch, step: int) -> torch.Tensor:
        """Step ``step`` of ``epoch`` for every active member; returns their losses (K,)."""
        size, x_all, y_all = self.config.batch_size, self.data.train.x, self.data.train.y
        batches = epoch.orders[:, step * size : (step + 1) * size]  # (K, N)
        if not self.stacks:  # one member after the other, each a plain step
            return torch.stack(
                [
                    self.members[k].step(x_all.index_select(0, batch), y_all.index_select(0, batch))
                    for k, batch in zip(epoch.active, batches, strict=True)
                ]
            )
        K = len(epoch.active)
        index = batches.reshape(-1)  # (K * N,)
        x = x_all.index_select(0, index).view(K, -1, *x_all.shape[1:])
        y = y_all.index_select(0, index).view(K, -1)
        reduction = self.config.reduction
        if self.fused:
            rate = epoch.shared_rate if epoch.shared_rate is not None else epoch.rate_vector
            return self._rule.sgd_step(self._net, x, y, lr=rate, reduction=reduction).loss
        loss = self._rule.backward(self._net, x, y, reduction=reduction).loss
        self._optimizer.step()
        return loss

    def end_epoch(
        self, epoch: EnsembleEpoch, losses: torch.Tensor, seconds: float
    ) -> dict[int, dict[str, float]]:
        """Copy the weights back to the members and record the epoch for each of them."""
        if self.stacks:
            self._unstack(list(epoch.active))
        records: dict[int, dict[str, float]] = {}
        for position, k in enumerate(epoch.active):
            try:
                records[k] = self.members[k].record_epoch(losses[:, position], seconds)
            except DivergenceError as error:
                self.errors[k] = error
        return records

    def fit(
        self,
        epochs: int | None = None,
        *,
        on_epoch: Callable[[dict[int, dict[str, float]]], None] | None = None,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> list[list[dict[str, float]]]:
        """Train until ``epochs`` (default ``config.epochs``) have finished; one history each."""
        target = self.config.epochs if epochs is None else epochs
        while self.active and self.epoch < target:
            records = self.train_epoch(on_batch)
            if on_epoch is not None:
                on_epoch(records)
        return self.histories


def _stack_state(states: Sequence[Mapping[str, Any]], stacked: torch.Tensor) -> dict[str, Any]:
    """Members' optimizer states of one parameter as the state of its stacked tensor: entries
    shaped like the parameter are stacked, the others (step counts) are shared."""
    first = states[0]
    result: dict[str, Any] = {}
    for key, value in first.items():
        if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(stacked.shape[1:]):
            result[key] = torch.stack([state[key] for state in states])
        elif isinstance(value, torch.Tensor):
            result[key] = value.clone()
        else:
            result[key] = value
    return result


def _member_state(state: Mapping[str, Any], stacked: torch.Tensor, k: int) -> dict[str, Any]:
    """Member ``k``'s slice of a stacked parameter's optimizer state."""
    result: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(stacked.shape):
            result[key] = value[k].clone()
        elif isinstance(value, torch.Tensor):
            result[key] = value.clone()
        else:
            result[key] = value
    return result


def _check_config(where: str, config: TrainConfig, first: TrainConfig) -> None:
    shared = replace(config, **{name: getattr(first, name) for name in _PER_MEMBER})
    if shared != first:
        differing = [
            f.name for f in fields(TrainConfig) if getattr(shared, f.name) != getattr(first, f.name)
        ]
        raise ValueError(
            f"{where}: its TrainConfig differs from member 0's in {', '.join(differing)}; "
            f"members may differ only in {' and '.join(_PER_MEMBER)}"
        )


def _check_network(where: str, net, first) -> None:
    if net.is_chain_of_linear != first.is_chain_of_linear:
        kinds = {True: "an MLP", False: "a model of blocks"}
        raise ValueError(
            f"{where}: {kinds[net.is_chain_of_linear]}, member 0 {kinds[first.is_chain_of_linear]}"
        )
    if net.is_chain_of_linear:
        mine = (net.sizes, net.activation.name, net.objective.name)
        theirs = (first.sizes, first.activation.name, first.objective.name)
        if mine != theirs:
            raise ValueError(
                f"{where}: network (sizes, activation, objective) {mine} differs from member "
                f"0's {theirs}"
            )
    parameter, reference = next(net.parameters()), next(first.parameters())
    if (parameter.dtype, parameter.device) != (reference.dtype, reference.device):
        raise ValueError(
            f"{where}: network on {parameter.device} in {parameter.dtype}, member 0's on "
            f"{reference.device} in {reference.dtype}"
        )


def _check_rule(where: str, rule: FeedbackRule, first: FeedbackRule) -> None:
    if rule.plan != first.plan or rule.structure != first.structure:
        raise ValueError(
            f"{where}: rule {rule.config.name!r} has other terms than member 0's rule "
            f"{first.config.name!r}; stacked members need the same configuration structure "
            f"(they may differ in seeds and feedback families)"
        )
    shapes = {name: tuple(b.shape) for name, b in rule.named_buffers()}
    reference = {name: tuple(b.shape) for name, b in first.named_buffers()}
    if shapes != reference:
        raise ValueError(f"{where}: feedback matrices {shapes} differ from member 0's {reference}")


def _trained(net: nn.Module, rule: FeedbackRule) -> list[torch.Tensor]:
    """What an optimizer steps: the network's parameters, then the rule's learned feedback."""
    return [*net.parameters(), *rule.parameters()]
