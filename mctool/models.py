"""Model construction by name through timm's registry, plus mctool's CIFAR-style architectures.

Importing this module registers ``cifar_convfc``, ``cifar_vgg16``, ``cifar_vgg16_bn``,
``cifar_preresnet20``, ``cifar_preresnet110``, ``cifar_preresnet164``, ``cifar_wrn28_10`` and ``mlp``
into timm, so ``timm.create_model(name)`` builds them like any timm model.
Every mctool architecture accepts ``num_classes``, ``in_chans`` and ``img_size`` and handles inputs
from 8x8 to 32x32 (and larger) with 1 or 3 channels.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

import timm
import torch
from timm.models import register_model
from torch import nn

from .errors import ConfigError

#: Names registered by mctool (all others come from timm itself).
MCTOOL_ARCHS = (
    "cifar_convfc",
    "cifar_vgg16",
    "cifar_vgg16_bn",
    "cifar_preresnet20",
    "cifar_preresnet110",
    "cifar_preresnet164",
    "cifar_wrn28_10",
    "mlp",
)

# timm passes these to every entry function; mctool's models have no pretrained weights.
_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only")


def _pool_out(size: int) -> int:
    # MaxPool2d(3, stride 2, padding 1) halves the size, rounding up; never below 1.
    return (size + 2 - 3) // 2 + 1


class ConvFC(nn.Module):
    """The paper's 3 conv + 3 FC network (conv 32-64-128 of 5x5, FC 1000-1000), widths scaled by ``width``."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: float = 1.0, img_size: int = 32):
        super().__init__()
        c1, c2, c3, hidden = (max(1, round(c * width)) for c in (32, 64, 128, 1000))
        pool = lambda: nn.MaxPool2d(3, stride=2, padding=1)  # noqa: E731
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, c1, 5, padding=2), nn.ReLU(inplace=True), pool(),
            nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(inplace=True), pool(),
            nn.Conv2d(c2, c3, 5, padding=2), nn.ReLU(inplace=True), pool(),
            nn.AdaptiveAvgPool2d(3),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c3 * 9, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    """VGG16 for small images: 13 3x3 convs (each followed by BN when ``batch_norm``, then ReLU), 3 FC layers."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, batch_norm: bool = False, img_size: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_chans
        for v in _VGG16_CFG:
            if v == "M":
                # ceil_mode keeps a 1x1 map at 1x1, so 8x8 inputs survive all five pools.
                layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
                continue
            layers.append(nn.Conv2d(c, v, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            c = v
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(), nn.Linear(512, 512), nn.ReLU(inplace=True),
            nn.Dropout(), nn.Linear(512, 512), nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )
        self.num_classes = num_classes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _PreActBasic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return out + (x if self.downsample is None else self.downsample(x))


class _PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + (x if self.downsample is None else self.downsample(x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class PreResNet(nn.Module):
    """Pre-activation ResNet for small images: depth 6n+2 with basic blocks, or 9n+2 with bottlenecks."""

    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3, bottleneck: bool = False, img_size: int = 32):
        super().__init__()
        block = _PreActBottleneck if bottleneck else _PreActBasic
        per = 9 if bottleneck else 6
        if (depth - 2) % per:
            raise ConfigError(f"PreResNet depth must be {per}n+2, got {depth}.")
        n = (depth - 2) // per
        self.conv1 = nn.Conv2d(in_chans, 16, 3, padding=1, bias=False)
        cin, stages = 16, []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(block(cin, planes, stride if i == 0 else 1))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.num_classes = num_classes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.pool(self.relu(self.bn(x)))
        return self.fc(torch.flatten(x, 1))


class _WideBasic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, drop_rate: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=True)
        self.dropout = nn.Dropout(drop_rate)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=stride, padding=1, bias=True)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride=stride, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.conv1(self.relu(self.bn1(x))))
        out = self.conv2(self.relu(self.bn2(out)))
        return out + (x if self.shortcut is None else self.shortcut(x))


class WideResNet(nn.Module):
    """Wide ResNet (Zagoruyko & Komodakis) for small images: depth 6n+4, widening factor ``widen``."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, depth: int = 28, widen: int = 10,
                 drop_rate: float = 0.0, img_size: int = 32):
        super().__init__()
        if (depth - 4) % 6:
            raise ConfigError(f"Wide ResNet depth must be 6n+4, got {depth}.")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=True)
        cin, stages = widths[0], []
        for cout, stride in zip(widths[1:], (1, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_WideBasic(cin, cout, stride if i == 0 else 1, drop_rate))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.pool(self.relu(self.bn(x)))
        return self.fc(torch.flatten(x, 1))


class MLP(nn.Module):
    """Fully connected network for tiny inputs: ``depth`` hidden layers of ``hidden`` units (optionally with BN)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 8, hidden: int = 256,
                 depth: int = 2, batch_norm: bool = False):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        n_in = in_chans * img_size * img_size
        for _ in range(depth):
            layers.append(nn.Linear(n_in, hidden))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(nn.ReLU(inplace=True))
            n_in = hidden
        layers.append(nn.Linear(n_in, num_classes))
        self.net = nn.Sequential(*layers)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _create(cls, pretrained: bool, kwargs: dict[str, Any], **defaults: Any) -> nn.Module:
    if pretrained:
        raise ConfigError("mctool's CIFAR-style architectures have no pretrained weights.")
    for k in _TIMM_ONLY_KWARGS:
        kwargs.pop(k, None)
    return cls(**{**defaults, **kwargs})


@register_model
def cifar_convfc(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _create(ConvFC, pretrained, kwargs)


@register_model
def cifar_vgg16(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _create(VGG, pretrained, kwargs, batch_norm=False)


@register_model
def cifar_vgg16_bn(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _create(VGG, pretrained, kwargs, batch_norm=True)


@register_model
def cifar_preresnet20(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _create(PreResNet, pretrained, kwargs, depth=20)


@register_model
def cifar_preresnet110(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _create(PreResNet, pretrained, kwargs, depth=110)


@register_model
def cifar_preresnet164(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _create(PreResNet, pretrained, kwargs, depth=164, bottleneck=True)


@register_model
def cifar_wrn28_10(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _create(WideResNet, pretrained, kwargs, depth=28, widen=10)


@register_model
def mlp(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _create(MLP, pretrained, kwargs)


def build_model(arch: str, num_classes: int, in_chans: int, arch_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build ``arch`` (any timm name) with random weights; unknown names and bad kwargs raise ConfigError."""
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, list(MCTOOL_ARCHS) + timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"unknown architecture '{arch}'.{hint} mctool's own: {', '.join(MCTOOL_ARCHS)}; any name in timm.list_models() works too.")
    try:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                                 **(arch_kwargs or {}))
    except TypeError as e:
        raise ConfigError(f"architecture '{arch}' does not accept the arch kwargs {arch_kwargs}: {e}") from None


def arch_kwargs_for(arch: str, arch_kwargs: dict[str, Any] | None, img_size: int) -> dict[str, Any]:
    """The kwargs to record and rebuild with: mctool's archs also get the input ``img_size``."""
    kwargs = dict(arch_kwargs or {})
    if arch in MCTOOL_ARCHS:
        kwargs.setdefault("img_size", img_size)
    return kwargs


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
