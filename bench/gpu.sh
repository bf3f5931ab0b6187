#!/usr/bin/env bash
# Every GPU figure of the project in one run, on one H100 or H200, in under 8 minutes; each figure is printed
# with the baseline it is compared to, measured in the same run on the same GPU:
#   1. the CUDA tests (tests/test_cuda.py: graph replay equals eager, dropout under replay, NaN on the device)
#   2. Fashion-MNIST CNN: engine images/s against a plain PyTorch loop (and the engine without its CUDA graph),
#      then the recipe trained to its test accuracy, at batch 128 and with the GPU batch sizes
#   3. nanoGPT's shakespeare_char config at 2000 steps: deeprecipe against nanoGPT itself (when NANOGPT names
#      a checkout of it; nothing is downloaded): validation loss and wall time
#   4. GPT-2 small's layout (12 x 768, context 1024): tokens/s and MFU against the measured bf16 matmul peak
#   5. every built-in recipe: 40 steps on CUDA from a cold start (a fresh process), wall time each
#
#   bash bench/gpu.sh [OUT_DIR]
# env: DEEPRECIPE_DATA (required), NANOGPT, PYTHON, SECTIONS="2 3" (some only), DEVICE=cpu QUICK=1 (a dry run)
set -u
OUT=${1:-${OUT:-/tmp/deeprecipe-gpu}}
mkdir -p "$OUT/runs"
PY=${PYTHON:-python3}
DEV=${DEVICE:-cuda}
QUICK=${QUICK:-0}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
q() { if [ "$QUICK" = 1 ]; then echo "$2"; else echo "$1"; fi; }  # the full value, or the dry run's
section() { echo; echo "== $1   [t+$(( $(date +%s) - START )) s]"; }
now() { date +%s.%N; }
secs() { $PY -c "print(f'{$2 - $1:.1f}')"; }
train() {  # train RUN_NAME RECIPE [--set ...]: the whole command, timed
  local name=$1 recipe=$2; shift 2
  local t=$(now)
  $PY -m deeprecipe.cli train "$recipe" --out "$OUT/runs/$name" --set train.device=$DEV "$@" >"$OUT/runs/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc, wall $(secs "$t" "$(now)") s"
  [ $rc = 0 ] || tail -3 "$OUT/runs/$name.log"
  return $rc
}
timed() {  # timed SECONDS NAME RECIPE [ARGS]: train under a time limit
  local limit=$1; shift
  timeout "$limit" bash -c 'train "$@"' _ "$@"
  local rc=$?
  [ $rc = 124 ] && echo "$1: stopped after $limit s (time limit)"
  return $rc
}
want() { [ -z "${SECTIONS:-}" ] || [[ " $SECTIONS " == *" $1 "* ]]; }
export -f q now secs train
export OUT PY DEV QUICK

section "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0], 'cuda', torch.cuda.is_available())"
git log -1 --format='deeprecipe commit %h %s' 2>/dev/null || true

if want 1; then
section "1. CUDA tests"
timeout 180 $PY -m pytest -q -p no:warnings -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -15

fi
if want 2; then
section "2a. Fashion-MNIST CNN, batch 128: deeprecipe vs a plain PyTorch loop (images/s over steps 10..N)"
timeout 150 $PY bench/classify_speed.py --device $DEV --steps $(q 2000 30) --contenders deeprecipe,plain
echo "-- the engine without its CUDA graph (same steps):"
timeout 90 $PY bench/classify_speed.py --device $DEV --steps $(q 2000 30) --contenders deeprecipe --set train.cuda_graph=false

