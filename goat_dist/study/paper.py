"""The GOAT paper's commonsense results (ICML 2025, Table 3: LLaMA-2-7B, 8 tasks), for reporting
our method ordering beside the paper's.

Transcribed from ../shared/docs/goat_reference.md section 6.3. LoRA, PiSSA and MiLoRA are
numbers the paper copied from other papers (its dagger rows); MoLoRA, HydraLoRA and GOAT are the
paper's own runs. The paper's average covers 8 tasks including HellaSwag, which our
``commonsense_std`` suite does not have, so reports compare on the average over the tasks both
have (:func:`paper_average`); the printed 8-task figure is kept for reference.
"""

from __future__ import annotations

import statistics
from typing import Optional

#: Table 3's task columns, in its order.
TABLE3_TASKS = ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
                "obqa")

#: Accuracy (%) per task and method, Table 3 (rows as printed, columns as TABLE3_TASKS). Keys
#: are goat_dist's method names.
PAPER_TABLE3: dict[str, dict[str, float]] = {
    method: dict(zip(TABLE3_TASKS, row)) for method, row in {
        "lora": (69.80, 79.90, 79.50, 83.60, 82.60, 79.80, 64.70, 81.00),
        "pissa": (67.60, 78.10, 78.40, 76.60, 78.00, 75.80, 60.20, 75.60),
        "milora": (67.60, 83.80, 80.10, 88.20, 82.00, 82.80, 68.80, 80.60),
        "molora": (73.15, 83.68, 80.09, 74.57, 85.95, 87.33, 72.53, 86.20),
        "hydralora": (72.78, 84.06, 79.68, 80.34, 86.66, 87.12, 72.35, 86.00),
        "goat": (73.60, 83.95, 80.50, 87.12, 85.00, 87.79, 76.88, 87.00),
    }.items()
}

#: The 8-task averages as Table 3 prints them (the per-task means round differently for MoLoRA,
#: 80.44, and PiSSA, 73.79: the paper truncates or averaged unrounded scores).
PAPER_TABLE3_AVG: dict[str, float] = {"lora": 77.61, "pissa": 73.78, "milora": 79.24,
                                      "molora": 80.43, "hydralora": 81.12, "goat": 82.73}


def paper_task(task: str) -> Optional[str]:
    """The paper's name for one of our task names (``cs_std_arc_easy`` -> ``arc_easy``), or None."""
    for name in TABLE3_TASKS:      # no name ends with "_" + another, so the first match is it
        if task == name or task.endswith("_" + name):
            return name
    return None


def paper_average(method: str, tasks: Optional[list[str]] = None) -> Optional[float]:
    """The paper's mean accuracy (%) of ``method`` over ``tasks`` (our names; all 8 when None).

    None when the paper has no row for ``method`` or none of ``tasks`` is in Table 3.
    """
    row = PAPER_TABLE3.get(method)
    if row is None:
        return None
    names = list(row) if tasks is None else [n for n in map(paper_task, tasks) if n in row]
    return statistics.fmean(row[n] for n in names) if names else None
