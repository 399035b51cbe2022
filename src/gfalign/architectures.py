"""Built-in model graphs, as plain ``nn.Module`` s that ``gfalign.graph.convert`` reads.

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
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

__all__ = ["BasicBlock", "CifarResNet", "resnet"]


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
