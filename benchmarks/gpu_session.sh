#!/usr/bin/env bash
# One prepared run on a GPU machine: CUDA correctness, the --full benchmark, and the CLI on Fashion-MNIST.
#
#   OUT=gpu-out bash benchmarks/gpu_session.sh        # from the repository root
#
# Everything ends up packed in $OUT/results.tgz too. The device tool brings back only a few files, so
# there run it as: OUT=/tmp/gout bash benchmarks/gpu_session.sh; cp /tmp/gout/results.tgz "$OUT"/
#
# Needs torch, torchvision, timm, typer, rich, safetensors, h5py; pytest is taken from .gpu-vendor/ when the
# machine has none (pip install --target .gpu-vendor pytest); Fashion-MNIST's four .gz files in
# data/fashion-mnist/ (for the cli part). Parts, in order: tests (tests/test_cuda.py), evalbatch (the
# evaluation of many networks in one pass: bench.py --eval-only), dist (torchrun over the GPUs present),
# evalcompile, bench (bench.py --full), compile, profile, cli, plane21 (a whole 21x21 plane, timed: alone in a
# call, see the part); SKIP names those to leave out. Each part has its own time limit and writes under $OUT, so a part that fails or
# runs out of time leaves the others' results; the whole run stays within DEADLINE seconds (default 540,
# under the device tool's 600 s per command), skipping what no longer fits.
set -u
DEADLINE=${DEADLINE:-540}
# limit WANT: WANT seconds, or what is left of the deadline (less a margin for packing the results)
limit() { local left=$((DEADLINE - SECONDS - 15)); echo $(($1 < left ? $1 : left)); }
fits() { [ $((DEADLINE - SECONDS - 15)) -ge "$1" ] || { log "skipped: $2 (deadline)"; return 1; }; }
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=.
${PY:-python3} -c "import pytest" 2>/dev/null || export PYTHONPATH=.:.gpu-vendor
PY=${PY:-python3}
MC="$PY -m mctool"
log() { echo "== $(date +%T) $*" | tee -a "$OUT/session.log"; }

log "device"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c "import torch; print(torch.__version__, torch.version.cuda)"; } \
  >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

DS=${DS:-fashion-mnist} ARCH=${ARCH:-cifar_preresnet20} DEVICE=${DEVICE:-cuda} EP=${EP:-3}
SKIP=${SKIP:-}  # parts to skip (tests evalbatch dist evalcompile bench compile profile cli plane21), e.g. "profile cli"
# part NAME: whether SKIP leaves it in (whole words: "evalcompile" does not skip "compile")
part() { [[ " $SKIP " != *" $1 "* ]]; }
# evalbatch: runs of the evaluation alone, each "P:variants:archs[:eval batch size]" (commas inside), in order; those in
# EVAL_RUNS_LATE after evalcompile
EVAL_RUNS=${EVAL_RUNS-"8:bf16+cl,bf16+cl+tune:cifar_preresnet110,cifar_vgg16 16:bf16+cl:cifar_preresnet110"}
# (an MLP's first layer from its points' control points, unmeasured on a GPU: batched_direct_over_sequential;
# a minute or so of the default session, before bench; EVAL_RUNS_LATE= leaves it out)
EVAL_RUNS_LATE=${EVAL_RUNS_LATE-"8:fp32,bf16:mlp"}
EVAL_RUN=0  # numbers the runs' output files

if part tests && fits 60 tests; then
log "pytest tests/test_cuda.py"
timeout "$(limit "${T_TESTS:-120}")" $PY -m pytest -q -s -p no:cacheprovider tests/test_cuda.py >"$OUT/test_cuda.txt" 2>&1
echo "rc=$?" >>"$OUT/test_cuda.txt"
tail -5 "$OUT/test_cuda.txt"
fi

