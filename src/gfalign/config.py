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
    dropout_input = 0.1         # dropout rates in training mode (DESIGN.md section 11)
    dropout_hidden = 0.5
    [train]
    epochs = 100
    batch_size = 32
    lr = 0.001
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
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

__all__ = [
    "DTYPES",
    "SEED_MAX",
    "RunConfig",
    "check_memory",
    "given_fields",
    "load_toml",
    "machine_memory",
    "resolve_device",
    "with_model_protocol",
]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
_SYNTHETIC_IMAGE = (1, 28, 28)  # gfalign.data.synthetic: MNIST's shape, 10 classes
SEED_MAX = 2**63 - 1
"""The largest seed: torch's generators take up to 2^64 - 1, a results store (SQLite's
integers, the 64-bit checks of an import) holds up to 2^63 - 1."""


def check_seed(seed: int, where: str = "") -> None:
    """Refuse a seed beyond ``SEED_MAX`` in one line (``check_fields`` has checked its type).

    Example:
        >>> check_seed(2**64)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        gfalign.rules.ConfigError: seed = 18446744073709551616: out of range; allowed: ...
    """
    if seed > SEED_MAX:
        raise ConfigError(
            f"{where}seed = {seed}: out of range; allowed: an integer from 0 to 2^63 - 1 = "
            f"{SEED_MAX}"
        )


def _datasets() -> list[str]:
    from gfalign.data.registry import SPECS  # datasets may be registered at run time

    return [*SPECS, "synthetic", "chars"]


def _dataset_facts(name: str) -> tuple[tuple[int, ...], int, bool]:
    """A dataset's image shape (C, H, W), its number of classes, and whether its inputs are
    normalised (not in [0, 1])."""
    from gfalign.data.registry import SPECS

    spec = SPECS.get(name)
    if name == "chars":  # gfalign.data.chars: character indices, not in [0, 1]
        from gfalign.data.text import ALPHABET, CONTEXT

        return (CONTEXT,), len(ALPHABET), True
    if spec is None:
        return _SYNTHETIC_IMAGE, 10, False
    return spec.image_shape, len(spec.classes), spec.normalize is not None


# Fields added after runs were stored: left out of ``to_data`` (and so of a run's key) while they
# hold their defaults, so that every earlier configuration keeps its key.
_LATER_FIELDS = {"dropout_input": 0.0, "dropout_hidden": 0.0}


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
    "dropout_input": Limit(minimum=0, example="0.1"),
    "dropout_hidden": Limit(minimum=0, example="0.5"),
}


