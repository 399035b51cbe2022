"""The training loop: epochs over device-resident tensors, any rule, any ``torch.optim`` optimizer.

The loop knows nothing of rule names: it asks the rule for gradients and the optimizer for a
step. Every epoch it evaluates train and test loss and error and appends one plain record to the
history. A ``Trainer`` carries all of its state (network, rule, optimizer, shuffling generator,
history) in ``state_dict``, so a run resumes exactly where it stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from gfalign.data.errors import DataError
from gfalign.engine import FeedbackRule
from gfalign.network import MLP
from gfalign.rules import ConfigError, Limit, check_fields, render

if TYPE_CHECKING:
    from gfalign.data import Dataset, Split

__all__ = [
    "OPTIMIZERS",
    "DivergenceError",
    "TrainConfig",
    "Trainer",
    "check_data",
    "evaluate",
    "make_optimizer",
    "train",
]

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}


# Ranges and names beyond the types of TrainConfig's annotations (gfalign.rules.check_fields).
_TRAIN_LIMITS = {
    "epochs": Limit(minimum=1),
    "batch_size": Limit(minimum=1),
    "lr": Limit(above=0),
    "optimizer": Limit(choices=lambda: OPTIMIZERS),
    "reduction": Limit(choices=("sum", "mean")),
    "seed": Limit(minimum=0),
    "eval_batch_size": Limit(minimum=1),
}


def _check_optimizer_options(config: TrainConfig) -> None:
    """Refuse options the optimizer does not take, or values it refuses, before any run."""
    import difflib
    import inspect

    optimizer, options = OPTIMIZERS[config.optimizer], config.optimizer_options
    known = [p for p in inspect.signature(optimizer).parameters if p not in ("params", "lr")]
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"[train] optimizer_options: unknown option {key!r} of {config.optimizer}{hint}; "
                f"known: {', '.join(known)}"
            )
    try:  # the optimizer's own checks (momentum >= 0 ...) on a stand-in parameter
        optimizer([torch.zeros(1, requires_grad=True)], lr=config.lr, **options)
    except (TypeError, ValueError) as problem:
        raise ConfigError(
            f"[train] optimizer_options = {render(options)}: {config.optimizer} refuses them "
            f"({problem})"
        ) from None


@dataclass(frozen=True)
class TrainConfig:
    """How to train; the fields are the defaults and the documentation.

    Attributes:
        epochs: passes over the training set.
        batch_size: examples per step; the last, smaller batch of an epoch is kept.
        lr: learning rate (the paper's 0.001).
        optimizer: a name in ``OPTIMIZERS`` (``sgd``, ``adam`` ...).
        optimizer_options: extra keyword arguments of the optimizer (``momentum`` ...).
        reduction: ``"sum"`` sums the per-example updates of a batch, so each example moves the
            weights by ``lr`` times its own gradient, as the paper's per-example SGD does;
            ``"mean"`` averages them (the usual minibatch convention, ``lr`` then acts per batch).
        seed: seeds the shuffling of the training set (the network and the feedback matrices
            have their own seeds).
        evaluate_train: also measure loss and error on the whole training set every epoch.
        eval_batch_size: batch size of evaluation passes (memory only, not the numbers).
    """

    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "sgd"
    optimizer_options: Mapping[str, Any] = field(default_factory=dict)
    reduction: str = "sum"
    seed: int = 0
    evaluate_train: bool = True
    eval_batch_size: int = 10_000

    def __post_init__(self) -> None:
        check_fields(self, _TRAIN_LIMITS, "[train] ")
        object.__setattr__(self, "optimizer_options", dict(self.optimizer_options))
        _check_optimizer_options(self)

    def to_data(self) -> dict[str, Any]:
        return asdict(self)


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss; ``history`` holds every finished epoch.

    ``step`` is the training step whose batch loss was not finite, or None when the batch
    losses were finite and the end-of-epoch evaluation's ``measured`` loss was not.
    """

    def __init__(
        self,
        epoch: int,
        step: int | None,
        loss: float,
        history: list[dict],
        *,
        measured: str = "evaluation loss",
    ) -> None:
        if step is None:
            where = (
                f"the {measured} at the end-of-epoch evaluation is {loss} "
                "(the batch losses were finite)"
            )
        else:
            where = f"step {step}: loss is {loss}"
        super().__init__(
            f"training diverged at epoch {epoch}, {where}. The {len(history)} finished "
            "epoch(s) are kept; try a smaller learning rate"
        )
        self.epoch, self.step, self.loss, self.history = epoch, step, loss, history


def make_optimizer(config: TrainConfig, parameters) -> torch.optim.Optimizer:
    """The optimizer ``config`` names, over ``parameters``."""
    return OPTIMIZERS[config.optimizer](parameters, lr=config.lr, **config.optimizer_options)


_SGD_DEFAULTS = {
    "momentum": 0,
    "dampening": 0,
    "weight_decay": 0,
    "nesterov": False,
    "maximize": False,
}


def _plain_sgd_group(optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The single parameter group of a plain SGD optimizer, else ``None``.

    Plain SGD (no momentum, dampening, weight decay, Nesterov or maximize) is exactly
    ``W <- W - lr * grad``, which ``FeedbackRule.sgd_step`` applies in place without ``.grad``.
    The learning rate is read from the group at every step, so schedulers keep working.
    """
    if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
        return None
    group = optimizer.param_groups[0]
    if isinstance(group["lr"], torch.Tensor):
        return None
    if any(group.get(key, default) != default for key, default in _SGD_DEFAULTS.items()):
        return None
    return group


def evaluate(net: MLP, split: Split, batch_size: int = 10_000) -> tuple[float, float]:
    """``(loss, error)`` of ``net`` on a split.

    For classification ``error`` is the misclassification rate in percent; for the autoencoder
    it is the mean squared reconstruction error per pixel. ``loss`` is the training loss
    (cross-entropy, or half the squared error summed over pixels), averaged over examples.

    Raises:
        DataError: the split is empty.
    """
    n = len(split)
    if n == 0:
        raise DataError("cannot evaluate on an empty split: it holds no examples")
    total_loss = torch.zeros((), dtype=torch.float64, device=split.x.device)
    total_error = torch.zeros((), dtype=torch.float64, device=split.x.device)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            x = split.x[start : start + batch_size]
            y = split.y[start : start + batch_size]
            logits = net(x)
            target = y if net.objective.uses_labels else x
            loss, _ = net.objective.error(logits, target)
            total_loss += loss.double() * len(x)
            if net.objective.uses_labels:
                total_error += (logits.argmax(dim=1) != y).sum()
            else:
                total_error += (net.objective.output(logits) - x).square().mean(dim=1).sum()
    scale = 100.0 if net.objective.uses_labels else 1.0
    return (total_loss / n).item(), (total_error * scale / n).item()


Metric = Callable[["Trainer"], Mapping[str, float]]


def check_data(data: Dataset) -> None:
    """Refuse data a run cannot learn from: an empty split, or inputs holding NaN or inf.

    Checked once, before training, so that damaged data are not mistaken for a divergence.

    Raises:
        DataError: naming the split and what is wrong with it.
    """
    for name, split in (("training", data.train), ("test", data.test)):
        if len(split) == 0:
            raise DataError(
                f"the {name} split is empty: there is nothing to "
                f"{'train on' if name == 'training' else 'evaluate'}; give it examples"
            )
        bad = int((~torch.isfinite(split.x)).sum()) if split.x.is_floating_point() else 0
        if bad:
            raise DataError(
                f"{name} inputs hold {bad} non-finite values (NaN/inf): the data are damaged, "
                "not the learning rate; check them (gfalign data verify) or fetch them again"
            )


class Trainer:
    """Trains ``net`` with ``rule`` on ``data`` according to ``config``.

    Args:
        net: the network; its parameters are updated in place.
        rule: a ``FeedbackRule`` built for ``net.sizes``.
        data: a ``gfalign.data.Dataset`` (train and test splits on the network's device).
        config: a ``TrainConfig``.
        metrics: callables run at every epoch end, each returning extra named numbers for the
            epoch's record (alignment angles, for instance). They must not change any state.
        fused_sgd: with plain SGD (no momentum, dampening, weight decay, Nesterov, maximize),
            apply each step in place through ``FeedbackRule.sgd_step``: the same update up to
            rounding, without writing ``.grad`` or an optimizer pass over the weights (the
            largest overhead at small batches). ``False`` always fills ``.grad`` and calls the
            optimizer.

    Raises:
        DataError: an empty split, or inputs holding NaN or inf (``check_data``).

    Example:
        >>> from gfalign.data import synthetic
        >>> data, net = synthetic(200, 50), MLP([784, 32, 10], seed=0)
        >>> trainer = Trainer(net, FeedbackRule("s1", net), data, TrainConfig(epochs=2))
        >>> history = trainer.fit()
        >>> len(history), sorted(history[-1])[:3]
        (2, ['batch_loss', 'epoch', 'seconds'])
    """

    def __init__(
        self,
        net: MLP,
        rule: FeedbackRule,
        data: Dataset,
        config: TrainConfig = TrainConfig(),
        *,
        metrics: Sequence[Metric] = (),
        fused_sgd: bool = True,
    ) -> None:
        rule.check(net)
        check_data(data)
        self.net, self.rule, self.data, self.config = net, rule, data, config
        self.metrics = tuple(metrics)
        self.fused_sgd = fused_sgd
        self.optimizer = make_optimizer(config, net.parameters())
        self.generator = torch.Generator().manual_seed(config.seed)
        self.history: list[dict[str, float]] = []

    @property
    def epoch(self) -> int:
        """Epochs finished so far."""
        return len(self.history)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: loadable with ``torch.load(weights_only=True)``."""
        return {
            "net": self.net.state_dict(),
            "rule": self.rule.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "history": [dict(record) for record in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.rule.load_state_dict(state["rule"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.history = [dict(record) for record in state["history"]]

    def train_epoch(self, on_batch: Callable[[int, int], None] | None = None) -> dict[str, float]:
        """One pass over the training set, then evaluation; returns and records the epoch."""
        config, train = self.config, self.data.train
        n = len(train)
        steps = math.ceil(n / config.batch_size)
        order = torch.randperm(n, generator=self.generator).to(train.x.device)
        x_all, y_all = train.x, train.y
        # Losses stay on the device: no host round trip per step, checked once per epoch.
        step_losses: list[torch.Tensor] = []
        started = time.perf_counter()
        for step in range(steps):
            batch = order[step * config.batch_size : (step + 1) * config.batch_size]
            step_losses.append(
                self.step(x_all.index_select(0, batch), y_all.index_select(0, batch))
            )
            if on_batch is not None:
                on_batch(step + 1, steps)
        losses = torch.stack(step_losses)
        torch.isfinite(losses).all().item()  # waits for the device before reading the clock
        return self.record_epoch(losses, time.perf_counter() - started)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One training step on a batch; returns its loss (0-d, left on the device).

        Plain SGD with ``fused_sgd`` goes through ``FeedbackRule.sgd_step``; anything else fills
        ``.grad`` with ``FeedbackRule.backward`` and calls the optimizer.
        """
        group = _plain_sgd_group(self.optimizer) if self.fused_sgd else None
        if group is not None:
            return self.rule.sgd_step(
                self.net, x, y, lr=group["lr"], reduction=self.config.reduction
            ).loss
        loss = self.rule.backward(self.net, x, y, reduction=self.config.reduction).loss
        self.optimizer.step()
        return loss

    def record_epoch(self, losses: torch.Tensor, seconds: float) -> dict[str, float]:
        """Check, evaluate and append the record of an epoch whose steps have run.

        ``losses`` holds the batch losses of the epoch's steps, (steps,); ``seconds`` the time
        the steps took. ``train_epoch`` calls it, and so does ``gfalign.ensemble`` for every
        member it trained, so both keep the same records.

        Raises:
            DivergenceError: a batch loss, or the train or test loss of the evaluation, is not
                finite; ``history`` keeps the finished epochs.
        """
        config = self.config
        finite = torch.isfinite(losses)
        if not bool(finite.all()):
            step = int((~finite).nonzero()[0, 0])
            raise DivergenceError(self.epoch + 1, step + 1, float(losses[step]), self.history)
        record: dict[str, float] = {
            "epoch": self.epoch + 1,
            "steps": len(losses),
            "seconds": seconds,
            "batch_loss": float(losses.double().mean()),
        }
        if config.evaluate_train:
            record["train_loss"], record["train_error"] = evaluate(
                self.net, self.data.train, config.eval_batch_size
            )
        record["test_loss"], record["test_error"] = evaluate(
            self.net, self.data.test, config.eval_batch_size
        )
        for name in ("train_loss", "test_loss"):
            if name in record and not math.isfinite(record[name]):
                measured = name.replace("_", " ")
                raise DivergenceError(
                    self.epoch + 1, None, record[name], self.history, measured=measured
                )
        for metric in self.metrics:
            record.update(metric(self))
        self.history.append(record)
        return record

    def fit(
        self,
        epochs: int | None = None,
        *,
        on_epoch: Callable[[dict[str, float]], None] | None = None,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> list[dict[str, float]]:
        """Train until ``epochs`` (default ``config.epochs``) have finished in total."""
        target = self.config.epochs if epochs is None else epochs
        while self.epoch < target:
            record = self.train_epoch(on_batch)
            if on_epoch is not None:
                on_epoch(record)
        return self.history


def train(
    net: MLP,
    rule: FeedbackRule,
    data: Dataset,
    config: TrainConfig | None = None,
    **options: Any,
) -> list[dict[str, float]]:
    """Train and return the history: ``train(net, rule, data, epochs=5, lr=1e-3)``."""
    config = config or TrainConfig(**options)
    return Trainer(net, rule, data, config).fit()
