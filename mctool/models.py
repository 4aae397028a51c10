"""Model construction by name through timm's registry, plus mctool's CIFAR-style architectures.

``register_in_timm()`` (which ``import mctool`` calls) registers ``cifar_convfc``, ``cifar_vgg16``,
``cifar_vgg16_bn``, ``cifar_preresnet20``, ``cifar_preresnet110``, ``cifar_preresnet164``, ``cifar_wrn28_10``
and ``mlp`` into timm, so ``timm.create_model(name)`` builds them like any timm model. mctool builds its own
architectures without timm (importing timm, with torchvision, takes seconds: the command does it only for
other names), exactly as ``timm.create_model`` does.
Every mctool architecture accepts ``num_classes``, ``in_chans`` and ``img_size`` and handles inputs
from 8x8 to 32x32 (and larger) with 1 or 3 channels.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .errors import ConfigError

# timm passes these to every entry function; mctool's models have no pretrained weights.
_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only")


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

    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3, bottleneck: bool = False,
                 img_size: int = 32):
        super().__init__()
        block = _PreActBottleneck if bottleneck else _PreActBasic
        per = 9 if bottleneck else 6
        if (depth - 2) % per:
            examples = "164, 272" if bottleneck else "20, 32, 56, 110"
            raise ConfigError(f"PreResNet depth (--arch-kwargs 'depth') must be {per}n+2 (e.g. {examples}), got "
                              f"{depth}.")
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
            raise ConfigError(f"Wide ResNet depth (--arch-kwargs 'depth') must be 6n+4 (e.g. 16, 28, 40), got "
                              f"{depth}.")
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


def cifar_convfc(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _create(ConvFC, pretrained, kwargs)


def cifar_vgg16(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _create(VGG, pretrained, kwargs, batch_norm=False)


def cifar_vgg16_bn(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _create(VGG, pretrained, kwargs, batch_norm=True)


def cifar_preresnet20(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _create(PreResNet, pretrained, kwargs, depth=20)


def cifar_preresnet110(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _create(PreResNet, pretrained, kwargs, depth=110)


def cifar_preresnet164(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _create(PreResNet, pretrained, kwargs, depth=164, bottleneck=True)


def cifar_wrn28_10(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _create(WideResNet, pretrained, kwargs, depth=28, widen=10)


def mlp(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return _create(MLP, pretrained, kwargs)


#: mctool's architectures by name: their timm entry functions.
_ENTRIES = {fn.__name__: fn for fn in (cifar_convfc, cifar_vgg16, cifar_vgg16_bn, cifar_preresnet20,
                                       cifar_preresnet110, cifar_preresnet164, cifar_wrn28_10, mlp)}
#: Names registered by mctool (all others come from timm itself).
MCTOOL_ARCHS = tuple(_ENTRIES)


def register_in_timm() -> Any:
    """Register mctool's architectures in timm's registry (once) and return the ``timm`` module: every use of
    timm goes through here, so that a timm model name finds mctool's too."""
    import timm
    from timm.models import register_model

    for name, fn in _ENTRIES.items():
        if not timm.is_model(name):
            register_model(fn)
    return timm


def _create_model(arch: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(arch, pretrained=False, **kwargs)``; mctool's own architectures without timm."""
    if arch in _ENTRIES:  # (timm drops the arguments given as None)
        return _ENTRIES[arch](pretrained=False, **{k: v for k, v in kwargs.items() if v is not None})
    return register_in_timm().create_model(arch, pretrained=False, **kwargs)


#: Largest network mctool builds (elements of all parameters and buffers: 16 GiB as float32).
MAX_ELEMENTS = 1 << 32
#: Bounds of the sizes every architecture gets.
MAX_CLASSES = 1_000_000
MAX_IN_CHANS = 1024
#: Largest int, longest string and most items in an arch kwarg value (any architecture).
_MAX_KWARG_INT = 1_000_000
_MAX_KWARG_STR = 200
_MAX_KWARG_ITEMS = 64

#: timm.create_model arguments that read files, download weights or change what is built; never accepted
#: in arch kwargs (from a checkpoint or from --arch-kwargs).
REFUSED_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict",
                  "pretrained_filter_fn", "checkpoint_path", "cache_dir", "features_only", "feature_cfg",
                  "feature_cls", "out_indices", "kwargs_filter", "scriptable", "exportable", "no_jit",
                  "num_classes", "in_chans", "device", "dtype")
