"""``mctool align``: permutation groups found from the graph, exact recovery of a permuted copy, function
preservation, activation matching, and the documented errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import h5py
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mctool import ConfigError, align, load_model
from mctool.align import activation_matching, discover_groups, permute_state, weight_matching
from mctool.checkpoint import ModelMeta, save_model
from mctool.h5io import read_h5
from mctool.models import build_model

CPU = ["--device", "cpu"]
SYNTH = "synthetic:size=8,channels=3,classes=10,train=64,test=32"
SYNTH32 = "synthetic:size=32,channels=3,classes=10,train=64,test=32"  # ConvNeXt's stem and 3 downsamplings: 32 -> 1
# (arch, arch kwargs, data set); small widths and 8x8 images keep every case to a second or so
FAMILIES = {
    "mlp": ("mlp", {"hidden": 32}, "digits"),
    "convfc": ("cifar_convfc", {"img_size": 8, "width": 0.25}, SYNTH),
    "vgg_bn": ("cifar_vgg16_bn", {"img_size": 8}, SYNTH),
    "preresnet": ("cifar_preresnet20", {"img_size": 8}, SYNTH),
    "wrn": ("cifar_wrn28_10", {"img_size": 8, "widen": 1}, SYNTH),
    "timm_resnet": ("test_resnet", {}, SYNTH),
    # concatenation: each layer of a dense block reads the concatenation of all earlier outputs
    "timm_densenet": ("densenet121", {"growth_rate": 8, "block_config": [2, 3]}, SYNTH),
    # depthwise convolutions, permutes to channels-last, LayerNorm and LayerNorm2d, layer scale (1-D gamma)
    "timm_convnext": ("test_convnext", {}, SYNTH32),
}


def _network(family: str, seed: int) -> tuple[nn.Module, ModelMeta]:
    """A network initialised from ``seed``, its BN layers given random weights and running statistics (so that a
    forgotten BN tensor changes the function)."""
    arch, kwargs, dataset = FAMILIES[family]
    in_chans = 1 if dataset == "digits" else 3
    torch.manual_seed(seed)
    model = build_model(arch, 10, in_chans, kwargs)
    for m in model.modules():
        if isinstance(getattr(m, "gamma", None), nn.Parameter):  # layer scale: 1e-6 at initialisation
            with torch.no_grad():
                m.gamma.normal_()
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval(), ModelMeta(arch=arch, num_classes=10, in_chans=in_chans, arch_kwargs=kwargs, dataset=dataset)


def _save(family: str, seed: int, path: Path) -> Path:
    model, meta = _network(family, seed)
    save_model(path, model, meta)
    return path


def _example(family: str) -> torch.Tensor:
    dataset = FAMILIES[family][2]
    in_chans, size = (1, 8) if dataset == "digits" else (3, 32 if dataset == SYNTH32 else 8)
    return torch.randn(16, in_chans, size, size, generator=torch.Generator().manual_seed(1))


def _random_perms(groups, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(grp.size, generator=g) for grp in groups]


def _logits_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def _permuted_copy(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, list]:
    """A copy of ``model`` with random permutations applied to every group, checked independently: it computes
    the same logits as ``model``, with different tensors."""
    groups = discover_groups(model, x[:2])
    perms = _random_perms(groups)
    assert all(len(p) > 1 for p in perms) and any((p != torch.arange(len(p))).any() for p in perms)
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(permute_state(model.state_dict(), groups, perms))
    with torch.no_grad():
        _logits_close(permuted(x), model(x))
    assert any(not torch.equal(permuted.state_dict()[k], v) for k, v in model.state_dict().items())
    return permuted, groups


@pytest.mark.parametrize("family", ["mlp", "preresnet", "timm_densenet", "timm_convnext"])
def test_weight_matching_recovers_a_permuted_copy_exactly(family, tmp_path):
    model, meta = _network(family, 0)
    permuted, groups = _permuted_copy(model, _example(family))
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_model(a, model, meta)
    save_model(b, permuted, meta)
    r = align(a, b, tmp_path / "out.safetensors", device="cpu", quiet=True)
    aligned = load_model(tmp_path / "out.safetensors").model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(aligned[k], v), k  # a permutation of the same numbers: exact
    assert r.distance_after == 0 and r.distance_before > 0 and r.moved > 0.5 and r.groups == len(groups)


def test_weight_matching_recovers_a_permuted_vgg_exactly():
    """A VGG-style network with BatchNorm (cifar_vgg16_bn's layers, narrow: 512-wide layers take seconds per sweep
    on a CPU), flattening a 2x2 map into its classifier."""
    torch.manual_seed(0)
    layers, c = [], 3
    for width in (8, 8, "M", 16, 16, "M"):
        if width == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        c = width
    model = nn.Sequential(*layers, nn.Flatten(), nn.Dropout(), nn.Linear(16 * 2 * 2, 24), nn.ReLU(), nn.Linear(24, 10))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    model.eval()
    permuted, groups = _permuted_copy(model, _example("vgg_bn"))
    assert [g.size for g in groups] == [8, 8, 16, 16, 24]
    params = {n: p.detach() for n, p in model.named_parameters()}
    perms, objective = weight_matching(params, permuted.state_dict(), groups)
    aligned = permute_state(permuted.state_dict(), groups, perms)
    for k, v in model.state_dict().items():
        assert torch.equal(aligned[k], v), k
    assert objective[-1] == pytest.approx(sum(float((p * p).sum()) for p in params.values()), rel=1e-5)


def test_groups_of_a_residual_network():
    model, _ = _network("preresnet", 0)
    groups = discover_groups(model, _example("preresnet")[:2])
    streams = [g for g in groups if len(g.producers) > 1]
    # three residual streams (one per stage), each shared by its stage's convolutions and shortcut
    assert [g.size for g in streams] == [16, 32, 64]
    assert "layer2.0.downsample.weight" in {m.name for m in streams[1].members}
    assert {"bn.running_mean", "fc.weight"} <= {m.name for m in streams[2].members}
    assert all(m.axis == 1 for m in streams[2].members if m.name == "fc.weight")
    # the input channels (conv1's dim 1) and the classes (fc's dim 0, fc.bias) are never permuted
    every = {(m.name, m.axis) for g in groups for m in g.members}
    assert ("conv1.weight", 1) not in every and ("fc.weight", 0) not in every and ("fc.bias", 0) not in every


def test_flatten_into_linear_permutes_blocks():
    model, _ = _network("convfc", 0)
    groups = discover_groups(model, _example("convfc")[:2])
    last_conv = next(g for g in groups if g.name == "features.6")
    # a [C, 3, 3] map flattened into classifier.1: each channel is a block of 9 input columns
    assert next(m for m in last_conv.members if m.name == "classifier.1.weight") == \
        type(last_conv.members[0])("classifier.1.weight", 1, 9)


@pytest.mark.parametrize("family", ["preresnet", "timm_densenet", "timm_convnext"])
def test_activation_matching_recovers_a_permuted_copy(family):
    model, _ = _network(family, 0)
    x = _example(family)
    permuted, groups = _permuted_copy(model, x)
    perms, corrs = activation_matching(model, permuted, groups, iter([x, 0.5 * x + 1]))
    aligned = permute_state(permuted.state_dict(), groups, perms)
    for k, v in model.state_dict().items():
        assert torch.equal(aligned[k], v), k
    assert min(corrs) > 0.9  # units matched to their own copies (a dead unit correlates with nothing)


def test_activation_matching_places_units_that_are_never_active():
    """Units that a ReLU always zeroes on the data correlate with none after it: their correlation before it
    breaks the tie, so a permuted copy is recovered exactly (they were placed arbitrarily, leaving the aligned
    network further from A than the permuted copy of A is)."""
    model, _ = _network("mlp", 0)
    with torch.no_grad():
        for layer in (model.net[1], model.net[3]):
            layer.bias[:5] = -1e3  # 5 dead units in each hidden layer
    x = _example("mlp")
    with torch.no_grad():
        assert not model.net[2](model.net[1](model.net[0](x)))[:, :5].any()
    permuted, groups = _permuted_copy(model, x)
    perms, corrs = activation_matching(model, permuted, groups, iter([x, 0.5 * x + 1]))
    aligned = permute_state(permuted.state_dict(), groups, perms)
    for k, v in model.state_dict().items():
        assert torch.equal(aligned[k], v), k


def test_concatenation_ties_each_piece_at_its_offset():
    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1)
            self.bn = nn.BatchNorm2d(10)
            self.c = nn.Conv2d(10, 5, 1)
            self.fc = nn.Linear(5 * 8 * 8 + 10, 10)

        def forward(self, x):
            y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
            z = torch.relu(self.c(y))
            return self.fc(torch.cat((torch.flatten(z, 1), y.mean((2, 3))), 1))

    model = Dense().eval()
    x = _example("convfc")
    groups = {g.name: g for g in discover_groups(model, x[:2])}
    assert {n: g.size for n, g in groups.items()} == {"a": 4, "b": 6, "c": 5}
    Member = type(groups["a"].members[0])
    a_members, b_members = groups["a"].members, groups["b"].members
    assert Member("c.weight", 1, 1, 0) in a_members and Member("bn.weight", 0, 1, 0) in a_members
    # b's units come after a's 4 channels; in fc, after c's 5 blocks of 64 flattened features
    assert Member("c.weight", 1, 1, 4) in b_members and Member("bn.running_var", 0, 1, 4) in b_members
    assert Member("fc.weight", 1, 64, 0) in groups["c"].members
    assert Member("fc.weight", 1, 1, 320) in a_members and Member("fc.weight", 1, 1, 324) in b_members
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
    permuted = copy.deepcopy(model)
    perms = _random_perms(list(groups.values()))
    permuted.load_state_dict(permute_state(model.state_dict(), list(groups.values()), perms))
    with torch.no_grad():
        _logits_close(permuted(x), model(x))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_align_preserves_the_function(family, tmp_path, cli):
    a, b = _save(family, 0, tmp_path / "a.safetensors"), _save(family, 1, tmp_path / "b.safetensors")
    out = tmp_path / "b-aligned.safetensors"
    sweeps = "1" if family == "vgg_bn" else "5"  # 512-wide layers: a sweep takes seconds on a CPU
    r = cli.json("align", a, b, "-o", out, "--max-sweeps", sweeps, "--batch-size", "16", "-q", *CPU)
    assert r["outputs"]["metrics"]["path"] == str(tmp_path / "b-aligned-align.h5")
    assert len(read_h5(tmp_path / "b-aligned-align.h5")[1]["data_fingerprint"]) == 64  # the data set it read
    assert 0 < r["moved"] <= 1 and r["distance_after"] < r["distance_before"]
    model_b, aligned = load_model(b), load_model(out)
    x = _example(family)
    with torch.no_grad():
        _logits_close(aligned.model(x), model_b.model(x))
    # BN running statistics moved with their channels
    bn = [k for k in aligned.model.state_dict() if k.endswith("running_mean")]
    if bn:
        assert any(not torch.equal(aligned.model.state_dict()[k], model_b.model.state_dict()[k]) for k in bn)
    md = aligned.meta
    assert md.kind == "model" and md.arch == model_b.meta.arch and md.arch_kwargs == model_b.meta.arch_kwargs
    assert md.inputs == {str(a): load_model(a).sha256, str(b): model_b.sha256}
    assert md.extra["align_method"] == "weights" and len(json.loads(md.extra["align_groups"])) == r["groups"]
    with h5py.File(tmp_path / "b-aligned-align.h5") as f:
        assert f.attrs["kind"] == "align" and len(f["objective"]) == r["sweeps"]
        assert f["groups/size"].shape == (r["groups"],)
        perm = f["permutations/0000"][()]
        assert sorted(perm) == list(range(len(perm)))
        objective = f["objective"][()]
        assert all(objective[1:] >= objective[:-1] - 1e-5 * abs(objective[-1]))  # coordinate ascent never falls


def test_evaluate_reads_the_output(tmp_path, cli):
    a, b = _save("mlp", 0, tmp_path / "a.safetensors"), _save("mlp", 1, tmp_path / "b.safetensors")
    out = tmp_path / "c.safetensors"
    cli("align", a, b, "-o", out, "-m", tmp_path / "c.h5", "-q", *CPU)
    ra, rb = cli.json("evaluate", b, *CPU), cli.json("evaluate", out, *CPU)
    assert ra["metrics"]["eval"]["err"] == rb["metrics"]["eval"]["err"]
    # a network aligned with itself: nothing moves, and its one file is listed once (as every command lists)
    r = cli.json("align", a, a, "-o", tmp_path / "self.safetensors", *CPU)
    assert [i["path"] for i in r["inputs"]] == [str(a)] and r["moved"] == 0


def test_activation_matching(tmp_path, cli, digits_models):
    out = tmp_path / "act.safetensors"
    r = cli.json("align", *digits_models, "-o", out, "--method", "activations", "--activation-batches", "2", *CPU)
    assert r["method"] == "activations" and r["sweeps"] is None and r["objective"] is None
    assert 0 < r["correlation"] <= 1
    assert r["distance_after"] < r["distance_before"]  # the matched B is closer to A
    x = _example("mlp")
    with torch.no_grad():
        _logits_close(load_model(out).model(x), load_model(digits_models[1]).model(x))
    with h5py.File(tmp_path / "act-align.h5") as f:
        assert "objective" not in f and (f["groups/correlation"][()] > 0).all()


def test_a_layer_called_twice_shares_one_group():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc, self.out = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.out(torch.relu(self.fc(torch.relu(self.fc(torch.relu(self.fc1(x)))))))

    torch.manual_seed(0)
    model = Shared()
    permuted, groups = _permuted_copy(model, torch.randn(8, 5))  # checks the function is kept
    assert [(g.size, sorted(g.producers)) for g in groups] == [(6, ["fc", "fc", "fc1"])]


def test_refuses_an_operation_that_mixes_channels():
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 8 * 8, 10)

        def forward(self, x):
            y = self.conv(x)
            y = y.view(y.shape[0], 2, 16, 8)  # folds channels into rows
            return self.fc(y.flatten(1))

    with pytest.raises(ConfigError, match=r"operation 'view'.*reshapes the channel axis"):
        discover_groups(Mixer(), torch.randn(2, 3, 8, 8))


def test_refuses_what_the_tracer_cannot_follow():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                x = -x
            return self.fc(x)

    with pytest.raises(ConfigError, match="cannot trace"):
        discover_groups(Branchy(), torch.randn(2, 4))


def test_a_branch_on_the_input_shape_is_traced_for_that_shape():
    # timm's VGG pools its features only when they are smaller than its classifier's window: a branch on a
    # shape, which torch.fx alone cannot trace; with the example's shape known it is taken as for that input
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6 * 8 * 8, 10)

        def forward(self, x):
            x = torch.relu(self.conv(x))
            if x.shape[-1] < 8:
                x = F.adaptive_avg_pool2d(x, 8)
            return self.fc(torch.flatten(x, 1))

    model = Branchy().eval()
    for size in (4, 8):  # the branch taken, and not
        x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(size))
        permuted, groups = _permuted_copy(model, x)
        assert [g.size for g in groups] == [6]
        assert next(m for m in groups[0].members if m.name == "fc.weight").inner == 64


def test_timm_vgg_with_its_convolutional_classifier():
    # timm's VGG (here with small layers): a 7x7 convolution as its first classifier layer, reached through a
    # branch on the feature map's shape
    from timm.models.vgg import VGG

    torch.manual_seed(0)
    model = VGG(cfg=[8, "M", 16, "M"], num_classes=10, mlp_ratio=1 / 512).eval()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    permuted, groups = _permuted_copy(model, x)
    assert [g.size for g in groups] == [8, 16, 8, 4096]
    params = {n: p.detach() for n, p in model.named_parameters()}
    perms, _ = weight_matching(params, permuted.state_dict(), groups)
    aligned = permute_state(permuted.state_dict(), groups, perms)
    for k, v in model.state_dict().items():
        assert torch.equal(aligned[k], v), k


def test_refuses_attention_rather_than_permuting_it_wrongly():
    # timm's ViT: its attention blocks reshape the channel axis into heads; nothing is permuted, the error says why
    model = build_model("test_vit", 10, 3, {}).eval()
    with pytest.raises(ConfigError, match="align cannot"):
        discover_groups(model, torch.randn(2, 3, 160, 160))


def test_refuses_grouped_convolution():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=2), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 4, 4))
    with pytest.raises(ConfigError, match=r"layer '1' \(Conv2d\) is a grouped convolution"):
        discover_groups(model, torch.randn(2, 3, 4, 4))


def test_cli_errors(tmp_path, cli):
    a, b = _save("mlp", 0, tmp_path / "a.safetensors"), _save("mlp", 1, tmp_path / "b.safetensors")
    model, meta = _network("mlp", 2)
    wide = tmp_path / "wide.safetensors"
    save_model(wide, build_model("mlp", 10, 1, {"hidden": 16}), ModelMeta(**{**meta.__dict__,
                                                                              "arch_kwargs": {"hidden": 16}}))
    msg = cli.error("align", a, wide, "-o", tmp_path / "x.safetensors", *CPU)
    assert "different networks (arch_kwargs" in msg and "x.safetensors" not in str(list(tmp_path.iterdir()))
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    assert "already exists; pass --force" in cli.error("align", a, b, "-o", out, *CPU)
    assert out.read_bytes() == b"old"
    assert "is also an input" in cli.error("align", a, b, "-o", b, *CPU)
    cli("align", a, b, "-o", tmp_path / "y.safetensors", "--method", "magic", code=2)
    assert "--max-sweeps must be >= 1" in cli.error("align", a, b, "-o", tmp_path / "y.safetensors",
                                                   "--max-sweeps", "0", *CPU)
