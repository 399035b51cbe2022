"""The full description of one training run, as data.

A ``RunConfig`` names everything that decides a run's numbers: the data, the network, the rule
and its feedback family, the training protocol and one seed. It reads and writes TOML, and its
``key()`` (a hash of the resolved configuration, device excluded) identifies the run in a results
store, so a sweep recognises a run it has already done.

    dataset = "mnist"
    hidden = [800, 800]
    activation = "tanh"
    rule = "s1"                 # a preset name, or an inline table (see gfalign.rules)
    feedback = "uniform"
    seed = 0
    [train]
    epochs = 100
    batch_size = 32
    lr = 0.001
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from gfalign.feedback import FeedbackSpec
from gfalign.rules import ConfigError, resolve
from gfalign.train import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["DTYPES", "RunConfig", "load_toml", "resolve_device"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
_INPUT_WIDTH = 784  # MNIST and Fashion-MNIST images, flattened


@dataclass(frozen=True)
class RunConfig:
    """One run. Every field has the default of the paper's 2x800 tanh ``s1`` network.

    Attributes:
        dataset: ``mnist``, ``fashion-mnist`` or ``synthetic`` (a small learnable fake set).
        train_subset: train on the first N training examples only (quick runs); ``None``: all.
        test_subset: evaluate on the first N test examples only; ``None``: all.
        validation: hold out the last N training examples as a validation split.
        hidden: widths of the hidden layers.
        activation: ``tanh``, ``relu`` or ``sigmoid``.
        objective: ``classification`` or ``autoencoder`` (784-...-784, sigmoid output).
        weight_init, bias_init: see ``gfalign.network.MLP``.
        rule: a preset name or a configuration table.
        feedback: the default feedback family, e.g. ``"uniform"`` or ``"B6:density=0.2"``.
        seed: seeds the weights, the feedback matrices and the data order.
        train: the training protocol (its own ``seed`` is replaced by ``seed``).
        device: ``cpu``, ``cuda`` or ``auto``; not part of ``key()``.
        dtype: ``float32`` or ``float64``.
        alignment: measure alignment with the backprop gradient every epoch.
        alignment_probe: examples in the fixed alignment probe batch.
    """

    dataset: str = "mnist"
    train_subset: int | None = None
    test_subset: int | None = None
    validation: int = 0
    hidden: tuple[int, ...] = (800, 800)
    activation: str = "tanh"
    objective: str = "classification"
    weight_init: str = "xavier_uniform"
    bias_init: str = "normal"
    rule: str | Mapping[str, Any] = "s1"
    feedback: str = "uniform"
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    device: str = "cpu"
    dtype: str = "float32"
    alignment: bool = False
    alignment_probe: int = 1000

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(n) for n in self.hidden))
        if not self.hidden:
            raise ConfigError("hidden: give at least one hidden layer width")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be cpu, cuda or auto, got {self.device!r}")
        if self.train.seed != self.seed:
            object.__setattr__(self, "train", replace(self.train, seed=self.seed))
        # Resolving checks the rule and the feedback family now, before any data is loaded.
        self.rule_config()

    @property
    def sizes(self) -> tuple[int, ...]:
        output = _INPUT_WIDTH if self.objective == "autoencoder" else 10
        return (_INPUT_WIDTH, *self.hidden, output)

    @property
    def rule_name(self) -> str:
        return self.rule if isinstance(self.rule, str) else str(self.rule.get("name", "custom"))

    def rule_config(self):
        """The resolved ``RuleConfig`` for this network's depth."""
        return resolve(self.rule, len(self.hidden), FeedbackSpec.parse(self.feedback))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    # ------------------------------------------------------------------ data forms

    def to_data(self) -> dict[str, Any]:
        """Plain data (TOML/JSON-ready); ``None`` fields are left out."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["hidden"] = list(self.hidden)
        data["rule"] = self.rule if isinstance(self.rule, str) else _plain(self.rule)
        train = asdict(self.train)
        train.pop("seed")
        data["train"] = train
        return {k: v for k, v in data.items() if v is not None}

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> RunConfig:
        """Read plain data; unknown keys are refused with the list of known ones."""
        data = dict(data)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(
                f"unknown configuration key(s) {sorted(unknown)}; known: {', '.join(sorted(known))}"
            )
        train = dict(data.pop("train", {}) or {})
        train_known = {f.name for f in fields(TrainConfig)} - {"seed"}
        unknown = set(train) - train_known
        if unknown:
            raise ConfigError(
                f"unknown [train] key(s) {sorted(unknown)}; known: {', '.join(sorted(train_known))}"
            )
        try:
            train_config = TrainConfig(**train, seed=int(data.get("seed", 0)))
        except (TypeError, ValueError) as problem:
            raise ConfigError(f"[train]: {problem}") from None
        if "hidden" in data:
            data["hidden"] = tuple(data["hidden"])
        try:
            return cls(**data, train=train_config)
        except (TypeError, ValueError) as problem:
            if isinstance(problem, ConfigError):
                raise
            raise ConfigError(str(problem)) from None

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_data())

    @classmethod
    def from_toml(cls, path: str | Path) -> RunConfig:
        return cls.from_data(load_toml(path))

    def override(self, **changes: Any) -> RunConfig:
        """A copy with top-level fields and ``train`` fields (by name) replaced."""
        train_names = {f.name for f in fields(TrainConfig)} - {"seed"}
        data = self.to_data()
        for name, value in changes.items():
            if value is None:
                continue
            if name in train_names:
                data["train"][name] = value
            else:
                data[name] = value
        return RunConfig.from_data(data)

    def key(self) -> str:
        """A stable hash of everything that decides the numbers (the device aside)."""
        data = self.to_data()
        data.pop("device")
        data["rule"] = self.rule_config().to_data()
        text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def label(self) -> str:
        """A short human-readable name: ``s1 2x800 tanh seed0``."""
        widths = self.hidden
        shape = (
            f"{len(widths)}x{widths[0]}" if len(set(widths)) == 1 else "-".join(map(str, widths))
        )
        family = "" if self.feedback == "uniform" else f" {self.feedback}"
        return f"{self.rule_name}{family} {shape} {self.activation} seed{self.seed}"


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, turning a syntax error into a ``ConfigError`` that names the file."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except tomllib.TOMLDecodeError as problem:
        raise ConfigError(f"{path}: not valid TOML: {problem}") from None


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r} was asked for, but this PyTorch ({torch.__version__}) sees no "
            "CUDA GPU; use --device cpu or auto"
        )
    return torch.device(device)