# ...and any name containing one of these (a file, a URL or a hub reference by another name).
_REFUSED_PARTS = ("pretrained", "checkpoint", "cache", "file", "url", "hub", "download")

# Types and ranges of the arguments of mctool's own architectures: (kind, low, high), both inclusive.
_MCTOOL_KWARGS: dict[str, tuple[str, float, float]] = {
    "img_size": ("int", 1, 4096),
    "width": ("float", 1 / 64, 64),
    "hidden": ("int", 1, 65536),
    "depth": ("int", 0, 1000),
    "widen": ("int", 1, 64),
    "drop_rate": ("float", 0.0, 1.0),
    "batch_norm": ("bool", 0, 1),
    "bottleneck": ("bool", 0, 1),
}
_MCTOOL_CLASSES = {"cifar_convfc": ConvFC, "cifar_vgg16": VGG, "cifar_vgg16_bn": VGG, "cifar_preresnet20": PreResNet,
                   "cifar_preresnet110": PreResNet, "cifar_preresnet164": PreResNet, "cifar_wrn28_10": WideResNet,
                   "mlp": MLP}


def _check_value(arch: str, key: str, value: Any, depth: int = 0) -> None:
    """A JSON value any timm architecture may take: small numbers, short strings, short lists and dicts."""
    bad = None
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int):
        if abs(value) > _MAX_KWARG_INT:
            bad = f"{value} is larger than {_MAX_KWARG_INT:,}"
    elif isinstance(value, float):
        if not math.isfinite(value) or abs(value) > _MAX_KWARG_INT:
            bad = f"{value} is not a finite number of at most {_MAX_KWARG_INT:,}"
    elif isinstance(value, str):
        if len(value) > _MAX_KWARG_STR or not value.isprintable():
            bad = f"strings must be printable and at most {_MAX_KWARG_STR} characters"
    elif isinstance(value, (list, dict)) and depth < 2:
        if len(value) > _MAX_KWARG_ITEMS:
            bad = f"at most {_MAX_KWARG_ITEMS} items"
        else:
            for v in (value.values() if isinstance(value, dict) else value):
                _check_value(arch, key, v, depth + 1)
    else:
        bad = f"a {type(value).__name__} nested this deep is not allowed"
    if bad:
        raise ConfigError(f"arch kwarg '{key}' of '{arch}': {bad}.")


def check_arch_kwargs(arch: str, arch_kwargs: Any) -> dict[str, Any]:
    """Refuse arch kwargs that would make timm read files or download, and values of the wrong type or size.

    mctool's own architectures accept only their documented arguments, each within its range.
    """
    if not isinstance(arch_kwargs, dict):
        raise ConfigError(f"arch kwargs of '{arch}' must be a JSON object, got {type(arch_kwargs).__name__}.")
    for key, value in arch_kwargs.items():
        lowered = str(key).lower()
        if key in REFUSED_KWARGS or any(part in lowered for part in _REFUSED_PARTS):
            raise ConfigError(f"arch kwarg '{key}' is not allowed: mctool builds networks with random weights and "
                              "never lets timm read or download files, or change the classes or input channels "
                              "(see 'What mctool checks when reading a file' in docs/file-formats.md).")
        if not str(key).isidentifier():
            raise ConfigError(f"arch kwarg {key!r} of '{arch}' is not a valid argument name.")
        _check_value(arch, key, value)
    cls = _MCTOOL_CLASSES.get(arch)
    if cls is not None:
        accepted = [k for k in inspect.signature(cls.__init__).parameters if k in _MCTOOL_KWARGS]
        for key, value in arch_kwargs.items():
            if key not in accepted:
                raise ConfigError(f"architecture '{arch}' does not accept the arch kwarg '{key}'; it takes "
                                  f"{', '.join(accepted)}.")
            kind, lo, hi = _MCTOOL_KWARGS[key]
            ok = {"int": isinstance(value, int) and not isinstance(value, bool),
                  "float": isinstance(value, (int, float)) and not isinstance(value, bool),
                  "bool": isinstance(value, bool)}[kind] and lo <= value <= hi
            if not ok:
                what = "true or false" if kind == "bool" else f"{'an integer' if kind == 'int' else 'a number'} " \
                                                                f"from {lo:g} to {hi:g}"
                raise ConfigError(f"arch kwarg '{key}' of '{arch}' must be {what}, got {value!r}.")
    return arch_kwargs


