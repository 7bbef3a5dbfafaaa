#!/usr/bin/env python
"""Trainer benchmark: goat_dist's trainer (GOAT, and plain LoRA) against transformers.Trainer + peft.

What a user would otherwise run is ``transformers.Trainer`` + peft LoRA + DeepSpeed. This script
runs, side by side in one invocation, under the SAME DeepSpeed JSON, model, data, micro-batches,
sequence lengths and number of ranks:

  goat   goat_dist's trainer (goat_dist.train.loop.Trainer, what launch/train.py runs) with GOAT
         (E=8 experts, top-2, total rank r=32, init goat: SVD priors + residual correction)
  lora   goat_dist's trainer with a plain LoRA of the same rank (E=1, top-1, init molora)
  peft   transformers.Trainer + peft LoRA (r=32, same alpha/dropout/targets), ``deepspeed=`` the
         same JSON (its "auto" values filled by transformers from the same hyper-parameters)

Same micro-batches: the examples are goat_dist's tokenized records; transformers.Trainer gets them
in goat_dist's StepPlan order with ``train_sampling_strategy="sequential"``, which hands global
micro-batch u of a step to rank u mod W at accumulation step u // W, as StepPlan does. Both
collate with goat_dist's ``collate`` (padding to the longest of the micro-batch), so every step
of every variant processes the same tokens. Both log every step (goat_dist: TensorBoard + tqdm;
transformers: its logging, ``report_to="tensorboard"``); neither evaluates nor checkpoints
during the timed steps.

Timing: each job (one variant, one stage, one dtype) is a fresh set of spawned ranks (gloo on the
CPU, NCCL on GPUs). A step's time is the interval between consecutive optimizer-step ends
(``--warmup`` steps are dropped), so it includes everything the loop does per step: collation,
forward/backward, optimizer, loss/metric syncs and logging. Jobs are interleaved: repetition i
runs the variants in an order rotated by i; medians over the timed steps of a job, then over
repetitions. Ratios are of step times (goat_over_peft_trainer = goat's / peft's), plus paired
ratios (within each repetition, median over repetitions), which resist load drift on a shared
machine. Peak memory per rank: ``ru_maxrss`` (RSS high-water mark of the rank's process) on the
CPU, ``torch.cuda.max_memory_allocated`` on GPUs.

Stages: zero1 / zero2 (ds_configs/zero2.json, stage 1 or 2), zero3 (ds_configs/zero3.json:
offload_param), zero3_offload (ds_configs/zero3_offload.json: + offload_optimizer, DeepSpeed's
CPU Adam). ``--dtypes fp32 bf16`` adds bf16 jobs (train.bf16=true / TrainingArguments.bf16);
with both, the JSON also reports each variant's bf16_over_fp32 step-time ratio per stage.

Output: a table, then as the LAST line one JSON object with goat_over_peft_trainer and
lora_over_peft_trainer (first stage and dtype), and every figure per stage/dtype.

    python scripts/bench_train.py                       # SmolLM2-135M if installed, else tiny
    python scripts/bench_train.py --model tiny --stages zero2 --reps 1 --steps 2
    python scripts/bench_train.py --variants goat --dtypes fp32 bf16 --stages zero1 zero2 zero3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from _bench_common import cpu_model, free_port  # noqa: E402

SMOLLM2 = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct")
STAGE_FILES = {"zero1": ("zero2.json", 1), "zero2": ("zero2.json", 2), "zero3": ("zero3.json", 3),
               "zero3_offload": ("zero3_offload.json", 3)}
VARIANTS = ("goat", "lora", "peft")


# ----------------------------------------------------------------------------- preparation
def prepare_tiny(work: str, data_file: str) -> tuple[str, str]:
    """A tiny-llama HF folder + sentencepiece tokenizer (for machines without SmolLM2)."""
    from goat_dist.train.config import DataConfig
    from goat_dist.train.data import corpus_texts, load_splits
    from goat_dist.train.modeling import build_preset
    from goat_dist.train.tokenizer import load_tokenizer, train_sentencepiece_tokenizer
    d = os.path.join(work, "tiny_model")
    tok_file = os.path.join(d, "tokenizer.model")
    if not os.path.isfile(os.path.join(d, "config.json")):
        cfg = DataConfig(train_file=data_file)
        train_sentencepiece_tokenizer(corpus_texts(load_splits(cfg, "causal_lm", 0).train, cfg),
                                      512, d)
        tok = load_tokenizer(tok_file)
        build_preset("tiny-llama", len(tok), seed=0, pad_token_id=tok.pad_token_id).save_pretrained(d)
    return d, tok_file


def ds_config_file(work: str, stage: str) -> str:
    """The stage's DeepSpeed JSON (from ds_configs/), written to the work dir."""
    name, zstage = STAGE_FILES[stage]
    with open(os.path.join(ROOT, "ds_configs", name)) as f:
        ds = json.load(f)
    ds["zero_optimization"]["stage"] = zstage
    path = os.path.join(work, f"ds_{stage}.json")
    with open(path, "w") as f:
        json.dump(ds, f, indent=1)
    return path


