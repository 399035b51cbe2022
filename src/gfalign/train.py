"""The training loop: epochs over device-resident tensors, any rule, any ``torch.optim`` optimizer.

The loop knows nothing of rule names: it asks the rule for gradients and the optimizer for a
step. Every epoch it evaluates loss and error on the training, validation (when the data hold
one) and test splits and appends one plain record to the history. A ``Trainer`` carries all of
its state (network, rule, optimizer, learning rate, shuffling generator, history) in
``state_dict``, so a run resumes exactly where it stopped.

Every rule can use the same training features, all ``TrainConfig`` fields (a run's ``[train]``
table) and all off by default:

    weight_decay = 1e-4                 the optimizer's own weight decay
    schedule = "step:every=30,gamma=0.1"   or "multistep:milestones=[30, 60]", "cosine"
    warmup = 5                          epochs of linear warm-up before the schedule
    clip_grad_norm = 1.0                the rule's gradients clipped to this total norm
    early_stopping = 10                 patience in epochs on the validation error
    keep_best = true                    track the best validation epoch (runs keep best.pt)
    record_norms = true                 weight, update and delta norms per layer per epoch
    evaluate_test = false               no test evaluation per epoch (hyperparameter search)
"""

from __future__ import annotations

import bisect
import difflib
import itertools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch

from gfalign.data.errors import DataError
from gfalign.engine import FeedbackRule
from gfalign.network import Network
from gfalign.rules import ConfigError, Limit, check_fields, render

if TYPE_CHECKING:
    from gfalign.data import Dataset, Split

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "EPOCHS_MAX",
    "DivergenceError",
    "Schedule",
    "TrainConfig",
    "Trainer",
    "check_data",
    "evaluate",
    "make_optimizer",
    "stacking_problem",
    "train",
]

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}


EPOCHS_MAX = 100_000
"""The most epochs a run may have: a run that could finish (days of the paper's networks)."""

# Ranges and names beyond the types of TrainConfig's annotations (gfalign.rules.check_fields).
_TRAIN_LIMITS = {
    "epochs": Limit(minimum=1, maximum=EPOCHS_MAX),
    "batch_size": Limit(minimum=1),
    "lr": Limit(above=0),
    "optimizer": Limit(choices=lambda: OPTIMIZERS),
    "reduction": Limit(choices=("sum", "mean")),
    "seed": Limit(minimum=0),
    "eval_batch_size": Limit(minimum=1),
    "weight_decay": Limit(minimum=0),
    "schedule": Limit(
        example='"step:every=30,gamma=0.1", "multistep:milestones=[30, 60]" or "cosine"',
        absent="a constant learning rate",
    ),
    "warmup": Limit(minimum=0),
    "clip_grad_norm": Limit(above=0, absent="no clipping"),
    "early_stopping": Limit(minimum=1, absent="no early stopping"),
}

# Fields added after runs were stored: left out of ``TrainConfig.to_data`` (and so of a run's
# key) while they hold their defaults, so that every earlier configuration keeps its key.
_LATER_FIELDS = (
    "weight_decay",
    "schedule",
    "warmup",
    "clip_grad_norm",
    "early_stopping",
    "keep_best",
    "record_norms",
    "evaluate_test",
)
# Features that act on each network alone within a step or an epoch, which the stacked
# computation of gfalign.ensemble (K networks, one optimizer pass) cannot do: field -> why.
_UNSTACKABLE = {
    "clip_grad_norm": "clipping scales each network's gradients by its own total norm",
    "early_stopping": "early stopping ends each run at its own epoch",
    "record_norms": "record_norms measures every step's deltas of one network",
}


def _check_optimizer_options(config: TrainConfig) -> None:
    """Refuse options the optimizer does not take, or values it refuses, before any run."""
    import difflib
    import inspect

    optimizer, options = OPTIMIZERS[config.optimizer], config.optimizer_options
    if config.weight_decay and "weight_decay" in options:
        raise ConfigError(
            f"[train] weight_decay = {render(config.weight_decay)} and optimizer_options."
            f"weight_decay = {render(options['weight_decay'])} both give weight decay; "
            "allowed: one of them"
        )
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
        optimizer([torch.zeros(1, requires_grad=True)], lr=config.lr, **_options(config))
    except (TypeError, ValueError) as problem:
        raise ConfigError(
            f"[train] optimizer_options = {render(options)}: {config.optimizer} refuses them "
            f"({problem})"
        ) from None