def _check_sizes(arch: str, num_classes: Any, in_chans: Any) -> None:
    for name, value, hi in (("num_classes", num_classes, MAX_CLASSES), ("in_chans", in_chans, MAX_IN_CHANS)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
            raise ConfigError(f"{name} of '{arch}' must be an integer from 1 to {hi:,}, got {value!r}.")


def _create_checked(arch: str, num_classes: int, in_chans: int, arch_kwargs: dict[str, Any]) -> nn.Module:
    try:
        return _create_model(arch, num_classes=num_classes, in_chans=in_chans, **arch_kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError, RuntimeError, ArithmeticError, AssertionError, IndexError, KeyError,
            AttributeError, NotImplementedError) as e:
        raise ConfigError(f"architecture '{arch}' cannot be built with num_classes={num_classes}, "
                          f"in_chans={in_chans} and arch kwargs {json.dumps(arch_kwargs)}: "
                          f"{type(e).__name__}: {e}") from None


def model_shapes(arch: str, num_classes: int, in_chans: int,
                 arch_kwargs: dict[str, Any] | None = None) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the state dict ``build_model`` would make, without allocating it.

    The network is built on PyTorch's ``meta`` device (shapes, no storage); an architecture that cannot be
    built there is built on the CPU, which is safe because its arguments are already bounded. Refuses
    networks with more than ``MAX_ELEMENTS`` elements.
    """
    arch_kwargs = dict(arch_kwargs or {})
    _check_arch_name(arch)
    _check_sizes(arch, num_classes, in_chans)
    check_arch_kwargs(arch, arch_kwargs)
    try:
        with torch.device("meta"):
            model = _create_model(arch, num_classes=num_classes, in_chans=in_chans, **arch_kwargs)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - not buildable on 'meta': the checked CPU build gives the real error
        model = _create_checked(arch, num_classes, in_chans, arch_kwargs)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    elements = sum(math.prod(s) for s in shapes.values())
    if elements > MAX_ELEMENTS:
        raise ConfigError(f"architecture '{arch}' with num_classes={num_classes}, in_chans={in_chans} and arch "
                          f"kwargs {json.dumps(arch_kwargs)} has {elements:,} parameters and buffers; mctool builds "
                          f"at most {MAX_ELEMENTS:,}.")
    return shapes


def _check_arch_name(arch: Any) -> None:
    if not isinstance(arch, str) or not arch or len(arch) > _MAX_KWARG_STR or not arch.isprintable():
        raise ConfigError(f"architecture name {arch!r} is not a timm model name.")
    if ":" in arch or "/" in arch:  # timm reads configs and weights for 'hf-hub:...' and 'local-dir:...' names
        raise ConfigError(f"architecture '{arch}' names a hub or folder; mctool builds timm models by their "
                          "registry name only (e.g. 'resnet18'), with random weights.")
    if arch in _ENTRIES:
        return
    timm = register_in_timm()
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, list(dict.fromkeys([*MCTOOL_ARCHS, *timm.list_models()])), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"unknown architecture '{arch}'.{hint} mctool's own: {', '.join(MCTOOL_ARCHS)}; "
                          "any name in timm.list_models() works too.")


def build_model(arch: str, num_classes: int, in_chans: int, arch_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build ``arch`` (any timm name) with random weights; unknown names and bad kwargs raise ConfigError.

    Arguments are checked (``check_arch_kwargs``) and the network's size is measured on the ``meta`` device
    (``model_shapes``) before any memory is allocated for it.
    """
    arch_kwargs = dict(arch_kwargs or {})
    model_shapes(arch, num_classes, in_chans, arch_kwargs)
    return _create_checked(arch, num_classes, in_chans, arch_kwargs)


def arch_kwargs_for(arch: str, arch_kwargs: dict[str, Any] | None, img_size: int) -> dict[str, Any]:
    """The kwargs to record and rebuild with: mctool's archs also get the input ``img_size``."""
    kwargs = dict(arch_kwargs or {})
    if arch in MCTOOL_ARCHS:
        kwargs.setdefault("img_size", img_size)
    return kwargs


def blank_images(model: nn.Module, n: int, in_chans: int, image_size: int) -> torch.Tensor:
    """``n`` zero images of ``in_chans`` x ``image_size`` x ``image_size`` as ``model`` takes its input: on its
    device, in its dtype, channels-last where its 4-D weights are."""
    param = next(model.parameters(), None)
    x = torch.zeros(n, in_chans, image_size, image_size, device=param.device if param is not None else None,
                    dtype=param.dtype if param is not None and param.is_floating_point() else None)
    if param is not None and param.dim() == 4 and param.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@contextlib.contextmanager
def modes_kept(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` as the block leaves it, then every module's own mode (train or eval) as it was before, also
    after an error or a Ctrl-C: ``model.train(was_training)`` would also switch the layers a caller keeps in
    the other mode (BatchNorm frozen in eval mode while the rest fine-tunes)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block; every module's own mode restored afterwards (``modes_kept``)."""
    with modes_kept(model):
        yield model.eval()


def probe_forward(model: nn.Module, x: torch.Tensor) -> Any:
    """``model(x)`` in eval mode without gradients, for a check before any work; the model's modes are kept."""
    with evaluating(model), torch.no_grad():
        return model(x)


def check_takes_images(model: nn.Module, arch: str, num_classes: int, in_chans: int, image_size: int,
                       dataset: str) -> None:
    """Refuse, before any work, a network that cannot take the data set's images: run it (eval mode, no
    gradients) on two blank images of ``in_chans`` x ``image_size`` x ``image_size`` on its own device, and
    check it gives ``num_classes`` logits each. A timm model of a fixed input size, or an ``img_size`` in
    --arch-kwargs other than the data's, otherwise fails in the first training step with torch's traceback."""
    try:
        out = probe_forward(model, blank_images(model, 2, in_chans, image_size))
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, AssertionError, IndexError, TypeError) as e:
        why = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConfigError(f"architecture '{arch}' failed on the {in_chans}x{image_size}x{image_size} images of "
                          f"data set '{dataset}' ({type(e).__name__}: {why}); check its --arch-kwargs, pick another "
                          f"--arch, or give its input size in --arch-kwargs (e.g. '{{\"img_size\": {image_size}}}' "
                          "where it takes one).") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"architecture '{arch}' gives outputs of shape {shape} for 2 images of data set "
                          f"'{dataset}', not (2, {num_classes}) class logits; pick a classifier for --arch.")


def pretrained_cfg(arch: str, *, need_weights: bool = True) -> dict[str, Any]:
    """timm's pretrained config of ``arch`` (its default tag, or the one named as in 'resnet18.a1_in1k').

    Refuses mctool's own architectures (they have no pretrained weights) and, with ``need_weights``, timm
    models for which timm knows no weights to download.
    """
    _check_arch_name(arch)
    if arch.split(".", 1)[0] in MCTOOL_ARCHS:
        raise ConfigError(f"architecture '{arch}' is one of mctool's own CIFAR-style networks, which have no "
                          "pretrained weights; pick a timm model with --arch (e.g. resnet18) for --pretrained.")
    cfg = register_in_timm().models.get_pretrained_cfg(arch)
    if need_weights and (cfg is None or not (cfg.hf_hub_id or cfg.url)):
        raise ConfigError(f"timm has no pretrained weights for '{arch}' (timm.list_pretrained() lists the models "
                          "that have them); pass --pretrained-file PATH.safetensors to use your own.")
    return cfg.to_dict() if cfg is not None else {}


def pretrained_data_config(arch: str, *, need_weights: bool = True) -> dict[str, Any]:
    """The input a pretrained ``arch`` expects, JSON-safe: timm's ``resolve_data_config`` (``input_size``,
    ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, pretrained_cfg=pretrained_cfg(arch, need_weights=need_weights))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def _head_keys(cfg: dict[str, Any]) -> set[str]:
    heads = cfg.get("classifier") or ()
    return {f"{h}.{p}" for h in ((heads,) if isinstance(heads, str) else heads) for p in ("weight", "bias")}


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """Without huggingface_hub's warnings while timm downloads: offline, each of its retries printed a line (22
    before the one ``Error:`` line that says what to do); a failed download is that error."""
    hub = logging.getLogger("huggingface_hub")
    level = hub.level
    hub.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub.setLevel(level)


def build_pretrained(arch: str, num_classes: int, in_chans: int, arch_kwargs: dict[str, Any] | None = None, *,
                     file: str | os.PathLike | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build ``arch`` from pretrained weights: timm's own (timm downloads and caches them) or, with ``file``,
    a local safetensors file of the timm model's state dict (never unpickled).

    As timm does, a classifier with another number of classes is re-initialised (with a warning) and a
    first convolution for another number of input channels is adapted (``adapt_input_conv``). Anything else
    in ``file`` that is missing, extra or of another shape is refused. Returns the network and a JSON-safe
    description of where its weights came from (recorded in the checkpoint's config as ``pretrained_source``).
    """
    arch_kwargs = dict(arch_kwargs or {})
    cfg = pretrained_cfg(arch, need_weights=file is None)
    model_shapes(arch, num_classes, in_chans, arch_kwargs)  # checks everything and bounds the size first
    if file is None:
        timm = register_in_timm()
        source = {"timm": timm.__version__, **{k: cfg[k] for k in ("architecture", "tag", "hf_hub_id", "url")
                                               if cfg.get(k)}}
        try:
            with _quiet_hub():
                model = timm.create_model(arch, pretrained=True, num_classes=num_classes, in_chans=in_chans,
                                          **arch_kwargs)
        except ConfigError:
            raise
        except (OSError, ImportError) as e:  # no network, no cache, a failed download
            raise ConfigError(f"could not get timm's pretrained weights for '{arch}' ({type(e).__name__}: "
                              f"{str(e)[:300]}). Offline, save them where there is internet (e.g. "
                              f"safetensors.torch.save_file(timm.create_model('{arch}', pretrained=True)"
                              ".state_dict(), 'w.safetensors')) and pass --pretrained-file w.safetensors.") from None
        except (RuntimeError, ValueError) as e:  # e.g. arch kwargs that change the shapes of the weights
            raise ConfigError(f"timm could not load its pretrained weights into '{arch}' with num_classes="
                              f"{num_classes}, in_chans={in_chans} and arch kwargs {json.dumps(arch_kwargs)}: "
                              f"{type(e).__name__}: {str(e)[:300]}") from None
        heads = _head_keys(cfg) & set(model.state_dict())
        dropped = sorted(heads) if num_classes != cfg.get("num_classes", num_classes) else []
        absent = False
    else:
        model, dropped, source, absent = _load_pretrained_file(arch, num_classes, in_chans, arch_kwargs, Path(file),
                                                               cfg)
    if dropped:
        from .console import warn

        warn(f"--pretrained-file '{file}' holds no classifier ({', '.join(dropped)}); it starts from a random "
             f"initialisation for {num_classes} classes." if absent else
             f"the pretrained classifier of '{arch}' ({', '.join(dropped)}) does not fit {num_classes} classes; "
             "it starts from a random initialisation.")
    source["reinitialized"] = dropped
    source["data_config"] = pretrained_data_config(arch, need_weights=False)
    return model, source


def _adapt_input_conv(timm_adapt: Any, in_chans: int, weight: torch.Tensor) -> torch.Tensor:
    """timm's ``adapt_input_conv`` for a first convolution pretrained on ``weight.shape[1]`` channels. Its
    ``base_chans`` (any channel count, not only RGB) came in timm 1.0.31; with an older timm the same rule:
    one channel sums the file's, more repeat them, scaled by ``base / in_chans``."""
    base = weight.shape[1]
    if "base_chans" in inspect.signature(timm_adapt).parameters:
        return timm_adapt(in_chans, weight, base_chans=base)
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    return weight.repeat(1, math.ceil(in_chans / base), 1, 1)[:, :in_chans] * (base / in_chans)


def _load_pretrained_file(arch: str, num_classes: int, in_chans: int, arch_kwargs: dict[str, Any], file: Path,
                          cfg: dict[str, Any]) -> tuple[nn.Module, list[str], dict[str, Any], bool]:
    from timm.models import adapt_input_conv

    from .checkpoint import _describe_mismatch, read_checkpoint, read_header
    from .errors import CheckpointError
    from .fileio import sha256_file

    if not file.is_file():
        raise ConfigError(f"--pretrained-file '{file}' does not exist (it must be a safetensors file of the timm "
                          "model's state dict).")
    header, md = read_header(file)  # refuses pickles and malformed files before any tensor data is read
    if md.get("arch") not in (None, arch):
        raise CheckpointError(f"--pretrained-file '{file}' holds a '{md['arch']}', not a '{arch}'; pass --arch "
                              f"{md['arch']}, or a file with the state dict of {arch}.")
    got = {k: v.shape for k, v in header.items()}
    expected = model_shapes(arch, num_classes, in_chans, arch_kwargs)
    # The classifier is re-initialised when it does not fit (or is absent: a model saved without its head).
    dropped = sorted(k for k in _head_keys(cfg) if k in expected and got.get(k) != expected[k])
    adapt = []  # first convolutions for another number of input channels: adapted as timm does
    first = cfg.get("first_conv") or ()
    for k in (f"{c}.weight" for c in ((first,) if isinstance(first, str) else first)):
        g, e = got.get(k), expected.get(k)
        if g and e and len(g) == len(e) == 4 and g[1] != e[1] and (g[0], *g[2:]) == (e[0], *e[2:]):
            adapt.append(k)
    # Checked by name and shape: everything else; BN batch counters may be absent (they are not weights).
    skip = {*dropped, *adapt, *(k for k in expected if k.endswith("num_batches_tracked") and k not in got)}
    problem = _describe_mismatch({k: v for k, v in expected.items() if k not in skip},
                                 {k: v for k, v in got.items() if k not in skip})
    if problem:
        raise CheckpointError(f"--pretrained-file '{file}' does not fit '{arch}' (num_classes={num_classes}, "
                              f"in_chans={in_chans}): {problem}. It must hold the state dict of "
                              f"timm.create_model('{arch}').")
    tensors, _ = read_checkpoint(file)
    for k in adapt:
        tensors[k] = _adapt_input_conv(adapt_input_conv, in_chans, tensors[k].float())
    model = _create_checked(arch, num_classes, in_chans, arch_kwargs)
    model.load_state_dict({k: v for k, v in tensors.items() if k not in dropped}, strict=False)  # names checked above
    absent = bool(dropped) and all(k not in got for k in dropped)  # a model saved without its head
    return model, dropped, {"file": str(file), "sha256": sha256_file(file), "adapted_input_conv": adapt}, absent


_DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def recorded_data_config(config: Any) -> dict[str, Any] | None:
    """The pretrained model's input that ``train --pretrained`` recorded in a checkpoint's ``config``
    (``pretrained_source.data_config``), or None. Checked, because a file is untrusted input: pass it on to
    ``load_data(data_config=...)`` so that ``imagefolder:PATH`` data gets the transforms the network was
    trained with."""
    source = config.get("pretrained_source") if isinstance(config, dict) else None
    dc = source.get("data_config") if isinstance(source, dict) else None
    if dc is None:
        return None

    def number(x: Any, lo: float, hi: float) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and lo <= x <= hi

    size = dc.get("input_size") if isinstance(dc, dict) else None
    ok = (isinstance(dc, dict) and set(dc) <= set(_DATA_CONFIG_KEYS) and {"input_size", "mean", "std"} <= set(dc)
          and isinstance(size, list) and len(size) == 3 and all(isinstance(s, int) for s in size)
          and 1 <= size[0] <= MAX_IN_CHANS and all(1 <= s <= 4096 for s in size[1:])
          and all(isinstance(dc[k], list) and len(dc[k]) == size[0] for k in ("mean", "std"))
          and all(number(m, -1e3, 1e3) for m in dc["mean"]) and all(number(s, 1e-6, 1e3) for s in dc["std"])
          and dc.get("interpolation", "bilinear") in ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
          and number(dc.get("crop_pct", 1.0), 0.01, 4.0)
          and dc.get("crop_mode", "center") in ("center", "squash", "border"))
    if not ok:
        raise ConfigError(f"the recorded pretrained_source.data_config is not what train --pretrained writes "
                          f"(input_size [C, H, W], mean and std of C numbers, interpolation, crop_pct, crop_mode): "
                          f"{json.dumps(dc)[:200]}. The file was changed since; re-create it.")
    return dict(dc)
