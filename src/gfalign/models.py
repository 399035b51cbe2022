"""Models as sequences of blocks (DESIGN.md section 9), from data or from a user's modules.

A block is a parametrised linear part, an element-wise activation and a parameter-free tail:

    a^i = phi_i(h^{i-1}; theta_i),    h^i = tau_i(f_i(a^i)),    logits = a^L.

``Network`` holds such a sequence. Its ``forward`` is plain PyTorch, differentiable by autograd
(the reference every rule is tested against); ``forward_cache`` keeps every ``a^i``, ``h^i`` and
each tail's linearisation state for the rules. A model is written as data, a table per block:

    input = [1, 32, 32]              # (C, H, W) the first block receives
    resize = 32                      # 28x28 images are resized (bilinearly) to 32x32 at load
    activation = "relu"              # every block's, unless the block names its own
    [[blocks]]
    conv = 6                         # output channels; kernel, stride, padding, bias
    kernel = 5
    pool = "max:2"                   # max:K, max:K:S, avg:K, avg:K:S
    [[blocks]]
    linear = 84                      # output features; a flatten comes before it by itself
    activation = "identity"
    dropout = 0.5                    # drops f(a^i) in training mode (default: the run's rate)
    [[blocks]]
    linear = 10                      # the last block is the output (no activation, no tail)

A model may also name the protocol it trains with unless a run says otherwise (its
``[protocol]`` table, ``ModelSpec.protocol``): ``[train]`` fields, the default ``feedback``
family, and ``rates``, a learning rate per rule where the model's ``lr`` does not suit it:

    [protocol]
    optimizer = "sgd"
    optimizer_options = { momentum = 0.9 }
    lr = 0.01
    batch_size = 128
    reduction = "mean"
    weight_decay = 1e-4
    feedback = "xavier"
    rates = { dfa = 0.001 }     # this rule's rate instead of lr

The protocol is a default, not part of the model: it never enters ``ModelSpec.to_data`` (so a
run's key is what it was), and ``gfalign.config.with_model_protocol`` applies it to the fields a
command line or a configuration file leaves unset.

``MODELS`` has the built-ins (``lenet5``, ``lenet5-tanh``, ``lenet5-cifar``), ``from_modules``
turns a user's ``nn.Sequential`` (or list of modules) into a ``Network``; ``resnet20`` and
``resnet56`` are model graphs (``gfalign.graph``).

    >>> net = build("lenet5", seed=0)
    >>> net(torch.zeros(2, 1, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from gfalign import architectures
from gfalign.blocks import Block, Tail, check_dropout_rate
from gfalign.network import (
    ACTIVATION_MODULES,
    IDENTITY,
    Network,
    activation_named,
    initialise,
)
from gfalign.rules import ConfigError, render
from gfalign.train import TrainConfig

__all__ = [
    "MODELS",
    "RETIRED_MODELS",
    "Block",
    "BlockNet",
    "ModelSpec",
    "Network",
    "build",
    "from_modules",
    "model_spec",
]


def _refuse_unknown(table: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = set(table) - known
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(
            f"{where}: unknown key {key!r}{_close(key, sorted(known))}; known: "
            f"{', '.join(sorted(known))}"
        )


def _close(word: str, known: Sequence[str]) -> str:
    match = difflib.get_close_matches(str(word), list(known), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


BlockNet = Network
"""The model class's name in earlier releases (``gfalign.network.Network``)."""


# --------------------------------------------------------------------------- models as data

_MODEL_KEYS = {
    "name",
    "description",
    "input",
    "resize",
    "normalize",
    "activation",
    "weight_init",
    "bias_init",
    "blocks",
    "graph",
    "classes",
    "protocol",
}
# The keys of a model's [protocol]: [train] fields (the seed is the run's), the default feedback
# family, and a learning rate per rule.
_PROTOCOL_KEYS = ({f.name for f in fields(TrainConfig)} - {"seed"}) | {"feedback", "rates"}
_BLOCK_KEYS = {
    "conv",
    "linear",
    "kernel",
    "stride",
    "padding",
    "bias",
    "activation",
    "pool",
    "dropout",
}