@dataclass(frozen=True)
class RunConfig:
    """One run. Every field has the default of the paper's 2x800 tanh ``s1`` network.

    Making one checks every field by type and range before anything runs: a ``ConfigError`` of
    one line names the key, the value and what is allowed (``hidden = "32"``, ``epochs = 0``,
    ``alignment = "no"`` and ``train_subset = 0`` are refused, never converted).

    Attributes:
        dataset: ``mnist``, ``fashion-mnist``, ``cifar10`` (images of 3 x 32 x 32, so an MLP's
            input is 3072 wide) or ``synthetic`` (a small learnable fake set).
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
        dropout_input, dropout_hidden: the probabilities in [0, 1) of dropping an input unit
            and a hidden unit in training mode (DESIGN.md section 11); a model's block may set
            its own ``dropout``. 0, the default, is no dropout, and leaves ``key()`` as it was.
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
    dropout_input: float = 0.0
    dropout_hidden: float = 0.0
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
        check_seed(self.seed)
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", self.device):
            raise ConfigError(
                f"device must be cpu, cuda or auto, got {self.device!r}; allowed: cpu, auto, "
                "cuda or cuda:N (GPU number N)"
            )
        for name in _LATER_FIELDS:
            if not getattr(self, name) < 1:
                raise ConfigError(
                    f"{name} = {render(getattr(self, name))}: out of range; allowed: a number "
                    "in [0, 1), the probability of dropping a unit"
                )
        if self.train.seed != self.seed:
            object.__setattr__(self, "train", replace(self.train, seed=self.seed))
        _, _, normalised = _dataset_facts(self.dataset)
        if normalised and not OBJECTIVES[self.objective].uses_labels:
            raise ConfigError(
                f'objective = "{self.objective}" reconstructs inputs in [0, 1] through a '
                f"sigmoid, but {self.dataset}'s inputs are not in [0, 1]; allowed: objective = "
                '"classification"'
            )
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
        image, classes, _ = _dataset_facts(self.dataset)
        width = math.prod(image)
        outputs = classes if OBJECTIVES[self.objective].uses_labels else width
        if spec.outputs != outputs:
            raise ConfigError(
                f"model {spec.name!r}: its output block has {spec.outputs} units, the "
                f"{self.objective} of {self.dataset} needs {outputs}"
            )
        if self.dataset == "synthetic":
            return  # made in the model's input shape (gfalign.runs.load_data)
        channels = image[0]
        wanted = (channels, spec.resize, spec.resize) if spec.resize else None
        if (wanted is None and spec.input not in ((width,), image)) or (
            wanted is not None and spec.input != wanted
        ):
            raise ConfigError(
                f"model {spec.name!r} takes inputs of shape {list(spec.input)}; {self.dataset} "
                f"gives images of shape {list(image)} (or [{width}] flat); allowed: input = "
                f"{list(image)}, [{width}], or [{channels}, R, R] with resize = R"
            )

    def parameters(self) -> int:
        """The number of weights and biases of the network this configuration builds, counted
        from its widths without building it.

        Example:
            >>> RunConfig(hidden=(800, 800)).parameters()  # 784-800-800-10
            1276810
        """
        spec = self.model_spec()
        if spec is None:
            return sum((a + 1) * b for a, b in zip(self.sizes[:-1], self.sizes[1:], strict=True))
        return _block_parameters(spec)

    def check_fits(self) -> None:
        """Refuse, before anything is allocated, a network whose weights cannot fit in the
        memory of the machine (or of the GPU) it would train on.

        Raises:
            ConfigError: naming the parameter count, the memory needed and what there is.
        """
        model = "the MLP " + "-".join(map(str, self.sizes)) if self.model is None else None
        check_memory(
            model or f"model {self.model_spec().name!r}",
            self.parameters(),
            self.torch_dtype,
            self.device,
        )

    @property
    def sizes(self) -> tuple[int, ...]:
        """The MLP's widths: the dataset's flattened image, ``hidden``, and the classes (or the
        image again, for the autoencoder)."""
        image, classes, _ = _dataset_facts(self.dataset)
        width = math.prod(image)
        output = width if self.objective == "autoencoder" else classes
        return (width, *self.hidden, output)

    @property
    def rule_name(self) -> str:
        return self.rule if isinstance(self.rule, str) else str(self.rule.get("name", "custom"))

    def rule_config(self):
        """The resolved ``RuleConfig`` for this network's depth."""
        feedback = feedback_spec(self.feedback, f"feedback = {render(self.feedback)}: ")
        spec = self.model_spec()
        hidden = len(self.hidden) if spec is None else spec.depth - 1
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
        train = self.train.to_data()  # leaves later fields out at their defaults: keys stay
        train.pop("seed")
        data["train"] = train
        for name, default in _LATER_FIELDS.items():
            if data[name] == default:
                del data[name]
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
        """A short human-readable name: ``s1 2x800 tanh seed0`` (with dropout:
        ``s1 2x800 tanh dropout 0.1/0.5 seed0``, the input's rate, then the hidden one)."""
        widths = self.hidden
        shape = (
            f"{len(widths)}x{widths[0]}" if len(set(widths)) == 1 else "-".join(map(str, widths))
        )
        family = "" if self.feedback == "uniform" else f" {self.feedback}"
        network = f"{shape} {self.activation}" if self.model is None else self.model_spec().name
        dropout = ""
        if self.dropout_input or self.dropout_hidden:
            dropout = f" dropout {self.dropout_input:g}/{self.dropout_hidden:g}"
        return f"{self.rule_name}{family} {network}{dropout} seed{self.seed}"


_DEFAULTS = {"hidden": (800, 800), "activation": "tanh"}


def given_fields(data: Mapping[str, Any]) -> set[str]:
    """The fields a configuration's plain data sets: its top-level keys and its ``[train]``
    table's, by name (``{"model", "rule", "lr"}``)."""
    train = data.get("train")
    return {k for k in data if k != "train"} | (set(train) if isinstance(train, Mapping) else set())


