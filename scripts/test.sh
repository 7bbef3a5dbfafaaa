#!/usr/bin/env bash
# The test suite, as README.md runs it: CPU only, gloo, one thread per rank, nothing downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TORCH_EXTENSIONS_DIR="$PWD/.torch_extensions"
exec .venv/bin/python -m pytest -q "$@"
