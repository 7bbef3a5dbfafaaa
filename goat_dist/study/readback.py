"""Read a finished (or partial) training run's results back from its output folder."""

from __future__ import annotations

import json
import os
from typing import Optional


def read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_finished(point_dir: str) -> bool:
    summary = read_json(os.path.join(point_dir, "summary.json"))
    return bool(summary and summary.get("finished"))


def tensorboard_scalars(log_dir: str, tags: list[str]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of ``tags`` in a TensorBoard folder; the last write of a step wins."""
    if not os.path.isdir(log_dir):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    # keep every scalar, and at most one image/histogram (the expert-load heatmaps are large)
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "images": 1, "histograms": 1,
                                                   "tensors": 1, "audio": 1})
    acc.Reload()
    have = set(acc.Tags().get("scalars", []))
    out = {}
    for tag in tags:
        if tag in have:
            by_step = {e.step: float(e.value) for e in acc.Scalars(tag)}
            out[tag] = sorted(by_step.items())
    return out