@dataclass(frozen=True)
class ModelSpec:
    """A block model as data (see the module docstring); ``to_data`` gives it back.

    Attributes:
        name: shown in labels.
        input: (C, H, W) or (features,) the first block receives.
        resize: images are resized to ``resize`` x ``resize`` at load (``None``: as they are).
        normalize: ``(mean, std)`` applied to the inputs at load, or ``None``.
        activation: the blocks' default activation.
        weight_init, bias_init: ``default`` (PyTorch's), ``xavier_uniform``, ``xavier_normal``;
            ``default``, ``zeros``, ``normal``.
        blocks: one plain table per block (a hidden block's ``dropout`` is its own rate,
            overriding the run's ``dropout_hidden``).
        protocol: the model's default protocol (see the module docstring): applied by
            ``gfalign.config.with_model_protocol`` to what a run leaves unset, never part of
            ``to_data`` (nor of a run's key).
    """

    name: str
    input: tuple[int, ...]
    blocks: tuple[Mapping[str, Any], ...]
    resize: int | None = None
    normalize: tuple[float, float] | None = None
    activation: str = "relu"
    weight_init: str = "default"
    bias_init: str = "default"
    description: str = ""
    graph: str | None = None
    classes: int = 0
    protocol: Mapping[str, Any] = field(default_factory=dict)

    def to_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "input": list(self.input),
            "activation": self.activation,
            "weight_init": self.weight_init,
            "bias_init": self.bias_init,
            "blocks": [dict(block) for block in self.blocks],
        }
        if self.description:
            data["description"] = self.description
        if self.resize is not None:
            data["resize"] = self.resize
        if self.normalize is not None:
            data["normalize"] = list(self.normalize)
        if self.graph is not None:
            data.update(graph=self.graph, classes=self.classes)
            del data["blocks"]
        return data

    @property
    def depth(self) -> int:
        """The number of blocks ``L``."""
        return ARCHITECTURES[self.graph].blocks if self.graph is not None else len(self.blocks)

    @property
    def outputs(self) -> int:
        """The output block's width."""
        return self.classes if self.graph is not None else int(self.blocks[-1]["linear"])


_LENET_PROTOCOL: dict[str, Any] = {
    # Adam at batch 32, not the conv experiment's SGD at batch 128 (SGD with momentum 0.9, lr
    # 0.01): under that one LeNet's relu blocks take hundreds of steps to leave their starting
    # plateau (after one epoch of 3,000 MNIST examples, bp is at 90% test error with it, 79% at
    # batch 32), while Adam, whose steps are scaled per parameter, gets every rule moving
    # within that epoch with one rate for all, whatever the size of its feedback (dfa 52.6%,
    # s2 51.3% test error there). The rest is biotorch's LeNet protocol at the conv
    # experiment's 20 epochs: weight decay 1e-4, mean updates, the rate divided by 10 at epochs
    # 8, 12 and 16, Glorot-scaled feedback.
    "optimizer": "adam",
    "lr": 0.001,
    "batch_size": 32,
    "reduction": "mean",
    "weight_decay": 1e-4,
    "epochs": 20,
    "schedule": "multistep:milestones=[8, 12, 16],gamma=0.1",
    "feedback": "xavier",
}

_LENET5: dict[str, Any] = {
    "name": "lenet5",
    "description": "LeNet-5 as biotorch's LeNetMNIST: three 5x5 relu convolutions (6, 16, "
    "120 channels, 2x2 max-pooling after the first two), Linear 120-84 relu, Linear 84-10; "
    "32x32 inputs, so 28x28 images are resized to 32x32 as biotorch does",
    "input": [1, 32, 32],
    "resize": 32,
    "activation": "relu",
    "blocks": [
        {"conv": 6, "kernel": 5, "pool": "max:2"},
        {"conv": 16, "kernel": 5, "pool": "max:2"},
        {"conv": 120, "kernel": 5},
        {"linear": 84},
        {"linear": 10},
    ],
    "protocol": _LENET_PROTOCOL,
}
"""biotorch's LeNetMNIST as data (``MODELS["lenet5"]``)."""

