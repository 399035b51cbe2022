"""Several networks trained as one stacked computation: seeds of a run in a single pass.

A network of the paper's small grid (2x200) cannot keep even two cores busy at batch 32: its
products are small and much of a step is per-operation overhead. ``EnsembleTrainer`` stacks K
members that share a configuration structure (the same sizes, activation, objective and rule
terms) and trains them together: every product becomes one ``torch.bmm`` / ``torch.baddbmm``
over (K, N, n) tensors and every element-wise operation runs once for all members.

Member ``k`` follows ``Trainer(nets[k], rules[k], data, configs[k])`` exactly, up to rounding:

- its own data order (``torch.randperm`` from a generator seeded by ``configs[k].seed``), each
  member gathering its own batch, stacked to (K, N, n_0);
- its own weights and fixed feedback matrices (members may differ in seeds, in feedback
  families and in learning rate);
- the rule engine's own term loop (``gfalign.engine.direct_values`` and ``propagate``, which
  take stacked tensors), so every preset and configuration runs without a line naming it;
- plain SGD applied in place (``W <- W - lr * scale * d^T h``), like ``Trainer``'s fused path.

Other optimizers keep per-parameter state that the stack does not carry: the ensemble refuses
them. Each member is a real ``Trainer`` (``ensemble.members``): its history has the same records
as a ``Trainer``'s, its ``state_dict`` is a ``Trainer``'s, and it can continue alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional

from gfalign.engine import FeedbackRule, direct_values, propagate, times_slope
from gfalign.network import MLP
from gfalign.train import DivergenceError, Metric, TrainConfig, Trainer, _plain_sgd_group

if TYPE_CHECKING:
    from gfalign.data import Dataset

__all__ = ["STACKED_OBJECTIVES", "EnsembleEpoch", "EnsembleTrainer"]


def _stacked_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-member mean cross-entropy (K,) and ``e = softmax - onehot`` (K, N, C)."""
    log_probabilities = torch.log_softmax(logits, dim=-1)
    index = labels.unsqueeze(-1)  # (K, N, 1)
    loss = log_probabilities.gather(-1, index).squeeze(-1).mean(dim=-1).neg_()
    error = log_probabilities.exp_()
    error.sub_(functional.one_hot(labels, logits.shape[-1]))
    return loss, error


