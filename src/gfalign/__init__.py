"""gfalign: biologically plausible credit assignment in PyTorch.

Backpropagation, feedback alignment, direct feedback alignment, layer-wise auxiliary errors and
the general feedback alignment rule, all as configurations of one exact rule engine.

The names below are imported on first use, so that ``import gfalign.cli`` (the command line)
starts without PyTorch and a Ctrl-C while it loads is one line, not a traceback.

    >>> from gfalign import FeedbackRule, mlp
    >>> FeedbackRule("bp", mlp([4, 3, 2], seed=0)).config.name
    'bp'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module it comes from
_EXPORTS = {
    "FeedbackRule": "gfalign.engine",
    "Step": "gfalign.engine",
    "FAMILIES": "gfalign.feedback",
    "FeedbackSpec": "gfalign.feedback",
    "MLP": "gfalign.network",
    "Network": "gfalign.network",
    "mlp": "gfalign.network",
    "convert": "gfalign.graph",
    "PRESETS": "gfalign.rules",
    "ConfigError": "gfalign.rules",
    "LayerRule": "gfalign.rules",
    "RuleConfig": "gfalign.rules",
    "Term": "gfalign.rules",
    "preset": "gfalign.rules",
    "resolve": "gfalign.rules",
    "DivergenceError": "gfalign.train",
    "TrainConfig": "gfalign.train",
    "Trainer": "gfalign.train",
    "evaluate": "gfalign.train",
}

__all__ = [
    "FAMILIES",
    "PRESETS",
    "ConfigError",
    "DivergenceError",
    "FeedbackRule",
    "FeedbackSpec",
    "LayerRule",
    "MLP",
    "Network",
    "RuleConfig",
    "Step",
    "Term",
    "TrainConfig",
    "Trainer",
    "convert",
    "evaluate",
    "mlp",
    "preset",
    "resolve",
]

if TYPE_CHECKING:
    from gfalign.engine import FeedbackRule, Step
    from gfalign.feedback import FAMILIES, FeedbackSpec
    from gfalign.graph import convert
    from gfalign.network import MLP, Network, mlp
    from gfalign.rules import PRESETS, ConfigError, LayerRule, RuleConfig, Term, preset, resolve
    from gfalign.train import DivergenceError, TrainConfig, Trainer, evaluate


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gfalign' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
