"""Run launch/train.py for real in 1..N fresh processes (gloo on CPU), as a launcher would.

Each worker is a spawned process with the rank variables torchrun would set, so the trainer,
DeepSpeed and torch.distributed run exactly as in production; only the launcher is replaced by
``torch.multiprocessing`` (3-5 s per run instead of ~10 s for the deepspeed CLI).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from typing import Any, Optional

import torch.multiprocessing as mp
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DATA = os.path.join(ROOT, "data", "demo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_launch_module():
    spec = importlib.util.spec_from_file_location("goat_launch_train",
                                                  os.path.join(ROOT, "launch", "train.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _worker(rank: int, world: int, port: int, argv: list[str], result_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    import torch
    torch.set_num_threads(1)
    rc = load_launch_module().main(argv)
    with open(os.path.join(result_dir, f"rc{rank}"), "w") as f:
        f.write(str(rc))


def run_train(argv: list[str], world: int = 1, tmp_dir: Optional[str] = None) -> int:
    """Run ``launch/train.py argv`` on ``world`` ranks; returns rank 0's exit status."""
    import tempfile
    result_dir = tempfile.mkdtemp(dir=tmp_dir)
    ctx = mp.start_processes(_worker, args=(world, free_port(), argv, result_dir), nprocs=world,
                             start_method="spawn", join=False)
    while not ctx.join(timeout=600):
        pass
    with open(os.path.join(result_dir, "rc0")) as f:
        return int(f.read())


def tiny_config(path: str, output_dir: str, **sections: dict[str, Any]) -> str:
    """Write a tiny-llama run config on the demo data; ``sections`` update its sections."""
    cfg = {
        "model": {"preset": "tiny-llama", "task": "causal_lm", "vocab_size": 256},
        "data": {"train_file": os.path.join(DEMO_DATA, "train.json"),
                 "eval_file": os.path.join(DEMO_DATA, "eval.json"),
                 "format": "instruction", "max_length": 96, "max_train_samples": 64,
                 "max_eval_samples": 8},
        "goat": {"r": 8, "lora_alpha": 16, "num_experts": 4, "top_k": 2, "lora_dropout": 0.0,
                 "target_modules": "all-linear"},
        "optim": {"lr": 5.0e-3, "warmup_steps": 1},
        "train": {"output_dir": output_dir, "micro_batch_size": 2,
                  "gradient_accumulation_steps": 2, "max_steps": 5, "seed": 0, "log_every": 1},
    }
    for sec, values in sections.items():
        cfg[sec].update(values)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def read_summary(output_dir: str) -> dict:
    with open(os.path.join(output_dir, "summary.json")) as f:
        return json.load(f)


def losses(output_dir: str) -> list[float]:
    return [h["loss"] for h in read_summary(output_dir)["history"]]


def adapter_eval_loss(config_path: str, output_dir: str) -> float:
    """Eval loss of ``output_dir``'s exported adapter on the original preset base model, computed
    in this one process without DeepSpeed (the oracle for adapter export)."""
    import torch
    from goat_dist.adapter_io import load_adapter
    from goat_dist.train.config import load_run_config
    from goat_dist.train.data import collate, prepare_data
    from goat_dist.train.loop import count_targets, loss_sum
    from goat_dist.train.modeling import build_preset
    from goat_dist.train.tokenizer import load_tokenizer

    run = load_run_config(config_path)
    tok = load_tokenizer(os.path.join(output_dir, "tokenizer"))
    data = prepare_data(run.data, tok, "causal_lm", run.train.seed)
    model = build_preset("tiny-llama", len(tok), seed=run.train.seed, pad_token_id=tok.pad_token_id)
    goat = load_adapter(model, os.path.join(output_dir, "adapter")).eval()
    b = run.train.micro_batch_size
    total = n = 0.0
    with torch.no_grad():
        for i in range(0, len(data.eval), b):
            batch = collate([data.eval[j] for j in range(i, min(i + b, len(data.eval)))],
                            tok.pad_token_id)
            logits = goat(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total += loss_sum(logits, batch["labels"], "causal_lm").item()
            n += count_targets(batch["labels"], "causal_lm")
    return total / n
