"""Near ties: the multiple-choice records whose reduced-precision scores cannot be trusted.

A bf16 forward moves each option's log-likelihood by a few hundredths of a nat (weights and
activations are rounded to 8 mantissa bits). That is harmless unless a record's best two
options are closer than that: then bf16 and fp32 may pick different options, and such records
are where bf16 evaluation disagrees with fp32 (docs/RESULTS.md, "bf16 vs fp32 agreement"). The
evaluator scores every request in bf16, finds the records whose margin is below ``margin`` here,
and scores only those again in float32 (goat_dist/eval/lm.py, GoatHFLM.loglikelihood), so a
bf16 evaluation picks the fp32 option wherever bf16 could have changed it, at the cost of a
small fraction of the requests.

Both of lm-eval's multiple-choice metrics are covered: ``acc`` takes the argmax of the raw
log-likelihoods, ``acc_norm`` of log-likelihood per continuation character. A record is a near
tie when either margin is small; the per-character margin is compared with ``margin`` divided by
the shorter continuation's length (the raw error, spread over its characters).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Hashable, Sequence


def _top_two_gap(values: Sequence[float]) -> float:
    best = sorted(values, reverse=True)
    return best[0] - best[1]


def near_tie_indices(keys: Sequence[Hashable], continuations: Sequence[str],
                     loglikelihoods: Sequence[float], margin: float) -> list[int]:
    """Indices of every request of the records whose best two options are within ``margin``.

    Args:
        keys: one record key per request (``(task_name, doc_id)``); the requests of a record
            are its options. Records with a single request (rolling log-likelihood, one-option
            tasks) have no tie and are skipped.
        continuations: each request's continuation text (its length normalises ``acc_norm``).
        loglikelihoods: each request's log-likelihood, in nats.
        margin: nats; 0 finds nothing.

    Returns:
        Request indices, ascending, for all options of each near-tie record.
    """
    if margin <= 0:
        return []
    records: dict[Hashable, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        records[key].append(i)
    out: list[int] = []
    for idx in records.values():
        if len(idx) < 2:
            continue
        raw = [loglikelihoods[i] for i in idx]
        chars = [max(len(continuations[i]), 1) for i in idx]
        norm = [ll / n for ll, n in zip(raw, chars)]
        if _top_two_gap(raw) < margin or _top_two_gap(norm) < margin / min(chars):
            out += idx
    return sorted(out)
