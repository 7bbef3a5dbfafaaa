#!/usr/bin/env python
"""Evaluation speed: goat_dist's lm-eval evaluator vs the old in-training option scorer.

Both score the same records of the seven commonsense test sets (LLM-Adapters form, option
scoring: each option's continuation "the correct answer is <option>" + eos after the Alpaca
prompt) with the same model, side by side in one process, A and B alternating per repetition:

* ``old``: the hand-written scorer the trainer used before lm-eval (kept here, verbatim, as the
  baseline): one padded forward per batch of ``--old_batch_size`` candidates, in record order.
* ``new``: goat_dist/eval (lm-eval's HFLM: length-sorted batches of ``--batch_size`` requests,
  each context run once for all its options: goat_dist/eval/prefix.py), in fp32 and, where the
  CPU has native bf16, in bf16 (``launch/evaluate.py``'s default dtype there) with its near ties
  rescored in fp32 at the default ``--rescore_margin``, as the CLI does.

Prints records/s of each (median over repetitions), and as the last line JSON with ``speedup``
(the new evaluator at its default dtype / the old scorer in fp32: what a user gets by switching),
``speedup_fp32`` (both in fp32: the same arithmetic, so only the method differs), ``agreement``
(fraction of records whose predicted option is the same, both in fp32) and, with bf16,
``agreement_bf16_vs_fp32``.

    python scripts/bench_eval.py                         # SmolLM2, 8 records per task, ~ minutes
    python scripts/bench_eval.py --per_task 30 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench_common import cpu_model  # noqa: E402

from goat_dist.eval.answers import answer_options, candidate_response  # noqa: E402
from goat_dist.eval.tasks import (  # noqa: E402
    TASK_GROUPS,
    TASKS,
    build_tasks,
    load_records,
    task_file,
)
from goat_dist.train.data import IGNORE_INDEX, collate, format_prompt  # noqa: E402

# ------------------------------------------------------- the old in-training scorer (the baseline)

def old_option_scoring_batches(records, tokenizer, template, max_length):
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    out = []
    for ri, rec in enumerate(records):
        options = answer_options(rec)
        prompt = list(tokenizer(format_prompt(rec, template), add_special_tokens=True)["input_ids"])
        responses = tokenizer([candidate_response(rec, options, o) for o in options],
                              add_special_tokens=False)["input_ids"]
        for oi, resp in enumerate(responses):
            resp = list(resp) + [eos]
            p = prompt
            excess = len(p) + len(resp) - max_length
            if excess > 0:
                keep = 1 if (p and bos is not None and p[0] == bos) else 0
                p = p[:keep] + p[keep + excess:]
            out.append({"input_ids": p + resp, "labels": [IGNORE_INDEX] * len(p) + resp,
                        "record_index": ri, "option_index": oi})
    return out


def old_sequence_logprobs(logits, labels):
    logits, target = logits[:, :-1].float(), labels[:, 1:]
    mask = target != IGNORE_INDEX
    logp = F.log_softmax(logits, dim=-1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(dim=-1)


@torch.no_grad()
def old_predictions(model, tokenizer, records, batch_size, max_length):
    cands = old_option_scoring_batches(records, tokenizer, "alpaca", max_length)
    scores = []
    for i in range(0, len(cands), batch_size):
        b = collate(cands[i:i + batch_size], tokenizer.pad_token_id)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        scores += old_sequence_logprobs(logits, b["labels"]).tolist()
    best = {}
    for c, s in zip(cands, scores):
        r = c["record_index"]
        if r not in best or s > best[r][0]:
            best[r] = (s, c["option_index"])
    return [best[r][1] for r in range(len(records))]


# ------------------------------------------------------------------------------- the new evaluator

def new_predictions(model, tokenizer, by_task, batch_size, max_length, fp32_model=None):
    """The evaluator as launch/evaluate.py runs it; with ``fp32_model`` (a bf16 ``model``), its
    near ties are rescored by that float32 model at the CLI's default margin."""
    from goat_dist.eval.cli import RESCORE_MARGIN
    from goat_dist.eval.lm import make_lm
    from goat_dist.eval.results import predictions, run_evaluation

    tasks = build_tasks(list(by_task), eos_text=tokenizer.eos_token, records=by_task)
    lm = make_lm(model, tokenizer, batch_size=batch_size, max_length=max_length,
                 fp32_model=(lambda: fp32_model) if fp32_model is not None else None,
                 rescore_margin=RESCORE_MARGIN)
    res = run_evaluation(lm, tasks, log_samples=True)
    out = []
    for name in by_task:
        p = predictions(res["samples"][name])
        out += [p[i] for i in range(len(by_task[name]))]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.path.join(REPO, "models", "SmolLM2-135M-Instruct"))
    p.add_argument("--per_task", type=int, default=8, help="first N records of each commonsense test set")
    p.add_argument("--reps", type=int, default=1, help="repetitions (old and new alternate)")
    p.add_argument("--batch_size", type=int, default=16, help="the new evaluator's batch (CLI default)")
    p.add_argument("--old_batch_size", type=int, default=4,
                   help="the old scorer's batch (the trainer used micro_batch_size: 4 in smollm2_commonsense.yaml)")
    p.add_argument("--max_length", type=int, default=512)
    args = p.parse_args()
    import logging

    from goat_dist.eval.lm import load_model, native_bf16
    logging.getLogger("lm_eval").setLevel(logging.ERROR)

    by_task = {n: load_records(task_file(TASKS[n], os.path.join(REPO, "data", "eval")))[:args.per_task]
               for n in TASK_GROUPS["commonsense"]}
    records = [r for rs in by_task.values() for r in rs]
    model, tok, _ = load_model(args.model, None, torch.float32)
    bf16 = None
    if native_bf16():
        bf16, _, _ = load_model(args.model, None, torch.bfloat16)
    times = {"old": [], "new": [], "new_bf16": []}
    preds = {}
    for rep in range(args.reps):
        order = ["old", "new", "new_bf16"] if rep % 2 == 0 else ["new_bf16", "new", "old"]
        for which in order:
            if which == "new_bf16" and bf16 is None:
                continue
            t0 = time.perf_counter()
            if which == "old":
                preds[which] = old_predictions(model, tok, records, args.old_batch_size, args.max_length)
            else:
                # bf16 as the CLI runs it: near ties rescored by the fp32 model (already loaded
                # here; the CLI loads its copy on first use, ~1 s for SmolLM2)
                preds[which] = new_predictions(bf16 if which == "new_bf16" else model, tok, by_task,
                                               args.batch_size, args.max_length,
                                               fp32_model=model if which == "new_bf16" else None)
            times[which].append(time.perf_counter() - t0)
    rate = {k: len(records) / statistics.median(v) for k, v in times.items() if v}
    agree = sum(a == b for a, b in zip(preds["old"], preds["new"])) / len(records)
    load = os.getloadavg()
    for k, v in rate.items():
        print(f"{k:9s} {v:7.2f} records/s  (median of {len(times[k])}: {statistics.median(times[k]):.1f} s)")
    out = {"records": len(records), "per_task": args.per_task, "reps": args.reps,
           "old_records_per_s": round(rate["old"], 3), "new_records_per_s": round(rate["new"], 3),
           "speedup_fp32": round(rate["new"] / rate["old"], 2), "agreement": round(agree, 4),
           "cpu": cpu_model(), "loadavg": [round(x, 2) for x in load],
           "threads": torch.get_num_threads()}
    default = "new_bf16" if "new_bf16" in rate else "new"    # what launch/evaluate.py picks
    out["default_dtype"] = "bfloat16" if default == "new_bf16" else "float32"
    out["speedup"] = round(rate[default] / rate["old"], 2)
    if "new_bf16" in rate:
        out["new_bf16_records_per_s"] = round(rate["new_bf16"], 3)
        out["agreement_bf16_vs_fp32"] = round(
            sum(a == b for a, b in zip(preds["new_bf16"], preds["new"])) / len(records), 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
