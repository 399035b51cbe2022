"""Small block models the tests share: a user module that is not affine, and a model holding it."""

from __future__ import annotations

import torch
from torch import nn

from gfalign.models import from_modules

DTYPE = torch.float64
CLASSES = 5


class Gated(nn.Module):
    """A user module that is not affine and has no ``weight``: ``tanh(x A^T) * (x C^T) + b``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(7)
        self.a = nn.Parameter(torch.randn(n_out, n_in, generator=generator, dtype=DTYPE) / 4)
        self.c = nn.Parameter(torch.randn(n_out, n_in, generator=generator, dtype=DTYPE) / 4)
        self.b = nn.Parameter(torch.randn(n_out, generator=generator, dtype=DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.a.t()) * (x @ self.c.t()) + self.b


def user_net():
    """Conv (tanh, max-pool, flatten), Gated (tanh), Linear (sigmoid), Linear; on (1, 10, 10)."""
    torch.manual_seed(0)
    modules = [
        nn.Conv2d(1, 2, 3, dtype=DTYPE),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        Gated(2 * 4 * 4, 7),
        nn.Tanh(),
        nn.Linear(7, 6, dtype=DTYPE),
        nn.Sigmoid(),
        nn.Linear(6, CLASSES, dtype=DTYPE),
    ]
    return from_modules(modules, input_shape=(1, 10, 10))