def run_config(args, variant: str, dtype: str, out: str) -> list[str]:
    """goat_dist run-config overrides of a job (the same hyper-parameters feed transformers)."""
    goat = (dict(num_experts=args.experts, top_k=args.top_k, init="goat") if variant == "goat"
            else dict(num_experts=1, top_k=1, init="molora"))
    ov = {"model.name_or_path": args.model_dir, "model.task": "causal_lm",
          "data.train_file": args.data, "data.eval_file": None, "data.eval_fraction": 0.0,
          "data.format": "instruction",
          "data.max_length": args.max_length, "data.max_train_samples": args.max_train_samples,
          "goat.r": args.rank, "goat.lora_alpha": 2 * args.rank, "goat.lora_dropout": 0.05,
          "goat.target_modules": args.targets, "goat.num_experts": goat["num_experts"],
          "goat.top_k": goat["top_k"], "goat.init": goat["init"],
          "optim.lr": 1e-4, "optim.warmup_ratio": 0.03, "optim.max_grad_norm": 1.0,
          "train.micro_batch_size": args.micro_batch, "train.gradient_accumulation_steps": args.grad_accum,
          "train.max_steps": args.warmup + args.steps, "train.eval_every": 0, "train.save_every": 0,
          "train.log_every": 1, "train.seed": 0, "train.bf16": dtype == "bf16",
          "train.output_dir": out, "train.overwrite_output_dir": True, "train.resume": "none",
          "train.svd_cache_dir": os.path.join(args.work, "svd_cache")}
    if args.tokenizer:
        ov["model.tokenizer"] = args.tokenizer
    # Override syntax: strings raw, everything else as YAML (JSON is YAML).
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in ov.items()]


# ----------------------------------------------------------------------------- one rank of a job
def _peak_memory_mb() -> float:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # KiB on Linux


