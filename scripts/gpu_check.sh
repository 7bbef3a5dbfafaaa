#!/usr/bin/env bash
# The GPU check (docs/CLUSTER.md, "GPU check"): one script a user or CI runs as is on a GPU node,
# under 10 minutes on one GPU. Each step is logged to <out>/<step>.log; a summary table follows
# and the exit status is non-zero when any step failed.
#
#   bash scripts/gpu_check.sh                  # on a node with 1+ CUDA GPUs
#   bash scripts/gpu_check.sh --cpu            # the same steps on the CPU, small shapes (tests the script)
#
# Steps:
#   layer_tests_*  tests/test_layer.py (fp32, every path/init/scaling against the official loop,
#                  bf16 base precision) and tests/test_device.py (fp32 + bf16, both compute paths,
#                  torch._grouped_mm on CUDA, no stray host tensor/sync, CUDA RNG in checkpoints)
#                  with `pytest --device cuda`
#   bench_layer_*  scripts/bench_layer.py at 7B-like shapes (n=m=4096, 8192 tokens, E=8, k=2, r=32)
#                  in bf16, adapters fp32 (GoatLinear's default) and bf16 (DeepSpeed bf16)
#   train_*        the tiny Llama on NCCL ranks (2 when 2+ GPUs, else 1): ZeRO-2, ZeRO-3
#                  (+ offload_param), ep_size=2 (2 GPUs), each held to the 1-rank ZeRO-0 run's
#                  losses (fp32, no dropout); then ZeRO-2 in bf16 (finite, decreasing loss)
#   smollm2_bf16   SmolLM2-135M-Instruct training steps in bf16, if models/SmolLM2-135M-Instruct exists
#
# Options: --cpu, --out DIR (default outputs/gpu_check), --python PATH (default .venv/bin/python
# when present, else python3), --skip-tests, --skip-bench (to rerun only the training steps).
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=cuda
OUT=outputs/gpu_check
PY=""
SKIP_TESTS=0
SKIP_BENCH=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) MODE=cpu ;;
    --out) OUT="$2"; shift ;;
    --python) PY="$2"; shift ;;
    --skip-tests) SKIP_TESTS=1 ;;
    --skip-bench) SKIP_BENCH=1 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}"
mkdir -p "$OUT"
rm -rf "${OUT:?}"/train_* "${OUT:?}"/smollm2_*

if [ "$MODE" = cuda ]; then
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
  if [ "${NGPU:-0}" -lt 1 ]; then
    echo "gpu_check: torch sees no CUDA device (install a CUDA torch build first, see README); use --cpu to check the script on the CPU" >&2
    exit 2
  fi
  NPROC=$(( NGPU >= 2 ? 2 : 1 ))
  "$PY" -c "import torch; print('gpu_check:', torch.__version__, 'CUDA', torch.version.cuda, [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
else
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  NPROC=2
  echo "gpu_check: --cpu mode (gloo, small shapes): checks the script, not a GPU"
fi

declare -a NAMES STATUS SECS
run_step() {   # run_step NAME TIMEOUT_S CMD...: log to $OUT/NAME.log, record status and time
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc
  echo "== $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  NAMES+=("$name"); SECS+=($((SECONDS - t0)))
  if [ $rc -eq 0 ]; then STATUS+=("ok"); else STATUS+=("FAIL($rc)"); tail -n 25 "$OUT/$name.log"; fi
  echo "   -> ${STATUS[-1]} in ${SECS[-1]} s (log: $OUT/$name.log)"
}
skip_step() { NAMES+=("$1"); STATUS+=("skipped: $2"); SECS+=(0); }

# ---------------------------------------------------------------- 1. layer tests on the device
if [ $SKIP_TESTS -eq 0 ]; then
  if [ "$MODE" = cuda ]; then
    run_step layer_tests_cuda 300 "$PY" -m pytest -q -p no:cacheprovider --device cuda \
      tests/test_layer.py tests/test_device.py
  else
    run_step layer_tests_cpu 300 "$PY" -m pytest -q -p no:cacheprovider --device cpu \
      tests/test_device.py tests/test_layer.py -k "grouped or bf16 or dense"
  fi
fi

# ---------------------------------------------------------------- 2. the layer benchmark
if [ $SKIP_BENCH -eq 0 ]; then
  if [ "$MODE" = cuda ]; then
    SHAPE=(--n 4096 --m 4096 --tokens 8192 --experts 8 --top-k 2 --rank 32 --iters 20 --warmup 5)
  else
    SHAPE=(--n 256 --m 256 --tokens 512 --experts 8 --top-k 2 --rank 32 --iters 3 --warmup 1)
  fi
  run_step bench_layer_bf16 300 "$PY" scripts/bench_layer.py --device "$MODE" --dtype bfloat16 "${SHAPE[@]}"
  run_step bench_layer_bf16_adapters 300 "$PY" scripts/bench_layer.py --device "$MODE" --dtype bfloat16 \
    --adapter-dtype same "${SHAPE[@]}"
