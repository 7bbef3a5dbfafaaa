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
from typing import Any, Callable, Optional

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


def _worker(rank: int, world: int, port: int, argv: list[str], result_dir: str,
            hook: Optional[Callable[[int], None]] = None) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    import torch
    torch.set_num_threads(1)
    if hook is not None:
        hook(rank)      # a test's fault injection (NaN, signal, kill, sleep), in this rank
    rc = load_launch_module().main(argv)
    write_status(result_dir, rank, rc)
    leave_process_group_and_exit(rc)     # the process exits with main()'s status, as launched


def write_status(result_dir: str, rank: int, rc: int) -> None:
    """Record ``rank``'s main() status for the parent, atomically (temporary file, then rename).

    Why atomic: once one rank dies, the parent SIGKILLs the others, as a launcher does, and a
    rank killed between opening its status file and writing it used to leave an empty file
    behind (CI once failed on ``int('')``). With the rename, the file either holds the whole
    status or is absent, and an absent file means the process's own exit code is used.
    """
    path = os.path.join(result_dir, f"rc{rank}")
    with open(path + ".tmp", "w") as f:
        f.write(str(rc))
    os.replace(path + ".tmp", path)


def read_status(result_dir: str, rank: int) -> Optional[int]:
    """The status ``write_status`` recorded for ``rank``, or None when it recorded none."""
    path = os.path.join(result_dir, f"rc{rank}")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return int(f.read())


def leave_process_group_and_exit(status: int = 0) -> None:
    """End a spawned rank: barrier, destroy the process group, flush, ``os._exit(status)``.

    Why not a normal return: in a rank that ran ``deepspeed.zero.Init`` on a transformers model,
    the world ProcessGroupGloo outlives ``destroy_process_group``: its threads (``gloo_tcp_loop``,
    two ``pt_gloo_runloop``, and rank 0's TCPStore server ``pt_tcpstore_uv``) are still running
    afterwards, and no Python reference is left to drop (DeepSpeed's own group caches are empty;
    a plain gloo world, or zero.Init on an nn.Linear, leaves no thread). The interpreter's
    teardown and the C++ static destructors then run beside live gloo threads, and a few percent
    of such exits abort with "terminate called without an active exception" (SIGABRT, exit -6).
    ``os._exit`` ends the process without that teardown, after everything is written and
    flushed. See docs/CLUSTER.md ("Exit statuses") for the evidence.
    """
    import sys
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_train_ranks(argv: list[str], world: int = 1, tmp_dir: Optional[str] = None,
                    hook: Optional[Callable[[int], None]] = None,
                    timeout_s: float = 900) -> list[Optional[int]]:
    """Run ``launch/train.py argv`` on ``world`` spawned ranks, as a launcher would: when a rank
    dies (a signal, a crash: status 1, or a lost peer: status 4), the others are SIGKILLed, like
    srun --kill-on-bad-exit or torchrun do. Statuses every rank reaches by itself (0, 2 bad
    input, 3 diverged, 75 stopped) let the others finish on their own.

    Args:
        hook: a picklable ``hook(rank)`` run in each rank before the trainer (fault injection).
        timeout_s: generous bound on the whole run (a safety net, not a timing assertion).

    Returns:
        Each rank's exit status: main()'s return value, or -signal / the process exit code for a
        rank that did not return (killed, crashed).
    """
    import tempfile
    import time
    result_dir = tempfile.mkdtemp(dir=tmp_dir)
    ctx = mp.start_processes(_worker, args=(world, free_port(), argv, result_dir, hook),
                             nprocs=world, start_method="spawn", join=False)
    procs = ctx.processes
    deadline = time.monotonic() + timeout_s
    while any(p.is_alive() for p in procs):
        failed = [p for p in procs
                  if p.exitcode is not None and (p.exitcode < 0 or p.exitcode in (1, 4))]
        if failed or time.monotonic() > deadline:
            for p in procs:
                if p.is_alive():
                    p.kill()
        time.sleep(0.05)   # polls process state only; no test outcome depends on this timing
    for p in procs:
        p.join()
    rcs: list[Optional[int]] = []
    for rank, p in enumerate(procs):
        status = read_status(result_dir, rank)
        if status is not None:
            rcs.append(status)
            continue
        rcs.append(p.exitcode)
        err = ctx.error_files[rank]
        if err and os.path.isfile(err) and os.path.getsize(err):   # the rank raised: show why
            import pickle
            import sys
            with open(err, "rb") as f:
                print(f"-- rank {rank} raised:\n{pickle.load(f)}", file=sys.stderr)
    return rcs


def run_train(argv: list[str], world: int = 1, tmp_dir: Optional[str] = None,
              hook: Optional[Callable[[int], None]] = None) -> int:
    """Run ``launch/train.py argv`` on ``world`` ranks; returns rank 0's exit status."""
    return run_train_ranks(argv, world, tmp_dir, hook)[0]


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
        # bf16 pinned off: "auto" picks bf16 on CPUs with native bf16 (this one, maybe not CI's),
        # and the tests compare runs within fp32 tolerances.
        "train": {"output_dir": output_dir, "micro_batch_size": 2,
                  "gradient_accumulation_steps": 2, "max_steps": 5, "seed": 0, "log_every": 1,
                  "bf16": False},
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


def load_script(name: str):
    """Import ``scripts/<name>.py`` as a module (scripts are not a package)."""
    import sys
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # dataclasses resolve string annotations through it
    spec.loader.exec_module(mod)
    return mod


def set_subprocess_env(monkeypatch) -> None:
    """The environment scripts/test.sh gives the training/evaluation subprocesses a study starts:
    CPU DeepSpeed, one thread, nothing downloaded, JIT-built ops cached in the repository."""
    for k, v in {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                 "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}.items():
        monkeypatch.setenv(k, v)
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".torch_extensions"))