MODELS: dict[str, dict[str, Any]] = {
    "lenet5": _LENET5,
    "lenet5-tanh": {
        **_LENET5,
        "name": "lenet5-tanh",
        "description": "lenet5 with tanh units in every hidden block, as Frenkel et al. train "
        "conv nets with DRTP: a target projection drives each unit towards a fixed sign and "
        "only a bounded unit stops there (with relu, DRTP's activations grow without bound)",
        "activation": "tanh",
    },
    "lenet5-cifar": {
        "name": "lenet5-cifar",
        "description": "LeNet for CIFAR-10 as biotorch's LeNetCIFAR: three 3x3 relu "
        "convolutions (32, 64, 128 channels, 2x2 max-pooling after the first two, a 4x4 average "
        "pooling of the last one's 4x4 map to 1x1), Linear 128-256 relu, Linear 256-10; 3x32x32 "
        "inputs",
        "input": [3, 32, 32],
        "activation": "relu",
        "blocks": [
            {"conv": 32, "kernel": 3, "pool": "max:2"},  # (32, 30, 30) -> (32, 15, 15)
            {"conv": 64, "kernel": 3, "pool": "max:2"},  # (64, 13, 13) -> (64, 6, 6)
            {"conv": 128, "kernel": 3, "pool": "avg:4"},  # (128, 4, 4) -> (128, 1, 1)
            {"linear": 256},
            {"linear": 10},
        ],
    },
    "resnet20": {
        "name": "resnet20",
        "description": "ResNet-20 for CIFAR-10 (He et al. 2016, option A shortcuts), as "
        "biotorch's resnet20: 3x32x32 inputs, three stages of three basic blocks with BatchNorm, "
        "a model graph",
        "input": [3, 32, 32],
        "graph": "resnet20",
        "classes": 10,
    },
    "resnet56": {
        "name": "resnet56",
        "description": "ResNet-56 for CIFAR-10 (He et al. 2016, option A shortcuts), as biotorch's "
        "resnet56: three stages of nine basic blocks, a model graph",
        "input": [3, 32, 32],
        "graph": "resnet56",
        "classes": 10,
    },
    "transformer": {
        "name": "transformer",
        "description": "a pre-norm transformer of 2 layers, width 128, 4 heads, over 32 "
        "characters, predicting the next one (the chars dataset's 28); each layer one block, "
        "so dfa gives one direct term per layer (Launay et al. 2020), a model graph",
        "input": [32],
        "graph": "transformer",
        "classes": 28,
        # Adam, as transformers are trained (Launay et al. train theirs with it, under every
        # rule), at one rate for every rule; Glorot-scaled feedback.
        "protocol": {
            "optimizer": "adam",
            "lr": 0.001,
            "batch_size": 64,
            "reduction": "mean",
            "epochs": 5,
            "feedback": "xavier",
        },
    },
}
"""The built-in models, by name, as data."""

RETIRED_MODELS: dict[str, tuple[dict[str, Any], ...]] = {
    "lenet5": (
        {  # before relu was added after fc1: fc1 and fc2 were one linear map
            "name": "lenet5",
            "description": "LeNet-5 as biotorch's LeNetMNIST: three 5x5 relu convolutions (6, "
            "16, 120 channels, 2x2 max-pooling after the first two), Linear 120-84 without "
            "activation, Linear 84-10; 32x32 inputs, so 28x28 images are resized to 32x32 as "
            "biotorch does",
            "input": [1, 32, 32],
            "resize": 32,
            "activation": "relu",
            "blocks": [
                {"conv": 6, "kernel": 5, "pool": "max:2"},
                {"conv": 16, "kernel": 5, "pool": "max:2"},
                {"conv": 120, "kernel": 5},
                {"linear": 84, "activation": "identity"},
                {"linear": 10},
            ],
        },
    ),
}
"""Former definitions of built-in models, newest last. A stored run names its model, and its
key hashes the model's definition: a run trained on a former definition is recognised by its
key and reads that definition as an explicit table (``gfalign.store``), so it keeps its meaning
and leaves the tables of the current one."""


