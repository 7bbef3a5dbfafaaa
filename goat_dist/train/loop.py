"""The training run: validate inputs, build model + engine, train, evaluate, checkpoint, export.

Loss normalisation makes a run's numbers independent of how its global batch is split across
ranks and micro-steps: every optimizer step first counts the target tokens of its whole global
batch (one all-reduce), and each micro-step's loss is ``sum of token losses * W * GA / N_global``,
which DeepSpeed's 1/GA loss scaling and 1/W gradient averaging turn into the global token mean.
The router aux loss is a per-micro-batch statistic; it is added unscaled, i.e. averaged over the
step's micro-batches, which are the same micro-batches whatever W (data.StepPlan). So a 2-rank
run reproduces the 1-rank run with twice the accumulation, step for step.
"""

from __future__ import annotations

import datetime
import math
import os
import random
import shutil
import time
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .checkpoint import (check_resumable, checkpoint_dir, export_adapter, latest_checkpoint,
                         load_checkpoint, load_history, resume_bf16, save_checkpoint)
from .config import ConfigError, RunConfig
from .data import RecordSplits, StepPlan, collate, corpus_texts, load_splits, prepare_data
from .ds_config import bf16_wanted, precision_name, resolve_ds_config, zero_stage
from .modeling import embedding_rows, inject_goat, load_base_model, resolve_modules_to_save
from ..parallel.comm import all_reduce_, dist_backend
from ..parallel.dispatch import ExpertParallelDispatcher
from ..parallel.expert_optim import (ExpertOptimizer, clip_coefficient, engine_gradients,
                                     scale_engine_gradients, squared_norm)
from ..parallel.groups import create_expert_parallel_groups
from .monitor import Monitor, Throughput
from .resilience import (DivergedError, GracefulStop, agree, collective_op, grad_norm,
                         nonfinite, skip_update)
from .tokenizer import check_tokenizer_fits, load_tokenizer, train_sentencepiece_tokenizer
from . import evaluate as ev


# The expert-load heatmap (and its load_cv/max_load scalars) is written every this many scalar
# logs and at the end, not at every one: drawing it costs ~0.2 s (matplotlib) on rank 0 while the
# other ranks wait, which made log_every=1 runs several times slower than transformers.Trainer
# (docs/BENCHMARKS.md, "Trainer vs transformers.Trainer + peft"). The selection counts keep
# accumulating in between, so each heatmap covers every token since the previous one. A step
# count, not a clock: every rank must take the same decision (expert_load() is a collective).
EXPERT_LOAD_EVERY_LOGS = 10


def init_distributed(timeout_s: float = 600) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, NCCL + gloo on CUDA: see
    parallel/comm.py); returns (rank, world).

    ``timeout_s`` (train.dist_timeout_s) bounds every collective of the default group: a rank
    waiting longer for a peer raises instead of hanging the job."""
    import deepspeed
    if torch.cuda.is_available():
        # Bind this rank's GPU before any collective: DeepSpeed binds it only in initialize(),
        # and host-side counts all-reduced earlier (SVD init) would all go to cuda:0 under NCCL.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=dist_backend(),
                                   timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place; host tensors go through the backend's device (NCCL: CUDA)."""
    return all_reduce_(t)


def _prepare_output_dir(run: RunConfig) -> Optional[str]:
    """Decide where to resume from; refuse to clobber another run. Writes nothing."""
    t = run.train
    out = t.output_dir
    if t.resume not in ("auto", "none"):
        if not os.path.isdir(t.resume):
            raise ConfigError(f"train.resume={t.resume!r} is not a checkpoint folder; use a "
                              f"folder under {checkpoint_dir(out)} or resume=auto")
        return t.resume
    latest = latest_checkpoint(out) if t.resume == "auto" else None
    if latest is not None:
        return latest
    holds_run = os.path.isdir(out) and any(
        os.path.exists(os.path.join(out, n)) for n in ("checkpoints", "adapter", "summary.json"))
    if holds_run and not t.overwrite_output_dir:
        raise ConfigError(f"train.output_dir={out!r} already holds another run (and no checkpoint "
                          f"to resume); choose a new output_dir, or set "
                          f"train.overwrite_output_dir=true to replace it")
    return None


