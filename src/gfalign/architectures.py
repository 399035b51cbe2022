"""Built-in model graphs, as plain ``nn.Module`` s that ``gfalign.graph.convert`` reads: He et
al.'s CIFAR ResNets and a small pre-norm transformer.

``resnet(depth)`` is He et al.'s CIFAR-10 ResNet (arXiv:1512.03385, section 4.2), as biotorch
builds its ResNet-20 and ResNet-56 (``biotorch/models/small_resnet.py``): a 3x3 convolution of
16 channels, three stages of ``(depth - 2) / 6`` basic blocks of 16, 32 and 64 channels (the
first block of the second and third stride 2), global average pooling and a Linear layer to
the classes. A basic block is conv-BN-relu-conv-BN, plus the shortcut, then relu; where the
shape changes the shortcut is option A, parameter-free: every second pixel, zero channels
padded on both sides. Convolutions have no bias (BatchNorm's shift takes its place).

    >>> model = resnet(20)
    >>> sum(p.numel() for p in model.parameters())  # 0.27M, as the paper's table says
    269722

``transformer()`` is a pre-norm transformer classifier of characters (2 layers of width 128, 4
heads by default): an embedding of each character and its position, layers of
``x + attention(norm(x))`` then ``x + mlp(norm(x))`` (a GELU MLP of 4 x width), and a Linear
head on the normalised last position, predicting the next character. Each ``Layer`` is one
block of the graph (it is a leaf of the trace, ``TRANSFORMER_LEAVES``), so ``dfa`` gives one
direct term per transformer layer, where Launay et al. (arXiv:2006.12878) place it.

    >>> model = transformer(vocabulary=28, context=32)
    >>> model(torch.zeros(2, 32)).shape
    torch.Size([2, 28])
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

__all__ = [
    "TRANSFORMER_LEAVES",
    "BasicBlock",
    "CifarResNet",
    "Embedding",
    "Layer",
    "Transformer",
    "resnet",
    "transformer",
]


class _Subsample(nn.Module):
    """Option A's shortcut: ``x[:, :, ::2, ::2]`` with ``planes // 4`` zero channels on either
    side, so 16 channels become 32 and 32 become 64 at half the resolution."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """conv3x3-BN-relu-conv3x3-BN, plus the shortcut, then relu."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        reshaped = stride != 1 or inplanes != planes
        self.shortcut = _Subsample(planes) if reshaped else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR-10 ResNet of ``blocks`` basic blocks per stage (3: ResNet-20, 9: ResNet-56)."""

    def __init__(self, blocks: int, classes: int = 10, channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, inplanes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            stage = []
            for number in range(blocks):
                stage.append(BasicBlock(inplanes, planes, stride if number == 0 else 1))
                inplanes = planes
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = functional.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def resnet(depth: int, classes: int = 10, channels: int = 3) -> CifarResNet:
    """He et al.'s CIFAR ResNet of ``depth`` = 6n + 2 layers (20, 32, 44, 56, 110)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"a CIFAR ResNet's depth is 6n + 2 (20, 32, 44, 56, 110), got {depth}")
    return CifarResNet((depth - 2) // 6, classes, channels)


class Embedding(nn.Module):
    """Each position's character embedding plus its position's: ``E[x_t] + P_t``, for inputs
    that hold character indices (as floats, like every dataset's inputs)."""

    def __init__(self, vocabulary: int, context: int, width: int) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(vocabulary, width) * 0.02)
        self.positions = nn.Parameter(torch.randn(context, width) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens[x.long()] + self.positions  # (N, T, width)


class Layer(nn.Module):
    """A pre-norm transformer layer: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"a width of {width} does not split into {heads} heads")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.project = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.expand = nn.Linear(width, hidden)
        self.contract = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, width = x.shape[0], x.shape[1], x.shape[2]
        qkv = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, T, width / heads)
        scores = q @ k.transpose(-2, -1) / (width // self.heads) ** 0.5
        attended = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(n, t, width)
        x = x + self.project(attended)
        return x + self.contract(functional.gelu(self.expand(self.norm2(x))))


class Transformer(nn.Module):
    """Embedding, ``layers`` pre-norm layers, and a Linear head on the normalised last
    position."""

    def __init__(
        self, vocabulary: int, context: int, width: int, layers: int, heads: int, hidden: int
    ) -> None:
        super().__init__()
        self.embed = Embedding(vocabulary, context, width)
        self.layers = nn.Sequential(*(Layer(width, heads, hidden) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocabulary)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(self.embed(x))
        return self.head(self.norm(h[:, -1]))


TRANSFORMER_LEAVES = (Layer,)
"""The module types ``convert`` keeps as one block each in a ``Transformer``."""


def transformer(
    vocabulary: int = 28,
    context: int = 32,
    *,
    width: int = 128,
    layers: int = 2,
    heads: int = 4,
    hidden: int | None = None,
) -> Transformer:
    """A pre-norm transformer over ``context`` characters of a ``vocabulary``, predicting the
    next one (the module docstring); ``hidden`` defaults to 4 x ``width``."""
    return Transformer(vocabulary, context, width, layers, heads, hidden or 4 * width)