section "2b. Fashion-MNIST CNN recipe to test accuracy (train_s: from the first step to the last, evaluations included)"
# b128: the CPU recipe as written; b512: what --device cuda runs (the recipe's cuda section)
for v in "b128|train.batch_size=128 train.steps=7000 optim.lr=0.004" "b512|" "b1024|train.batch_size=1024 train.steps=875 optim.lr=0.011"; do
  name=fm-${v%%|*}; sets=""
  for kv in ${v#*|} $( [ "$QUICK" = 1 ] && echo train.steps=20 ); do sets="$sets --set $kv"; done
  timed 120 $name fashion-mnist-cnn $sets && $PY bench/gpu_figures.py "$OUT/runs/$name" --skip 100
done

fi
if want 3; then
section "3. nanoGPT's shakespeare_char config, 2000 steps: deeprecipe vs nanoGPT (same GPU, one after the other)"
STEPS=$(q 2000 20)
CHAR="--set train.steps=$STEPS $( [ "$QUICK" = 1 ] && echo --set train.batch_size=4 --set data.block_size=32 )"
timed 150 char-gpt shakespeare-char-gpt-gpu $CHAR && $PY bench/gpu_figures.py "$OUT/runs/char-gpt" --skip 200
if [ -n "${NANOGPT:-}" ] && [ -f "$NANOGPT/train.py" ]; then
  rm -rf /tmp/nanogpt && cp -r "$NANOGPT" /tmp/nanogpt && mkdir -p /tmp/nanogpt/data/shakespeare_char
  cp "$DEEPRECIPE_DATA/tinyshakespeare/input.txt" /tmp/nanogpt/data/shakespeare_char/
  # its prepare.py imports requests only to download input.txt, which is already there
  (cd /tmp/nanogpt/data/shakespeare_char && $PY -c "import sys, types; sys.modules.setdefault('requests', \
    types.ModuleType('requests')); __file__ = 'prepare.py'; exec(open('prepare.py').read())" >/dev/null) \
    || echo "nanoGPT data preparation failed"
  t=$(now)
  (cd /tmp/nanogpt && timeout 240 $PY train.py config/train_shakespeare_char.py --max_iters=$STEPS --lr_decay_iters=$STEPS \
      --out_dir=/tmp/nanogpt/out --device=$DEV $( [ "$QUICK" = 1 ] && echo "--compile=False --eval_iters=2 --batch_size=4 --block_size=32" ) \
      >"$OUT/runs/nanogpt.log" 2>&1)
  echo "nanogpt: exit $?, wall $(secs "$t" "$(now)") s"
  grep "^step $STEPS:" "$OUT/runs/nanogpt.log" || tail -5 "$OUT/runs/nanogpt.log"
else
  echo "nanoGPT: not run (set NANOGPT to a checkout of it)"
fi
echo "-- deeprecipe with torch.compile:"
timed 150 char-gpt-compiled shakespeare-char-gpt-gpu $CHAR --set train.compile=$( [ "$QUICK" = 1 ] && echo false || echo true ) && $PY bench/gpu_figures.py "$OUT/runs/char-gpt-compiled" --skip 200

fi
if want 4; then
section "4. GPT-2 small layout: tokens/s and MFU"
PEAK=$(timeout 60 $PY bench/gpu_figures.py --peak-only)
echo "bf16 matmul peak (8192^3, best of 10): $PEAK TFLOP/s"
for b in $(q 32 2); do
  timed 200 gpt2-b$b shakespeare-bpe-gpt2-small --set train.steps=$(q 120 6) --set train.batch_size=$b \
    --set train.eval_every=0 --set train.log_every=10 $( [ "$QUICK" = 1 ] && echo --set model.n_layer=2 --set \
    model.n_embd=64 --set model.n_head=2 --set data.block_size=64 --set train.compile=false ) \
    && $PY bench/gpu_figures.py "$OUT/runs/gpt2-b$b" --skip $(q 40 0) --peak "$PEAK"
done

fi
if want 5; then
section "5. every built-in recipe: 40 steps on CUDA from a cold start (4 at a time, 4 CPU threads each)"
$PY -m deeprecipe.cli recipes | awk '{print $1}' > "$OUT/recipes.txt"
smoke() {
  local r=$1 t=$(now)
  OMP_NUM_THREADS=4 timeout 150 $PY -m deeprecipe.cli train "$r" --out "$OUT/smoke/$r" --set train.device=$DEV \
    --set train.steps=$(q 40 2) --set train.eval_every=0 --set train.limit_eval=512 >"$OUT/smoke/$r.log" 2>&1
  local rc=$? why=""
  [ $rc = 0 ] || why=" ($(grep -m1 -E '^error' "$OUT/smoke/$r.log" | cut -c1-150))"
  echo "$r: exit $rc, $(secs "$t" "$(now)") s$why"
}
mkdir -p "$OUT/smoke"
export -f smoke
LEFT=$(( ${BUDGET:-570} - ($(date +%s) - START) ))  # the script ends within BUDGET seconds
timeout $(( LEFT > 30 ? LEFT : 30 )) xargs -P 4 -I{} bash -c 'smoke {}' < "$OUT/recipes.txt"
[ $? = 124 ] && echo "(the recipes not listed above did not finish within the script's ${BUDGET:-570} s)"

fi
section "done"
