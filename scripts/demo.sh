#!/usr/bin/env bash
# Set up (idempotent) and run the embedded demo: a tiny Llama fine-tuned with GOAT on a slice of
# BoolQ / ARC-Easy / OpenBookQA, on one CPU process. Outputs go to outputs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TORCH_EXTENSIONS_DIR="$PWD/.torch_extensions"
# The venv's bin first, as `activate` would: DeepSpeed JIT-builds its ops with whichever `ninja`
# is on PATH, and the venv's (pip, 1.13) and Debian's (/usr/bin, 1.11) hash build commands
# differently, so a process that finds the other one rebuilds the op (~30 s) for every rank.
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python launch/train.py "$@"
