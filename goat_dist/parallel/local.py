"""Join a single-machine CPU world as one of its ranks (spawned benchmark/test workers).

What torchrun would do for a worker: rank variables for 127.0.0.1, one thread per rank (two
ranks on two cores must not oversubscribe them), DeepSpeed's CPU accelerator, and a gloo group.
"""

from __future__ import annotations

import datetime
import os


def init_local_process_group(rank: int, world: int, port: int, timeout_s: int = 300) -> None:
    """Set this process up as ``rank`` of a ``world``-rank gloo group on 127.0.0.1:``port``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    import torch
    torch.set_num_threads(1)
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