def model_spec(data: str | Mapping[str, Any]) -> ModelSpec:
    """A ``ModelSpec`` from a built-in name or a table, every key checked.

    Raises:
        ConfigError: naming the block and the key or value at fault.
    """
    if isinstance(data, str):
        if data not in MODELS:
            raise ConfigError(
                f"unknown model {data!r}{_close(data, list(MODELS))}; built-in: "
                f"{', '.join(MODELS)}, or a TOML file of blocks"
            )
        data = MODELS[data]
    if not isinstance(data, Mapping):
        raise ConfigError(f"model: expected a table or a name, got {type(data).__name__}")
    _refuse_unknown(data, _MODEL_KEYS, "model")
    if "graph" in data:
        return _graph_spec(data)
    blocks = data.get("blocks")
    if not isinstance(blocks, Sequence) or isinstance(blocks, str) or not blocks:
        raise ConfigError("model: 'blocks' must be a non-empty list of block tables")
    shape = data.get("input")
    if (
        not isinstance(shape, Sequence)
        or isinstance(shape, str)
        or len(shape) not in (1, 3)
        or not all(_positive_int(n) for n in shape)
    ):
        raise ConfigError(
            f"model: 'input' must be [C, H, W] or [features] of positive integers, got {shape!r}"
        )
    for number, block in enumerate(blocks, start=1):
        _check_block(block, number, last=number == len(blocks))
    resize = data.get("resize")
    if resize is not None and not _positive_int(resize):
        raise ConfigError(f"model: 'resize' must be a positive integer, got {resize!r}")
    normalize = data.get("normalize")
    if normalize is not None:
        if (
            not isinstance(normalize, Sequence)
            or len(normalize) != 2
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in normalize)
            or not normalize[1] > 0
        ):
            raise ConfigError(f"model: 'normalize' must be [mean, std > 0], got {normalize!r}")
        normalize = (float(normalize[0]), float(normalize[1]))
    activation = str(data.get("activation", "relu"))
    activation_named(activation, "model")
    weight_init = str(data.get("weight_init", "default"))
    bias_init = str(data.get("bias_init", "default"))
    protocol = _protocol(data.get("protocol", {}))
    if weight_init not in _WEIGHT_INITS:
        raise ConfigError(
            f"model: unknown weight_init {weight_init!r}; known: {', '.join(_WEIGHT_INITS)}"
        )
    if bias_init not in _BIAS_INITS:
        raise ConfigError(
            f"model: unknown bias_init {bias_init!r}; known: {', '.join(_BIAS_INITS)}"
        )
    return ModelSpec(
        name=str(data.get("name", "custom")),
        input=tuple(int(n) for n in shape),
        blocks=tuple(dict(block) for block in blocks),
        resize=None if resize is None else int(resize),
        normalize=normalize,
        activation=activation,
        weight_init=weight_init,
        bias_init=bias_init,
        description=str(data.get("description", "")),
        protocol=protocol,
    )


@dataclass(frozen=True)
class Architecture:
    """A built-in model graph (``gfalign.architectures``).

    Attributes:
        build: ``(classes, input) -> nn.Module``, ``input`` the shape of one example.
        blocks: the number of blocks its graph has.
        input: what ``input`` must be, in words, with the number of its dimensions.
        leaves: the module types its trace keeps as one block each.
    """

    build: Callable[[int, tuple[int, ...]], nn.Module]
    blocks: int
    input: tuple[str, int]
    leaves: tuple[type, ...] = ()


def _transformer(classes: int, shape: tuple[int, ...]) -> nn.Module:
    return architectures.transformer(vocabulary=classes, context=shape[0])


