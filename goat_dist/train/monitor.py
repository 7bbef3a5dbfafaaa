"""Training monitoring: TensorBoard scalars, an expert-load heatmap, a progress bar, a JSON summary.

Only rank 0 writes: every rank builds a :class:`Monitor` (so the calling code needs no ``if
rank == 0``), and on the others ``enabled=False`` turns every method into a no-op that touches
neither the file system nor the terminal.

    mon = Monitor("outputs/run/tb", enabled=rank == 0, total_steps=200)
    mon.log_scalars(step, {"train/loss": 1.23, "train/lr": 1e-4})
    mon.log_expert_load(step, {"layers.0.q_proj": counts0, ...})   # (E,) selection counts each
    mon.advance()
    mon.write_summary("outputs/run/summary.json", {"final_loss": 1.1})
    mon.close()
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable, Mapping

import numpy as np
import torch

# Bounds of the heatmap figure (inches at _DPI): a 30-layer x 7-module model has 210 adapted
# linears, and TensorBoard stores every image in the event file, so the image must stay small.
_DPI = 100
_MAX_HEIGHT_IN = 12.0
_MAX_WIDTH_IN = 10.0
_MAX_YTICKS = 40


class Monitor:
    """Rank-0 writer of TensorBoard events and owner of the tqdm progress bar.

    Args:
        log_dir: TensorBoard folder (created when enabled).
        enabled: True on rank 0 only; False makes every method a no-op.
        total_steps: optimizer steps of the run (the progress bar's total).
        initial_step: first step of this process (> 0 when resuming). Events of an earlier,
            interrupted run at steps >= initial_step are purged from the TensorBoard view.
        desc: progress bar label.
    """

    def __init__(self, log_dir: str, enabled: bool, total_steps: int, initial_step: int = 0,
                 desc: str = "train") -> None:
        self.enabled = enabled
        self.log_dir = log_dir
        self._writer = None
        self._bar = None
        if not enabled:
            return
        # Imported lazily: disabled ranks never pay for (or depend on) tensorboard/tqdm.
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        os.makedirs(log_dir, exist_ok=True)
        self._writer = SummaryWriter(log_dir=log_dir,
                                     purge_step=initial_step if initial_step > 0 else None)
        self._bar = tqdm(total=total_steps, initial=initial_step, desc=desc, mininterval=1.0,
                         file=sys.stderr, dynamic_ncols=True, unit="step")

    # ------------------------------------------------------------------ scalars
    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Write ``scalars`` (tag -> value, e.g. ``train/loss``) at ``step``; show loss/lr on the bar.

        Values may be floats, ints or 0-d tensors; ``None`` (e.g. a grad norm DeepSpeed did not
        compute on this step) is skipped rather than failing the run.
        """
        if not self.enabled:
            return
        scalars = {tag: value for tag, value in scalars.items() if value is not None}
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, _to_float(value), global_step=step)
        postfix = {}
        for tag, key, fmt in (("train/loss", "loss", "{:.4f}"), ("eval/loss", "eval", "{:.4f}"),
                              ("train/lr", "lr", "{:.2e}")):
            if tag in scalars:
                postfix[key] = fmt.format(_to_float(scalars[tag]))
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)

    # ------------------------------------------------------------------ expert load
    def log_expert_load(self, step: int, counts: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Log how evenly the router spreads tokens over the experts of every adapted layer.

        Args:
            step: global step.
            counts: layer name -> (E,) number of times each expert was selected (any dtype,
                any device). All layers must have the same E.

        Writes the image ``experts/load`` (layers x experts, each row as fractions of that
        layer's selections) and the scalars ``experts/load_cv`` (mean over layers of the
        coefficient of variation of the fractions; 0 = perfectly balanced) and
        ``experts/max_load`` (largest fraction divided by the uniform 1/E; 1 = balanced, E =
        one expert takes everything). Layers with no selections are drawn as zeros and left
        out of the statistics.

        Returns:
            The two scalars (computed on every rank, written on rank 0 only); empty if
            ``counts`` is empty.
        """
        if not counts:
            return {}
        names = list(counts)
        rows = [torch.as_tensor(counts[n]).detach().to("cpu", torch.float64).reshape(-1)
                for n in names]
        num_experts = {r.numel() for r in rows}
        if len(num_experts) != 1:
            raise ValueError(f"log_expert_load: every layer needs the same number of experts, "
                             f"got sizes {sorted(num_experts)}")
        mat = torch.stack(rows)
        totals = mat.sum(dim=1, keepdim=True)
        frac = torch.where(totals > 0, mat / totals.clamp_min(1e-12), torch.zeros_like(mat))
        stats = _load_stats(frac[totals.squeeze(1) > 0])
        if self.enabled:
            image = _heatmap(frac.numpy(), _short_names(names), step)
            self._writer.add_image("experts/load", image, global_step=step, dataformats="HWC")
            for tag, value in stats.items():
                self._writer.add_scalar(tag, value, global_step=step)
        return stats

    # ------------------------------------------------------------------ progress / lifecycle
    def advance(self, n: int = 1) -> None:
        """Move the progress bar ``n`` optimizer steps on."""
        if self.enabled:
            self._bar.update(n)

    def flush(self) -> None:
        """Push pending events to disk (e.g. before a checkpoint, so logs and state agree)."""
        if self.enabled and self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file and the progress bar (safe to call twice)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
        self.enabled = False

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ summary
    def write_summary(self, path: str, summary: Mapping[str, Any]) -> None:
        """Write ``summary`` as JSON at ``path`` atomically (temp file + ``os.replace``).

        A reader (or a crash) never sees a half-written file. Tensors and numpy scalars are
        converted; other unknown objects are written as their ``str``.
        """
        if not self.enabled:
            return
        write_json_atomic(path, summary)


class Throughput:
    """Tokens per second between two log points.

    Args:
        clock: time source in seconds (injectable for tests).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        """Start a new measurement window now."""
        self.tokens = 0
        self._start = self._clock()

    def update(self, num_tokens: int) -> None:
        """Count ``num_tokens`` processed since the last reset."""
        self.tokens += int(num_tokens)

    def rate(self) -> float:
        """Tokens per second since the last reset (0.0 before any time has passed)."""
        elapsed = self._clock() - self._start
        return self.tokens / elapsed if elapsed > 0 else 0.0


# ---------------------------------------------------------------------- helpers
def write_json_atomic(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` via a temp file in the same folder + os.replace."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=_json_default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def _to_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().item())
    return float(value)


def _load_stats(frac: torch.Tensor) -> dict[str, float]:
    """load_cv and max_load of an (L, E) matrix of per-layer expert fractions (rows sum to 1)."""
    if frac.numel() == 0:
        return {"experts/load_cv": math.nan, "experts/max_load": math.nan}
    num_experts = frac.shape[1]
    # Each row's mean is 1/E, so its coefficient of variation is std * E (population std).
    cv = frac.std(dim=1, unbiased=False) * num_experts
    return {"experts/load_cv": float(cv.mean()),
            "experts/max_load": float(frac.max() * num_experts)}


def _short_names(names: list[str], max_len: int = 28) -> list[str]:
    """Shorten module paths for axis labels: ``...layers.12.self_attn.q_proj`` -> ``12.q_proj``."""
    def shorten(name: str, keep: int) -> str:
        parts = name.split(".")
        idx = next((p for p in parts if re.fullmatch(r"\d+", p)), None)
        tail = ".".join(parts[-keep:])
        short = f"{idx}.{tail}" if idx is not None and idx not in parts[-keep:] else tail
        return short if len(short) <= max_len else "…" + short[-(max_len - 1):]

    for keep in (1, 2, 3):
        short = [shorten(n, keep) for n in names]
        if len(set(short)) == len(short):
            return short
    return short  # still ambiguous after 3 components: labels are only a visual aid


def _heatmap(frac: np.ndarray, labels: list[str], step: int) -> np.ndarray:
    """Render an (L, E) fraction matrix as an (H, W, 3) uint8 image of bounded size."""
    # Built on the Agg canvas directly, not pyplot: no display, no global backend switch and no
    # figure registry that could leak memory over thousands of calls.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    num_layers, num_experts = frac.shape
    height = min(_MAX_HEIGHT_IN, 1.5 + 0.18 * num_layers)
    width = min(_MAX_WIDTH_IN, 3.5 + 0.35 * num_experts)
    fig = Figure(figsize=(width, height), dpi=_DPI)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(frac, aspect="auto", interpolation="nearest", cmap="viridis",
                   vmin=0.0, vmax=max(float(frac.max()), 1.0 / num_experts))
    fig.colorbar(im, ax=ax, label="fraction of the layer's selections")
    ax.set_xticks(range(num_experts))
    ax.set_xlabel("expert")
    stride = max(1, math.ceil(num_layers / _MAX_YTICKS))  # readable labels for 200+ rows
    ticks = list(range(0, num_layers, stride))
    ax.set_yticks(ticks)
    ax.set_yticklabels([labels[i] for i in ticks], fontsize=7 if num_layers > 20 else 8)
    ax.set_title(f"expert load, step {step} (uniform = {1.0 / num_experts:.3f})", fontsize=9)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
