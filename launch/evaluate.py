#!/usr/bin/env python
"""Evaluate a model (base, or base + goat_dist adapter) on lm-evaluation-harness tasks.

    python launch/evaluate.py --model models/SmolLM2-135M-Instruct --tasks commonsense_std
    torchrun --nproc-per-node 2 launch/evaluate.py --model ... --adapter outputs/run --tasks commonsense
    deepspeed --num_accelerators 2 launch/evaluate.py --model ... --tasks commonsense

The program itself is goat_dist/eval/cli.py (``main(argv) -> int``, also the ``goat-eval``
command); this file only makes it runnable from a checkout without installing the package.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from goat_dist.eval.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