ARCHITECTURES: dict[str, Architecture] = {
    "resnet20": Architecture(
        lambda classes, shape: architectures.resnet(20, classes, shape[0]), 20, ("[C, H, W]", 3)
    ),
    "resnet56": Architecture(
        lambda classes, shape: architectures.resnet(56, classes, shape[0]), 56, ("[C, H, W]", 3)
    ),
    "transformer": Architecture(
        _transformer, 4, ("[characters]", 1), architectures.TRANSFORMER_LEAVES
    ),
}
"""The built-in model graphs, by the name a model's ``graph`` key gives."""


def _graph_spec(data: Mapping[str, Any]) -> ModelSpec:
    """A model graph's spec: a built-in architecture, its input and its classes."""
    graph = data["graph"]
    if graph not in ARCHITECTURES:
        raise ConfigError(
            f"model: unknown graph {graph!r}{_close(str(graph), list(ARCHITECTURES))}; known: "
            f"{', '.join(ARCHITECTURES)}"
        )
    extra = set(data) - {"name", "description", "input", "graph", "classes", "protocol"}
    if extra:
        raise ConfigError(f"model: a graph takes no {', '.join(sorted(extra))}")
    shape, classes = data.get("input"), data.get("classes")
    words, rank = ARCHITECTURES[graph].input
    if not isinstance(shape, Sequence) or len(shape) != rank or not all(map(_positive_int, shape)):
        raise ConfigError(f"model: graph {graph!r} takes an 'input' of {words}, got {shape!r}")
    if not _positive_int(classes):
        raise ConfigError(f"model: 'classes' must be a positive integer, got {classes!r}")
    return ModelSpec(
        name=str(data.get("name", graph)),
        input=tuple(int(n) for n in shape),
        blocks=(),
        description=str(data.get("description", "")),
        graph=str(graph),
        classes=int(classes),
        protocol=_protocol(data.get("protocol", {})),
    )


def _build_graph(spec: ModelSpec, objective: str, seed: int, dropout: tuple[float, float]):
    """A built-in graph's module, initialised by PyTorch's defaults from ``seed`` (the global
    generator is left as it was), converted to a ``Network``."""
    from gfalign.graph import convert

    if any(dropout):
        raise ConfigError(f"model {spec.name!r} is a graph, which takes no dropout")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        architecture = ARCHITECTURES[spec.graph]
        module = architecture.build(spec.classes, spec.input)
    module = module.to(torch.float64)
    example = torch.zeros(2, *spec.input, dtype=torch.float64)
    net = convert(module, example, objective=objective, leaves=architecture.leaves)
    net.module = module  # the traced module, whose parameters the blocks share
    return net


