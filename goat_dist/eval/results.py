"""Running lm-eval's evaluator on goat_dist tasks, and what comes out: JSON, markdown, predictions."""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Optional

from .tasks import TASK_GROUPS

PRIMARY = "acc"  # the metric averaged over a group (the papers' convention)


def run_evaluation(lm, tasks: dict[str, Any], log_samples: bool = False,
                   bootstrap_iters: int = 0) -> Optional[dict]:
    """lm-eval's ``evaluate`` over prepared Task objects; the results dict on rank 0, None elsewhere.

    Every rank of ``lm``'s group must call it with the same tasks (requests are sharded inside).
    ``bootstrap_iters=0``: acc/acc_norm stderr are closed-form (mean_stderr) anyway.
    """
    from lm_eval.evaluator import evaluate

    return evaluate(lm, {"tasks": tasks, "groups": {}}, bootstrap_iters=bootstrap_iters,
                    log_samples=log_samples)


def task_metrics(results: dict) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval's results (filter suffixes dropped, stderr kept)."""
    out: dict[str, dict[str, float]] = {}
    for task, res in results["results"].items():
        m = {}
        for key, v in res.items():
            if "," not in key or not isinstance(v, (int, float)):
                continue
            metric = key.split(",")[0]
            m[metric] = float(v)
        out[task] = m
    return out


def group_averages(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """Unweighted mean of PRIMARY over each group whose tasks were all evaluated."""
    out = {}
    for group, names in TASK_GROUPS.items():
        if names and all(n in metrics and PRIMARY in metrics[n] for n in names):
            out[group] = sum(metrics[n][PRIMARY] for n in names) / len(names)
    return out


def predictions(samples: list[dict]) -> dict[int, Any]:
    """Per doc_id, the prediction: argmax option index (multiple choice) or the extracted answer."""
    out = {}
    for s in samples:
        resps = s["filtered_resps"]
        if resps and isinstance(resps[0], (list, tuple)) and len(resps[0]) == 2:  # (ll, is_greedy)
            lls = [r[0] for r in resps]
            out[s["doc_id"]] = max(range(len(lls)), key=lambda i: (lls[i], -i))
        else:
            out[s["doc_id"]] = resps[0] if resps else None
    return out


def markdown_table(metrics: dict[str, dict[str, float]], averages: dict[str, float],
                   n_docs: dict[str, int]) -> str:
    """One row per task (acc, acc_norm where present, stderr, records) and one per group average."""
    def pct(v):
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"

    lines = ["| task | records | acc | ± | acc_norm | ± |", "|---|---:|---:|---:|---:|---:|"]
    for task, m in metrics.items():
        lines.append(f"| {task} | {n_docs.get(task, '')} | {pct(m.get('acc'))} | "
                     f"{pct(m.get('acc_stderr'))} | {pct(m.get('acc_norm'))} | "
                     f"{pct(m.get('acc_norm_stderr'))} |")
    for group, v in averages.items():
        lines.append(f"| **{group} (average acc)** | | **{pct(v)}** | | | |")
    return "\n".join(lines) + "\n"


def write_atomic(path: str, text: str) -> None:
    """Write via a temp file + rename: an interrupted run never leaves a half-written result."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def to_json(obj) -> str:
    return json.dumps(obj, indent=2, default=lambda o: repr(o) if not isinstance(o, (set, tuple))
                      else list(o)) + "\n"
