"""Evaluate a base model, or a base model + goat_dist adapter, on lm-evaluation-harness tasks.

    python launch/evaluate.py --model models/SmolLM2-135M-Instruct --tasks commonsense_std
    python launch/evaluate.py --model models/SmolLM2-135M-Instruct \\
        --adapter outputs/smollm2_commonsense --tasks commonsense arithmetic --output_dir outputs/eval/goat
    torchrun --nproc-per-node 2 launch/evaluate.py --model ... --tasks commonsense   (requests sharded)
    deepspeed --num_accelerators 2 launch/evaluate.py --model ... --tasks commonsense

Tasks and groups (goat_dist/eval/tasks.py): ``commonsense`` (LLM-Adapters form, option scoring),
``commonsense_gen`` (the paper's generate + extract), ``commonsense_std`` (standard zero-shot form,
comparable with published lm-eval figures), ``arithmetic`` (GSM8K, AddSub, SVAMP), or single tasks
(``cs_arc_easy``, ``cs_std_piqa``, ``math_gsm8k`` ...). Test files come from data/eval (committed).

Writes ``<output_dir>/eval_results.json`` (lm-eval's results + model, adapter and its SHA-256,
dtype, library versions, time) and ``results.md`` (a table per task + group averages); with
``--log_samples`` also ``samples.jsonl`` (one line per record: task, doc_id, prediction, acc and
the options' log-likelihoods). In bf16, records whose best two options are within
``--rescore_margin`` nats are scored again in float32 (goat_dist/eval/near_ties.py).
Bad input (missing folder, adapter of another base model, unknown task, empty test file) is
reported in one line with exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import time
from typing import Optional


# nats. Calibrated on SmolLM2-135M (docs/RESULTS.md, "bf16 vs fp32 agreement"): bf16 moves the
# gap between two options by 0.07 nats (median) and up to ~1.3, but every flip seen had a bf16 gap
# under 0.25; rescoring below 0.25 gave 100 % agreement with fp32 on 700 standard-form records
# (7.6 % rescored) and 99.4 % on 700 LLM-Adapters-form records of the untrained base model, the
# worst case (20.7 % rescored: it scores the "answerN" options almost uniformly).
RESCORE_MARGIN = 0.25


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="goat-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local Hugging Face model folder (the base model)")
    p.add_argument("--adapter", default=None,
                   help="goat_dist adapter folder, a training run's output folder (its adapter/ export) or "
                        "one of its checkpoints/step_N folders")
    p.add_argument("--tasks", nargs="+", required=True,
                   help="task or group names (space- or comma-separated)")
    p.add_argument("--output_dir", default="outputs/eval", help="where eval_results.json and results.md go")
    p.add_argument("--dtype", default="auto",
                   help="auto (bfloat16 on CUDA and on CPUs with AVX512-BF16/AMX, else float32), "
                        "float32, bfloat16 or float16")
    p.add_argument("--batch_size", type=int, default=16, help="requests per forward, per rank")
    p.add_argument("--limit", type=int, default=0, help="first N records of each test set (0 = all)")
    p.add_argument("--data_dir", default=None, help="folder with <source>/test.json (default: data/eval)")
    p.add_argument("--prompt_template", default="alpaca",
                   help="prompt of the LLM-Adapters tasks: alpaca (as training) or a string with {instruction}")
    p.add_argument("--max_length", type=int, default=None,
                   help="max tokens per request (default: the model's max_position_embeddings)")
    p.add_argument("--rescore_margin", type=float, default=RESCORE_MARGIN,
                   help="with a bfloat16/float16 dtype: multiple-choice records whose best two "
                        "options are within this many nats (per character for acc_norm: divided "
                        "by the shorter option's length) are scored again in float32, so "
                        "rounding cannot change their prediction; 0 = off (default "
                        f"{RESCORE_MARGIN}, see docs/EVALUATION.md)")
    p.add_argument("--log_samples", action="store_true",
                   help="also write samples.jsonl (per-record prediction and option log-likelihoods)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher; read from the environment otherwise")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.limit < 0 or not args.rescore_margin >= 0:
        p.error("--batch_size must be >= 1, --limit >= 0 and --rescore_margin >= 0")
    return args


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("goat_dist", "lm_eval", "torch", "transformers", "datasets", "deepspeed"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def _init_distributed():
    """Join the launcher's process group (torchrun / deepspeed / srun), or stay single-process."""
    import torch
    import torch.distributed as dist

    from ..train.cli import rendezvous_env

    os.environ.update(rendezvous_env(os.environ))
    world = int(os.environ["WORLD_SIZE"])
    if world == 1 or dist.is_initialized():
        return None
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, (cores or 1) // local_world))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.group.WORLD


