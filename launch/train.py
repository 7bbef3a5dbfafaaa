#!/usr/bin/env python
"""Fine-tune a Hugging Face model with GOAT adapters on DeepSpeed.

    deepspeed --num_accelerators 2 launch/train.py --ds_config ds_configs/zero3.json --config configs/demo.yaml
    torchrun --nproc-per-node 2 launch/train.py --ds_config ds_configs/zero2.json --config run.yaml train.max_steps=50
    srun ... python launch/train.py ...          (ranks from SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS)
    python launch/train.py                       (the embedded demo: configs/demo.yaml, one process)

The program itself is goat_dist/train/cli.py (also installed as the ``goat-train`` command); this
file only makes it runnable from a checkout without installing the package.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from goat_dist.train.cli import (DEMO_CONFIG, ROOT, config_reference, first_host, main,  # noqa: E402,F401
                                 parse_args, rendezvous_env)

if __name__ == "__main__":
    sys.exit(main())