def _protocol(table: Any) -> dict[str, Any]:
    """A model's ``[protocol]`` checked by key (its values are checked where a run uses them)."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"model: protocol = {render(table)} is not a table")
    _refuse_unknown(table, _PROTOCOL_KEYS, "model protocol")
    rates = table.get("rates", {})
    if not isinstance(rates, Mapping) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in rates.values()
    ):
        raise ConfigError(
            f"model protocol: rates = {render(rates)}; allowed: a table of rule = rate > 0"
        )
    return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in table.items()}


_WEIGHT_INITS = ("default", "xavier_uniform", "xavier_normal")
_BIAS_INITS = ("default", "zeros", "normal")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_block(block: Any, number: int, *, last: bool) -> None:
    where = f"model block {number}"
    if not isinstance(block, Mapping):
        raise ConfigError(f"{where}: expected a table, got {block!r}")
    _refuse_unknown(block, _BLOCK_KEYS, where)
    kinds = [kind for kind in ("conv", "linear") if kind in block]
    if len(kinds) != 1:
        raise ConfigError(f"{where}: give exactly one of 'conv = CHANNELS' or 'linear = WIDTH'")
    kind = kinds[0]
    if not _positive_int(block[kind]):
        raise ConfigError(f"{where}: {kind} must be a positive integer, got {block[kind]!r}")
    if kind == "linear":
        extra = {"kernel", "stride", "padding"} & set(block)
        if extra:
            raise ConfigError(f"{where}: a linear block has no {', '.join(sorted(extra))}")
    else:
        if not _positive_int(block.get("kernel")):
            raise ConfigError(f"{where}: a conv block needs 'kernel', a positive integer")
        if not _positive_int(block.get("stride", 1)):
            raise ConfigError(f"{where}: stride must be a positive integer")
        padding = block.get("padding", 0)
        if not (isinstance(padding, int) and not isinstance(padding, bool) and padding >= 0):
            raise ConfigError(f"{where}: padding must be an integer >= 0, got {padding!r}")
    if "bias" in block and not isinstance(block["bias"], bool):
        raise ConfigError(f"{where}: bias must be true or false, got {block['bias']!r}")
    if "activation" in block:
        if last:
            raise ConfigError(f"{where} is the output block: its activation is the objective's")
        activation_named(str(block["activation"]), where)
    if "pool" in block:
        if last:
            raise ConfigError(f"{where} is the output block: it cannot pool")
        _pool(block["pool"], where)
    if "dropout" in block:
        if last:
            raise ConfigError(f"{where} is the output block: its logits are never dropped")
        check_dropout_rate(block["dropout"], f"{where}: dropout")


def _pool(text: Any, where: str) -> nn.Module:
    parts = str(text).split(":")
    kinds = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}
    if parts[0] not in kinds or len(parts) not in (2, 3) or not all(p.isdigit() for p in parts[1:]):
        raise ConfigError(f"{where}: pool must be max:K, max:K:S, avg:K or avg:K:S, got {text!r}")
    sizes = [int(p) for p in parts[1:]]
    if min(sizes) < 1:
        raise ConfigError(f"{where}: pool sizes must be positive, got {text!r}")
    return kinds[parts[0]](sizes[0], sizes[-1])


def build(
    spec: str | Mapping[str, Any] | ModelSpec,
    objective: str = "classification",
    *,
    seed: int = 0,
    dropout_input: float = 0.0,
    dropout_hidden: float = 0.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Network:
    """The ``Network`` a spec describes, its parameters drawn from ``seed`` (in float64, then
    cast, so float32 and float64 models share their values).

    ``dropout_input`` is the input's dropout rate and ``dropout_hidden`` every hidden block's,
    except where a block's table gives its own ``dropout``; the masks are drawn from ``seed``.

    Example:
        >>> net = build({"input": [4], "blocks": [{"linear": 3, "activation": "tanh"},
        ...                                        {"linear": 2}]})
        >>> [tuple(p.shape) for p in net.parameters()]
        [(3, 4), (3,), (2, 3), (2,)]
        >>> build("lenet5", dropout_hidden=0.5).dropout_rates
        (0.5, 0.5, 0.5, 0.5, 0.0)
    """
    spec = spec if isinstance(spec, ModelSpec) else model_spec(spec)
    if spec.graph is not None:
        net = _build_graph(spec, objective, seed, (dropout_input, dropout_hidden))
        net.spec = spec
        return net.to(device=device, dtype=dtype)
    dropout_hidden = check_dropout_rate(dropout_hidden, "dropout_hidden")
    generator = torch.Generator().manual_seed(seed)
    shape = spec.input
    blocks: list[Block] = []
    count = len(spec.blocks)
    for number, table in enumerate(spec.blocks, start=1):
        where = f"model block {number}"
        if "conv" in table:
            if len(shape) != 3:
                raise ConfigError(f"{where}: a conv block needs an image input, gets {list(shape)}")
            part: nn.Module = nn.Conv2d(
                shape[0],
                int(table["conv"]),
                int(table["kernel"]),
                stride=int(table.get("stride", 1)),
                padding=int(table.get("padding", 0)),
                bias=bool(table.get("bias", True)),
                dtype=torch.float64,
            )
        else:
            if len(shape) != 1:
                raise ConfigError(
                    f"{where}: a linear block needs flat inputs, gets {list(shape)}; give the "
                    f"model input = [{math.prod(shape)}]"
                )
            part = nn.Linear(
                shape[0],
                int(table["linear"]),
                bias=bool(table.get("bias", True)),
                dtype=torch.float64,
            )
        initialise(part, spec.weight_init, spec.bias_init, generator)
        last = number == count
        default = spec.activation
        activation = IDENTITY if last else activation_named(table.get("activation", default), where)
        tail: list[nn.Module] = []
        if "pool" in table:
            tail.append(_pool(table["pool"], where))
        if not last and "conv" in table and "linear" in spec.blocks[number]:
            tail.append(nn.Flatten())  # a linear block after a conv block reads it flattened
        with torch.no_grad():
            try:
                probe = nn.Sequential(part, *tail)(torch.zeros(1, *shape, dtype=torch.float64))
            except RuntimeError as problem:
                raise ConfigError(
                    f"{where} does not fit its input of shape {list(shape)}: "
                    f"{str(problem).splitlines()[0]}"
                ) from None
        shape = tuple(probe.shape[1:])
        dropout = 0.0 if last else table.get("dropout", dropout_hidden)
        blocks.append(Block(part, activation, Tail(tuple(tail)), dropout))
    net = Network(blocks, objective, input_shape=spec.input, dropout_input=dropout_input, seed=seed)
    net.spec = spec
    return net.to(device=device, dtype=dtype)


# -------------------------------------------------------------------------- user modules

_DROPOUT_MODULES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def from_modules(
    modules: nn.Sequential | Sequence[nn.Module],
    *,
    input_shape: Sequence[int],
    objective: str = "classification",
    seed: int = 0,
) -> Network:
    """A ``Network`` from a user's modules, in order, sharing their parameters.

    Each module with parameters starts a block as its linear part; a ``ReLU``, ``Tanh`` or
    ``Sigmoid`` right after it is the block's activation (none: identity), and an
    ``nn.Dropout`` right after that is the block's dropout rate (an ``nn.Dropout`` before the
    first block drops the input); every other parameter-free module (pooling, flatten, ...)
    joins the block's tail. The last block is the output: nothing may follow its linear part.
    ``seed`` seeds the dropout masks.

    Example:
        >>> net = from_modules(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Dropout(0.1),
        ...                                  nn.MaxPool2d(2), nn.Flatten(),
        ...                                  nn.Linear(4 * 13 * 13, 10)),
        ...                    input_shape=(1, 28, 28))
        >>> net.depth, net.pre_shapes[0], net.dropout_rates
        (2, (4, 26, 26), (0.1, 0.0))
    """
    modules = list(modules.children() if isinstance(modules, nn.Sequential) else modules)
    groups: list[list[nn.Module]] = []
    dropout_input = 0.0
    for index, module in enumerate(modules):
        if _has_parameters(module):
            groups.append([module])
        elif not groups:
            if type(module) is nn.Dropout and index == 0:
                dropout_input = module.p
                continue
            raise ConfigError(
                f"{type(module).__name__} comes before any module with parameters; a model "
                "starts with its first block's linear part (or one nn.Dropout of its input)"
            )
        else:
            groups[-1].append(module)
    blocks = []
    for number, (part, *rest) in enumerate(groups, start=1):
        activation = IDENTITY
        last = number == len(groups)
        if rest and type(rest[0]) in ACTIVATION_MODULES and not last:
            activation = ACTIVATION_MODULES[type(rest.pop(0))]
        dropout = 0.0
        if rest and type(rest[0]) is nn.Dropout and not last:
            dropout = rest.pop(0).p
        if last and rest:
            raise ConfigError(
                f"block {number} is the output block, but {type(rest[0]).__name__} follows its "
                f"{type(part).__name__}: the output block's linear part gives the logits"
            )
        for module in rest:
            if isinstance(module, _DROPOUT_MODULES):
                raise ConfigError(
                    f"block {number}: {type(module).__name__} in its tail; allowed: one "
                    "nn.Dropout right after the block's activation (its mask multiplies "
                    "f(a^i), as a feedback rule needs)"
                )
        blocks.append(Block(part, activation, Tail(tuple(rest)), dropout))
    return Network(
        blocks, objective, input_shape=input_shape, dropout_input=dropout_input, seed=seed
    )
