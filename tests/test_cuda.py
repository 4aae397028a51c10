"""CUDA-only checks: CUDA-graph steps make the same updates as eager ones; --deterministic runs repeat exactly;
wide and compiled evaluation give the one-at-a-time metrics.

Skipped without a GPU (CI has none); run on a GPU machine with ``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mctool.curve_training import CurveStep
from mctool.curves import Curve
from mctool.data import load_data
from mctool.errors import MctoolWarning
from mctool.flat import ParamLayout
from mctool.graphs import GraphedStep, sgd
from mctool.models import build_model
from mctool.loop import sgd_step

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")]
DEV = torch.device("cuda")
SYNTH = "synthetic:size=16,channels=3,classes=4,train=200,test=64"  # 200 = 3 batches of 64 and one of 8


def _batches(n_epochs: int = 2, batch_size: int = 64, channels_last: bool = False):
    data = load_data(SYNTH, device=DEV, channels_last=channels_last)
    return [b for e in range(n_epochs) for b in data.train.batches(batch_size, shuffle=True, augment=True, seed=e)]


def _plain_run(graphs: bool, precision: str = "fp32") -> tuple[dict[str, torch.Tensor], list[float]]:
    torch.manual_seed(0)
    model = build_model("cifar_preresnet20", 4, 3, {}).to(DEV)
    opt = sgd(model.parameters(), lr=0.05, momentum=0.9, wd=5e-4, device=DEV, graphs=graphs)
    step = sgd_step(model, opt, DEV, precision, cuda_graphs=graphs)
    losses = [float(step(x, y, 0.05 / (1 + i))[0]) for i, (x, y) in enumerate(_batches())]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses


def _relative_difference(a: dict, b: dict, start: dict) -> float:
    """||a - b|| / ||b - start|| over all floating-point tensors: how far two runs' updates differ.

    cuDNN's kernels are not bitwise deterministic, so two runs of the same steps differ by float noise
    (about 1e-4 of the update after a few steps); a wrong step (stale lr, stale input, stale t) gives order 1.
    """
    keys = [k for k in start if start[k].is_floating_point()]
    diff = sum(float((a[k].float().cpu() - b[k].float().cpu()).pow(2).sum()) for k in keys) ** 0.5
    moved = sum(float((b[k].float().cpu() - start[k].float()).pow(2).sum()) for k in keys) ** 0.5
    return diff / moved


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_plain_steps_match_eager(precision):
    eager, eager_losses = _plain_run(False, precision)
    graphed, graphed_losses = _plain_run(True, precision)
    # 8 steps: 3 eager warm-up steps per batch shape, then replays (and a graph for the 8-image batch)
    tol = 1e-3 if precision == "fp32" else 2e-2
    assert graphed_losses == pytest.approx(eager_losses, rel=tol, abs=tol)
    assert _relative_difference(graphed, eager, _initial()) < 10 * tol


def _initial() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model("cifar_preresnet20", 4, 3, {}).state_dict()


@pytest.mark.parametrize("graphs", [False, True])
def test_deterministic_runs_repeat_bit_for_bit(graphs):
    """--deterministic: the same seed gives the same weights and losses on CUDA, not just close ones."""
    from mctool.runtime import deterministic

    with deterministic(True):
        (a, la), (b, lb) = _plain_run(graphs), _plain_run(graphs)
    assert la == lb
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_graphed_steps_really_train():
    before = _initial()
    after, losses = _plain_run(True)
    changed = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k].cpu())]
    assert len(changed) > len(before) // 2
    assert all(torch.isfinite(torch.tensor(losses)))


def _curve_run(graphs: bool, channels_last: bool = False, compile: bool = False) -> torch.Tensor:
    torch.manual_seed(0)
    model = build_model("cifar_preresnet20", 4, 3, {}).to(DEV)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    layout = ParamLayout.of(model)
    flat = layout.flatten(dict(model.named_parameters())).cpu()
    g = torch.Generator().manual_seed(1)
    points = torch.stack([flat, flat + 0.05 * torch.randn(flat.shape, generator=g),
                          flat + 0.1 * torch.randn(flat.shape, generator=g)])
    step = CurveStep(model, Curve("bezier", 1, points, layout, None, {}), [1], wd=5e-4, momentum=0.9,
                     cuda_graphs=graphs, compile=compile)
    torch.manual_seed(5)
    for x, y in _batches(channels_last=channels_last):
        step(x, y, 0.05)
    return step.points()


@pytest.mark.parametrize("channels_last, compile", [(False, False), (True, False), (False, True)])
def test_graphed_curve_steps_match_eager(channels_last, compile, recwarn):
    eager, graphed = _curve_run(False, channels_last), _curve_run(True, channels_last, compile)
    # neither capture nor compilation fell back
    assert not [str(w.message) for w in recwarn if issubclass(w.category, MctoolWarning)]
    start = _curve_start()
    assert not torch.equal(eager[1], start[1])  # the bend moved
    assert torch.equal(graphed[0], start[0]) and torch.equal(graphed[2], start[2])  # endpoints fixed
    # cuDNN noise grows over the steps: 0.01-0.02 of the update measured on an H100; a stale t, input or
    # learning rate in the replayed graph would give order 1
    assert float((graphed[1] - eager[1]).norm() / (eager[1] - start[1]).norm()) < 0.1


def _curve_start() -> torch.Tensor:
    torch.manual_seed(0)
    model = build_model("cifar_preresnet20", 4, 3, {})
    layout = ParamLayout.of(model)
    flat = layout.flatten(dict(model.named_parameters()))
    g = torch.Generator().manual_seed(1)
    return torch.stack([flat, flat + 0.05 * torch.randn(flat.shape, generator=g),
                        flat + 0.1 * torch.randn(flat.shape, generator=g)])


class _HostSync(torch.nn.Module):
    """A network whose forward reads a value on the host: it cannot be captured."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 16 * 16, 4)

    def forward(self, x):
        out = self.fc(x.flatten(1))
        return out * 2 if out.sum().item() > 0 else out