def with_model_protocol(config: RunConfig, given: set[str] | frozenset[str]) -> RunConfig:
    """``config`` with its model's default protocol (``ModelSpec.protocol``) in every field
    not in ``given``, the fields its maker set (flags, a file's keys: ``given_fields``).

    The protocol's ``rates`` give the rule's learning rate where they name it, its ``lr``
    otherwise; its ``optimizer_options`` apply only with its own optimizer (a run naming
    another keeps that optimizer's defaults). A configuration without a model, or whose model
    names no protocol, comes back unchanged, and so does every field the maker set: an
    explicit configuration trains as it always has.

    Example:
        >>> config = with_model_protocol(RunConfig(model="lenet5", rule="dfa"), {"model", "rule"})
        >>> config.train.optimizer, config.train.batch_size, config.feedback
        ('adam', 32, 'xavier')
        >>> with_model_protocol(RunConfig(model="lenet5"), {"model", "reduction"}).train.reduction
        'sum'
    """
    spec = config.model_spec()
    protocol = dict(spec.protocol) if spec is not None else {}
    if not protocol:
        return config
    rates = protocol.pop("rates", {})
    if "lr" in protocol or config.rule_name in rates:
        protocol["lr"] = rates.get(config.rule_name, protocol.get("lr"))
    if "optimizer" in given and config.train.optimizer != protocol.get("optimizer", "sgd"):
        protocol.pop("optimizer_options", None)
    changes = {name: value for name, value in protocol.items() if name not in given}
    return config.override(**changes) if changes else config


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


def _block_parameters(spec) -> int:
    """The weights and biases of a ``gfalign.models.ModelSpec``, from its blocks' tables
    (convolution and pooling output sizes as ``torch.nn`` computes them)."""
    shape = tuple(spec.input)
    total = 0
    for block in spec.blocks:
        bias = bool(block.get("bias", True))
        if "conv" in block:
            channels, kernel = int(block["conv"]), int(block["kernel"])
            stride, padding = int(block.get("stride", 1)), int(block.get("padding", 0))
            total += channels * (shape[0] * kernel * kernel + bias)
            sides = [(side + 2 * padding - kernel) // stride + 1 for side in shape[1:]]
            if "pool" in block:
                sizes = [int(p) for p in str(block["pool"]).split(":")[1:]]
                sides = [(side - sizes[0]) // sizes[-1] + 1 for side in sides]
            shape = (channels, *(max(side, 1) for side in sides))
        else:
            width = int(block["linear"])
            total += width * (math.prod(shape) + bias)
            shape = (width,)
    return total


def machine_memory(device: str = "cpu") -> tuple[int, str] | None:
    """The bytes of memory a run on ``device`` has, and where they are: the GPU's own for
    CUDA, else this machine's (``MemTotal`` of ``/proc/meminfo``, or ``os.sysconf``); None
    where neither can be read.

    Example:
        >>> total, where = machine_memory()
        >>> total > 0 and where == "this machine"
        True
    """
    if device != "cpu" and torch.cuda.is_available():
        index = torch.device("cuda" if device == "auto" else device).index or 0
        if index < torch.cuda.device_count():
            properties = torch.cuda.get_device_properties(index)
            return int(properties.total_memory), f"GPU {index} ({properties.name})"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024, "this machine"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine"
    except (ValueError, OSError, AttributeError):
        return None


def _bytes(count: float) -> str:
    """``12.5 GB``: a size in decimal units."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB", "EB"):
        if count < 1000 or unit == "EB":
            return f"{count:.3g} {unit}"
        count /= 1000
    raise AssertionError  # pragma: no cover


def check_memory(
    what: str, count: int, dtype: torch.dtype, device: str = "cpu", copies: int = 2
) -> None:
    """Refuse ``count`` numbers of ``dtype`` that cannot fit ``copies`` times (the weights and
    their updates, at the least) in the memory ``machine_memory(device)`` finds.

    Raises:
        ConfigError: ``{what} has N parameters, needing at least M of memory ..., more than
            {where} has (T)``.

    Example:
        >>> check_memory("an MLP", 795 * 10**12, torch.float32)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        gfalign.rules.ConfigError: an MLP has 795,000,000,000,000 parameters, needing at least ...
    """
    found = machine_memory(device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    needed = count * itemsize * copies
    if found is None or needed <= found[0]:
        return
    total, where = found
    name = str(dtype).removeprefix("torch.")
    raise ConfigError(
        f"{what} has {count:,} parameters, needing at least {_bytes(needed)} of memory "
        f"({copies} copies in {name}: the weights and their updates), more than {where} has "
        f"({_bytes(total)}); allowed: a network of at most about "
        f"{total // (itemsize * copies):,} parameters here"
    )


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
