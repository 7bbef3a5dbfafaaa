"""The trainer's periodic accuracy: goat_dist's lm-eval tasks on the run's eval records.

One scorer: this runs the same task definitions (goat_dist/eval/tasks.py) through the same
engine (lm-eval's HFLM, goat_dist/eval/lm.py) as ``launch/evaluate.py``, on the run's eval
records (a subset: ``data.eval_file`` / ``eval_fraction``, capped by ``max_eval_samples``):

* ``eval_mode: options``: records with an ``Answer format: a/b/c`` line, option scoring (each
  option's continuation = the record's output with the gold option replaced, + eos; exactly the
  trained tokens); records without options are skipped (counted out of ``accuracy_n``).
* ``eval_mode: generate``: every record; greedy generation of ``eval_max_new_tokens`` tokens and
  LLM-Adapters answer extraction (option word, or the last number for math).

Distributed: lm-eval shards the documents over the ranks of ``group`` and gathers the metrics.
Under ZeRO-3 every forward is a collective, so every rank must run the same number of them:
lm-eval pads each rank's requests to the same count, the logits cache (which merges requests
data-dependently) is off, and generation runs with ``synced_gpus``. The result is broadcast so
every rank returns the same numbers.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch.distributed as dist

from ..eval.answers import answer_options
from ..eval.lm import make_lm
from ..eval.results import run_evaluation
from ..eval.tasks import TaskSpec, _docs, task_config

_NAME = {"options": "train_eval_options", "generate": "train_eval_generate"}


def accuracy(model, tokenizer, records: list[dict], mode: str, template: str, max_length: int,
             max_new_tokens: int, batch_size: int, group=None, lockstep: bool = False) -> dict[str, float]:
    """Accuracy of ``model`` on ``records``, identical on every rank of ``group``.

    Args:
        model: the (GoatModel-wrapped) causal LM; under ZeRO-3 the engine's module.
        records: Alpaca/LLM-Adapters records with an ``answer``.
        mode: ``options`` or ``generate`` (DataConfig.eval_mode).
        template: the prompt template used in training (DataConfig.prompt_template).
        max_length: longest request in tokens (longer contexts lose their start).
        max_new_tokens: generation budget of ``generate`` mode.
        batch_size: requests per forward per rank.
        group: torch.distributed group the records are sharded over (None: the default group).
        lockstep: every rank must run the same number of forwards (ZeRO-3 with > 1 rank).

    Returns:
        ``{"eval/accuracy": float, "eval/accuracy_n": float}``, or {} when no record qualifies.
    """
    from lm_eval.api.task import ConfigurableTask

    if mode == "options":
        records = [r for r in records if answer_options(r)]
    if not records:
        return {}
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-call notices about model instances
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    n = len(records)
    # lm-eval gives every rank documents[rank::world] and refuses a rank without any: pad with
    # copies of the first record to a multiple of the world size; the copies are not counted
    records = records + [records[0]] * ((-n) % world)
    kind = "options" if mode == "options" else "generate"
    spec = TaskSpec(_NAME[mode], kind, "train_eval")
    docs = _docs(spec, records, template, eos_text=tokenizer.eos_token or "")
    cfg = task_config(spec, docs)
    if kind == "generate":
        cfg["generation_kwargs"]["max_gen_toks"] = max_new_tokens
    task = ConfigurableTask(config=cfg)
    lm = make_lm(model, tokenizer, batch_size=batch_size, max_length=max_length, group=group,
                 synced_gpus=lockstep)
    res = run_evaluation(lm, {spec.name: task}, log_samples=True)
    out: list[Optional[dict]] = [None]
    if res is not None:
        hits = [float(s["acc"]) for s in res["samples"][spec.name] if s["doc_id"] < n]
        out = [{"eval/accuracy": sum(hits) / len(hits), "eval/accuracy_n": float(len(hits))}]
    if world > 1:
        src = dist.get_global_rank(group, 0) if group is not None else 0
        dist.broadcast_object_list(out, src=src, group=group)
    return out[0]
