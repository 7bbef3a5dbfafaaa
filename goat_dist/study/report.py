"""Tables, statistics and plots of a method comparison (scripts/compare_methods.py): what a
unit's evaluation and training produced, mean +- std over seeds, significance against a reference
method, and the PNG figures."""

from __future__ import annotations

import csv
import math
import os
import statistics
from typing import Any, Optional

from .paper import PAPER_TABLE3_AVG, paper_average, paper_task
from .readback import read_json, tensorboard_scalars


def eval_metrics(eval_dir: str, metric: str) -> dict[str, tuple[float, float]]:
    """{task: (value, stderr)} of ``metric`` from launch/evaluate.py's eval_results.json.

    The stderr is lm-eval's where it reported one; otherwise (it says "N/A" when bootstrapping
    is off) the closed-form standard error of a mean of 0/1 scores over the task's n records,
    sqrt(p (1 - p) / (n - 1)), which is what lm-eval's ``mean_stderr`` computes for acc.
    """
    res = read_json(os.path.join(eval_dir, "eval_results.json"))
    if not res:
        return {}
    raw = (res.get("lm_eval") or {}).get("results") or {}
    out = {}
    for task, vals in (res.get("metrics") or {}).items():
        v = vals.get(metric)
        if not isinstance(v, (int, float)):
            continue
        se = (raw.get(task) or {}).get(f"{metric}_stderr,none")
        if not isinstance(se, (int, float)):
            n = (res.get("n_samples") or {}).get(task) or 0
            se = math.sqrt(v * (1 - v) / (n - 1)) if n > 1 and 0 <= v <= 1 else math.nan
        out[task] = (float(v), float(se))
    return out


def compute_hours(runs_dir: str) -> dict[str, float]:
    """Wall-clock hours a study has spent, from every unit's ``unit.json`` under ``runs_dir``.

    Each unit's training is counted once, however many evaluations reuse it (the sweep's best
    run is also seed 0 of the final table), and every stage sums its attempts, interrupted ones
    included (goat_dist/study/units.py). Returns {"train", "eval", "total", "units"}.
    """
    train = evals = 0.0
    units = 0
    for name in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
        rec = read_json(os.path.join(runs_dir, name, "unit.json"))
        if not rec:
            continue
        units += 1
        train += (rec.get("train") or {}).get("run_time_s") or 0.0
        evals += sum((e or {}).get("run_time_s") or 0.0 for e in (rec.get("eval") or {}).values())
    return {"train": train / 3600, "eval": evals / 3600, "total": (train + evals) / 3600,
            "units": units}


def train_figures(train_dir: str) -> dict[str, Any]:
    """Throughput, load balance and the loss curve of a finished training run."""
    summary = read_json(os.path.join(train_dir, "summary.json")) or {}
    sc = tensorboard_scalars(os.path.join(train_dir, "tensorboard"),
                             ["train/tokens_per_s", "experts/load_cv", "train/loss"])
    rates = [v for _, v in sc.get("train/tokens_per_s", [])]
    rates = rates[1:] if len(rates) >= 2 else rates   # the first window pays start-up costs
    hist = summary.get("history") or []
    # A run resumed by a trainer that did not yet carry its history through checkpoints has
    # only the steps since the restart in summary.json; the event files (every attempt's,
    # every log_every steps) fill in the steps before.
    first = hist[0]["step"] if hist else math.inf
    earlier = [(s, v) for s, v in sc.get("train/loss", []) if s < first]
    return {"tokens_per_s": sum(rates) / len(rates) if rates else math.nan,
            "load_cv": sc["experts/load_cv"][-1][1] if sc.get("experts/load_cv") else math.nan,
            "final_train_loss": (sum(h["loss"] for h in hist[-5:]) / len(hist[-5:])
                                 if hist else math.nan),
            "steps": summary.get("global_step"), "wall_time_s": summary.get("wall_time_s"),
            # a study resumed on another machine can mix precisions (train.bf16=auto): say which
            "train_dtype": {True: "bf16", False: "fp32"}.get(summary.get("bf16"), ""),
            "loss_curve": earlier + [(h["step"], h["loss"]) for h in hist]}