def test_capture_failure_falls_back_to_eager():
    torch.manual_seed(0)
    model = _HostSync().to(DEV)
    opt = sgd(model.parameters(), lr=0.05, momentum=0.9, wd=0.0, device=DEV, graphs=True)
    step = sgd_step(model, opt, DEV, "fp32", cuda_graphs=True)
    with pytest.warns(MctoolWarning, match="could not capture the training step as a CUDA graph"):
        losses = [float(step(x, y, 0.05)[0]) for x, y in _batches()]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_graphed_step_replays_into_the_same_outputs():
    w = torch.zeros(3, device=DEV)
    calls = []

    def body(x, y):
        calls.append(1)
        w.add_(x.sum(0))
        return w.sum(), w * 1

    step = GraphedStep(body, enabled=True, warmup=1)
    for i in range(4):
        step(torch.full((2, 3), float(i), device=DEV), torch.zeros(2, device=DEV))
    assert len(calls) == 2  # one eager warm-up call, one capture; the rest are replays
    assert w.tolist() == [2 * (0 + 1 + 2 + 3)] * 3


def test_train_on_cuda_with_graphs_is_reproducible(cli, tmp_path):
    outs = []
    for i, extra in enumerate([["--cuda-graphs"], ["--cuda-graphs"], []]):
        out = tmp_path / f"m{i}.safetensors"
        # lr 0.01: at 0.05 (the default) training on 200 random images is chaotic enough that two runs' float
        # noise grew to 5% of the update in 8 steps (H200, torch 2.11), which would hide nothing but fail the test
        r = cli.json("train", "-d", SYNTH, "-a", "cifar_preresnet20", "--epochs", "2", "--batch-size", "64",
                     "--lr", "0.01", "-o", out, "--device", "cuda", "-q", *extra)
        outs.append((load_file(out), r))
    (a, ra), (b, rb), (c, rc) = outs
    # cuDNN may pick non-deterministic kernels, so "the same" is up to floating-point order; printed with -s
    print(f"\nbitwise equal: graphs twice {all(torch.equal(a[k], b[k]) for k in a)}, "
          f"graphs vs eager {all(torch.equal(a[k], c[k]) for k in a)}")
    torch.manual_seed(0)
    start = build_model("cifar_preresnet20", 4, 3, {}).state_dict()
    start = {k: v for k, v in start.items() if k in a and "running" not in k}
    noise, between = _relative_difference(a, b, start), _relative_difference(a, c, start)
    print(f"relative difference: graphs twice {noise:.2e}, graphs vs eager {between:.2e}")
    assert noise < 0.05  # graphs twice: float noise only
    assert between < 0.05  # graphs vs eager: the same training
    assert abs(ra["metrics"]["eval"]["err"] - rc["metrics"]["eval"]["err"]) <= 0.05


def _eval_points(compile: bool, points_per_pass: int, arch: str) -> list[dict[str, float]]:
    """Metrics of 3 networks around one of ``arch`` (BN recomputed for each), as evaluate-curve computes them."""
    from mctool.batched import ManyEvaluator

    torch.manual_seed(0)
    data = load_data(SYNTH, device=DEV)
    kwargs = {"img_size": 16, "hidden": 64, "batch_norm": True} if arch == "mlp" else {}
    model = build_model(arch, 4, 3, kwargs).to(DEV)
    layout = ParamLayout.of(model)
    w = layout.flatten(dict(model.named_parameters()))
    g = torch.Generator(device=DEV).manual_seed(1)
    weights = torch.stack([w + 0.05 * w.abs().mean() * torch.randn(w.numel(), device=DEV, generator=g)
                           for _ in range(3)])
    many = ManyEvaluator(model, layout, data, points_per_pass=points_per_pass, wd=5e-4, batch_size=64,
                         compile=compile)
    out = many.evaluate(weights)
    if points_per_pass > 1:
        assert many._wide(points_per_pass) is not None  # on a GPU, convolutional networks are widened too
    return out


