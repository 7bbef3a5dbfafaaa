#!/usr/bin/env bash
# Set up (idempotent) and run the embedded demo: a tiny Llama fine-tuned with GOAT on a slice of
# BoolQ / ARC-Easy / OpenBookQA, on one CPU process. Outputs go to outputs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TORCH_EXTENSIONS_DIR="$PWD/.torch_extensions"
exec .venv/bin/python launch/train.py "$@"