def _options(config: TrainConfig) -> dict[str, Any]:
    """The optimizer's keyword arguments: its options, and ``weight_decay`` when set."""
    options = dict(config.optimizer_options)
    if config.weight_decay:
        options["weight_decay"] = config.weight_decay
    return options


SCHEDULES: dict[str, dict[str, Any]] = {
    "step": {"every": None, "gamma": 0.1},
    "multistep": {"milestones": None, "gamma": 0.1},
    "cosine": {"min_lr": 0.0},
}
"""Learning-rate schedules by name, with their options' defaults (``None``: required)."""


@dataclass(frozen=True)
class Schedule:
    """The learning rate of every epoch: a linear warm-up, then a schedule.

    With ``k`` epochs finished (``k = 0`` for the first epoch), ``W`` warm-up epochs and
    ``j = k - W`` the epochs since the warm-up, the next epoch trains at

        warm-up (k < W)   lr * (k + 1) / (W + 1)
        step              lr * gamma ** (j // every)
        multistep         lr * gamma ** (number of milestones <= j)
        cosine            min_lr + (lr - min_lr) * (1 + cos(pi * j / (epochs - W))) / 2
        none              lr

    These are the closed forms of ``torch.optim.lr_scheduler``'s ``LinearLR`` (from
    ``1 / (W + 1)``), ``StepLR``, ``MultiStepLR`` and ``CosineAnnealingLR``, chained as
    ``SequentialLR`` chains them (the schedule counts epochs from the end of the warm-up), and
    equal to their rates to rounding. The rate is computed from the epoch count instead of
    stepping a scheduler because the fused plain-SGD step never calls ``optimizer.step`` (which
    a scheduler expects) and stacked members read their rates from their optimizers at every
    epoch start (``gfalign.ensemble``); the epoch count and the optimizer's rate are in every
    checkpoint, so a resumed run takes the same rates.

    Attributes:
        kind: ``step``, ``multistep``, ``cosine`` or ``None`` (warm-up only).
        options: the schedule's options with their defaults filled in.
        warmup: epochs of linear warm-up.
        epochs: epochs of the run (the cosine's length is ``epochs - warmup``).
        lr: the peak learning rate.

    Example:
        >>> schedule = Schedule.parse("step:every=2,gamma=0.5", lr=0.1, epochs=6, warmup=1)
        >>> [round(schedule.rate(k), 4) for k in range(6)]
        [0.05, 0.1, 0.1, 0.05, 0.05, 0.025]
    """

    kind: str | None
    options: Mapping[str, Any]
    warmup: int
    epochs: int
    lr: float

    @classmethod
    def parse(
        cls, text: str | None, *, lr: float, epochs: int, warmup: int = 0, where: str = "[train] "
    ) -> Schedule:
        """Read ``name[:key=value,...]`` (``"step:every=30,gamma=0.1"``,
        ``"multistep:milestones=[30, 60],gamma=0.2"``, ``"cosine:min_lr=1e-5"``).

        Raises:
            ConfigError: an unknown schedule or option, a missing option or a bad value.
        """
        if text is None:
            return cls(None, {}, warmup, epochs, lr)
        name, _, rest = text.partition(":")
        name = name.strip()

        def refuse(problem: str, allowed: str) -> ConfigError:
            return ConfigError(f"{where}schedule = {render(text)}: {problem}; allowed: {allowed}")

        if name not in SCHEDULES:
            close = difflib.get_close_matches(name, SCHEDULES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise refuse(f"unknown schedule {name!r}{hint}", "one of " + ", ".join(SCHEDULES))
        defaults = SCHEDULES[name]
        given = _schedule_options(rest, lambda problem: refuse(problem, _SCHEDULE_FORM))
        for key in given:
            if key not in defaults:
                raise refuse(f"{name} has no option {key!r}", f"{', '.join(defaults)} for {name}")
        options = {**defaults, **given}
        for key, value in options.items():
            if value is None:
                raise refuse(f"{name} needs {key}", _SCHEDULE_OPTIONS[key])
            problem = _option_problem(key, value)
            if problem:
                raise refuse(f"{key} = {render(value)}: {problem}", _SCHEDULE_OPTIONS[key])
        if "milestones" in options:
            options["milestones"] = tuple(int(m) for m in options["milestones"])
        for key in ("gamma", "min_lr"):
            if key in options:
                options[key] = float(options[key])
        return cls(name, options, warmup, epochs, lr)

    @property
    def active(self) -> bool:
        """Whether any epoch's rate differs from ``lr``."""
        return self.kind is not None or self.warmup > 0

    def rate(self, finished: int) -> float:
        """The learning rate of the epoch after ``finished`` epochs."""
        lr, warmup = self.lr, self.warmup
        if finished < warmup:
            return lr * (finished + 1) / (warmup + 1)
        j, options = finished - warmup, self.options
        if self.kind == "step":
            return lr * options["gamma"] ** (j // options["every"])
        if self.kind == "multistep":
            return lr * options["gamma"] ** bisect.bisect_right(options["milestones"], j)
        if self.kind == "cosine":
            low, length = options["min_lr"], max(self.epochs - warmup, 1)
            return low + (lr - low) * (1 + math.cos(math.pi * j / length)) / 2
        return lr


_SCHEDULE_FORM = 'name:key=value,... as in "step:every=30,gamma=0.1"'
_SCHEDULE_OPTIONS = {
    "every": "every = an integer >= 1 (epochs between decays)",
    "milestones": "milestones = a list of increasing integers >= 1, e.g. [30, 60]",
    "gamma": "gamma = a finite number > 0 (the factor of each decay)",
    "min_lr": "min_lr = a finite number >= 0 (the cosine's last rate)",
}


def _schedule_options(text: str, refuse: Callable[[str], ConfigError]) -> dict[str, Any]:
    """``"every=30,gamma=0.1"`` as ``{"every": 30, "gamma": 0.1}`` (lists in brackets)."""
    items, depth, start = [], 0, 0
    for position, character in enumerate(text):
        depth += {"[": 1, "]": -1}.get(character, 0)
        if character == "," and depth == 0:
            items.append(text[start:position])
            start = position + 1
    items.append(text[start:])
    options: dict[str, Any] = {}
    for item in (item.strip() for item in items):
        if not item:
            continue
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise refuse(f"{item!r} is not key=value")
        try:
            options[key.strip()] = json.loads(value.strip())
        except ValueError:
            try:
                options[key.strip()] = float(value.strip())
            except ValueError:
                raise refuse(f"{key.strip()} = {value.strip()!r} is not a number") from None
    return options


def _option_problem(key: str, value: Any) -> str:
    def number(entry: Any) -> bool:
        return isinstance(entry, (int, float)) and not isinstance(entry, bool)

    if key == "every":
        ok = number(value) and isinstance(value, int) and value >= 1
        return "" if ok else "not an integer >= 1"
    if key == "milestones":
        ok = (
            isinstance(value, list)
            and value
            and all(number(m) and isinstance(m, int) and m >= 1 for m in value)
            and all(a < b for a, b in itertools.pairwise(value))
        )
        return "" if ok else "not a list of increasing integers >= 1"
    if key == "gamma":
        return "" if number(value) and math.isfinite(value) and value > 0 else "not a number > 0"
    if key == "min_lr":
        return "" if number(value) and math.isfinite(value) and value >= 0 else "not >= 0"
    return ""


@dataclass(frozen=True)
class TrainConfig:
    """How to train; the fields are the defaults and the documentation.

    Attributes:
        epochs: passes over the training set, at most 100000 (a run that could finish).
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
        weight_decay: the optimizer's own ``weight_decay`` (0: none). For ``sgd``, ``adam``,
            ``rmsprop`` and ``adagrad`` it is coupled L2 regularisation: ``weight_decay * W``
            is added to the rule's gradient before the step (the gradient in the scale that
            ``reduction`` gives it); ``adamw`` decouples it (``W <- W - lr * weight_decay *
            W`` besides the Adam step). It applies to every parameter the optimizer holds.
        schedule: the learning-rate schedule by epoch (``Schedule``): ``"step:every=30,
            gamma=0.1"``, ``"multistep:milestones=[30, 60],gamma=0.1"`` or ``"cosine"``
            (``"cosine:min_lr=1e-5"``); ``None`` keeps ``lr``. With a schedule or a warm-up,
            every record carries the epoch's ``lr``.
        warmup: epochs of linear warm-up before the schedule: epoch ``k`` of the first
            ``warmup`` trains at ``lr * k / (warmup + 1)``.
        clip_grad_norm: clip the rule's gradients (all parameters together) to this total
            norm before every step (``torch.nn.utils.clip_grad_norm_``); ``None``: no clipping.
        early_stopping: stop once the validation error has not improved for this many epochs
            (needs a validation split, the run's ``validation``); ``None``: train all epochs.
        keep_best: track the epoch of the lowest validation error (each record's
            ``best_epoch``); a run directory keeps its state as ``best.pt``. Needs a
            validation split.
        record_norms: add per-layer norms to every epoch's record: ``weight_norm_i``
            (Frobenius norm of block i's weight at the epoch's end), ``update_norm_i`` (of the
            change of that weight over the epoch) and ``delta_norm_i`` (the mean over the
            epoch's steps of the root-mean-square over a batch of the per-example norm of
            ``d^i``; ``i = L`` is the output error ``e``).
        evaluate_test: measure the test split every epoch. ``False`` never evaluates it
            during training (a hyperparameter search chooses on the validation split only); a
            run directory then measures it once, after the last epoch (``gfalign.runs``).

    Fields added later (``weight_decay`` to ``evaluate_test``) are left out of ``to_data``
    while they hold their defaults, so configurations that do not use them keep their keys.
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
    weight_decay: float = 0.0
    schedule: str | None = None
    warmup: int = 0
    clip_grad_norm: float | None = None
    early_stopping: int | None = None
    keep_best: bool = False
    record_norms: bool = False
    evaluate_test: bool = True

    def __post_init__(self) -> None:
        check_fields(self, _TRAIN_LIMITS, "[train] ")
        if self.seed > 2**63 - 1:  # gfalign.config.SEED_MAX
            raise ConfigError(
                f"[train] seed = {self.seed}: out of range; allowed: an integer from 0 to "
                f"2^63 - 1 = {2**63 - 1}"
            )
        object.__setattr__(self, "optimizer_options", dict(self.optimizer_options))
        _check_optimizer_options(self)
        if self.warmup and self.warmup >= self.epochs:
            raise ConfigError(
                f"[train] warmup = {self.warmup}: not shorter than epochs = {self.epochs}; "
                f"allowed: an integer from 0 to {self.epochs - 1}"
            )
        self.learning_rates()  # checks the schedule

    def learning_rates(self) -> Schedule:
        """The ``Schedule`` of ``schedule`` and ``warmup``.

        Raises:
            ConfigError: the schedule cannot be read (an unknown name, option or value).
        """
        return Schedule.parse(self.schedule, lr=self.lr, epochs=self.epochs, warmup=self.warmup)

    @property
    def needs_validation(self) -> tuple[str, ...]:
        """The fields set here that watch a validation split (``early_stopping``, ``keep_best``)."""
        return tuple(
            name
            for name, on in (
                ("early_stopping", self.early_stopping is not None),
                ("keep_best", self.keep_best),
            )
            if on
        )

    @property
    def tracks_best(self) -> bool:
        """Whether every record carries ``best_epoch``."""
        return bool(self.needs_validation)

    def to_data(self) -> dict[str, Any]:
        """Plain data; the later fields only where they differ from their defaults.

        Example:
            >>> sorted(set(TrainConfig(warmup=2).to_data()) - set(TrainConfig().to_data()))
            ['warmup']
        """
        data = asdict(self)
        defaults = {item.name: item.default for item in fields(self)}
        for name in _LATER_FIELDS:
            if data[name] == defaults[name]:
                data.pop(name)
        return data


def stacking_problem(config: TrainConfig) -> str | None:
    """Why runs of ``config`` cannot train as one stacked computation (``gfalign.ensemble``),
    or ``None`` when they can. Weight decay, schedules, warm-up and ``keep_best`` stack.

    Example:
        >>> stacking_problem(TrainConfig(weight_decay=1e-4, schedule="cosine")) is None
        True
        >>> stacking_problem(TrainConfig(clip_grad_norm=1.0)).split(":")[0]
        '[train] clip_grad_norm = 1.0 cannot train stacked'
    """
    defaults = {item.name: item.default for item in fields(TrainConfig)}
    for name, why in _UNSTACKABLE.items():
        value = getattr(config, name)
        if value != defaults[name]:
            return (
                f"[train] {name} = {render(value)} cannot train stacked: {why}; train these "
                "runs one by one (stack = 1)"
            )
    return None


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
    """The optimizer ``config`` names, over ``parameters``, with its ``weight_decay``."""
    return OPTIMIZERS[config.optimizer](parameters, lr=config.lr, **_options(config))


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
    The learning rate is read from the group at every step, so schedules keep working.
    """
    if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
        return None
    group = optimizer.param_groups[0]
    if isinstance(group["lr"], torch.Tensor):
        return None
    if any(group.get(key, default) != default for key, default in _SGD_DEFAULTS.items()):
        return None
    return group


def evaluate(net: Network, split: Split, batch_size: int = 10_000) -> tuple[float, float]:
    """``(loss, error)`` of ``net`` on a split, in evaluation mode (``net.eval()``; the mode
    it was in is restored).

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
    training = net.training
    net.eval()
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                x = split.x[start : start + batch_size]
                y = split.y[start : start + batch_size]
                logits = net(x)
                target = net.objective.target(x, y)
                loss, _ = net.objective.error(logits, target)
                total_loss += loss.double() * len(x)
                if net.objective.uses_labels:
                    total_error += (logits.argmax(dim=1) != y).sum()
                else:
                    total_error += (net.objective.output(logits) - x).square().mean(dim=1).sum()
    finally:
        net.train(training)
    scale = 100.0 if net.objective.uses_labels else 1.0
    return (total_loss / n).item(), (total_error * scale / n).item()


Metric = Callable[["Trainer"], Mapping[str, float]]


def validation_split(data: Dataset) -> Split | None:
    """The data's validation split, or None. Data given as any object with ``train`` and
    ``test`` splits (as before validation splits were evaluated) have none."""
    return getattr(data, "validation", None)


def check_data(data: Dataset) -> None:
    """Refuse data a run cannot learn from: an empty split, or inputs holding NaN or inf.

    Checked once, before training, so that damaged data are not mistaken for a divergence.

    Raises:
        DataError: naming the split and what is wrong with it.
    """
    splits = [("training", data.train), ("test", data.test)]
    validation = validation_split(data)
    if validation is not None:
        splits.append(("validation", validation))
    for name, split in splits:
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


def _weight(part: torch.nn.Module) -> torch.Tensor:
    """A block's weight, or all its parameters as one vector for a module without one."""
    weight = dict(part.named_parameters(recurse=False)).get("weight")
    if weight is not None:
        return weight
    flat = [p.detach().reshape(-1) for p in part.parameters()]
    return torch.cat(flat) if flat else torch.zeros(0)


class Trainer:
    """Trains ``net`` with ``rule`` on ``data`` according to ``config``.

    The optimizer holds the network's parameters and then the rule's (a rule with learned
    feedback parameters trains them with the same optimizer). Every step runs with the network
    in training mode (``net.train()``), every evaluation in evaluation mode (``net.eval()``),
    which decides whether dropout masks are drawn.

    Args:
        net: the network; its parameters are updated in place.
        rule: a ``FeedbackRule`` built for ``net.sizes``.
        data: a ``gfalign.data.Dataset`` (train and test splits on the network's device, and
            the validation split that ``early_stopping`` and ``keep_best`` watch).
        config: a ``TrainConfig``.
        metrics: callables run at every epoch end, each returning extra named numbers for the
            epoch's record (alignment angles, for instance). They must not change any state.
        fused_sgd: with plain SGD (no momentum, dampening, weight decay, Nesterov, maximize)
            and no gradient clipping, apply each step in place through
            ``FeedbackRule.sgd_step``: the same update up to rounding, without writing
            ``.grad`` or an optimizer pass over the weights (the largest overhead at small
            batches). A schedule keeps this path (the rate is read at every step). ``False``
            always fills ``.grad`` and calls the optimizer.

    Raises:
        DataError: an empty split, or inputs holding NaN or inf (``check_data``).
        ConfigError: ``early_stopping`` or ``keep_best`` without a validation split.

    Example:
        >>> from gfalign.data import synthetic
        >>> from gfalign.network import mlp
        >>> data, net = synthetic(200, 50), mlp([784, 32, 10], seed=0)
        >>> trainer = Trainer(net, FeedbackRule("s1", net), data, TrainConfig(epochs=2))
        >>> history = trainer.fit()
        >>> len(history), sorted(history[-1])[:3]
        (2, ['batch_loss', 'epoch', 'seconds'])

        Early stopping and the best epoch watch the validation split:

        >>> data, net = synthetic(240, 50, validation=40), mlp([784, 32, 10], seed=0)
        >>> config = TrainConfig(epochs=3, lr=0.01, schedule="cosine", early_stopping=2)
        >>> history = Trainer(net, FeedbackRule("dfa", net), data, config).fit()
        >>> sorted(k for k in history[-1] if "validation" in k or "best" in k)
        ['best_epoch', 'validation_error', 'validation_loss']
    """

    def __init__(
        self,
        net: Network,
        rule: FeedbackRule,
        data: Dataset,
        config: TrainConfig = TrainConfig(),
        *,
        metrics: Sequence[Metric] = (),
        fused_sgd: bool = True,
    ) -> None:
        rule.check(net)
        check_data(data)
        if config.needs_validation and validation_split(data) is None:
            name = config.needs_validation[0]
            raise ConfigError(
                f"[train] {name} = {render(getattr(config, name))} watches the validation "
                "error, but the data hold no validation split; allowed: validation = N "
                "(training examples held out) in the run configuration"
            )
        self.net, self.rule, self.data, self.config = net, rule, data, config
        self.metrics = tuple(metrics)
        self.fused_sgd = fused_sgd
        self.parameters = [*net.parameters(), *rule.parameters()]
        self.optimizer = make_optimizer(config, self.parameters)
        self.schedule = config.learning_rates()
        self.generator = torch.Generator().manual_seed(config.seed)
        self.history: list[dict[str, float]] = []
        self._epoch_start: list[torch.Tensor] | None = None
        self._delta_norms: dict[int, torch.Tensor] | None = None
        self._steps = 0
        self._set_rate()

    @property
    def epoch(self) -> int:
        """Epochs finished so far."""
        return len(self.history)

    @property
    def lr(self) -> float:
        """The learning rate of the next epoch."""
        return self.optimizer.param_groups[0]["lr"]

    @property
    def best_epoch(self) -> int | None:
        """The finished epoch of the lowest validation error (the first of equals), or None
        when the data hold no validation split or no epoch has finished."""
        errors = [record.get("validation_error") for record in self.history]
        if not errors or errors[0] is None:
            return None
        return 1 + min(range(len(errors)), key=errors.__getitem__)

    @property
    def stopped_early(self) -> bool:
        """Whether ``early_stopping`` epochs have passed since the best validation error."""
        patience, best = self.config.early_stopping, self.best_epoch
        return patience is not None and best is not None and self.epoch - best >= patience

    def _set_rate(self) -> None:
        """Give the optimizer the learning rate of the next epoch."""
        if self.schedule.active:
            rate = self.schedule.rate(self.epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = rate

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: loadable with ``torch.load(weights_only=True)``."""
        state = {
            "net": self.net.state_dict(),
            "rule": self.rule.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "history": [dict(record) for record in self.history],
        }
        if self.schedule.active:
            state["schedule"] = {"epoch": self.epoch, "lr": self.lr}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.rule.load_state_dict(state["rule"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.history = [dict(record) for record in state["history"]]
        self._set_rate()
        if "schedule" in state and state["schedule"]["epoch"] == self.epoch:
            for group in self.optimizer.param_groups:
                group["lr"] = state["schedule"]["lr"]

    def train_epoch(self, on_batch: Callable[[int, int], None] | None = None) -> dict[str, float]:
        """One pass over the training set, then evaluation; returns and records the epoch."""
        config, train = self.config, self.data.train
        n = len(train)
        steps = math.ceil(n / config.batch_size)
        order = torch.randperm(n, generator=self.generator).to(train.x.device)
        x_all, y_all = train.x, train.y
        self.net.train()
        if config.record_norms:
            self._epoch_start = [_weight(part).detach().clone() for part in self.net.layers]
            self._delta_norms, self._steps = {}, 0
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

        Plain SGD with ``fused_sgd`` (and no clipping) goes through ``FeedbackRule.sgd_step``;
        anything else fills ``.grad`` with ``FeedbackRule.backward``, clips it to
        ``clip_grad_norm`` when set, and calls the optimizer.
        """
        if not self.net.training:
            self.net.train()
        config = self.config
        clip = config.clip_grad_norm
        group = _plain_sgd_group(self.optimizer) if self.fused_sgd and clip is None else None
        if group is not None:
            result = self.rule.sgd_step(self.net, x, y, lr=group["lr"], reduction=config.reduction)
        else:
            result = self.rule.backward(self.net, x, y, reduction=config.reduction)
            if clip is not None:  # the network's norm; learned feedback scales with it
                norm = torch.nn.utils.clip_grad_norm_(list(self.net.parameters()), clip)
                learned = [p for p in self.rule.parameters() if p.grad is not None]
                if learned:
                    factor = (clip / (norm + 1e-6)).clamp(max=1.0)
                    torch._foreach_mul_([p.grad for p in learned], factor)
            self.optimizer.step()
        if self._delta_norms is not None:
            for i, d in result.deltas.items():
                # root-mean-square over the batch of each example's ||d^i_n||
                norm = torch.linalg.vector_norm(d.detach()) / math.sqrt(d.shape[0])
                self._delta_norms[i] = self._delta_norms.get(i, 0) + norm
            self._steps += 1
        return result.loss

    def _norms(self) -> dict[str, float]:
        """``weight_norm_i``, ``update_norm_i`` and ``delta_norm_i`` of the epoch just run."""
        record: dict[str, float] = {}
        with torch.no_grad():
            weights = [_weight(part) for part in self.net.layers]
            for i, weight in enumerate(weights, 1):
                record[f"weight_norm_{i}"] = float(torch.linalg.vector_norm(weight))
            starts = self._epoch_start
            if starts is not None:
                for i, (weight, start) in enumerate(zip(weights, starts, strict=True), 1):
                    record[f"update_norm_{i}"] = float(torch.linalg.vector_norm(weight - start))
            for i, total in sorted((self._delta_norms or {}).items()):
                record[f"delta_norm_{i}"] = float(total) / max(self._steps, 1)
        self._epoch_start, self._delta_norms, self._steps = None, None, 0
        return record

    def record_epoch(self, losses: torch.Tensor, seconds: float) -> dict[str, float]:
        """Check, evaluate and append the record of an epoch whose steps have run, then set
        the next epoch's learning rate.

        ``losses`` holds the batch losses of the epoch's steps, (steps,); ``seconds`` the time
        the steps took. ``train_epoch`` calls it, and so does ``gfalign.ensemble`` for every
        member it trained, so both keep the same records.

        Raises:
            DivergenceError: a batch loss, or the train, validation or test loss of the
                evaluation, is not finite; ``history`` keeps the finished epochs.
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
        if self.schedule.active:
            record["lr"] = self.lr  # the epoch's rate; the next one is set at the end
        self.net.eval()
        splits = [
            ("train", self.data.train if config.evaluate_train else None),
            ("validation", validation_split(self.data)),
            ("test", self.data.test if config.evaluate_test else None),
        ]
        for name, split in splits:
            if split is not None:
                record[f"{name}_loss"], record[f"{name}_error"] = evaluate(
                    self.net, split, config.eval_batch_size
                )
        for name, _ in splits:
            loss = record.get(f"{name}_loss")
            if loss is not None and not math.isfinite(loss):
                raise DivergenceError(
                    self.epoch + 1, None, loss, self.history, measured=f"{name} loss"
                )
        if config.tracks_best:
            errors = [r["validation_error"] for r in self.history] + [record["validation_error"]]
            record["best_epoch"] = 1 + min(range(len(errors)), key=errors.__getitem__)
        if config.record_norms:
            record.update(self._norms())
        for metric in self.metrics:
            record.update(metric(self))
        self.history.append(record)
        self._set_rate()
        return record

    def fit(
        self,
        epochs: int | None = None,
        *,
        on_epoch: Callable[[dict[str, float]], None] | None = None,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> list[dict[str, float]]:
        """Train until ``epochs`` (default ``config.epochs``) have finished in total, or until
        ``early_stopping`` stops the run (``stopped_early``)."""
        target = self.config.epochs if epochs is None else epochs
        while self.epoch < target and not self.stopped_early:
            record = self.train_epoch(on_batch)
            if on_epoch is not None:
                on_epoch(record)
        return self.history


def train(
    net: Network,
    rule: FeedbackRule,
    data: Dataset,
    config: TrainConfig | None = None,
    **options: Any,
) -> list[dict[str, float]]:
    """Train and return the history: ``train(net, rule, data, epochs=5, lr=1e-3)``."""
    config = config or TrainConfig(**options)
    return Trainer(net, rule, data, config).fit()