def _stacked_squared_reconstruction(
    logits: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-member half squared error (K,) and the paper's ``e`` (see ``gfalign.network``)."""
    reconstruction = torch.sigmoid(logits)
    difference = reconstruction - target
    loss = 0.5 * difference.square().sum(dim=-1).mean(dim=-1)
    error = difference.mul_(reconstruction).mul_(1.0 - reconstruction)
    return loss, error


# Every objective of gfalign.network.OBJECTIVES, for stacked (K, N, n) outputs: the loss of each
# member (K,) and the output error e (K, N, n_L).
STACKED_OBJECTIVES: dict[
    str, Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
] = {
    "classification": _stacked_cross_entropy,
    "autoencoder": _stacked_squared_reconstruction,
}


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
            ``lr`` and ``seed`` (the shuffling seed). Plain SGD only.
        metrics: as for ``Trainer``, run for every member with that member's ``Trainer``.

    Member ``k`` gives the results of ``Trainer(nets[k], rules[k], data, configs[k])`` up to
    rounding. Learning rates are read from the members' optimizers at the start of every epoch
    (a scheduler stepping per epoch works; one changing the rate within an epoch does not). A
    member whose loss stops being finite leaves the stack: its ``DivergenceError`` is kept in
    ``errors[k]``, the others go on.

    Example:
        >>> nets = [MLP([784, 200, 200, 10], seed=s) for s in range(5)]
        >>> rules = [FeedbackRule("s1", net.sizes, seed=s) for s, net in enumerate(nets)]
        >>> configs = [TrainConfig(epochs=3, seed=s) for s in range(5)]
        >>> histories = EnsembleTrainer(nets, rules, data, configs).fit()
        >>> len(histories), histories[0][-1]["test_error"]
    """

    def __init__(
        self,
        nets: Sequence[MLP],
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
        for k, member in enumerate(members):
            where = f"ensemble member {k}"
            _check_config(where, member.config, first.config)
            if _plain_sgd_group(member.optimizer) is None:
                raise ValueError(
                    f"{where}: the ensemble applies plain SGD only (optimizer 'sgd' without "
                    f"momentum, dampening, weight decay, nesterov or maximize); it has "
                    f"{member.config.optimizer!r} with {dict(member.config.optimizer_options)}. "
                    "Train it with gfalign.train.Trainer"
                )
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
        self._objective = STACKED_OBJECTIVES[first.net.objective.name]
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

    # --------------------------------------------------------------------------- training

    def _stack(self, active: list[int]) -> None:
        """Copy the active members' weights and feedback matrices into the stacked tensors."""
        nets = [self.members[k].net for k in active]
        rules = [self.members[k].rule for k in active]
        if self._stacked_for != tuple(active):
            with torch.no_grad():
                # (K, n_i, n_{i-1}) and (K, n_i) for layers i = 1..L (index 0 unused).
                self._weights = [None] + [
                    torch.stack([net.weight(i) for net in nets])
                    for i in range(1, nets[0].depth + 1)
                ]
                self._biases = [None] + [
                    torch.stack([net.bias(i) for net in nets]) for i in range(1, nets[0].depth + 1)
                ]
                self._matrices = {
                    name: torch.stack([rule.get_buffer(name) for rule in rules])
                    for name, _ in rules[0].named_buffers()
                }
            self._stacked_for = tuple(active)
            return
        with torch.no_grad():
            for i in range(1, nets[0].depth + 1):
                torch.stack([net.weight(i) for net in nets], out=self._weights[i])
                torch.stack([net.bias(i) for net in nets], out=self._biases[i])
            for name, stacked in self._matrices.items():
                torch.stack([rule.get_buffer(name) for rule in rules], out=stacked)

    def _unstack(self, active: list[int]) -> None:
        with torch.no_grad():
            for position, k in enumerate(active):
                net = self.members[k].net
                for i in range(1, net.depth + 1):
                    net.weight(i).copy_(self._weights[i][position])
                    net.bias(i).copy_(self._biases[i][position])

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
        return EnsembleEpoch(tuple(active), orders, math.ceil(n / size), shared, vector)

    def train_step(self, epoch: EnsembleEpoch, step: int) -> torch.Tensor:
        """Step ``step`` of ``epoch`` for every active member; returns their losses (K,)."""
        size, x_all, y_all = self.config.batch_size, self.data.train.x, self.data.train.y
        K = len(epoch.active)
        index = epoch.orders[:, step * size : (step + 1) * size].reshape(-1)  # (K * N,)
        x = x_all.index_select(0, index).view(K, -1, x_all.shape[1])
        y = y_all.index_select(0, index).view(K, -1)
        scale = 1.0 / x.shape[1] if self.config.reduction == "mean" else 1.0
        alpha = -scale * (epoch.shared_rate if epoch.shared_rate is not None else 1.0)
        return self._step(x, y, alpha, epoch.rate_vector)

    def end_epoch(
        self, epoch: EnsembleEpoch, losses: torch.Tensor, seconds: float
    ) -> dict[int, dict[str, float]]:
        """Copy the weights back to the members and record the epoch for each of them."""
        self._unstack(list(epoch.active))
        records: dict[int, dict[str, float]] = {}
        for position, k in enumerate(epoch.active):
            try:
                records[k] = self.members[k].record_epoch(losses[:, position], seconds)
            except DivergenceError as error:
                self.errors[k] = error
        return records

    def _step(
        self,
        x: torch.Tensor,
        labels: torch.Tensor,
        alpha: float,
        rate_vector: torch.Tensor | None,
    ) -> torch.Tensor:
        """One stacked SGD step on x (K, N, n_0) and labels (K, N); returns the losses (K,)."""
        net = self.members[0].net
        weights, biases, plan = self._weights, self._biases, self.plan
        depth = len(weights) - 1
        function = net.activation.function
        with torch.no_grad():
            post, pre = [x], []
            for i in range(1, depth + 1):
                # (K, N, n_i) = b^i (K, 1, n_i) + h^{i-1} (K, N, n_{i-1}) @ (W^i)^T
                a = torch.baddbmm(biases[i].unsqueeze(1), post[-1], weights[i].transpose(1, 2))
                pre.append(a)
                if i < depth:
                    post.append(function(a))
            target = labels if net.objective.uses_labels else x
            loss, e = self._objective(pre[-1], target)
            slope = times_slope(net.activation, pre, post)
            values, _ = direct_values(
                plan, e, self._matrices["direct"], post, target, _stacked_cross_entropy
            )
            d = propagate(plan, e, slope, values, self._matrices, weights)
            for i in range(1, depth + 1):
                delta = d[i] if rate_vector is None else d[i] * rate_vector
                weights[i].baddbmm_(delta.transpose(1, 2), post[i - 1], alpha=alpha)
                biases[i].add_(delta.sum(dim=1), alpha=alpha)
        return loss

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


def _check_network(where: str, net: MLP, first: MLP) -> None:
    mine = (net.sizes, net.activation.name, net.objective.name)
    theirs = (first.sizes, first.activation.name, first.objective.name)
    if mine != theirs:
        raise ValueError(
            f"{where}: network (sizes, activation, objective) {mine} differs from member 0's "
            f"{theirs}"
        )
    parameter, reference = net.weight(1), first.weight(1)
    if (parameter.dtype, parameter.device) != (reference.dtype, reference.device):
        raise ValueError(
            f"{where}: network on {parameter.device} in {parameter.dtype}, member 0's on "
            f"{reference.device} in {reference.dtype}"
        )


def _check_rule(where: str, rule: FeedbackRule, first: FeedbackRule) -> None:
    if rule.plan != first.plan:
        raise ValueError(
            f"{where}: rule {rule.config.name!r} has other terms than member 0's rule "
            f"{first.config.name!r}; stacked members need the same configuration structure "
            f"(they may differ in seeds and feedback families)"
        )
    shapes = {name: tuple(b.shape) for name, b in rule.named_buffers()}
    reference = {name: tuple(b.shape) for name, b in first.named_buffers()}
    if shapes != reference:
        raise ValueError(f"{where}: feedback matrices {shapes} differ from member 0's {reference}")
