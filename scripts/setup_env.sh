#!/usr/bin/env bash
# Build goat_dist's virtual environment in .venv (idempotent). CPU machines: torch's CPU wheel is
# installed first so deepspeed's `torch>=2.0` requirement cannot pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q -U pip
python -m pip install -q -c constraints.txt torch
python -m pip install -q -c constraints.txt -e '.[test,gguf]'
# DeepSpeed JIT-builds its shared-memory comm op on every init_distributed; build it once here
# (machine-local cache, never committed: cpu ops are compiled with -march=native).
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export TORCH_EXTENSIONS_DIR="$PWD/.torch_extensions"
python - <<'PY'
from deepspeed.accelerator import get_accelerator
acc = get_accelerator()
if acc.device_name() == "cpu":
    acc.create_op_builder("ShareMemCommBuilder").load()
PY
