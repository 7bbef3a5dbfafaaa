#!/usr/bin/env bash
# Every SmolLM2-135M study of docs/RESULTS.md, one after the other, each resumable: rerun this
# script after any interruption and it continues where it stopped (finished units are skipped,
# an interrupted training resumes from its checkpoint).
#
#   1. the method table: learning-rate sweep (LoRA, GOAT) on the validation split, then seven
#      methods x 3 seeds and the zero-shot base on the full commonsense_std test sets;
#   2. the expert-count study: GOAT with E in {2,4,8,16} x top_k in {1,2} at total rank 32, plus
#      E=8 top_k=2 at ep_size=2 (same accuracy as ep_size=1 expected);
#   3. the secondary table: LoRA and GOAT trained and evaluated in the paper's LLM-Adapters form
#      ("the correct answer is answerN"), same records, batch and schedule, and the zero-shot
#      base in that form; scored on the first 500 test records per task (3,500 records: this
#      form's prompts are long and it is the secondary table).
#
# Usage (about 20 hours on a 2-vCPU machine, hours on a GPU; run it in the background):
#   nohup bash scripts/smollm2_studies.sh > outputs/smollm2_studies.log 2>&1 &
#   bash scripts/smollm2_studies.sh --dry-run        # the three plans, nothing run
# Extra arguments go to every scripts/compare_methods.py command (e.g. --dry-run, --model DIR).
# Stop it with `kill -TERM <pid of this script>`: the running trainer checkpoints first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi   # scripts/setup_env.sh's environment

child=""
# forward SIGTERM/SIGINT to the running study, which stops its unit with a checkpoint
trap 'if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null || true; wait "$child" || true; fi; exit 130' TERM INT

study() {
    "$PY" scripts/compare_methods.py "$@" &
    child=$!
    wait "$child"
    child=""
}

study --config configs/smollm2_std.yaml --lrs 1e-4 2e-4 5e-4 1e-3 --seeds 0 1 2 --eval-procs 2 \
    --study-dir results/compare_methods "$@"

study --config configs/smollm2_std.yaml --methods --expert-grid 2 4 8 16 --top-k 1 2 \
    --ep-size 1 --expert-points 8:2:2 --lrs 2e-4 --seeds 0 --eval-procs 2 \
    --study-dir results/expert_count "$@"

study --config configs/smollm2_commonsense.yaml --methods lora goat base --lrs 2e-4 --seeds 0 \
    --test-tasks commonsense --limit 500 --eval-procs 2 \
    --set data.max_train_samples=4096 train.max_steps=0 train.num_epochs=1 \
          train.micro_batch_size=8 train.gradient_accumulation_steps=2 train.eval_every=0 \
          train.save_every=32 train.log_every=4 train.bf16=auto \
    --study-dir results/llm_adapters_form "$@"
