"""Time mctool's hot paths on whatever device is present; write bench-out/results.json.

    python benchmarks/bench.py                 # CPU set (make bench): small networks, small synthetic data
    python benchmarks/bench.py --full          # GPU set: cifar_preresnet110 and cifar_vgg16, CIFAR-sized data,
                                               # variants fp32, fp32+graphs, bf16+cl, bf16+cl+graphs, and the
                                               # reference-style baseline measured in the same run

A variant is a precision (fp32 or bf16), optionally "+cl" (channels-last), "+graphs" (CUDA graphs), "+tune"
(cuDNN's autotuning, torch.backends.cudnn.benchmark, which mctool leaves off) and "+compile" (the curve
step's passes over the parameters through torch.compile, as ``connect --compile``; and P curve points to
a pass with the evaluation forward compiled, as ``evaluate-curve --compile``: ``compiled_over_batched``,
``eval_compile_first_pass_s`` with the compiling).
Figures are named ``<figure>/<arch>/<variant>``; the first variant's are also given as ``<figure>/<arch>``
(so ``curve_over_plain_step/<arch>`` is always present). Per architecture and variant: plain and curve
training step (ms, img/s) and their ratio; plain and curve training throughput over a run of real
batches (data pipeline included) and the pipeline's share; one curve point and one plane point (BN pass
plus train and test evaluation, s); P = --points-per-pass curve points evaluated one at a time and P to a
pass in one wide network, and their ratio ``batched_over_sequential`` (where the evaluator chooses one network
per pass, as for convolutional networks on the CPU, also ``wide_over_sequential``: the wide network forced;
where a linear layer reads the input, as in an MLP, also ``batched_direct_over_sequential``: the pass without
the points' span, each network's first layer computed from its own weights).
With ``--reference``: the reference code's way of working (fp32, a torchvision DataLoader with PIL transforms
and worker processes, w(t) assembled parameter by parameter, evaluation at batch 128), timed on part of the
data and given as img/s and an estimated curve-point time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.func import functional_call

from mctool.batched import ManyEvaluator, Span, WideNetwork, evaluate_many
from mctool.curve_training import CurveStep
from mctool.curves import Curve, coefficients
from mctool.data import load_data
from mctool.evaluation import evaluate_weights
from mctool.flat import ParamLayout
from mctool.graphs import sgd
from mctool.models import arch_kwargs_for, build_model
from mctool.plane import PlaneBasis
from mctool.loop import sgd_step


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _time_steps(steps, batches, dev, warmup: int, reps: int, block: int) -> list[float]:
    """Median milliseconds per call of each ``step(x, y, lr)``, timed over blocks of ``block`` calls in a row
    (as a training loop runs them: no synchronisation between steps). The steps take turns block by block,
    so that a busy or throttled machine slows them alike."""
    times = [[] for _ in steps]
    for i in range(warmup + reps):
        for step, ts in zip(steps, times):
            _sync(dev)
            t0 = time.perf_counter()
            for j in range(block):
                x, y = batches[(i * block + j) % len(batches)]
                step(x, y, 0.01)
            _sync(dev)
            if i >= warmup:
                ts.append(1000 * (time.perf_counter() - t0) / block)
    return [statistics.median(ts) for ts in times]


def _timed(fn, dev) -> float:
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    return time.perf_counter() - t0


def _race(evaluators: dict, ws: torch.Tensor, dev, reps: int, got: dict, span=None) -> list[list[float]]:
    """Time each evaluator's ``evaluate(ws, span)`` in turns, ``reps`` rounds (the machine's other load hits all of
    them alike); returns each one's times, in order, and leaves its metrics in ``got[name]``. An evaluator is a
    ManyEvaluator, or a (ManyEvaluator, span) pair that runs with that span instead."""
    times: list[list[float]] = [[] for _ in evaluators]
    for _ in range(reps):
        for t, (name, ev) in zip(times, evaluators.items()):
            ev, sp = ev if isinstance(ev, tuple) else (ev, span)
            t.append(_timed(lambda: got.__setitem__(name, ev.evaluate(ws, sp)), dev))
    return times


def _parse_variant(v: str) -> tuple[str, bool, bool, bool]:
    parts = v.split("+")
    if parts[0] not in ("fp32", "bf16") or not set(parts[1:]) <= {"cl", "graphs", "compile", "tune"}:
        raise SystemExit(f"bad variant '{v}': use fp32 or bf16, optionally +cl, +graphs, +compile and +tune")
    return parts[0], "cl" in parts, "graphs" in parts, "compile" in parts


def _run_loop(step, split, batch_size: int, n_batches: int, seed: int) -> None:
    """What ``training.fit`` does per iteration (step, weighted loss, error count), for ``n_batches``."""
    losses = torch.zeros(n_batches, device=split.device)
    wrong = torch.zeros((), device=split.device, dtype=torch.long)
    for i, (x, y) in zip(range(n_batches), split.batches(batch_size, shuffle=True, augment=True, seed=seed)):
        loss, out = step(x, y, 0.01)
        losses[i] = loss * y.shape[0]
        wrong += (out.argmax(1) != y).sum()
    float(losses.sum())


def bench_variant(arch: str, variant: str, data, dev, args, points: torch.Tensor | None,
                  evaluated: set) -> tuple[dict[str, float], torch.Tensor]:
    precision, cl, graphs, compile_ = _parse_variant(variant)
    # +tune: cuDNN's autotuning (torch.backends.cudnn.benchmark, off in mctool) for every figure of the variant
    tuned, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, "tune" in variant.split("+")
    try:
        return _bench_variant(arch, precision, cl, graphs, compile_, data, dev, args, points, evaluated,
                              "tune" in variant.split("+"))
    finally:
        torch.backends.cudnn.benchmark = tuned


def _bench_variant(arch: str, precision: str, cl: bool, graphs: bool, compile_: bool, data, dev, args,
                   points: torch.Tensor | None, evaluated: set, tune: bool) -> tuple[dict[str, float], torch.Tensor]:
    graphs = graphs and dev.type == "cuda"
    info = data.info
    data.train.channels_last = data.eval.channels_last = cl

    def make():
        torch.manual_seed(0)
        m = build_model(arch, info.num_classes, info.in_chans, arch_kwargs_for(arch, {}, info.image_size)).to(dev)
        return m.to(memory_format=torch.channels_last) if cl else m

    batches = [b for b, _ in zip(data.train.batches(args.batch_size, shuffle=True, augment=True, seed=1),
                                 range(args.block * (args.warmup + args.reps)))]
    out: dict[str, float] = {}

    model = make()
    layout = ParamLayout.of(model)
    if points is None:
        flat = layout.flatten(dict(model.named_parameters())).cpu()
        points = torch.stack([flat, flat + 0.01 * torch.randn_like(flat), flat + 0.02 * torch.randn_like(flat)])
    if not args.eval_only:
        out.update(_bench_training(model, layout, points, batches, data, dev, args, precision, graphs, compile_))
    return _bench_evaluation(make, layout, points, data, dev, args, precision, cl, compile_, evaluated, out,
                             tune), points


def _bench_training(model, layout, points, batches, data, dev, args, precision: str, graphs: bool,
                    compile_: bool) -> dict[str, float]:
    """The plain and curve steps, timed alone and in a loop over real batches, and the data pipeline."""
    out: dict[str, float] = {}
    bs = args.batch_size
    curve = Curve("bezier", 1, points, layout, None, {})  # meta unused for stepping
    # The curve runs the same module (functional_call), whose own parameters the plain step trains.
    cstep = CurveStep(model, curve, [1], wd=5e-4, momentum=0.9, precision=precision, cuda_graphs=graphs,
                      compile=compile_)
    opt = sgd(model.parameters(), lr=0.01, momentum=0.9, wd=5e-4, device=dev, graphs=graphs)
    plain_step = sgd_step(model, opt, dev, precision, cuda_graphs=graphs)
    plain, curve_ms = _time_steps([plain_step, cstep], batches, dev, args.warmup, args.reps, args.block)
    out.update({"plain_step_ms": plain, "curve_step_ms": curve_ms, "curve_over_plain_step": curve_ms / plain,
                "plain_step_img_per_s": 1000 * bs / plain, "curve_step_img_per_s": 1000 * bs / curve_ms})

    # Throughput over real batches, as the training loop runs them, and the data pipeline alone.
    n = min(args.loop_batches, data.train.num_batches(bs, drop_last=True))
    t_plain = _timed(lambda: _run_loop(plain_step, data.train, bs, n, 2), dev)
    t_curve = _timed(lambda: _run_loop(cstep, data.train, bs, n, 3), dev)
    t_data = _timed(lambda: [None for _, _ in zip(range(n), data.train.batches(bs, shuffle=True, augment=True,
                                                                               seed=4))], dev)
    out.update({"train_img_per_s": n * bs / t_plain, "curve_train_img_per_s": n * bs / t_curve,
                "data_pipeline_share": t_data / t_plain,
                # a whole epoch at the loop's rate (the loop is the whole epoch on the CPU set)
                "train_epoch_s": len(data.train) * t_plain / (n * bs),
                "curve_epoch_s": len(data.train) * t_curve / (n * bs)})
    return out


def _bench_evaluation(make, layout, points, data, dev, args, precision: str, cl: bool, compile_: bool,
                      evaluated: set, out: dict[str, float], tune: bool) -> dict[str, float]:
    """One curve point, one plane point, and P curve points one network at a time, P to a pass and compiled."""
    # P curve points for the evaluations of many networks (one at a time, P to a pass, compiled)
    ts = [0.1 + 0.8 * k / max(args.points_per_pass - 1, 1) for k in range(args.points_per_pass)]
    coef = torch.stack([coefficients("bezier", 1, t) for t in ts])
    ws = (coef.float() @ points).to(dev)
    span = Span((points.to(dev),), coef)  # the points as combinations of the control points (what evaluate-curve gives)
    opts = dict(wd=5e-4, batch_size=args.eval_batch_size, precision=precision, channels_last=cl)
    got: dict[str, list] = {}  # each way's metrics of the P points, from its last timed run

    # One curve point and one plane point: assign weights, BN pass, train and test evaluation.
    if (precision, cl, tune) not in evaluated:
        evaluated.add((precision, cl, tune))
        eval_model = make().eval()
        w = (coefficients("bezier", 1, 0.5).float() @ points).to(dev)
        kw = dict(wd=5e-4, batch_size=args.eval_batch_size, precision=precision)
        evaluate_weights(eval_model, data, **kw)  # warm-up
        metrics = {}
        out["curve_point_s"] = _timed(lambda: (layout.assign(eval_model, w),
                                               metrics.update(evaluate_weights(eval_model, data, **kw))), dev)
        out["curve_point_test_err"] = metrics["test/err"]
        out["curve_point_train_loss"] = metrics["train/loss"]
        basis = PlaneBasis.through(*[p.to(dev) for p in points])
        out["plane_point_s"] = _timed(lambda: (layout.assign(eval_model, basis.weights(0.3, 0.4)),
                                               evaluate_weights(eval_model, data, **kw)), dev)
        out["plane_21x21_min_estimate"] = 441 * out["plane_point_s"] / 60
        # P curve points evaluated one at a time and P to a pass (one wide network: mctool.batched)
        one = ManyEvaluator(eval_model, layout, data, points_per_pass=1, **opts)
        many = ManyEvaluator(eval_model, layout, data, points_per_pass=args.points_per_pass, **opts)
        many.evaluate(ws, span)  # warm-up, and builds the wide network
        evaluators: dict = {"one": one, "many": many}
        built = many._wide(len(ts))
        out["batched_wide"] = float(built is not None)
        if built is not None and built.input_layers:  # what the span saves: the same pass without it
            evaluators["direct"] = (many, None)
        if not out["batched_wide"]:  # one network per pass was chosen (batched.pays_off): what a wide one costs
            wide = WideNetwork.of(eval_model, len(ts), layout, next(iter(data.eval.batches(8)))[0])
            if wide is not None:
                wide = wide.use_channels_last() if cl else wide
                no_cl = {k: v for k, v in opts.items() if k != "channels_last"}
                evaluators["wide"] = SimpleNamespace(evaluate=lambda w, sp: evaluate_many(wide, w, data, span=sp,
                                                                                            **no_cl))
                evaluators["wide"].evaluate(ws, span)  # warm-up
        times = dict(zip(evaluators, _race(evaluators, ws, dev, args.eval_reps, got, span)))
        t_one, t_many = times["one"], times["many"]
        out["eval_points_sequential_s"] = min(t_one)
        out["eval_points_batched_s"] = min(t_many)
        out["batched_over_sequential"] = min(t_many) / min(t_one)
        out["curve_point_batched_s"] = min(t_many) / len(ts)
        out["plane_21x21_batched_min_estimate"] = 441 * out["curve_point_batched_s"] / 60
        out["batched_max_nll_diff"] = max(abs(a[k] - b[k]) for a, b in zip(got["one"], got["many"])
                                          for k in a if not k.endswith("err"))
        if "direct" in times:
            out["eval_points_batched_direct_s"] = min(times["direct"])
            out["batched_direct_over_sequential"] = min(times["direct"]) / min(t_one)
        if "wide" in times:
            out["eval_points_wide_s"] = min(times["wide"])
            out["wide_over_sequential"] = min(times["wide"]) / min(t_one)
    if compile_ and (precision, cl, tune, "compile") not in evaluated:
        # the same P points to a pass with the evaluation forward compiled (evaluate-curve/plane --compile)
        evaluated.add((precision, cl, tune, "compile"))
        eval_model = make().eval()
        many = ManyEvaluator(eval_model, layout, data, points_per_pass=args.points_per_pass, **opts)
        comp = ManyEvaluator(eval_model, layout, data, points_per_pass=args.points_per_pass, compile=True, **opts)
        many.evaluate(ws, span)
        out["eval_compile_first_pass_s"] = _timed(lambda: comp.evaluate(ws, span), dev)  # compiling included
        t_many, t_comp = _race({"many": many, "comp": comp}, ws, dev, args.eval_reps, got, span)
        out["eval_points_compiled_s"] = min(t_comp)
        out["compiled_over_batched"] = min(t_comp) / min(t_many)
        out["curve_point_compiled_s"] = min(t_comp) / len(ts)
        out["plane_21x21_compiled_min_estimate"] = 441 * out["curve_point_compiled_s"] / 60
        out["compiled_max_nll_diff"] = max(abs(a[k] - b[k]) for a, b in zip(got["many"], got["comp"])
                                           for k in a if not k.endswith("err"))
    data.train.channels_last = data.eval.channels_last = False
    return out


def bench_reference(arch: str, data, dev, args, points: torch.Tensor) -> dict[str, float]:
    """The reference code's way: fp32, DataLoader + PIL transforms, per-parameter w(t), batch-128 evaluation."""
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    info = data.info
    mean, std = list(info.mean), list(info.std)
    train_tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), transforms.Normalize(mean, std)])
    test_tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])

    class Images(Dataset):  # like torchvision.datasets.CIFAR10: HWC uint8 arrays, PIL per item
        def __init__(self, split, tf):
            self.x = split.images.permute(0, 2, 3, 1).cpu().numpy()
            self.y = split.labels.cpu().numpy()
            self.tf = tf

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.tf(Image.fromarray(self.x[i])), int(self.y[i])

    def loader(split, tf, shuffle):
        return DataLoader(Images(split, tf), batch_size=128, shuffle=shuffle, num_workers=args.ref_workers,
                          pin_memory=dev.type == "cuda", persistent_workers=False)

    torch.manual_seed(0)
    model = build_model(arch, info.num_classes, info.in_chans, arch_kwargs_for(arch, {}, info.image_size)).to(dev)
    layout = ParamLayout.of(model)
    per_param = [p.to(dev) for p in torch.split(points, layout.numels, dim=1)]
    bend = [torch.nn.Parameter(p[1].clone()) for p in per_param]
    ref_opt = torch.optim.SGD(bend, lr=0.01, momentum=0.9)
    plain_opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    buffers = dict(model.named_buffers())

    def curve_step(x, y):
        c = coefficients("bezier", 1, torch.rand(())).tolist()
        params = {name: (c[0] * p[0] + c[1] * b + c[2] * p[2]).view(shape)
                  for name, shape, p, b in zip(layout.names, layout.shapes, per_param, bend)}
        out_ = functional_call(model, {**params, **buffers}, (x,))
        loss = F.cross_entropy(out_, y) + 0.5 * 5e-4 * sum(v.pow(2).sum() for v in params.values())
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
        return loss.item()  # the reference code reads the loss every step

    def plain_step(x, y):
        out_ = model(x)
        loss = F.cross_entropy(out_, y)
        plain_opt.zero_grad()
        loss.backward()
        plain_opt.step()
        return loss.item()

    def rate(step, tf, train_mode, n_batches) -> float:
        model.train(train_mode)
        it = iter(loader(data.train, tf, True))
        for _ in range(3):  # workers started, cuDNN warmed up
            x, y = next(it)
            step(x.to(dev, non_blocking=True), y.to(dev, non_blocking=True))
        _sync(dev)
        t0, seen = time.perf_counter(), 0
        for _ in range(n_batches):
            x, y = next(it)
            step(x.to(dev, non_blocking=True), y.to(dev, non_blocking=True))
            seen += x.shape[0]
        _sync(dev)
        return seen / (time.perf_counter() - t0)

    n = min(args.ref_batches, len(data.train) // 128 - 4)
    out = {"reference_plain_train_img_per_s": rate(plain_step, train_tf, True, n),
           "reference_curve_train_img_per_s": rate(curve_step, train_tf, True, n)}
    with torch.no_grad():
        bn_rate = rate(lambda x, y: model(x), test_tf, True, n)
        eval_rate = rate(lambda x, y: model(x), test_tf, False, n)
    n_train, n_test = len(data.train), len(data.eval)
    out["reference_curve_point_s_estimate"] = n_train / bn_rate + (n_train + n_test) / eval_rate
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="GPU set: preresnet110 and vgg16 on 50,000/10,000 images")
    p.add_argument("--archs", nargs="*", help="architectures (default: per set)")
    p.add_argument("--variants", nargs="*", help="e.g. fp32 fp32+graphs bf16+cl+graphs bf16+cl+graphs+compile "
                                                 "(default: per set)")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the reference-style baseline (default: with --full)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2, help="untimed blocks of steps before timing")
    p.add_argument("--reps", type=int, default=8, help="timed blocks of steps (the median is reported)")
    p.add_argument("--block", type=int, default=5, help="steps in a row per timed block")
    p.add_argument("--loop-batches", type=int, default=None, help="batches in the throughput runs")
    p.add_argument("--ref-batches", type=int, default=60, help="batches timed for the reference rates")
    p.add_argument("--ref-workers", type=int, default=4, help="DataLoader workers for the reference rates")
    p.add_argument("--points-per-pass", type=int, default=4, help="networks per pass for batched_over_sequential")
    p.add_argument("--eval-reps", type=int, default=3, help="timed repetitions of the P-point evaluations")
    p.add_argument("--eval-only", action="store_true", help="only the evaluation figures (no training steps)")
    p.add_argument("--out", default="bench-out/results.json")
    args = p.parse_args()
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    if args.full:
        archs, n_train, n_test = args.archs or ["cifar_preresnet110", "cifar_vgg16"], 50_000, 10_000
        variants = args.variants or ["fp32", "fp32+graphs", "bf16+cl", "bf16+cl+graphs"]
        args.eval_batch_size = args.eval_batch_size or 1024
        args.loop_batches = args.loop_batches or 100
    else:
        archs, n_train, n_test = args.archs or ["cifar_convfc", "cifar_preresnet20", "mlp"], 2048, 512
        variants = args.variants or ["fp32"]
        args.eval_batch_size = args.eval_batch_size or 512
        args.loop_batches = args.loop_batches or 16
    reference = args.full if args.reference is None else args.reference
    data = load_data(f"synthetic:size=32,channels=3,classes=10,train={n_train},test={n_test}", device=dev)
    figures: dict[str, float] = {}
    errors: dict[str, str] = {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every variant too: a run killed by a time limit keeps what it measured
        device = (torch.cuda.get_device_name(dev) if dev.type == "cuda" else
                  f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
        settings = {"archs": archs, "variants": variants, "train_images": n_train, "test_images": n_test,
                    "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size, "warmup": args.warmup,
                    "reps": args.reps, "block": args.block, "loop_batches": args.loop_batches,
                    "reference": reference, "ref_batches": args.ref_batches, "ref_workers": args.ref_workers,
                    "points_per_pass": args.points_per_pass, "eval_reps": args.eval_reps,
                    "eval_only": args.eval_only}
        result = {"figures": figures, **({"errors": errors} if errors else {}), "device": device,
                  "torch": torch.__version__, "settings": settings}
        out.write_text(json.dumps(result, indent=2) + "\n")

    for arch in archs:
        points, evaluated = None, set()
        for variant in variants:
            t0 = time.time()
            try:
                got, points = bench_variant(arch, variant, data, dev, args, points, evaluated)
            except Exception as e:  # keep the other variants' figures; say what failed
                errors[f"{arch}/{variant}"] = f"{type(e).__name__}: {e}"
                print(f"{arch} {variant}: FAILED {type(e).__name__}: {e}", flush=True)
                continue
            figures.update({f"{k}/{arch}/{variant}": v for k, v in got.items()})
            if variant == variants[0]:
                figures.update({f"{k}/{arch}": v for k, v in got.items()})
            save()
            print(f"{arch} {variant}: " + ", ".join(f"{k} {v:.4g}" for k, v in got.items())
                  + f"  ({time.time() - t0:.0f} s)", flush=True)
        if reference and points is not None:
            t0 = time.time()
            got = bench_reference(arch, data, dev, args, points)
            figures.update({f"{k}/{arch}": v for k, v in got.items()})
            save()
            print(f"{arch} reference: " + ", ".join(f"{k} {v:.4g}" for k, v in got.items())
                  + f"  ({time.time() - t0:.0f} s)", flush=True)
    save()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
