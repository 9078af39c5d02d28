"""Builds a torch module from an ArchSpec. Knows nothing of Optuna or training."""

from __future__ import annotations

from torch import nn

from nas.spec import ArchSpec, validate


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, padding: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


def build_model(spec: ArchSpec) -> nn.Sequential:
    validate(spec)
    layers: list[nn.Module] = []
    prev_channels = spec.in_channels
    for index, block in enumerate(spec.blocks):
        if index > 0:
            layers.append(nn.MaxPool2d(2))
        for width in block.widths:
            layers += conv_bn_relu(prev_channels, width, 3, block.padding)
            if spec.dropout > 0:
                layers.append(nn.Dropout2d(spec.dropout))
            prev_channels = width
    for width in spec.tail:
        layers += conv_bn_relu(prev_channels, width, 1, 0)
        prev_channels = width
    layers += [
        nn.AdaptiveAvgPool2d(1),
        nn.Conv2d(prev_channels, spec.num_classes, 1, bias=False),
        nn.Flatten(),
    ]
    return nn.Sequential(*layers)