def _build_tokenizer(run: RunConfig, rank: int, splits: RecordSplits):
    m, d = run.model, run.data
    if m.tokenizer is not None:
        return load_tokenizer(m.tokenizer, m.trust_remote_code)
    if m.name_or_path is not None:
        return load_tokenizer(m.name_or_path, m.trust_remote_code)
    # Preset model: train a small sentencepiece tokenizer on the training split's prompts and
    # responses (rank 0), then every rank loads the same files.
    tok_dir = os.path.join(run.train.output_dir, "tokenizer")
    if rank == 0 and not os.path.isfile(os.path.join(tok_dir, "tokenizer.model")):
        train_sentencepiece_tokenizer(corpus_texts(splits.train, d), m.vocab_size, tok_dir)
    if dist.is_initialized():
        dist.barrier()
    return load_tokenizer(tok_dir)


def _move(batch: dict, device) -> dict:
    """The batch on ``device``. To CUDA the copies go from pinned memory and do not block the
    host, so collating the next micro-batch overlaps the transfer."""
    device = torch.device(device)
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Sum of per-target cross-entropies.

    Args:
        logits: (B, S, V) for causal_lm (next-token, shifted here) or (B, C) for seq_cls.
        labels: (B, S) with -100 for ignored positions, or (B,) class ids.
    """
    if task == "causal_lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100, reduction="sum")


def count_targets(labels: torch.Tensor, task: str) -> int:
    return int((labels[:, 1:] != -100).sum()) if task == "causal_lm" else int(labels.numel())


def lr_lambda(run: RunConfig, total_steps: int):
    """Linear warmup then cosine decay to min_lr_ratio (HF's get_cosine_schedule_with_warmup)."""
    o = run.optim
    warm = o.warmup_steps or int(math.ceil(o.warmup_ratio * total_steps))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        prog = (step - warm) / max(1, total_steps - warm)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))
    return f