def evaluate_folder(args: argparse.Namespace) -> Optional[dict]:
    """Validate, load, evaluate, write. Returns the written results on rank 0 (None elsewhere).

    Raises:
        EvalInputError: bad input, before the model is loaded or anything is written.
    """
    import torch
    import torch.distributed as dist

    from .lm import load_model, make_lm, resolve_dtype, sha256_of_folder
    from .results import (
        group_averages,
        markdown_table,
        predictions,
        run_evaluation,
        task_metrics,
        to_json,
        write_atomic,
    )
    from .tasks import (
        DEFAULT_DATA_DIR,
        TASKS,
        EvalInputError,
        build_tasks,
        load_records,
        resolve_tasks,
        task_file,
    )

    names = resolve_tasks(args.tasks)
    dtype = resolve_dtype(args.dtype)
    data_dir = args.data_dir or DEFAULT_DATA_DIR
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for n in names:  # every file checked before the model is loaded
        recs = load_records(task_file(TASKS[n], data_dir))
        if min(len(recs), args.limit or len(recs)) < world:
            raise EvalInputError(f"task {n} has {min(len(recs), args.limit or len(recs))} records "
                                 f"for {world} ranks (every rank needs one); use fewer ranks")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise EvalInputError(f"--output_dir {args.output_dir!r} is a file; pass a folder")

    # lm-eval warns on every model instance ("pretrained is not a str") and custom dataset;
    # both are how goat_dist uses it on purpose
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    started = time.time()
    model, tokenizer, adapter_dir = load_model(args.model, args.adapter, dtype)
    group = _init_distributed()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    tasks = build_tasks(names, data_dir, args.prompt_template, eos_text=tokenizer.eos_token or "",
                        limit=args.limit)
    fp32_copy: list = []

    def fp32_model():
        # loaded on first use only: most evaluations have a few near ties, some none
        if not fp32_copy:
            fp32_copy.append(load_model(args.model, args.adapter, torch.float32)[0].to(device))
        return fp32_copy[0]

    lm = make_lm(model, tokenizer, batch_size=args.batch_size, max_length=args.max_length,
                 group=group, fp32_model=None if dtype == torch.float32 else fp32_model,
                 rescore_margin=args.rescore_margin)
    # acc / acc_norm are means: lm-eval gives their stderr in closed form (no bootstrap is run)
    res = run_evaluation(lm, tasks, log_samples=args.log_samples, bootstrap_iters=100000)
    rescored = torch.tensor([lm.rescored[k] for k in ("records", "requests", "of_requests")],
                            dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(rescored)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank != 0:
        return None
    metrics = task_metrics(res)
    averages = group_averages(metrics)
    n_docs = {t: v.get("effective", v.get("original")) for t, v in res.get("n-samples", {}).items()}
    elapsed = time.time() - started
    out = {
        # as given, not made absolute: a results folder committed to a repository (the method
        # study's) then names no path of the machine it ran on; adapter_sha256 pins the weights
        "model": args.model,
        "adapter": adapter_dir,
        "adapter_sha256": sha256_of_folder(adapter_dir) if adapter_dir else None,
        "dtype": str(dtype).replace("torch.", ""),
        "rescored_in_float32": None if dtype == torch.float32 else {
            "margin_nats": args.rescore_margin, "records": int(rescored[0]),
            "requests": int(rescored[1]), "of_requests": int(rescored[2])},
        "tasks": names,
        "limit": args.limit,
        "batch_size": args.batch_size,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "prompt_template": args.prompt_template,
        "versions": _versions(),
        "started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(),
        "seconds": round(elapsed, 2),
        "metrics": metrics,
        "averages": averages,
        "n_samples": n_docs,
        "lm_eval": {k: res[k] for k in ("results", "n-samples", "higher_is_better", "versions")
                    if k in res},
    }
    os.makedirs(args.output_dir, exist_ok=True)
    if args.log_samples:
        import json
        lines = []
        for task, samples in res.get("samples", {}).items():
            preds = predictions(samples)
            for s in samples:
                resps = s["filtered_resps"]
                lls = ([r[0] for r in resps] if resps and isinstance(resps[0], (list, tuple))
                       else None)    # multiple choice: (loglikelihood, is_greedy) per option
                lines.append(json.dumps({"task": task, "doc_id": s["doc_id"],
                                         "prediction": preds[s["doc_id"]], "target": s["target"],
                                         "acc": s.get("acc"), "loglikelihoods": lls}, default=str))
        write_atomic(os.path.join(args.output_dir, "samples.jsonl"), "\n".join(lines) + "\n")
    title = f"# {os.path.basename(os.path.normpath(args.model))}" + (
        f" + {adapter_dir}" if adapter_dir else "")
    md = (f"{title}\n\ndtype {out['dtype']}, {out['world_size']} rank(s), {elapsed:.1f} s, "
          f"lm-eval {out['versions'].get('lm_eval')}\n\n" + markdown_table(metrics, averages, n_docs))
    write_atomic(os.path.join(args.output_dir, "results.md"), md)
    write_atomic(os.path.join(args.output_dir, "eval_results.json"), to_json(out))
    print(md)
    print(f"goat_dist: wrote {os.path.join(args.output_dir, 'eval_results.json')} ({elapsed:.1f} s)")
    return out


def main(argv: list[str] | None = None) -> int:
    """The ``goat-eval`` command: 0 on success, 2 on bad input (one line on stderr)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from .tasks import EvalInputError

    try:
        evaluate_folder(args)
    except EvalInputError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"goat_dist: error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
