"""gfalign: biologically plausible credit assignment in PyTorch.

Backpropagation, feedback alignment, direct feedback alignment, layer-wise auxiliary errors and
the general feedback alignment rule, all as configurations of one exact rule engine.
"""

from gfalign.engine import FeedbackRule, Step
from gfalign.feedback import FAMILIES, FeedbackSpec
from gfalign.graph import convert
from gfalign.network import MLP, Network, mlp
from gfalign.rules import PRESETS, ConfigError, LayerRule, RuleConfig, Term, preset, resolve
from gfalign.train import DivergenceError, TrainConfig, Trainer, evaluate

__version__ = "0.1.0"

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