@pytest.mark.parametrize("points_per_pass, compile, arch", [(2, False, "cifar_preresnet20"), (2, True, "mlp"),
                                                             (1, True, "mlp")])
def test_wide_and_compiled_evaluation_match_one_network_at_a_time(points_per_pass, compile, arch, recwarn):
    """Passes of 2 (one wide network: grouped convolutions for PreResNet-20), compiled (mode reduce-overhead: CUDA
    graphs whose outputs must be copied before the next replay; an MLP, quick to compile) or not: the eager
    one-at-a-time metrics within float noise."""
    want = _eval_points(False, 1, arch)
    got = _eval_points(compile, points_per_pass, arch)
    assert not [w for w in recwarn.list if issubclass(w.category, MctoolWarning)]  # nothing fell back
    for g, w in zip(got, want):
        for name in w:  # cuDNN/TF32 and inductor kernels: ~1e-4 relative; an error may flip one of 64 images
            tol = 1.5 / 64 if name.endswith("err") else 2e-3 * max(1.0, abs(w[name]))
            assert g[name] == pytest.approx(w[name], abs=tol), name


def test_a_deep_network_is_widened_despite_tf32():
    """PreResNet-110's wide network passes its check on a GPU (it was refused: TF32 rounding over 110 layers
    exceeded the check's tolerance, and every network went alone)."""
    from mctool.batched import WideNetwork

    torch.manual_seed(0)
    model = build_model("cifar_preresnet110", 10, 3, {}).to(DEV).eval()
    probe = torch.randn(8, 3, 32, 32, device=DEV)
    assert WideNetwork.of(model, 4, ParamLayout.of(model), probe) is not None


@pytest.mark.parametrize("precision", ["fp32", "bf16", "tf32"])
def test_an_mlps_first_layer_from_a_span_matches_its_own_weights(precision):
    """8 points of a Bezier curve of MLPs to a pass on the GPU: the first layer from the 3 control points
    (``batched.Span``) gives the metrics of each network's own weights (one at a time); also with TF32 matrix
    products allowed, under which the span's check must not round (it computes in float64)."""
    matmul = torch.backends.cuda.matmul  # (its settings are not monkeypatch-able)
    name, value = ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
    saved = getattr(matmul, name)
    try:
        if precision == "tf32":
            setattr(matmul, name, value)
        _span_points_match(precision if precision != "tf32" else "fp32", 5e-3 if precision == "tf32" else None)
    finally:
        setattr(matmul, name, saved)


def _span_points_match(precision: str, rel: float | None) -> None:
    from mctool.batched import ManyEvaluator, Span
    from mctool.curves import coefficients

    torch.manual_seed(0)
    data = load_data(SYNTH, device=DEV)
    model = build_model("mlp", 4, 3, {"img_size": 16, "hidden": 64, "batch_norm": True}).to(DEV)
    layout = ParamLayout.of(model)
    w = layout.flatten(dict(model.named_parameters()))
    g = torch.Generator(device=DEV).manual_seed(1)
    controls = torch.stack([w + 0.05 * w.abs().mean() * torch.randn(w.numel(), device=DEV, generator=g)
                            for _ in range(3)])
    c = torch.stack([coefficients("bezier", 1, k / 7) for k in range(8)])
    weights = c.float().to(DEV) @ controls
    opts = dict(wd=5e-4, batch_size=64, precision=precision)
    many = ManyEvaluator(model, layout, data, points_per_pass=8, **opts)
    got = many.evaluate(weights, Span((controls,), c))
    assert [n for n, layer in many._wide(8).input_layers.items() if layer.basis is not None] == ["net.1"]
    want = ManyEvaluator(model, layout, data, points_per_pass=1, **opts).evaluate(weights)
    for a, b in zip(got, want):
        for name in b:  # TF32 or bf16 matrix products, summed in another order: ~1e-3 relative (bf16 ~1e-2; with
            # TF32 matmuls too, the weights one at a time are TF32-rounded combinations, the span's exact ones)
            rel = rel or (2e-2 if precision == "bf16" else 2e-3)
            tol = 1.5 / 64 if name.endswith("err") else rel * max(1.0, abs(b[name]))
            assert a[name] == pytest.approx(b[name], abs=tol), name