def eval_dtype(eval_dir: str) -> str:
    """The precision launch/evaluate.py scored in ("bf16", "fp32", ...; "" before it ran)."""
    res = read_json(os.path.join(eval_dir, "eval_results.json")) or {}
    names = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}
    return names.get(res.get("dtype"), res.get("dtype") or "")


def average(metrics: dict[str, tuple[float, float]]) -> tuple[float, float]:
    """Unweighted mean over tasks and its stderr (tasks' test sets are independent)."""
    if not metrics:
        return math.nan, math.nan
    vals = [v for v, _ in metrics.values()]
    ses = [se for _, se in metrics.values()]
    se = math.sqrt(sum(s * s for s in ses)) / len(ses) if all(not math.isnan(s) for s in ses) \
        else math.nan
    return sum(vals) / len(vals), se


def fmt(v: Any, nd: int = 4) -> str:
    """A table cell: floats to nd significant digits, NaN and None empty, lists ;-joined."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, list):
        return ";".join(fmt(x, 6) for x in v)
    return f"{v:.{nd}g}" if isinstance(v, float) else str(v)


def write_csv(path: str, rows: list[dict], columns: Optional[list[str]] = None) -> None:
    """Rows to CSV atomically; ``columns`` default to every key in first-seen order."""
    cols: list[str] = list(columns or [])
    if columns is None:
        for r in rows:
            cols += [k for k in r if k not in cols and k != "loss_curve"]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: fmt(r.get(k), 8) for k in cols})
    os.replace(tmp, path)


def mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def method_table(rows: list[dict], phase_names: tuple[str, ...], eval_name: str,
                 tasks: list[str], metric: str,
                 trained: Optional[list[str]] = None) -> tuple[str, dict[str, dict]]:
    """Markdown: one line per variant, mean +- std over seeds of each task and the average.

    Args:
        trained: the tasks with training data; when given (and some are in ``tasks``), a column
            with their average (mean +- std over seeds), which separates what fine-tuning taught
            from transfer to the tasks it never saw.

    Returns the table and, per variant, {avg, std, se, n, by_seed} for the significance notes.
    ``se`` is the standard error of the variant's mean average accuracy: seed-to-seed spread and
    test-set sampling (lm-eval's stderr) combined, sqrt(std^2/n + mean(stderr^2)); the table
    shows it as the ``SE`` column. ``by_seed`` maps each seed to that run's average.
    """
    trained = [t for t in (trained or []) if t in tasks]
    by_variant: dict[str, list[dict]] = {}
    for r in rows:
        if r["phase"] in phase_names and r["eval"] == eval_name and r["eval_status"] in ("ok", "done"):
            by_variant.setdefault(r["variant"], []).append(r)
    head = ("| method | lr | seeds | " + " | ".join(tasks) + " | avg | SE |"
            + (" trained avg |" if trained else "") + " train min |")
    lines = [head, "|" + "---|" * (len(tasks) + 6 + bool(trained))]
    stats = {}
    for name, rs in by_variant.items():
        cells = []
        for t in tasks:
            m, s = mean_std([r.get(f"{t}", math.nan) for r in rs])
            cells.append("" if math.isnan(m) else f"{100 * m:.1f} ± {100 * s:.1f}")
        avg, sd = mean_std([r["avg"] for r in rs])
        ses = [r["avg_stderr"] for r in rs if not math.isnan(r["avg_stderr"])]
        se = math.sqrt(sd * sd / len(rs) + (statistics.fmean([x * x for x in ses]) if ses else 0))
        by_seed = {r["seed"]: r["avg"] for r in rs
                   if r.get("seed") is not None and not math.isnan(r["avg"])}
        stats[name] = {"avg": avg, "std": sd, "se": se, "n": len(rs), "by_seed": by_seed}
        lrs = sorted({r["lr"] for r in rs if r["lr"] is not None})
        tmin = [r["train_time_s"] / 60 for r in rs
                if isinstance(r.get("train_time_s"), float) and not math.isnan(r["train_time_s"])]
        if trained:
            tm, ts = mean_std([statistics.fmean([r.get(t, math.nan) for t in trained])
                               for r in rs])
            cells_trained = " |" if math.isnan(tm) else f" {100 * tm:.2f} ± {100 * ts:.2f} |"
        lines.append(f"| {name} | {', '.join(f'{x:g}' for x in lrs)} | {len(rs)} | "
                     + " | ".join(cells)
                     + f" | {'' if math.isnan(avg) else f'{100 * avg:.2f} ± {100 * sd:.2f}'} | "
                     + f"{'' if math.isnan(se) else f'{100 * se:.2f}'} |"
                     + (cells_trained if trained else "") + " "
                     + (f"{statistics.fmean(tmin):.1f}" if tmin else "") + " |")
    return "\n".join(lines), stats


def significance_notes(stats: dict[str, dict], ref: str) -> list[str]:
    """Which differences from ``ref`` are larger than their noise, judged two ways.

    - Seeds and test set (the verdict): the difference against twice the combined standard
      error of both means, each sqrt(seed std^2 / n + test-set stderr^2) (:func:`method_table`).
      The test-set term treats the two methods' test samples as independent although they score
      the same records, so this errs on the side of "within noise".
    - Seeds only (when both have 2+ seeds): Welch's t-test on the seed averages, i.e. whether
      the gap on *this* test set is larger than training-run randomness; its p-value follows.
    - Paired by seed (when both have 2+ seeds in common, from ``by_seed``): a paired t-test on
      the per-seed differences. A seed fixes the sampler order and the dropout masks (and the
      held-out records, without a ``data.eval_file``) for every method alike, so runs that share
      a seed share that luck; pairing removes it, where Welch's test counts it as noise. Only
      the seeds both methods have count.
    """
    from scipy import stats as scipy_stats

    if ref not in stats:
        return []
    out = []
    a = stats[ref]
    for name, b in stats.items():
        if name == ref or math.isnan(b["avg"]):
            continue
        d = a["avg"] - b["avg"]
        se = math.sqrt(a["se"] ** 2 + b["se"] ** 2)
        verdict = "significant" if se > 0 and abs(d) > 2 * se else "within noise"
        line = f"- {ref} - {name}: {100 * d:+.2f} points (2 SE = {200 * se:.2f}): {verdict}"
        if a["n"] >= 2 and b["n"] >= 2:
            if a["std"] == 0 and b["std"] == 0:
                p = 0.0 if d else 1.0
            else:
                p = float(scipy_stats.ttest_ind_from_stats(
                    a["avg"], a["std"], a["n"], b["avg"], b["std"], b["n"], equal_var=False).pvalue)
            line += f"; seeds only ({a['n']} vs {b['n']}): Welch p = {p:.3f}"
        shared = sorted(set(a.get("by_seed", {})) & set(b.get("by_seed", {})))
        if len(shared) >= 2:
            diffs = [a["by_seed"][s] - b["by_seed"][s] for s in shared]
            if statistics.stdev(diffs) == 0:        # t undefined: identical gaps on every seed
                p = 0.0 if diffs[0] else 1.0
            else:
                p = float(scipy_stats.ttest_1samp(diffs, 0.0).pvalue)
            line += (f"; paired by seed ({len(shared)} shared, gap "
                     f"{100 * statistics.fmean(diffs):+.2f} ± {100 * statistics.stdev(diffs):.2f}): "
                     f"p = {p:.3f}")
        out.append(line)
    return out


def beside_paper(stats: dict[str, dict], tasks: list[str]) -> list[str]:
    """Markdown: our ordering of the methods beside the paper's Table 3 ordering.

    Args:
        stats: per method, {avg, std, n} as returned by :func:`method_table` (avg in [0, 1]).
        tasks: our test tasks; the paper's average is taken over those of them it has (the
            paper's 8-task average, with HellaSwag, is shown too).

    Only methods with a Table 3 row are ranked (the base model and GOAT-mini have none there);
    rank 1 is the highest average. Returns [] when no method has both, or no task is in Table 3.
    """
    both = [m for m in stats if paper_average(m) is not None and not math.isnan(stats[m]["avg"])]
    shared = [paper_task(t) for t in tasks if paper_task(t)]
    if not both or not shared:          # e.g. a study on GSM8K: nothing to set beside Table 3
        return []
    ours = sorted(both, key=lambda m: -stats[m]["avg"])
    paper = sorted(both, key=lambda m: -paper_average(m, tasks))
    lines = [f"| method | ours: avg ± std (seeds) | our rank | paper: avg over {', '.join(shared)} "
             "| paper rank | paper 8-task avg (as printed) |", "|---|---:|---:|---:|---:|---:|"]
    for m in paper:
        s = stats[m]
        lines.append(f"| {m} | {100 * s['avg']:.2f} ± {100 * s['std']:.2f} ({s['n']}) | "
                     f"{ours.index(m) + 1} | {paper_average(m, tasks):.2f} | {paper.index(m) + 1} | "
                     f"{PAPER_TABLE3_AVG[m]:.2f} |")
    return lines


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (shorter at the start): same length as input."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


# Per-step loss jumps with the batch's task (length-grouped batches put BoolQ passages and short
# ARC questions in different steps), so the methods' curves are drawn smoothed over this many
# steps, with the raw per-step loss faint behind them.
LOSS_SMOOTHING_STEPS = 8


def plot(study_dir: str, rows: list[dict], curves: dict[str, list], grid: bool) -> list[str]:
    """loss_curves.png, accuracy.png (and accuracy_vs_E.png with ``grid``) in ``study_dir``.

    Args:
        rows: one dict per unit (compare_methods' results rows: variant, eval, eval_status, avg,
            and E / top_k / ep_size / tokens_per_s for grid points).
        curves: variant name -> [(step, train loss), ...] of its first seed.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, pts) in enumerate(sorted(curves.items())):
        if pts:
            steps, losses = [s for s, _ in pts], [v for _, v in pts]
            color = f"C{i % 10}"
            ax.plot(steps, losses, color=color, linewidth=0.6, alpha=0.25)
            ax.plot(steps, moving_average(losses, LOSS_SMOOTHING_STEPS), color=color,
                    linewidth=1.5, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss")
    ax.set_title(f"Training loss, first seed of each method (bold: mean of the last "
                 f"{LOSS_SMOOTHING_STEPS} steps)", fontsize=10)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(study_dir, "loss_curves.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # Points, not bars from zero: the methods differ by a few points on a ~45 % average, which a
    # bar chart from 0 hides. Each seed is a dot; the mean carries a +-std bar.
    final = [r for r in rows if r["eval"] == "test" and r["eval_status"] in ("ok", "done")
             and not math.isnan(r["avg"])]
    names = list(dict.fromkeys(r["variant"] for r in final))
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names)), 4))
    for i, n in enumerate(names):
        accs = [100 * r["avg"] for r in final if r["variant"] == n]
        m, s = mean_std(accs)
        ax.scatter([i] * len(accs), accs, s=12, color="0.6", zorder=2)
        ax.errorbar(i, m, yerr=s, fmt="o", color=f"C{i % 10}", capsize=5, markersize=7, zorder=3)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("average test accuracy (%)")
    ax.set_title("Test accuracy: seeds (grey), mean ± std (colour)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    if names:
        ax.set_xlim(-0.6, len(names) - 0.4)
    else:
        ax.text(0.5, 0.5, "no finished unit", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    paths.append(os.path.join(study_dir, "accuracy.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    if grid:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        pts: dict[str, list] = {}
        for r in final:
            if r.get("E"):
                pts.setdefault(f"k={r['top_k']} ep={r['ep_size']}", []).append(r)
        for label, rs in sorted(pts.items()):
            rs.sort(key=lambda r: r["E"])
            axes[0].plot([r["E"] for r in rs], [100 * r["avg"] for r in rs], marker="o", label=label)
            axes[1].plot([r["E"] for r in rs], [r["tokens_per_s"] for r in rs], marker="o", label=label)
        for ax, yl in zip(axes, ("average accuracy (%)", "tokens/s (all ranks)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("experts E")
            ax.set_ylabel(yl)
            ax.grid(True, alpha=0.3)
            if pts:
                ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(os.path.join(study_dir, "accuracy_vs_E.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
