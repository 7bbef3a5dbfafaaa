#!/usr/bin/env python
"""What a GOAT adapter costs an evaluation forward, by the dtype its experts run in.

One scoring forward (``logits_to_keep=1``, as goat_dist/eval/prefix.py's context pass) of the
same token batch, side by side in one process, the variants alternating per repetition:

* ``base``: the bare model in the evaluation dtype (bf16 where native, else fp32);
* ``goat_experts_fp32``: + the adapter with its experts in float32, as load_adapter leaves them
  (what ``launch/evaluate.py`` did before ``goat_dist.eval.lm.adapter_compute_dtype``: every
  adapted layer casts its output up and runs the expert GEMMs in fp32);
* ``goat``: + the adapter as ``launch/evaluate.py`` loads it now (experts in the evaluation
  dtype, router in fp32).

Prints the median seconds of each and, as the last line, JSON with each variant's time over
``base`` and ``speedup`` (goat_experts_fp32 / goat). Without ``--adapter`` it builds the GOAT
adapter of configs/smollm2_std.yaml at its SVD initialisation (r 32, E 8, k 2, q/k/v/up/down);
the cost does not depend on the trained values.

    python scripts/bench_eval_forward.py                       # SmolLM2, ~2 minutes
    OMP_NUM_THREADS=1 python scripts/bench_eval_forward.py --adapter outputs/smollm2_commonsense
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench_common import cpu_model  # noqa: E402

from goat_dist.eval.lm import adapter_compute_dtype, load_model, resolve_dtype  # noqa: E402


def goat_init_adapter(model_dir: str, out_dir: str) -> str:
    """Save configs/smollm2_std.yaml's GOAT adapter at its SVD initialisation to ``out_dir``."""
    from transformers import AutoModelForCausalLM

    from goat_dist import GoatConfig, get_goat_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True,
                                                 dtype=torch.float32)
    cfg = GoatConfig(r=32, lora_alpha=64, num_experts=8, top_k=2, init="goat",
                     target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    get_goat_model(model, cfg).save_pretrained(out_dir)
    return out_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(REPO, "models", "SmolLM2-135M-Instruct"))
    p.add_argument("--adapter", default=None, help="goat_dist adapter (default: GOAT at init)")
    p.add_argument("--dtype", default="auto", help="evaluation dtype (default: as evaluate.py)")
    p.add_argument("--batch", type=int, default=12, help="sequences per forward")
    p.add_argument("--seq", type=int, default=160, help="tokens per sequence")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    dtype = resolve_dtype(args.dtype)

    with tempfile.TemporaryDirectory() as tmp:
        adapter = args.adapter or goat_init_adapter(args.model, os.path.join(tmp, "goat"))
        models = {"base": load_model(args.model, None, dtype)[0]}
        old, _, _ = load_model(args.model, adapter, dtype)
        adapter_compute_dtype(old, torch.float32)            # the experts as load_adapter saves them
        models["goat_experts_fp32"] = old
        models["goat"] = load_model(args.model, adapter, dtype)[0]

    ids = torch.randint(0, 40000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():                            # warm-up (oneDNN kernel selection)
            m(input_ids=ids, logits_to_keep=1)
        for _ in range(args.reps):
            for name, m in models.items():
                t = time.perf_counter()
                m(input_ids=ids, logits_to_keep=1)
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:>18}: {v:.3f} s per forward ({v / med['base']:.2f}x base)")
    out = {"dtype": str(dtype).replace("torch.", ""), "batch": args.batch, "seq": args.seq,
           "threads": torch.get_num_threads(), "reps": args.reps,
           "seconds": {k: round(v, 4) for k, v in med.items()},
           "vs_base": {k: round(v / med["base"], 3) for k, v in med.items()},
           "speedup": round(med["goat_experts_fp32"] / med["goat"], 3),
           "cpu": cpu_model(), "loadavg": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
