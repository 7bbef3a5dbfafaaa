#!/usr/bin/env bash
# The test suite, as README.md runs it: CPU only, gloo, one thread per rank, nothing downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TORCH_EXTENSIONS_DIR="$PWD/.torch_extensions"
# The venv's bin first, as `activate` would: DeepSpeed JIT-builds its ops with whichever `ninja`
# is on PATH, and the venv's (pip, 1.13) and Debian's (/usr/bin, 1.11) hash build commands
# differently, so a process that finds the other one rebuilds the op (~30 s) for every rank.
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest -q "$@"
