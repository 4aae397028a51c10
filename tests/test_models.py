"""mctool.models: every registered architecture builds, runs forward and backward, and errors are helpful."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from mctool.errors import ConfigError
from mctool.bn import bn_modules
from mctool.models import MCTOOL_ARCHS, arch_kwargs_for, build_model


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny convs are dominated by thread start-up; with 2 threads on a busy 2-core machine the deep
    # ResNets run 10x slower (70 s instead of 5 s for this file), so use one thread here.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("size,in_chans", [(8, 1), (32, 3)])
@pytest.mark.parametrize("arch", MCTOOL_ARCHS)
def test_arch_forward_and_backward(arch, size, in_chans):
    torch.manual_seed(0)
    num_classes = 5
    model = build_model(arch, num_classes, in_chans, arch_kwargs_for(arch, {}, size))
    model.train()
    x = torch.randn(2, in_chans, size, size)
    out = model(x)
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 3])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{arch}: no gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"{arch}: non-finite gradient for {name}"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())
    # the first layer's weights, furthest from the loss, receive a nonzero gradient
    first = next(p for p in model.parameters() if p.dim() > 1)
    assert first.grad.abs().sum() > 0, f"{arch}: gradient does not reach the first layer"


def test_arch_kwargs_for_adds_img_size_only_to_mctool_archs():
    assert arch_kwargs_for("mlp", {"hidden": 4}, 8) == {"hidden": 4, "img_size": 8}
    assert arch_kwargs_for("mlp", {"img_size": 16}, 8) == {"img_size": 16}
    assert arch_kwargs_for("resnet18", None, 8) == {}


@pytest.mark.parametrize("arch", MCTOOL_ARCHS)
def test_registered_in_timm_and_built_without_it_as_timm_builds_them(arch):
    """`import mctool` registers them; mctool builds them without importing timm (seconds, in every command),
    the same network with the same weights for a seed as timm.create_model."""
    assert timm.is_model(arch)
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=3, in_chans=1, img_size=8)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    kwargs = {"img_size": 8, **({"width": 0.25} if arch == "cifar_convfc" else {}),
              **({"widen": 1} if arch == "cifar_wrn28_10" else {})}
    torch.manual_seed(5)
    theirs = timm.create_model(arch, num_classes=3, in_chans=1, **kwargs).state_dict()
    torch.manual_seed(5)
    ours = build_model(arch, 3, 1, kwargs).state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_vgg16_bn_layer_order():
    model = build_model("cifar_vgg16_bn", 10, 3)
    layers = list(model.features)
    convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13
    for i in convs:
        assert isinstance(layers[i + 1], nn.BatchNorm2d), f"conv at {i} not followed by BatchNorm2d"
        assert isinstance(layers[i + 2], nn.ReLU), f"BatchNorm2d at {i + 1} not followed by ReLU"
    assert bn_modules(model)


def test_vgg16_has_no_batchnorm():
    model = build_model("cifar_vgg16", 10, 3)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 13
    assert not bn_modules(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_convfc_width_scales_parameters():
    def count(width):
        model = build_model("cifar_convfc", 10, 3, {"width": width, "img_size": 32})
        return sum(p.numel() for p in model.parameters())

    assert count(2) > count(1) > count(0.5)


def test_mlp_kwargs_change_the_network():
    small = build_model("mlp", 10, 1, {"hidden": 4, "depth": 1, "img_size": 8})
    linears = [m for m in small.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 4), (4, 10)]
    assert bn_modules(build_model("mlp", 10, 1, {"batch_norm": True, "img_size": 8}))


def test_timm_model_builds():
    name = "test_resnet" if timm.is_model("test_resnet") else "resnet18"
    torch.manual_seed(0)
    model = build_model(name, 7, 1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_unknown_arch_suggests_close_name():
    with pytest.raises(ConfigError) as e:
        build_model("cifar_vgg61", 10, 3)
    assert "cifar_vgg16" in str(e.value)
    assert "unknown architecture 'cifar_vgg61'" in str(e.value)
    with pytest.raises(ConfigError) as e:  # mctool's own are also in timm's list: each named once
        build_model("mpl", 10, 3)
    assert "Did you mean 'mlp'?" in str(e.value)


def test_bad_kwarg_raises_config_error():
    with pytest.raises(ConfigError, match="nonsense"):
        build_model("mlp", 10, 1, {"nonsense": 1})


def test_pretrained_mctool_arch_is_refused():
    with pytest.raises(ConfigError, match="pretrained"):
        timm.create_model("mlp", pretrained=True)


def test_bn_modules():
    assert bn_modules(build_model("cifar_preresnet20", 10, 3))
    assert not bn_modules(build_model("mlp", 10, 1, {"img_size": 8}))