fi

# ---------------------------------------------------------------- 3. tiny-model training on NCCL
TINY=(--config configs/demo.yaml train.max_steps=6 train.eval_every=0 train.save_every=0
      train.log_every=1 data.max_train_samples=96 data.max_eval_samples=8 data.max_length=96
      goat.lora_dropout=0.0 train.micro_batch_size=4 train.gradient_accumulation_steps=2)
TR=("$PY" -m torch.distributed.run --standalone)
run_step train_ref_1rank 300 "${TR[@]}" --nproc-per-node 1 launch/train.py "${TINY[@]}" \
  train.bf16=false train.gradient_accumulation_steps=$((2 * NPROC)) --output_dir "$OUT/train_ref"
run_step train_zero2 300 "${TR[@]}" --nproc-per-node "$NPROC" launch/train.py "${TINY[@]}" \
  train.bf16=false --ds_config ds_configs/zero2.json --output_dir "$OUT/train_zero2"
run_step train_zero3 300 "${TR[@]}" --nproc-per-node "$NPROC" launch/train.py "${TINY[@]}" \
  train.bf16=false --ds_config ds_configs/zero3.json --output_dir "$OUT/train_zero3"
if [ "$NPROC" -ge 2 ]; then
  run_step train_ep2 300 "${TR[@]}" --nproc-per-node 2 launch/train.py "${TINY[@]}" \
    train.bf16=false train.ep_size=2 --ds_config ds_configs/zero2.json --output_dir "$OUT/train_ep2"
else
  skip_step train_ep2 "one GPU"
fi
run_step train_zero2_bf16 300 "${TR[@]}" --nproc-per-node "$NPROC" launch/train.py "${TINY[@]}" \
  train.bf16=true --ds_config ds_configs/zero2.json --output_dir "$OUT/train_zero2_bf16"

# The distributed runs against the 1-rank run (fp32), the bf16 run against sanity bounds.
cat >"$OUT/compare.py" <<'EOF'
import json, math, os, sys
out = sys.argv[1]
def hist(name):
    path = os.path.join(out, name, "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return [h["loss"] for h in json.load(f)["history"]]
ref = hist("train_ref")
ok = ref is not None
print("reference (1 rank, ZeRO-0):", ref)
for name in ("train_zero2", "train_zero3", "train_ep2"):
    got = hist(name)
    if got is None:
        ok &= name == "train_ep2"      # ep2 runs only with 2 GPUs; the others must exist
        continue
    diff = max(abs(a - b) for a, b in zip(got, ref)) if ref and len(got) == len(ref) else float("inf")
    good = diff <= 1e-3
    ok &= good
    print(f"{name}: max |loss - reference| = {diff:.2e} ({'OK' if good else 'FAIL'} <= 1e-3)")
bf = hist("train_zero2_bf16")
good = bf is not None and ref is not None and all(math.isfinite(v) for v in bf) \
    and abs(bf[0] - ref[0]) < 0.05 and bf[-1] < bf[0]
ok &= good
print(f"train_zero2_bf16: losses {bf} ({'OK' if good else 'FAIL'}: finite, first within 0.05 "
      f"of fp32, decreasing)")
sys.exit(0 if ok else 1)
EOF
run_step train_compare 60 "$PY" "$OUT/compare.py" "$OUT"

# ---------------------------------------------------------------- 4. SmolLM2 in bf16
SMOL=models/SmolLM2-135M-Instruct
if [ -f "$SMOL/config.json" ]; then
  run_step smollm2_bf16 420 "${TR[@]}" --nproc-per-node "$NPROC" launch/train.py --config configs/smollm2_commonsense.yaml \
    --ds_config ds_configs/zero2.json --output_dir "$OUT/smollm2_bf16" train.bf16=true \
    data.train_file=data/demo/train.json data.eval_file=data/demo/eval.json \
    data.max_train_samples=128 data.max_eval_samples=8 train.max_steps=$([ "$MODE" = cuda ] && echo 10 || echo 2) \
    train.micro_batch_size=4 train.gradient_accumulation_steps=2 train.eval_every=0 train.save_every=0 \
    train.log_every=1
else
  skip_step smollm2_bf16 "no $SMOL (docs/SMOLLM2.md)"
fi

# ---------------------------------------------------------------- summary
echo
printf '%-28s %-24s %8s\n' step status seconds
FAILED=0
for i in "${!NAMES[@]}"; do
  printf '%-28s %-24s %8s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}"
  case "${STATUS[$i]}" in FAIL*) FAILED=1 ;; esac
done
for b in bench_layer_bf16 bench_layer_bf16_adapters; do
  [ -f "$OUT/$b.log" ] && echo "$b: $(tail -n 1 "$OUT/$b.log" | cut -c1-400)"
done
if [ $FAILED -ne 0 ]; then
  echo "gpu_check: FAILED (logs in $OUT)"
  exit 1
fi
echo "gpu_check: all steps passed (logs in $OUT)"