evalbatch() {  # the EVAL_RUNS-style runs in $1
part evalbatch || return 0
for run in $1; do
  IFS=: read -r P VARIANTS ARCHS BS <<<"$run"
  BS=${BS:-1024}
  fits 60 "evaluation, $P networks to a pass, batch $BS" || break
  EVAL_RUN=$((EVAL_RUN + 1)); NAME="bench-eval-$EVAL_RUN-p$P-b$BS"
  log "bench --full --eval-only, $P networks to a pass, batch $BS: $VARIANTS on $ARCHS ($NAME)"
  # the reference-style baseline once, in the first run (the issue wants it measured in the same session)
  REF=--no-reference; [ -z "${EVAL_REFERENCE_DONE:-}" ] && REF=--reference && EVAL_REFERENCE_DONE=1
  timeout "$(limit "${T_EVALBATCH:-150}")" $PY benchmarks/bench.py --full --eval-only $REF \
    --points-per-pass "$P" --eval-batch-size "$BS" --eval-reps "${EVAL_REPS:-2}" --variants ${VARIANTS//,/ } \
    --archs ${ARCHS//,/ } --out "$OUT/$NAME.json" >"$OUT/$NAME.txt" 2>&1
  echo "rc=$?" >>"$OUT/$NAME.txt"
  grep -v Warning "$OUT/$NAME.txt"
done
}
evalbatch "$EVAL_RUNS"

if part dist && fits 90 dist; then
log "torchrun (NCCL): world 1 against plain, and scaling over the GPUs present"
NG=$($PY -c "import torch; print(torch.cuda.device_count())")
W=(1); [ "$NG" -ge 2 ] && W=(1 2); [ "$NG" -ge 4 ] && W=(1 2 4); [ "$NG" -ge 8 ] && W=(1 2 4 8)
timeout "$(limit "${T_DIST:-240}")" $PY benchmarks/scaling.py --device cuda --worlds "${W[@]}" \
  --arch cifar_preresnet20 --arch-kwargs '{}' --grid-points 7 --reps 2 ${DIST_ARGS:-} --out "$OUT/scaling.json" \
  >"$OUT/scaling.txt" 2>&1
echo "rc=$?" >>"$OUT/scaling.txt"
cat "$OUT/scaling.txt"
if [ "$NG" -ge 2 ] && fits 60 "distributed CUDA tests"; then
  timeout "$(limit 120)" $PY -m pytest -q -p no:cacheprovider tests/test_distributed.py -m cuda \
    >"$OUT/test_distributed_cuda.txt" 2>&1
  tail -3 "$OUT/test_distributed_cuda.txt"
fi
fi

if part evalcompile && fits 120 "evaluation --compile"; then
log "bench, PreResNet-110 curve points with the evaluation forward compiled (evaluate-curve --compile)"
timeout "$(limit "${T_EVALCOMPILE:-240}")" $PY benchmarks/bench.py --full --archs cifar_preresnet110 --no-reference \
  --variants bf16+cl+compile --eval-only --eval-reps 2 \
  --out "$OUT/bench-evalcompile.json" >"$OUT/bench-evalcompile.txt" 2>&1
echo "rc=$?" >>"$OUT/bench-evalcompile.txt"
grep -v Warning "$OUT/bench-evalcompile.txt"
fi

evalbatch "$EVAL_RUNS_LATE"

if part bench && fits 120 bench; then
log "bench --full"
timeout "$(limit "${T_BENCH:-300}")" $PY benchmarks/bench.py --full --out "$OUT/bench-full.json" >"$OUT/bench-full.txt" 2>&1
echo "rc=$?" >>"$OUT/bench-full.txt"
grep -v Warning "$OUT/bench-full.txt"
fi

if part compile && fits 90 "bench +compile"; then
log "bench --full, VGG16 with the curve passes compiled (connect --compile)"
timeout "$(limit "${T_COMPILE:-150}")" $PY benchmarks/bench.py --full --archs cifar_vgg16 --no-reference \
  --variants fp32+graphs fp32+graphs+compile bf16+cl+graphs bf16+cl+graphs+compile \
  --out "$OUT/bench-compile.json" >"$OUT/bench-compile.txt" 2>&1
echo "rc=$?" >>"$OUT/bench-compile.txt"
grep -v Warning "$OUT/bench-compile.txt"
fi

if part profile && fits 60 profile; then
log "profile"
# the passes over the parameters (and their torch.compile'd alternatives) do not depend on the variant
timeout "$(limit 120)" $PY benchmarks/profile_step.py --arch cifar_vgg16 --variant fp32 \
  >"$OUT/profile-vgg16-fp32.txt" 2>&1
fits 30 "bf16 profile" && timeout "$(limit 45)" $PY benchmarks/profile_step.py --arch cifar_vgg16 \
  --variant bf16+cl --no-passes >"$OUT/profile-vgg16-bf16+cl.txt" 2>&1
grep "== cifar" "$OUT/profile-vgg16-fp32.txt" "$OUT/profile-vgg16-bf16+cl.txt"
sed -n '/== passes/,$p' "$OUT/profile-vgg16-fp32.txt"
fi

if part cli && fits 40 CLI; then
log "CLI on $DS"
F="$OUT/cli"
mkdir -p "$F"
COMMON=(--data-root data --device "$DEVICE" --json -q --force)
T=(-d "$DS" -a "$ARCH" --epochs "$EP" --lr 0.1)
(
  set -e
  $MC train "${T[@]}" --seed 0 -o "$F/a.safetensors" --cuda-graphs "${COMMON[@]}" >"$F/a.json"
  $MC train "${T[@]}" --seed 1 -o "$F/b.safetensors" --cuda-graphs --precision bf16 --channels-last \
    "${COMMON[@]}" >"$F/b.json"
  $MC train "${T[@]}" --seed 0 -o "$F/a-eager.safetensors" "${COMMON[@]}" >"$F/a-eager.json"
  # --deterministic: the same command twice must give the same weights
  $MC train "${T[@]}" --epochs 1 --seed 0 -o "$F/d1.safetensors" --cuda-graphs --deterministic "${COMMON[@]}" >"$F/d1.json"
  $MC train "${T[@]}" --epochs 1 --seed 0 -o "$F/d2.safetensors" --cuda-graphs --deterministic "${COMMON[@]}" >"$F/d2.json"
  $PY -c "import sys, torch; from mctool.checkpoint import read_checkpoint as r; a, b = (r(f)[0] for f in sys.argv[1:])
print('deterministic runs identical:', all(torch.equal(a[k], b[k]) for k in a))" "$F/d1.safetensors" "$F/d2.safetensors" \
    | tee "$F/deterministic.txt"
  $MC connect "$F/a.safetensors" "$F/b.safetensors" --epochs 2 --lr 0.05 -o "$F/curve.safetensors" --cuda-graphs \
    "${COMMON[@]}" >"$F/curve.json"
  $MC evaluate-curve "$F/curve.safetensors" --num-points 5 --batch-size 1024 -m "$F/eval-fp32.h5" \
    "${COMMON[@]}" >"$F/eval-fp32.json"
  $MC evaluate-curve "$F/curve.safetensors" --num-points 5 --batch-size 1024 --precision bf16 --channels-last \
    -m "$F/eval-bf16.h5" "${COMMON[@]}" >"$F/eval-bf16.json"
  $MC plane "$F/curve.safetensors" --grid-points 5 --batch-size 1024 --precision bf16 --channels-last \
    -m "$F/plane.h5" "${COMMON[@]}" >"$F/plane.json"
  $MC fge "$F/a.safetensors" --epochs 2 --cycle-epochs 1 -o "$F/fge.safetensors" --cuda-graphs \
    "${COMMON[@]}" >"$F/fge.json"
) >"$F/log.txt" 2>&1 &
CLI_PID=$!
( sleep "$(limit "${T_CLI:-200}")"; kill "$CLI_PID" 2>/dev/null ) >/dev/null 2>&1 &
WATCH_PID=$!
wait "$CLI_PID"
echo "rc=$?" >>"$F/log.txt"
kill "$WATCH_PID" 2>/dev/null
rm -f "$F"/*.safetensors  # keep the metrics and summaries only
tail -20 "$F/log.txt"
for f in "$F"/*.json; do echo "--- $f"; head -c 1500 "$f"; echo; done
fi
if part plane21 && fits "${P21_MIN:-300}" "the whole plane"; then
# Issue 16's target, timed end to end: a 21 x 21 plane (and its 3 points) of PreResNet-110 on CIFAR-sized data
# (50,000 + 10,000 synthetic images), bf16 and channels-last, the default 8 networks to a pass. Last, and alone
# in its call when it is to finish (about 7 minutes on an H200):
#   DEADLINE=590 SKIP="tests evalbatch dist evalcompile bench compile profile cli" OUT=... bash benchmarks/gpu_session.sh
# Cut short, plane.txt says how many points were done in the time (the metrics file keeps them).
P21="$OUT/plane21"
mkdir -p "$P21"
P21_ARCH=${P21_ARCH:-cifar_preresnet110} P21_GRID=${P21_GRID:-21}
P21_DATA=${P21_DATA:-synthetic:size=32,channels=3,classes=10,train=50000,test=10000}
log "plane ${P21_GRID}x${P21_GRID} of $P21_ARCH on $P21_DATA, bf16 + channels-last"
for s in 0 1 2; do  # three networks (one epoch on 256 images: the time does not depend on the weights)
  timeout -k 10 "$(limit 90)" $MC train -d synthetic:size=32,channels=3,classes=10,train=256,test=64 \
    -a "$P21_ARCH" --epochs 1 --seed $s -o "$P21/n$s.safetensors" --device "$DEVICE" -q --force >>"$P21/plane.txt" 2>&1
done
T0=$SECONDS
timeout -k 10 "$(limit "${T_PLANE21:-600}")" $MC plane "$P21"/n0.safetensors "$P21"/n1.safetensors "$P21"/n2.safetensors \
  -d "$P21_DATA" --grid-points "$P21_GRID" --batch-size 1024 --precision bf16 --channels-last --device "$DEVICE" \
  -m "$P21/plane.h5" --json --force >"$P21/plane.json" 2>>"$P21/plane.txt"
echo "rc=$? wall $((SECONDS - T0)) s" >>"$P21/plane.txt"
$PY -c "import sys, numpy as np; from mctool.h5io import read_h5; d, _ = read_h5(sys.argv[1])
print('points done:', int(np.isfinite(d['train/loss']).sum()), 'of', d['train/loss'].size, 'grid cells')" \
  "$P21/plane.h5" >>"$P21/plane.txt" 2>&1
rm -f "$P21"/*.safetensors
tail -3 "$P21/plane.txt"
head -c 600 "$P21/plane.json"; echo
fi
# The device tool brings back only a few files: pack everything into one archive.
tar czf "$OUT.tgz" -C "$(dirname "$OUT")" "$(basename "$OUT")" && mv "$OUT.tgz" "$OUT/results.tgz"
log "done"
