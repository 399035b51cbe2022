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

import difflib
import hashlib
import json
import re
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from gfalign.network import ACTIVATIONS, BIAS_INITS, OBJECTIVES, WEIGHT_INITS
from gfalign.rules import ConfigError, Limit, check_fields, feedback_spec, render, resolve
from gfalign.train import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["DTYPES", "RunConfig", "load_toml", "resolve_device"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
_INPUT_WIDTH = 784  # MNIST and Fashion-MNIST images, flattened


def _datasets() -> list[str]:
    from gfalign.data.registry import SPECS  # datasets may be registered at run time

    return [*SPECS, "synthetic"]


# Ranges and names beyond the types of RunConfig's annotations (gfalign.rules.check_fields).
_LIMITS = {
    "dataset": Limit(choices=_datasets),
    "train_subset": Limit(minimum=1, absent="all training examples"),
    "test_subset": Limit(minimum=1, absent="all test examples"),
    "validation": Limit(minimum=0),
    "model": Limit(example='"lenet5" or a table of blocks', absent="the MLP of hidden"),
    "hidden": Limit(minimum=1, example="[800, 800]"),
    "activation": Limit(choices=lambda: ACTIVATIONS),
    "objective": Limit(choices=lambda: OBJECTIVES),
    "weight_init": Limit(choices=WEIGHT_INITS),
    "bias_init": Limit(choices=BIAS_INITS),
    "rule": Limit(example='"s1" or a rule table'),
    "feedback": Limit(example='"uniform" or "B6:density=0.2"'),
    "seed": Limit(minimum=0),
    "dtype": Limit(choices=DTYPES),
    "alignment_probe": Limit(minimum=1),
}


@dataclass(frozen=True)
class RunConfig:
    """One run. Every field has the default of the paper's 2x800 tanh ``s1`` network.

    Making one checks every field by type and range before anything runs: a ``ConfigError`` of
    one line names the key, the value and what is allowed (``hidden = "32"``, ``epochs = 0``,
    ``alignment = "no"`` and ``train_subset = 0`` are refused, never converted).

    Attributes:
        dataset: ``mnist``, ``fashion-mnist`` or ``synthetic`` (a small learnable fake set).
        train_subset: train on the first N training examples only (quick runs); ``None``: all.
        test_subset: evaluate on the first N test examples only; ``None``: all.
        validation: hold out the last N training examples as a validation split.
        model: a model of blocks instead of the MLP (``gfalign.models``): a built-in name
            (``"lenet5"``) or a table of blocks; ``None`` is the MLP of ``hidden`` and
            ``activation``, which a model leaves at their defaults. The model's own spec sets
            its initialisation, so ``weight_init`` and ``bias_init`` are the MLP's.
        hidden: widths of the MLP's hidden layers.
        activation: the MLP's ``tanh``, ``relu`` or ``sigmoid``.
        objective: ``classification`` or ``autoencoder`` (784-...-784, sigmoid output).
        weight_init, bias_init: see ``gfalign.network.MLP``.
        rule: a preset name or a configuration table.
        feedback: the default feedback family, e.g. ``"uniform"`` or ``"B6:density=0.2"``
            (or a table ``{family = "B6", density = 0.2}``).
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
    model: str | Mapping[str, Any] | None = None
    hidden: tuple[int, ...] = (800, 800)
    activation: str = "tanh"
    objective: str = "classification"
    weight_init: str = "xavier_uniform"
    bias_init: str = "normal"
    rule: str | Mapping[str, Any] = "s1"
    feedback: str | Mapping[str, Any] = "uniform"
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    device: str = "cpu"
    dtype: str = "float32"
    alignment: bool = False
    alignment_probe: int = 1000

    def __post_init__(self) -> None:
        # Every field's type and range, so nothing wrong reaches the data or the network.
        check_fields(self, _LIMITS)
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", self.device):
            raise ConfigError(
                f"device must be cpu, cuda or auto, got {self.device!r}; allowed: cpu, auto, "
                "cuda or cuda:N (GPU number N)"
            )
        if self.train.seed != self.seed:
            object.__setattr__(self, "train", replace(self.train, seed=self.seed))
        if self.model is not None:
            self._check_model()
        # Resolving checks the rule and the feedback family now, before any data is loaded.
        rule = self.rule_config()
        if rule.uses_auxiliary and not OBJECTIVES[self.objective].uses_labels:
            raise ConfigError(
                f"rule {rule.name!r} uses auxiliary errors, which need class labels; "
                f'objective = "{self.objective}" has none; allowed: objective = "classification"'
            )

    def model_spec(self):
        """The ``gfalign.models.ModelSpec`` of ``model`` (``None`` for the MLP)."""
        from gfalign.models import model_spec

        return None if self.model is None else model_spec(self.model)

    def _check_model(self) -> None:
        spec = self.model_spec()
        for name in ("hidden", "activation"):
            if getattr(self, name) != _DEFAULTS[name]:
                raise ConfigError(
                    f"{name} = {render(getattr(self, name))} is the MLP's, but model = "
                    f"{render(self.model)} is given; allowed: leave {name} out (a model's "
                    "widths and activations are in its blocks)"
                )
        outputs = 10 if OBJECTIVES[self.objective].uses_labels else _INPUT_WIDTH
        if spec.outputs != outputs:
            raise ConfigError(
                f"model {spec.name!r}: its output block has {spec.outputs} units, the "
                f"{self.objective} of {self.dataset} needs {outputs}"
            )
        image = (1, 28, 28)  # MNIST, Fashion-MNIST and the synthetic set
        size = spec.resize or 28
        if spec.input not in ((_INPUT_WIDTH,), (1, size, size)) or (
            spec.resize and spec.input != (1, size, size)
        ):
            raise ConfigError(
                f"model {spec.name!r} takes inputs of shape {list(spec.input)}; {self.dataset} "
                f"gives images of shape {list(image)} (or [784] flat); allowed: input = "
                f"[1, 28, 28], [784], or [1, R, R] with resize = R"
            )

    @property
    def sizes(self) -> tuple[int, ...]:
        output = _INPUT_WIDTH if self.objective == "autoencoder" else 10
        return (_INPUT_WIDTH, *self.hidden, output)

    @property
    def rule_name(self) -> str:
        return self.rule if isinstance(self.rule, str) else str(self.rule.get("name", "custom"))

    def rule_config(self):
        """The resolved ``RuleConfig`` for this network's depth."""
        feedback = feedback_spec(self.feedback, f"feedback = {render(self.feedback)}: ")
        spec = self.model_spec()
        hidden = len(self.hidden) if spec is None else len(spec.blocks) - 1
        return resolve(self.rule, hidden, feedback)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    # ------------------------------------------------------------------ data forms

    def to_data(self) -> dict[str, Any]:
        """Plain data (TOML/JSON-ready); ``None`` fields are left out."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["hidden"] = list(self.hidden)
        data["rule"] = self.rule if isinstance(self.rule, str) else _plain(self.rule)
        if isinstance(self.model, Mapping):
            data["model"] = _plain(self.model)
        train = asdict(self.train)
        train.pop("seed")
        data["train"] = train
        return {k: v for k, v in data.items() if v is not None}

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> RunConfig:
        """Read plain data, checking every key and value (``ConfigError`` naming the first bad
        one, what it is and what is allowed); unknown keys get the close known ones."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a run configuration must be a table, got {render(data)}")
        data = dict(data)
        _refuse_unknown(data, [f.name for f in fields(cls)], "configuration key")
        train = data.pop("train", {})
        if not isinstance(train, Mapping):
            raise ConfigError(f"train = {render(train)}: not a table; allowed: a [train] table")
        train = dict(train)
        known = [f.name for f in fields(TrainConfig) if f.name != "seed"]
        _refuse_unknown(train, known, "[train] key", {"seed": "the seed is set at the top level"})
        # The top-level seed replaces TrainConfig's in __post_init__, once it is checked.
        return cls(**data, train=TrainConfig(**train))

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
        if self.model is not None:
            data["model"] = self.model_spec().to_data()
        text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def label(self) -> str:
        """A short human-readable name: ``s1 2x800 tanh seed0``."""
        widths = self.hidden
        shape = (
            f"{len(widths)}x{widths[0]}" if len(set(widths)) == 1 else "-".join(map(str, widths))
        )
        family = "" if self.feedback == "uniform" else f" {self.feedback}"
        network = f"{shape} {self.activation}" if self.model is None else self.model_spec().name
        return f"{self.rule_name}{family} {network} seed{self.seed}"


_DEFAULTS = {"hidden": (800, 800), "activation": "tanh"}


def _refuse_unknown(
    data: Mapping[str, Any], known: list[str], what: str, notes: Mapping[str, str] | None = None
) -> None:
    """``unknown configuration key 'hiden' (did you mean 'hidden'?); known: ...``."""
    unknown = [key for key in data if key not in known]
    if not unknown:
        return
    names = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), known, n=1)
        note = (notes or {}).get(key) or (f"did you mean {close[0]!r}?" if close else "")
        names.append(f"{key!r}" + (f" ({note})" if note else ""))
    plural = "s" if len(unknown) > 1 else ""
    raise ConfigError(
        f"unknown {what}{plural} {', '.join(names)}; known: {', '.join(sorted(known))}"
    )


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