class _Profile:
    """torch.profiler (operators) + cProfile (Python: data, logging, syncs) over rank 0's timed
    steps; both tables go to ``path``."""

    def __init__(self, path: str) -> None:
        import cProfile

        import torch
        acts = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self.path = path
        self.torch_prof = torch.profiler.profile(activities=acts)
        self.py_prof = cProfile.Profile()

    def start(self) -> None:
        self.torch_prof.__enter__()
        self.py_prof.enable()

    def stop(self) -> None:
        import io
        import pstats
        self.py_prof.disable()
        self.torch_prof.__exit__(None, None, None)
        buf = io.StringIO()
        pstats.Stats(self.py_prof, stream=buf).sort_stats("cumulative").print_stats(45)
        with open(self.path, "w") as f:
            f.write("== torch.profiler, operators by CPU total\n")
            f.write(self.torch_prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
            f.write("\n== cProfile, Python functions by cumulative time\n")
            f.write(buf.getvalue())


def _profile_hook(args, rank: int, marks: list, prof: list, name: str) -> None:
    """Start profiling after the warmup steps, stop and write after the timed ones (rank 0)."""
    if not args.profile or rank != 0:
        return
    if len(marks) == args.warmup:
        prof[0] = _Profile(os.path.join(args.work, f"profile_{name}.txt"))
        prof[0].start()
    elif len(marks) == args.warmup + args.steps and prof[0] is not None:
        prof[0].stop()


def run_goat_dist(args, variant: str, dtype: str, ds_path: str, out: str, rank: int) -> dict:
    """goat_dist's Trainer.run(), with the end of every train_step time-stamped."""
    from goat_dist.train.config import load_run_config
    from goat_dist.train.ds_config import read_ds_config
    from goat_dist.train.loop import Trainer, shutdown

    marks: list[float] = []
    prof = [None]

    class TimedTrainer(Trainer):
        def train_step(self, *a, **kw):
            res = super().train_step(*a, **kw)
            marks.append(time.perf_counter())
            _profile_hook(args, rank, marks, prof, f"{variant}_{os.path.basename(out)}")
            return res

    run = load_run_config(None, run_config(args, variant, dtype, out))
    trainer = TimedTrainer(run, read_ds_config(ds_path))
    trainer.run()
    shutdown()
    return {"marks": marks, "peak_mb": _peak_memory_mb()}


def run_hf_peft(args, dtype: str, ds_path: str, out: str, rank: int, world: int) -> dict:
    """transformers.Trainer + peft LoRA on the same micro-batches (see the module docstring)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from goat_dist.train.config import load_run_config
    from goat_dist.train.data import StepPlan, collate, prepare_data
    from goat_dist.train.tokenizer import load_tokenizer

    run = load_run_config(None, run_config(args, "peft", dtype, out))
    t, o = run.train, run.optim
    with open(ds_path) as f:
        ds = json.load(f)
    targs = TrainingArguments(
        output_dir=out, per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, max_steps=t.max_steps,
        learning_rate=o.lr, weight_decay=o.weight_decay, adam_beta1=o.betas[0],
        adam_beta2=o.betas[1], adam_epsilon=o.eps, max_grad_norm=o.max_grad_norm,
        lr_scheduler_type="cosine", warmup_steps=max(1, round(o.warmup_ratio * t.max_steps)),
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to=["tensorboard"],
        bf16=dtype == "bf16", use_cpu=not torch.cuda.is_available(), seed=t.seed,
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
        train_sampling_strategy="sequential", deepspeed=ds)
    # Initialise torch.distributed now (transformers does it lazily): under ZeRO-3 from_pretrained
    # builds the model inside zero.Init, which needs the real world size.
    assert targs.world_size == world
    import deepspeed
    deepspeed.init_distributed()   # and let deepspeed.comm see it (zero.Init asks it the world size)
    tok = load_tokenizer(run.model.tokenizer or run.model.name_or_path)
    data = prepare_data(run.data, tok, "causal_lm", t.seed)
    # goat_dist's order: global step s is the permutation block s, its micro-batch u goes to rank
    # u mod W -- which is what the sequential sampler + accelerate's batch sharding do.
    plan = StepPlan(len(data.train), t.micro_batch_size, t.gradient_accumulation_steps, world,
                    rank, t.seed)
    order: list[int] = []
    for step in range(t.max_steps):
        epoch, s = plan.position(step)
        G = plan.global_batch
        order += plan.permutation(epoch)[s * G:(s + 1) * G].tolist()
    train = data.train.select(order)
    model = AutoModelForCausalLM.from_pretrained(run.model.name_or_path, dtype=torch.float32)
    torch.manual_seed(t.seed)
    model = get_peft_model(model, LoraConfig(
        r=run.goat.r, lora_alpha=run.goat.lora_alpha, lora_dropout=run.goat.lora_dropout,
        target_modules=list(run.goat.target_modules), task_type="CAUSAL_LM"))
    marks: list[float] = []
    prof = [None]

    class Marks(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            marks.append(time.perf_counter())
            _profile_hook(args, rank, marks, prof, f"peft_{os.path.basename(out)}")

    pad = tok.pad_token_id
    trainer = Trainer(model=model, args=targs, train_dataset=train,
                      data_collator=lambda b: collate(b, pad), callbacks=[Marks()])
    trainer.train()
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return {"marks": marks, "peak_mb": _peak_memory_mb()}


def _worker(rank: int, world: int, port: int, job: dict, args_d: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if job["device"] == "cpu":
        os.environ.update(OMP_NUM_THREADS=str(args_d["threads"]), DS_ACCELERATOR="cpu")
    import torch
    if job["device"] == "cpu":
        torch.set_num_threads(args_d["threads"])
    args = argparse.Namespace(**args_d)
    out = job["out"]
    if job["variant"] == "peft":
        res = run_hf_peft(args, job["dtype"], job["ds"], out, rank, world)
    else:
        res = run_goat_dist(args, job["variant"], job["dtype"], job["ds"], out, rank)
    with open(os.path.join(out, f"bench_rank{rank}.json"), "w") as f:
        json.dump(res, f)


def run_job(job: dict, args) -> dict:
    """Spawn the job's ranks; returns per-rank marks and peaks (raises when a rank failed)."""
    import torch.multiprocessing as mp
    os.makedirs(job["out"], exist_ok=True)
    for r in range(args.procs):
        p = os.path.join(job["out"], f"bench_rank{r}.json")
        if os.path.exists(p):
            os.remove(p)
    mp.start_processes(_worker, args=(args.procs, free_port(), job, vars(args)),
                       nprocs=args.procs, start_method="spawn", join=True)
    ranks = []
    for r in range(args.procs):
        with open(os.path.join(job["out"], f"bench_rank{r}.json")) as f:
            ranks.append(json.load(f))
    return {"ranks": ranks}


# ----------------------------------------------------------------------------- figures
def step_tokens(args) -> list[int]:
    """Tokens (attention-mask ones, all ranks) of every optimizer step of the plan."""
    from goat_dist.train.config import load_run_config
    from goat_dist.train.data import StepPlan, prepare_data
    from goat_dist.train.tokenizer import load_tokenizer
    run = load_run_config(None, run_config(args, "lora", "fp32", os.path.join(args.work, "x")))
    tok = load_tokenizer(run.model.tokenizer or run.model.name_or_path)
    data = prepare_data(run.data, tok, "causal_lm", 0)
    plan = StepPlan(len(data.train), args.micro_batch, args.grad_accum, args.procs, 0, 0)
    lengths = [len(x) for x in data.train["input_ids"]]
    out = []
    for step in range(args.warmup + args.steps):
        epoch, s = plan.position(step)
        G = plan.global_batch
        out.append(sum(lengths[i] for i in plan.permutation(epoch)[s * G:(s + 1) * G].tolist()))
    return out


def job_figures(res: dict, args, tokens: list[int]) -> dict:
    """Step time (median over timed steps, slowest rank), tokens/s per rank, peak MB per rank."""
    ends = [r["marks"] for r in res["ranks"]]
    n = min(len(m) for m in ends)
    if n < args.warmup + args.steps:
        raise RuntimeError(f"a rank recorded {n} steps, expected {args.warmup + args.steps}")
    # The slowest rank's interval per step (ranks wait for each other at the collectives anyway).
    steps = [max(m[i] - m[i - 1] for m in ends) for i in range(args.warmup, n)]
    timed_tokens = sum(tokens[args.warmup:n])
    return {"step_s": statistics.median(steps), "steps_s": steps,
            "tokens_per_s_per_rank": timed_tokens / args.procs / sum(steps),
            "peak_mb_per_rank": [round(r["peak_mb"], 1) for r in res["ranks"]]}


def load_text() -> str:
    try:
        return os.getloadavg().__repr__()
    except OSError:
        return "n/a"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="HF model folder, or 'tiny' (tiny-llama from a config + sentencepiece "
                        "tokenizer). Default: models/SmolLM2-135M-Instruct if present, else tiny")
    p.add_argument("--data", default=None, help="instruction JSON (default: data/commonsense/"
                   "train.json if present, else data/demo/train.json)")
    p.add_argument("--stages", nargs="+", default=["zero2", "zero3_offload"], choices=list(STAGE_FILES))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=("fp32", "bf16"))
    p.add_argument("--reps", type=int, default=2, help="repetitions of every job (interleaved)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per job")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first (>= 1)")
    p.add_argument("--procs", type=int, default=2, help="ranks per job")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank on the CPU")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-train-samples", type=int, default=512)
    p.add_argument("--rank", type=int, default=32, help="total rank r (GOAT: r/E per expert)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,up_proj,down_proj")
    p.add_argument("--work", default=os.path.join(ROOT, "outputs", "bench_train"))
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler over rank 0's timed steps; tables in --work/profile_*.txt")
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (a step's time is measured from the previous step's end)")
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and torch.cuda.device_count() < args.procs:
        p.error(f"--procs {args.procs} but only {torch.cuda.device_count()} GPU(s)")
    os.makedirs(args.work, exist_ok=True)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".torch_extensions"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.data is None:
        c = os.path.join(ROOT, "data", "commonsense", "train.json")
        args.data = c if os.path.isfile(c) else os.path.join(ROOT, "data", "demo", "train.json")
    if args.model is None:
        args.model = SMOLLM2 if os.path.isfile(os.path.join(SMOLLM2, "config.json")) else "tiny"
    args.tokenizer = None
    if args.model == "tiny":
        args.model_dir, args.tokenizer = prepare_tiny(args.work, args.data)
    elif not os.path.isfile(os.path.join(args.model, "config.json")):
        p.error(f"--model {args.model!r} is not a Hugging Face model folder (no config.json); "
                f"see docs/SMOLLM2.md, or pass --model tiny")
    else:
        args.model_dir = os.path.abspath(args.model)
    args.targets = [s for s in args.targets.split(",") if s]
    if "peft" in args.variants:
        try:
            import peft  # noqa: F401
        except ImportError:
            p.error("peft is not installed: pip install -c constraints.txt -e '.[bench]' "
                    "(or drop peft from --variants)")

    tokens = step_tokens(args)
    hw = torch.cuda.get_device_name(0) if device == "cuda" else cpu_model()
    print(f"bench_train: model={args.model_dir} data={args.data} procs={args.procs} device={device} "
          f"({hw}) b={args.micro_batch} GA={args.grad_accum} max_length={args.max_length} "
          f"r={args.rank} E={args.experts} k={args.top_k} steps={args.steps}+{args.warmup} warmup "
          f"reps={args.reps}; tokens/step {tokens}; load {load_text()}", flush=True)
    jobs = [(s, d) for s in args.stages for d in args.dtypes]
    results: dict = {}
    for rep in range(args.reps):
        for stage, dtype in jobs:
            k = rep % len(args.variants)
            for variant in args.variants[k:] + args.variants[:k]:
                job = {"variant": variant, "dtype": dtype, "device": device,
                       "ds": ds_config_file(args.work, stage),
                       "out": os.path.join(args.work, f"{stage}_{dtype}_{variant}")}
                t0 = time.time()
                fig = job_figures(run_job(job, args), args, tokens)
                results.setdefault((stage, dtype), {}).setdefault(variant, []).append(fig)
                print(f"rep {rep} {stage:13s} {dtype} {variant:5s}: step {fig['step_s']:.3f} s, "
                      f"{fig['tokens_per_s_per_rank']:.0f} tok/s/rank, peak {fig['peak_mb_per_rank']} MB "
                      f"(job {time.time() - t0:.0f} s; load {load_text()})", flush=True)

    summary: dict = {"per_stage": {}}
    print(f"\n{'stage':14s}{'dtype':6s}{'variant':8s}{'step s':>9s}{'tok/s/rank':>12s}"
          f"{'peak MB/rank':>20s}{'x peft':>8s}{'x peft paired':>15s}")
    for (stage, dtype), per in results.items():
        entry = {}
        for v, figs in per.items():
            entry[v] = {"step_s": round(statistics.median(f["step_s"] for f in figs), 4),
                        "tokens_per_s_per_rank": round(statistics.median(
                            f["tokens_per_s_per_rank"] for f in figs), 1),
                        "peak_mb_per_rank": [round(statistics.median(f["peak_mb_per_rank"][r]
                                                                     for f in figs), 1)
                                             for r in range(args.procs)],
                        "step_s_per_rep": [round(f["step_s"], 4) for f in figs]}
        for v in ("goat", "lora"):
            if v in per and "peft" in per:
                entry[f"{v}_over_peft_trainer"] = round(entry[v]["step_s"] / entry["peft"]["step_s"], 4)
                entry[f"{v}_over_peft_trainer_paired"] = round(statistics.median(
                    a["step_s"] / b["step_s"] for a, b in zip(per[v], per["peft"])), 4)
        for v, e in entry.items():
            if not isinstance(e, dict):
                continue
            x = entry.get(f"{v}_over_peft_trainer")
            xp = entry.get(f"{v}_over_peft_trainer_paired")
            print(f"{stage:14s}{dtype:6s}{v:8s}{e['step_s']:9.3f}{e['tokens_per_s_per_rank']:12.0f}"
                  f"{str(e['peak_mb_per_rank']):>20s}{(f'{x:.3f}' if x else '-'):>8s}"
                  f"{(f'{xp:.3f}' if xp else '-'):>15s}")
        summary["per_stage"][f"{stage}/{dtype}"] = entry
    if "fp32" in args.dtypes and "bf16" in args.dtypes:
        # Paired per repetition: bf16 and fp32 jobs of a repetition ran next to each other.
        summary["bf16_over_fp32"] = {
            f"{s}/{v}": round(statistics.median(
                b["step_s"] / f["step_s"]
                for b, f in zip(results[(s, "bf16")][v], results[(s, "fp32")][v])), 4)
            for s in args.stages for v in args.variants}
    first = summary["per_stage"][f"{args.stages[0]}/{args.dtypes[0]}"]
    summary.update({
        "goat_over_peft_trainer": first.get("goat_over_peft_trainer"),
        "lora_over_peft_trainer": first.get("lora_over_peft_trainer"),
        "measured_on": f"{args.stages[0]}/{args.dtypes[0]}",
        "config": {"model": args.model_dir, "data": args.data, "procs": args.procs,
                   "device": device, "hardware": hw, "threads_per_rank": args.threads,
                   "micro_batch": args.micro_batch, "grad_accum": args.grad_accum,
                   "max_length": args.max_length, "rank": args.rank, "experts": args.experts,
                   "top_k": args.top_k, "targets": args.targets, "steps": args.steps,
                   "warmup": args.warmup, "reps": args.reps, "tokens_per_step": tokens,
                   "torch": torch.__version__, "load_at_end": load_text()}})
    print()
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