class Trainer:
    """One training run. ``run()`` does everything; every public step is collective."""

    def __init__(self, run: RunConfig, ds_config: dict[str, Any]) -> None:
        self.run_cfg = run
        self.rank, self.world = init_distributed(run.train.dist_timeout_s)
        self.task = run.model.task
        self.ds_raw = ds_config

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        run, t = self.run_cfg, self.run_cfg.train
        self.resume_from = _prepare_output_dir(run)
        meta = {} if self.resume_from is None else check_resumable(self.resume_from, run, self.world)
        bf16 = resume_bf16(meta, run)          # a resumed run keeps its checkpoint's precision
        self.ds = resolve_ds_config(self.ds_raw, run, self.world, bf16=bf16)
        if bf16 is not None and bf16 != bf16_wanted(run) and self.rank == 0:
            print(f"goat_dist: train.bf16={run.train.bf16}: continuing in "
                  f"{precision_name(bf16)} as {self.resume_from} trained, although this machine "
                  f"would pick {precision_name(not bf16)} for a fresh run", flush=True)
        self.zero3 = zero_stage(self.ds) == 3
        self.ep = self._expert_parallel(run.goat)   # bad ep_size fails before anything is written
        set_seed(t.seed)
        splits = load_splits(run.data, self.task, t.seed)      # bad data fails before any write
        self.skipped_bad_records = splits.skipped_bad_records
        # too few records for one global batch: refuse before the tokenizer is written
        StepPlan(len(splits.train), t.micro_batch_size, t.gradient_accumulation_steps,
                 self.world, self.rank, t.seed)
        if splits.skipped_bad_records and self.rank == 0:
            print(f"goat_dist: warning: skipped {splits.skipped_bad_records} bad record(s) "
                  f"(data.skip_bad_records=true)", flush=True)
        self.tokenizer = _build_tokenizer(run, self.rank, splits)
        self.data = prepare_data(run.data, self.tokenizer, self.task, t.seed, splits=splits)
        lengths = [len(ids) for ids in self.data.train["input_ids"]] if run.data.group_by_length else None
        self.plan = StepPlan(len(self.data.train), t.micro_batch_size,
                             t.gradient_accumulation_steps, self.world, self.rank, t.seed, lengths)
        spe = self.plan.steps_per_epoch
        self.total_steps = t.max_steps or max(1, int(math.floor(t.num_epochs * spe)))
        num_labels = run.model.num_labels or self.data.num_labels or 2
        pad_id = self.tokenizer.pad_token_id
        model, self._keepalive = load_base_model(run.model, len(self.tokenizer), num_labels,
                                                 t.seed, pad_id, self.ds if self.zero3 else None)
        # Whether ZeRO-3 built the backbone partitioned (no rank ever held it whole).
        self.loaded_partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
        check_tokenizer_fits(self.tokenizer, embedding_rows(model))
        if self.task == "seq_cls" and getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = pad_id
        goat_cfg = resolve_modules_to_save(model, run.goat, self.task)
        set_seed(t.seed)  # router init identical on every rank and every world size
        cache = {"auto": os.path.join(t.output_dir, "svd_cache"), "none": None}.get(
            t.svd_cache_dir, t.svd_cache_dir)
        t_init = time.time()
        self.goat, stats = inject_goat(model, goat_cfg, expert_parallel=self.ep, svd_cache_dir=cache)
        counts = _all_reduce(torch.tensor([stats.svd_computed, stats.cache_hits], dtype=torch.float64))
        self.svd_init = {"svd_computed": int(counts[0]), "cache_hits": int(counts[1]),
                         "seconds": time.time() - t_init}
        self._init_engine()
        self.start_step = 0
        # the per-step log of the run so far (summary.json's history, each checkpoint's
        # history.json): a resumed run starts from its checkpoint's, so it is the whole run's
        self.history: list[dict] = []
        if self.resume_from is not None:
            self.start_step, expert_state = load_checkpoint(self.engine, self.resume_from)
            self.history = load_history(self.resume_from, self.start_step)
            if self.expert_opt is not None:
                if expert_state is None:
                    raise ConfigError(f"checkpoint {self.resume_from} has no expert shards for "
                                      f"rank {self.rank}; resume with the run's original ep_size")
                self.expert_opt.load_state_dict(expert_state)
        elif t.overwrite_output_dir and self.rank == 0:
            shutil.rmtree(checkpoint_dir(t.output_dir), ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()

    def _expert_parallel(self, goat_cfg):
        """The expert-parallel dispatcher for train.ep_size > 1 (DeepSpeed's EP/EDP groups)."""
        ep_size = self.run_cfg.train.ep_size
        if ep_size == 1:
            return None
        if goat_cfg.init == "hydralora":
            raise ConfigError("goat.init=hydralora shares one A across experts and cannot be "
                              "expert-parallel; use train.ep_size=1")
        try:
            groups = create_expert_parallel_groups(ep_size, goat_cfg.num_experts)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return ExpertParallelDispatcher(groups, goat_cfg.num_experts)

    def _init_engine(self) -> None:
        import deepspeed
        o = self.run_cfg.optim
        params = self.goat.trainable_parameters()
        sched = lr_lambda(self.run_cfg, self.total_steps)
        self.expert_opt = None
        if self.ep is not None:
            # goat_dist clips by the joint norm of engine params and expert shards (see
            # parallel/expert_optim.py); the engine must not clip on its own partial norm.
            self.ds["gradient_clipping"] = 0.0
            self.expert_opt = ExpertOptimizer(self.goat.expert_shard_parameters(), self.ep.groups,
                                              o.lr, o.betas, o.eps, o.weight_decay, sched)
        optimizer = None
        if "optimizer" not in self.ds:
            optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                          weight_decay=o.weight_decay)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.goat, model_parameters=params, optimizer=optimizer, config=self.ds,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, sched))
        self.device = self.engine.device
        with torch.no_grad():  # the engine moved its own parameters; shards are ours to move
            for p in self.goat.expert_shard_parameters():
                p.data = p.data.to(self.device)

    # ------------------------------------------------------------------ steps
    def _step_batches(self, step: int) -> list[dict]:
        epoch, s = self.plan.position(step)
        pad = self.tokenizer.pad_token_id
        return [collate([self.data.train[i] for i in idxs], pad)
                for idxs in self.plan.micro_batches(epoch, s)]

    def train_step(self, step: int, stop: Optional[GracefulStop] = None) -> dict[str, float]:
        """One optimizer step (GA micro-steps). Returns global loss / aux / token figures, and
        ``skipped`` (the non-finite guard skipped the update) and ``stop`` (some rank got a stop
        signal; every rank sees the same value).

        The guard: a non-finite loss on any rank (agreed by one all-reduce before the boundary
        micro-step's backward, together with the stop flag) or a non-finite reduced gradient
        (the same on every rank) closes the boundary with ``resilience.skip_update`` instead of
        an optimizer step, on every rank.
        """
        t = self.run_cfg.train
        batches = self._step_batches(step)
        counts = torch.tensor([float(sum(count_targets(b["labels"], self.task) for b in batches)),
                               float(sum(int(b["attention_mask"].sum()) for b in batches))])
        with collective_op("all-reduce of the step's token counts", step + 1):
            _all_reduce(counts)
        n_targets = max(counts[0].item(), 1.0)
        norm = self.world * t.gradient_accumulation_steps / n_targets
        stats = torch.zeros(2, device=self.device)   # loss sum, aux: summed on the device, no
        gn = None                                       # host sync per micro-step
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        skip = stop_now = False
        for i, b in enumerate(batches):
            last = i == len(batches) - 1
            b = _move(b, self.device)
            out = self.engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            lsum = loss_sum(out.logits, b["labels"], self.task)
            aux = self.engine.module.aux_loss().to(lsum.device)
            loss = lsum * norm + aux
            bad = bad | nonfinite(lsum, aux)
            if last:
                skip, stop_now = agree(bad, stop is not None and stop.requested, step + 1)
                if skip:
                    # Make every rank's gradients non-finite, so DeepSpeed's ZeRO/bf16 optimizers
                    # take their own overflow path (no update) on all ranks alike, even a rank
                    # whose loss was finite.
                    loss = loss * float("nan")
            self.engine.backward(loss)
            if self.expert_opt is not None and last:
                gn = self._reduce_and_clip_expert_parallel()
                skip = skip or not math.isfinite(gn)   # the same joint norm on every rank
            elif last and not skip and zero_stage(self.ds) == 0:
                # DeepSpeed's ZeRO-0 with a torch optimizer neither checks nor reports the norm
                gn = grad_norm(self.goat.trainable_parameters())   # reduced: same on every rank
                skip = not math.isfinite(gn)
            if last and skip:
                skip_update(self.engine)
            else:
                self.engine.step()
            stats += torch.stack([lsum.detach().float(), aux.detach().float()])
        if self.expert_opt is not None:
            if skip:
                self.expert_opt.optimizer.zero_grad(set_to_none=True)
            else:
                self.expert_opt.step()
        with collective_op("all-reduce of the step's loss statistics", step + 1):
            loss_total, aux_total = _all_reduce(stats).tolist()   # the step's last host sync
        if gn is None and not skip:
            gn = self.engine.get_global_grad_norm()
        return {"loss": loss_total / n_targets,
                "aux_loss": aux_total / (self.world * t.gradient_accumulation_steps),
                "lr": self.scheduler.get_last_lr()[0] if self.scheduler is not None else self.run_cfg.optim.lr,
                "grad_norm": float(gn) if gn is not None and not skip else float("nan"),
                "tokens": counts[1].item(), "skipped": skip, "stop": stop_now}

    def _reduce_and_clip_expert_parallel(self) -> float:
        """At the accumulation boundary: reduce expert gradients, clip everything jointly."""
        self.expert_opt.reduce_gradients()
        engine_params = self.goat.trainable_parameters()
        grads = engine_gradients(engine_params)
        total_sq = float(self.expert_opt.squared_norm() + squared_norm(grads))
        coef = clip_coefficient(total_sq, self.run_cfg.optim.max_grad_norm)
        if coef < 1.0:
            self.expert_opt.scale_gradients(coef)
            scale_engine_gradients(engine_params, grads, coef)
        return math.sqrt(total_sq)

    # ------------------------------------------------------------------ evaluation
    def _sharded(self, items: list) -> list:
        """This rank's share of ``items``, padded with None so every rank runs the same number of
        forwards (ZeRO-3 forwards are collectives)."""
        mine = items[self.rank::self.world]
        n = int(math.ceil(len(items) / self.world))
        return mine + [None] * (n - len(mine))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.data.eval is None or len(self.data.eval) == 0:
            return {}
        self.engine.eval()
        try:
            metrics = self._eval_loss()
            if self.task == "causal_lm" and self.data.eval_records:
                metrics.update(self._eval_accuracy())
        finally:
            self.engine.train()
        return metrics

    def _eval_loss(self) -> dict[str, float]:
        b, ds = self.run_cfg.train.micro_batch_size, self.data.eval
        batches = [list(range(i, min(i + b, len(ds)))) for i in range(0, len(ds), b)]
        if self.run_cfg.train.eval_batches:
            batches = batches[:self.run_cfg.train.eval_batches]
        pad = self.tokenizer.pad_token_id
        acc = torch.zeros(4)  # loss sum, targets, correct (seq_cls), examples
        for idxs in self._sharded(batches):
            real = idxs is not None
            batch = _move(collate([ds[i] for i in (idxs if real else batches[0])], pad), self.device)
            out = self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            if not real:
                continue
            acc[0] += loss_sum(out.logits, batch["labels"], self.task).float().cpu()
            acc[1] += count_targets(batch["labels"], self.task)
            if self.task == "seq_cls":
                acc[2] += (out.logits.argmax(-1) == batch["labels"]).sum().cpu()
                acc[3] += batch["labels"].numel()
        _all_reduce(acc)
        metrics = {"eval/loss": (acc[0] / acc[1].clamp(min=1)).item()}
        if self.task == "seq_cls":
            metrics["eval/accuracy"] = (acc[2] / acc[3].clamp(min=1)).item()
        return metrics

    def _eval_accuracy(self) -> dict[str, float]:
        """Accuracy on the eval records through goat_dist's lm-eval tasks (train/evaluate.py)."""
        d = self.run_cfg.data
        return ev.accuracy(self.engine.module, self.tokenizer, self.data.eval_records,
                           mode=d.eval_mode, template=d.prompt_template, max_length=d.max_length,
                           max_new_tokens=d.eval_max_new_tokens,
                           batch_size=self.run_cfg.train.micro_batch_size,
                           # ZeRO-3 gathers and EP all-to-alls make every forward a collective
                           lockstep=(self.zero3 or self.run_cfg.train.ep_size > 1) and self.world > 1)

    # ------------------------------------------------------------------ the run
    def expert_load(self) -> dict[str, torch.Tensor]:
        counts = self.engine.module.reset_expert_counts()
        if not counts:
            return counts
        names = list(counts)
        stacked = torch.stack([counts[n].float().cpu() for n in names])
        _all_reduce(stacked)
        return dict(zip(names, stacked))

    def run(self) -> dict[str, Any]:
        """Set up, train, evaluate, export; returns the summary (also written to summary.json).

        Ends early, with ``summary["stopped_by"]`` set, when a rank got SIGTERM/SIGUSR1 (after
        a checkpoint at the step every rank agreed on). Raises DivergedError after
        ``train.max_skipped_steps`` consecutive non-finite steps (summary.json written first,
        no new checkpoint), CollectiveTimeout when a peer stops answering.
        """
        stop = GracefulStop()   # before setup: a signal during loading stops at the first step
        try:
            return self._run(stop)
        finally:
            stop.restore()

    def _run(self, stop: GracefulStop) -> dict[str, Any]:
        self.setup()
        run, t = self.run_cfg, self.run_cfg.train
        end = self.total_steps if not t.stop_after_steps else min(self.total_steps, t.stop_after_steps)
        monitor = Monitor(os.path.join(t.output_dir, "tensorboard"), enabled=self.rank == 0,
                          total_steps=self.total_steps, initial_step=self.start_step)
        try:   # the progress bar and event file are closed on every way out
            thr = Throughput()
            history = self.history
            metrics: dict[str, float] = {}
            t0 = time.time()
            skipped_total = consecutive = 0
            stopped_by: Optional[str] = None
            diverged = False
            final_step = max(end, self.start_step)
            last_saved = self.start_step if self.resume_from is not None else None
            for step in range(self.start_step, end):
                with collective_op("a training step (forward, backward, gradient reduction)",
                                   step + 1):
                    res = self.train_step(step, stop)
                thr.update(int(res["tokens"]))
                done = step + 1
                if res["skipped"]:
                    skipped_total += 1
                    consecutive += 1
                else:
                    consecutive = 0
                history.append({"step": done, "loss": res["loss"], "aux_loss": res["aux_loss"],
                                "grad_norm": res["grad_norm"], "lr": res["lr"],
                                "skipped": res["skipped"]})
                if res["skipped"] and self.rank == 0:
                    print(f"goat_dist: warning: step {done}: non-finite loss or gradient norm "
                          f"(loss={res['loss']}); update skipped on every rank ({consecutive} in a "
                          f"row, {skipped_total} in this run; limit train.max_skipped_steps="
                          f"{t.max_skipped_steps})", flush=True)
                if done % t.log_every == 0 or done == end or res["skipped"]:
                    monitor.log_scalars(done, {
                        "train/loss": res["loss"], "train/aux_loss": res["aux_loss"],
                        "train/lr": res["lr"], "train/grad_norm": res["grad_norm"],
                        "train/tokens_per_s": thr.rate(), "train/skipped_steps": skipped_total})
                    if done % (EXPERT_LOAD_EVERY_LOGS * t.log_every) == 0 or done == end:
                        monitor.log_expert_load(done, self.expert_load())
                    thr.reset()
                if consecutive >= t.max_skipped_steps:
                    # every rank counts the same agreed skips, so all stop here together; no
                    # checkpoint: the last one on disk is the last good state
                    diverged, final_step = True, done
                    break
                if t.eval_every and done % t.eval_every == 0 and done != self.total_steps:
                    with collective_op("evaluation", done):
                        metrics = self.evaluate()
                    monitor.log_scalars(done, metrics)
                # No periodic checkpoint inside a run of skipped steps: a rerun then resumes from
                # before them. A stop (signal, end) saves anyway: the parameters are unchanged.
                if (t.save_every and done % t.save_every == 0 and consecutive == 0) or done == end \
                        or res["stop"]:
                    self._save(done)
                    last_saved = done
                monitor.advance(1)
                if res["stop"]:
                    stopped_by, final_step = stop.signal_name or "a signal on another rank", done
                    break
            finished = not diverged and stopped_by is None and final_step >= self.total_steps
            if finished:
                with collective_op("final evaluation", final_step):
                    metrics = self.evaluate()
                monitor.log_scalars(final_step, metrics)
                with collective_op("adapter export", final_step):
                    export_adapter(self.engine.module, os.path.join(t.output_dir, "adapter"))
            elapsed = time.time() - t0
            trainable, total = self.engine.module.parameter_counts()
            summary = {
                "finished": finished, "global_step": final_step, "total_steps": self.total_steps,
                "resumed_from": self.resume_from, "world_size": self.world,
                "stopped_by": stopped_by, "diverged": diverged, "last_checkpoint_step": last_saved,
                "skipped_steps": skipped_total,
                "skipped_bad_records": getattr(self, "skipped_bad_records", 0),
                "zero_stage": zero_stage(self.ds), "bf16": bool(self.ds["bf16"]["enabled"]),
                "ep_size": run.train.ep_size, "svd_init": self.svd_init,
                "base_loaded_partitioned": self.loaded_partitioned,
                "trainable_params": trainable, "total_params": total,
                "train_examples": len(self.data.train),
                "eval_examples": 0 if self.data.eval is None else len(self.data.eval),
                "truncated_train": self.data.num_truncated_train,
                "truncated_eval": self.data.num_truncated_eval,
                "final_metrics": metrics, "history": history,
                "wall_time_s": elapsed,
                "steps_per_s": (final_step - self.start_step) / elapsed if elapsed > 0 else None,
                "config": run.to_dict(), "ds_config": self.ds,
            }
            if self.rank == 0:
                monitor.write_summary(os.path.join(t.output_dir, "summary.json"), summary)
        finally:
            monitor.close()
        if diverged:
            where = (f"the last checkpoint (step {last_saved}) is current and holds the state "
                     f"before these steps" if last_saved is not None else "no checkpoint was written")
            raise DivergedError(
                f"training diverged: {consecutive} consecutive steps (up to step {final_step}) "
                f"had a non-finite loss or gradient norm and were skipped "
                f"(train.max_skipped_steps={t.max_skipped_steps}); {where}. Lower optim.lr, "
                f"keep optim.max_grad_norm > 0, check the data, or raise train.max_skipped_steps")
        return summary

    def _save(self, done: int) -> None:
        with collective_op("checkpoint save", done):
            save_checkpoint(self.engine, self.run_cfg, done, self.world,
                            None if self.expert_opt is None else self.expert_opt.state_dict(),
                            history=self.history)


def shutdown(barrier: bool = True) -> None:
    """Leave the process group (every rank, also on errors: a rank that exits with the group
    still alive can abort at interpreter exit, see docs/CLUSTER.md "Exit statuses").

    Args:
        barrier: wait for the other ranks first (the normal end, and errors every rank raises
            alike, such as bad input). False after a lost peer or a timeout, where a barrier
            would only wait for ``train.dist_timeout_s`` again.
    """
    if not dist.is_initialized():
        return
    if barrier:
        try:
            dist.barrier()
        except RuntimeError:
            pass   # a peer is gone; leaving is all that is left to do
    import deepspeed.comm as ds_comm
    if getattr(ds_comm, "cdb", None) is not None:
        # also drops DeepSpeed's cached groups (expert-parallel, world clone), which would
        # otherwise keep their gloo threads running into interpreter exit
        ds_comm.destroy_process_group()
    else:
        dist.destroy_process_group()
