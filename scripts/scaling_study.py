#!/usr/bin/env python
"""Scaling study: sweep experts E, top_k, ep_size and rank; one training run per point.

    # fixed total rank r = 8 (r_e = 8/E), 2 ranks, ZeRO-2, 60 steps each
    python scripts/scaling_study.py --experts 1 2 4 8 --top-k 1 2 --ep-size 1 2 \\
        --rank-mode total --rank 8 --max-steps 60 --study-dir outputs/scaling_total

    # fixed per-expert rank r_e = 2 (r = 2E), one process, built-in ZeRO-0
    python scripts/scaling_study.py --rank-mode per-expert --rank 2 --procs 1 --ds-config none

    # plan only: every point with its derived values and why it would be skipped
    python scripts/scaling_study.py --experts 2 4 8 16 --rank 8 --dry-run

Every point runs ``launch/train.py`` once, as a subprocess (so a crash, a hang or an
out-of-memory kill stays inside its point):

    procs > 1:  python -m torch.distributed.run --standalone --nproc-per-node <procs> \\
                    launch/train.py --config <config> --ds_config <ds> --output_dir <study>/<id> \\
                    <--set overrides> goat.num_experts=E goat.top_k=k goat.r=r train.ep_size=ep \\
                    [train.max_steps=N]
    procs == 1: python launch/train.py ... (rank variables set here, so a Slurm allocation's
                SLURM_* variables cannot turn the single process into a rank of a bigger world)

(``python -m torch.distributed.run`` is torchrun, run by this interpreter so the study's
virtual environment is the one training.) Paths inside the run config resolve against the
current directory, as for launch/train.py: run from the repository root for configs/demo.yaml.

Rank modes:
    --rank-mode total       --rank R: r = R at every E, r_e = R / E (E must divide R). The
                            reference's section 7 setting: s = alpha*E/r and init_cof = 1/E grow
                            and shrink with E while the adapter's parameter count stays put.
    --rank-mode per-expert  --rank R: r_e = R at every E, r = E * R (parameters grow with E).

A point is skipped (status ``invalid``, reason recorded) when top_k > E, ep_size does not divide
E or the process count, E does not divide r, or a spectrum chunk is too short: GOAT's SVD init
gives expert i the first r_e components of the i-th chunk of L = min(m, n) // E singular values
of every adapted linear, so L >= r_e is needed on the adapted linear with the smallest
min(m, n) (tiny-llama: k_proj/v_proj, 64 -> 32, so L = 32 // E).

Resuming: every point runs in <study-dir>/<point_id>. A point whose summary.json says
``finished`` is not run again (status ``done``; its numbers are read back from its folder). Any
other point (failed, interrupted, deleted) is run again from scratch: its folder is wiped first,
because a row must describe one complete, fresh run (a resumed run's wall time, tokens/s and
peak memory would only cover its tail). <study-dir>/study.json records the settings shared by
all points (config and DeepSpeed config contents, procs, max steps, --set); a rerun with other
settings is refused, so no table mixes incomparable rows. Adding E/top_k/ep/rank values to a
rerun is fine: only the new points run.

Measurements per point (results.csv; results.md shows the main ones):
    tokens_per_s      global tokens/s (all ranks) from the TensorBoard scalar train/tokens_per_s
                      (the trainer's Throughput, one value per log window): the mean over the
                      windows, leaving out the first window when there are two or more, because
                      it carries one-off start-up costs (first forward, allocator warm-up). Not
                      summary.json's steps_per_s, whose clock also runs through evaluation and
                      checkpoint writes. tokens_per_s_windows says how many windows it averages:
                      with max_steps <= train.log_every there is one, start-up included, so for
                      short runs pass e.g. --set train.log_every=1.
    peak_rss_mb_*     peak resident memory (MiB), measured from outside: the trainer records
                      none. While the run lasts, the process tree is polled every
                      --poll-interval s; each process's VmHWM (/proc/<pid>/status, the kernel's
                      own RSS high-water mark, so a spike between two polls is not missed) is
                      read and the process is attributed to a rank by the RANK variable of its
                      environment (set by torchrun for every worker, and here for procs == 1);
                      a rank's value is its main process's. The only blind spot is growth in the
                      last poll interval before a process exits; peak_rss_mb_max is therefore
                      also max()-ed with wait4()'s ru_maxrss of the launched process, which the
                      kernel computes over the whole tree of reaped descendants (exact, but one
                      number for all ranks). RSS is host memory and includes the shared
                      libraries (~0.3-0.5 GB for torch + DeepSpeed), so compare points, not
                      absolute values; accelerator memory is not measured. Linux only.
    final_train_loss  mean train loss of the last --loss-window steps (summary.json history);
                      final_aux_loss likewise.
    eval_loss, eval_accuracy   summary.json final_metrics (eval/loss, eval/accuracy).
    load_cv, max_load TensorBoard experts/load_cv and experts/max_load at the last logged step
                      (0 and 1 = perfectly balanced; see goat_dist/train/monitor.py).
    wall_time_s       summary.json wall_time_s (the training loop, incl. final eval/export);
                      run_time_s is the whole subprocess (imports, setup, SVD init, teardown).
    derived           r_e = r/E, s = GoatConfig.scale_for(hidden size), init_cof = residual_coef
                      (1/E unless goat.init_cof is set), L = q_min // E with q_min the smallest
                      min(m, n) over the adapted linears (L_layer names it).

Outputs in --study-dir: results.csv, results.md, tokens_per_s_vs_E.png, loss_vs_E.png,
load_cv_vs_E.png, study.json, and one folder per point (the trainer's outputs plus stdout.log,
stderr.log and study_point.json with the measurements taken from outside). Progress goes to
stderr; the last line on stdout is one JSON object summarising the sweep.

Exit status: 0 when no point failed, 1 when some point failed (the outputs are written anyway),
2 on bad input (config, overrides, settings differing from the study folder's).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from goat_dist.study.process import (child_env, error_summary, failure_reason,  # noqa: E402,F401
                                     interrupt_on_sigterm, log as _log, run_point)
from goat_dist.study.folder import StudyFolderError, open_study_folder, sha256_of  # noqa: E402
from goat_dist.study.report import fmt, write_csv  # noqa: E402
from goat_dist.study.readback import is_finished, read_json, tensorboard_scalars  # noqa: E402

TRAIN_SCRIPT = os.path.join(ROOT, "launch", "train.py")
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "demo.yaml")
DEFAULT_DS_CONFIG = os.path.join(ROOT, "ds_configs", "zero2.json")

# Keys every point sets itself; a --set of one of them would be silently overridden.
SWEPT_KEYS = ("goat.num_experts", "goat.top_k", "goat.r", "train.ep_size", "train.output_dir",
              "train.max_steps", "train.resume", "train.overwrite_output_dir")


def log(msg: str) -> None:
    _log(msg, "scaling_study")


CSV_COLUMNS = [
    "point_id", "E", "top_k", "ep_size", "r", "r_e", "rank_mode", "s", "init_cof", "q_min", "L",
    "L_layer", "procs", "status", "tokens_per_s", "tokens_per_s_windows", "peak_rss_mb_max",
    "peak_rss_mb_per_rank", "final_train_loss", "final_aux_loss", "eval_loss", "eval_accuracy",
    "load_cv", "max_load", "wall_time_s", "run_time_s", "steps", "trainable_params",
    "world_size", "returncode", "reason", "stderr_tail",
]


# ---------------------------------------------------------------------------- the sweep
@dataclass
class LayerShape:
    """An adapted linear: ``out_features`` x ``in_features`` (m x n)."""

    name: str
    out_features: int
    in_features: int

    @property
    def q(self) -> int:
        return min(self.out_features, self.in_features)


@dataclass
class StudyPoint:
    """One configuration of the sweep, with everything known about it before it runs.

    Attributes:
        num_experts, top_k, ep_size, r: the swept values (r is the TOTAL rank in both modes).
        rank_mode: ``total`` or ``per-expert`` (how r was derived; see the module docstring).
        r_e: per-expert rank r / E (None when E does not divide r).
        s: the adapter scaling for the model's hidden size (GoatConfig.scale_for).
        init_cof: the residual coefficient (GoatConfig.residual_coef).
        q_min, L, L_layer: smallest min(m, n) over the adapted linears, its chunk length
            q_min // E, and that layer's name.
        invalid_reason: why the point cannot run ("" when it can).
    """

    num_experts: int
    top_k: int
    ep_size: int
    r: int
    rank_mode: str
    r_e: Optional[int] = None
    s: Optional[float] = None
    init_cof: Optional[float] = None
    q_min: Optional[int] = None
    L: Optional[int] = None
    L_layer: str = ""
    invalid_reason: str = ""

    @property
    def point_id(self) -> str:
        # The total rank identifies a run in both modes, so a per-expert point and a total-rank
        # point that train the same thing share one folder and run once.
        return f"E{self.num_experts}_k{self.top_k}_ep{self.ep_size}_r{self.r}"

    def overrides(self) -> list[str]:
        return [f"goat.num_experts={self.num_experts}", f"goat.top_k={self.top_k}",
                f"goat.r={self.r}", f"train.ep_size={self.ep_size}"]


@dataclass
class PointResult:
    """What one point produced: measured from outside (memory, exit status) or read back from
    its folder (summary.json, TensorBoard). NaN/None where a value does not exist."""

    status: str = "planned"      # ok | done | failed | invalid | planned
    reason: str = ""
    stderr_tail: str = ""
    returncode: Optional[int] = None
    tokens_per_s: float = math.nan
    tokens_per_s_windows: Optional[int] = None
    peak_rss_mb_max: float = math.nan
    peak_rss_mb_per_rank: list[float] = field(default_factory=list)
    final_train_loss: float = math.nan
    final_aux_loss: float = math.nan
    eval_loss: float = math.nan
    eval_accuracy: float = math.nan
    load_cv: float = math.nan
    max_load: float = math.nan
    wall_time_s: float = math.nan
    run_time_s: float = math.nan
    steps: Optional[int] = None
    trainable_params: Optional[int] = None
    world_size: Optional[int] = None


def target_shapes(run) -> tuple[list[LayerShape], int]:
    """The adapted linears of the run's model (as the trainer selects them) and its hidden size.

    Presets are built for real (tiny); a model folder is instantiated on the meta device from
    its config.json, so no weight is read and no memory is spent.
    """
    import torch
    from goat_dist.model import find_target_modules
    from goat_dist.train.modeling import build_preset, resolve_modules_to_save

    m = run.model
    if m.preset is not None:
        model = build_preset(m.preset, m.vocab_size)
    else:
        from transformers import (AutoConfig, AutoModelForCausalLM,
                                  AutoModelForSequenceClassification)
        cfg = AutoConfig.from_pretrained(m.name_or_path)
        if m.task == "seq_cls":
            cfg.num_labels = max(2, m.num_labels)
        cls = AutoModelForCausalLM if m.task == "causal_lm" else AutoModelForSequenceClassification
        with torch.device("meta"):
            model = cls.from_config(cfg)
    goat_cfg = resolve_modules_to_save(model, dataclasses.replace(run.goat), m.task)
    modules = dict(model.named_modules())
    shapes = [LayerShape(n, modules[n].out_features, modules[n].in_features)
              for n in find_target_modules(model, goat_cfg)]
    return shapes, int(model.config.hidden_size)


def plan_points(experts: list[int], top_ks: list[int], ep_sizes: list[int], ranks: list[int],
                rank_mode: str, procs: int, base_goat, shapes: list[LayerShape], hidden: int,
                validate=None) -> list[StudyPoint]:
    """Every point of the grid with its derived values and, if it cannot run, the reason.

    Args:
        validate: optional ``fn(point) -> str`` for checks beyond the grid's own (the full run
            config); called only for points that pass those, returns "" when fine.
    """
    from goat_dist.config import RANDOM_INITS, GoatConfigError
    from goat_dist.svd import check_layer_fits

    smallest = min(shapes, key=lambda s: s.q)
    points, seen = [], set()
    for E, k, ep, rank in itertools.product(experts, top_ks, ep_sizes, ranks):
        r = rank if rank_mode == "total" else E * rank
        p = StudyPoint(num_experts=E, top_k=k, ep_size=ep, r=r, rank_mode=rank_mode,
                       q_min=smallest.q, L=smallest.q // E, L_layer=smallest.name)
        if p.point_id in seen:
            continue
        seen.add(p.point_id)
        reasons = []
        if k > E:
            reasons.append(f"top_k={k} > E={E}")
        if r % E:
            reasons.append(f"E={E} does not divide r={r}")
        else:
            p.r_e = r // E
        if E % ep:
            reasons.append(f"ep_size={ep} does not divide E={E}")
        if procs % ep:
            reasons.append(f"ep_size={ep} does not divide the process count {procs}")
        if ep > 1 and base_goat.init == "hydralora":
            # one A shared by all experts cannot be split over ranks (the trainer refuses it)
            reasons.append(f"init=hydralora cannot be expert-parallel (ep_size={ep})")
        # init_cof is defined whatever the rest: the explicit value or 1/E
        p.init_cof = 1.0 / E if base_goat.init_cof is None else float(base_goat.init_cof)
        if p.r_e:
            cfg = dataclasses.replace(base_goat, num_experts=E, top_k=min(k, E), r=r)
            p.s = cfg.scale_for(hidden)
            if cfg.init in ("goat", "goat_mini"):
                short = [s for s in shapes if s.q // E < p.r_e]
                if short:
                    worst = min(short, key=lambda s: s.q)
                    reasons.append(f"chunk too short: L = {worst.q}//{E} = {worst.q // E} < r_e = "
                                   f"{p.r_e} ({worst.name}, {worst.out_features}x"
                                   f"{worst.in_features}; {len(short)} layer(s))")
            elif cfg.init not in RANDOM_INITS:
                for s in shapes:  # pissa/milora: r components of the whole spectrum
                    try:
                        check_layer_fits(cfg, s.out_features, s.in_features, s.name)
                    except GoatConfigError as e:
                        reasons.append(str(e))
                        break
        if not reasons and validate is not None:
            extra = validate(p)
            if extra:
                reasons.append(extra)
        p.invalid_reason = "; ".join(reasons)
        points.append(p)
    return points


# ---------------------------------------------------------------------------- reading results
def collect(point_dir: str, res: PointResult, loss_window: int) -> None:
    """Fill ``res`` from a point's summary.json and TensorBoard events (what exists)."""
    summary = read_json(os.path.join(point_dir, "summary.json")) or {}
    hist = summary.get("history") or []
    if hist:
        last = hist[-loss_window:]
        res.final_train_loss = sum(h["loss"] for h in last) / len(last)
        res.final_aux_loss = sum(h["aux_loss"] for h in last) / len(last)
    fm = summary.get("final_metrics") or {}
    res.eval_loss = float(fm.get("eval/loss", math.nan))
    res.eval_accuracy = float(fm.get("eval/accuracy", math.nan))
    res.wall_time_s = float(summary.get("wall_time_s") or math.nan)
    res.steps = summary.get("global_step")
    res.trainable_params = summary.get("trainable_params")
    res.world_size = summary.get("world_size")
    sc = tensorboard_scalars(os.path.join(point_dir, "tensorboard"),
                             ["train/tokens_per_s", "experts/load_cv", "experts/max_load"])
    rates = [v for _, v in sc.get("train/tokens_per_s", [])]
    if len(rates) >= 2:
        rates = rates[1:]   # the first window pays the start-up costs
    if rates:
        res.tokens_per_s = sum(rates) / len(rates)
        res.tokens_per_s_windows = len(rates)
    if sc.get("experts/load_cv"):
        res.load_cv = sc["experts/load_cv"][-1][1]
    if sc.get("experts/max_load"):
        res.max_load = sc["experts/max_load"][-1][1]


# ---------------------------------------------------------------------------- outputs
def row_of(p: StudyPoint, res: PointResult, procs: int) -> dict[str, Any]:
    row = {"point_id": p.point_id, "E": p.num_experts, "top_k": p.top_k, "ep_size": p.ep_size,
           "r": p.r, "r_e": p.r_e, "rank_mode": p.rank_mode, "s": p.s, "init_cof": p.init_cof,
           "q_min": p.q_min, "L": p.L, "L_layer": p.L_layer, "procs": procs}
    row.update({k: v for k, v in dataclasses.asdict(res).items()})
    if p.invalid_reason:
        row["reason"] = p.invalid_reason
    return row


MD_COLUMNS = [("E", "E"), ("top_k", "k"), ("ep_size", "ep"), ("r", "r"), ("r_e", "r_e"),
              ("s", "s"), ("init_cof", "init_cof"), ("L", "L"), ("status", "status"),
              ("tokens_per_s", "tokens/s"), ("peak_rss_mb_per_rank", "peak RSS MiB/rank"),
              ("final_train_loss", "train loss"), ("eval_loss", "eval loss"),
              ("eval_accuracy", "eval acc"), ("load_cv", "load CV"), ("max_load", "max load"),
              ("wall_time_s", "wall s"), ("reason", "note")]


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(h for _, h in MD_COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in MD_COLUMNS) + "|"
    lines = [head, sep]
    for row in rows:
        cells = []
        for key, _ in MD_COLUMNS:
            v = row.get(key)
            if key == "peak_rss_mb_per_rank":
                text = " / ".join(f"{x:.0f}" for x in v) if v else ""
            elif key == "reason":
                text = (v or "")[:120].replace("|", "\\|").replace("\n", " ")
            elif key in ("tokens_per_s", "wall_time_s"):
                text = "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"
            else:
                text = fmt(v)
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(path: str, rows: list[dict], header: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(header + "\n\n" + markdown_table(rows) + "\n\n"
                "tokens/s: global (all ranks), mean over TensorBoard log windows after the first. "
                "peak RSS: VmHWM of each rank's process (MiB). train loss: mean of the last "
                "steps. load CV / max load: experts/load_cv and experts/max_load at the last "
                "step (0 / 1 = balanced). L = q_min // E on the smallest adapted linear.\n")
    os.replace(tmp, path)


def _good(v: Any) -> bool:
    return isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))


def plot_all(study_dir: str, rows: list[dict], rank_mode: str) -> list[str]:
    """The three PNGs (always written, with a note when no point has data)."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] in ("ok", "done")]
    rank_key = "r" if rank_mode == "total" else "r_e"
    varies = {k: len({r[k] for r in done}) > 1 for k in ("ep_size", "top_k", rank_key)}

    def series(rows_, first: str) -> dict[str, list[dict]]:
        # one line per combination of the other swept values; the label names only those
        # that actually vary, so a one-dimensional sweep gets short labels
        keys = [first] + [k for k in ("ep_size", "top_k", rank_key) if k != first and varies[k]]
        short = {"ep_size": "ep", "top_k": "k", "r": "r", "r_e": "r_e"}
        out: dict[str, list[dict]] = {}
        for r in sorted(rows_, key=lambda r: [r[k] for k in keys] + [r["E"]]):
            out.setdefault(" ".join(f"{short[k]}={r[k]}" for k in keys), []).append(r)
        return out

    def panel(ax, first: str, ykey: str, ylabel: str) -> None:
        any_data = False
        for label, rs in series(done, first).items():
            pts = [(r["E"], r[ykey]) for r in rs if _good(r.get(ykey))]
            if pts:
                any_data = True
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("experts E")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if any_data:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no finished point", ha="center", va="center",
                    transform=ax.transAxes)
        Es = sorted({r["E"] for r in rows})
        if Es:
            ax.set_xticks(Es)
            ax.set_xticklabels([str(e) for e in Es])

    fix = f"fixed {'total r' if rank_mode == 'total' else 'per-expert r_e'}"
    paths = []
    specs = [("tokens_per_s_vs_E.png", "ep_size",
              [("tokens_per_s", "tokens/s (all ranks)")], f"Throughput vs E ({fix})"),
             ("loss_vs_E.png", "top_k",
              [("final_train_loss", "final train loss"), ("eval_loss", "eval loss")],
              f"Loss vs E ({fix})"),
             ("load_cv_vs_E.png", "top_k",
              [("load_cv", "expert load CV (0 = balanced)"),
               ("max_load", "max load / uniform (1 = balanced)")],
              f"Expert load balance vs E, last step ({fix})")]
    for name, first, panels, title in specs:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
        for ax, (ykey, ylabel) in zip(axes[0], panels):
            panel(ax, first, ykey, ylabel)
        fig.suptitle(title)
        fig.tight_layout()
        path = os.path.join(study_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", "-E", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="numbers of experts E (default: 1 2 4 8)")
    p.add_argument("--top-k", type=int, nargs="+", default=[1, 2],
                   help="top_k values (default 1 2)")
    p.add_argument("--ep-size", type=int, nargs="+", default=[1],
                   help="expert-parallel degrees train.ep_size (default 1)")
    p.add_argument("--rank-mode", choices=("total", "per-expert"), default="total",
                   help="total: --rank is r, r_e = r/E; per-expert: --rank is r_e, r = E*r_e")
    p.add_argument("--rank", type=int, nargs="+", default=None,
                   help="r (total mode) or r_e (per-expert mode); default: the config's goat.r, "
                        "or goat.r // goat.num_experts in per-expert mode")
    p.add_argument("--procs", type=int, default=2,
                   help="processes per run: torchrun when > 1, plain python when 1 (default 2)")
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="base run config (default configs/demo.yaml)")
    p.add_argument("--ds-config", default=DEFAULT_DS_CONFIG,
                   help="DeepSpeed JSON (default ds_configs/zero2.json); 'none' = the trainer's "
                        "built-in ZeRO-0 config")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                   metavar="section.key=value", help="override applied to every point")
    p.add_argument("--max-steps", type=int, default=None,
                   help="train.max_steps of every point (default: the config's)")
    p.add_argument("--study-dir", default=os.path.join("outputs", "scaling_study"),
                   help="output folder (default outputs/scaling_study)")
    p.add_argument("--loss-window", type=int, default=5,
                   help="final train loss = mean over this many last steps (default 5)")
    p.add_argument("--timeout", type=float, default=0,
                   help="seconds before a point is stopped and marked failed (default 0 = none)")
    p.add_argument("--poll-interval", type=float, default=0.2,
                   help="seconds between memory polls of a running point (default 0.2)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the planned points (derived values, skip reasons); run nothing, "
                        "write nothing")
    args = p.parse_args(argv)
    for name in ("experts", "top_k", "ep_size", "rank"):
        vals = getattr(args, name)
        if vals is not None and any(v < 1 for v in vals):
            p.error(f"--{name.replace('_', '-')} values must be >= 1, got {vals}")
    if args.procs < 1 or args.loss_window < 1 or args.poll_interval <= 0:
        p.error("--procs and --loss-window must be >= 1 and --poll-interval > 0")
    if args.max_steps is not None and args.max_steps < 1:
        p.error("--max-steps must be >= 1")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from goat_dist.config import GoatConfigError
    from goat_dist.train.config import ConfigError, load_run_config
    from goat_dist.train.monitor import write_json_atomic

    config = os.path.abspath(args.config)
    ds_config = None if args.ds_config.lower() == "none" else os.path.abspath(args.ds_config)
    study_dir = os.path.abspath(args.study_dir)
    swept = [o for o in args.overrides if o.split("=", 1)[0] in SWEPT_KEYS]
    if swept:
        print(f"scaling_study: error: --set {swept} sets a key the study sets per point "
              f"({', '.join(SWEPT_KEYS)}); use --experts/--top-k/--ep-size/--rank/--max-steps",
              file=sys.stderr)
        return 2
    if ds_config is not None and not os.path.isfile(ds_config):
        print(f"scaling_study: error: --ds-config {ds_config} does not exist", file=sys.stderr)
        return 2
    common = list(args.overrides) + ([f"train.max_steps={args.max_steps}"]
                                     if args.max_steps is not None else [])
    try:
        base = load_run_config(config, common)
    except ConfigError as e:
        print(f"scaling_study: error: {e}", file=sys.stderr)
        return 2
    ranks = args.rank or [base.goat.r if args.rank_mode == "total"
                          else max(1, base.goat.r // base.goat.num_experts)]
    try:
        shapes, hidden = target_shapes(base)
    except (ConfigError, GoatConfigError, OSError) as e:
        print(f"scaling_study: error: cannot list the model's adapted linears: {e}",
              file=sys.stderr)
        return 2

    def validate(p: StudyPoint) -> str:
        # everything else the trainer would refuse at start-up (same code path)
        try:
            load_run_config(config, common + p.overrides())
        except ConfigError as e:
            return str(e)
        return ""

    points = plan_points(args.experts, args.top_k, args.ep_size, ranks, args.rank_mode,
                         args.procs, base.goat, shapes, hidden, validate)
    n_invalid = sum(bool(p.invalid_reason) for p in points)

    if args.dry_run:
        rows = [row_of(p, PointResult(status="invalid" if p.invalid_reason else "planned"),
                       args.procs) for p in points]
        print(markdown_table(rows), file=sys.stderr)
        print(json.dumps({"dry_run": True, "study_dir": study_dir, "points": len(points),
                          "runnable": len(points) - n_invalid, "invalid": n_invalid,
                          "planned": [{k: row[k] for k in CSV_COLUMNS[:13] + ["status", "reason"]}
                                      for row in rows]}))
        return 0

    settings = {"config": config, "config_sha256": sha256_of(config), "ds_config": ds_config,
                "ds_config_sha256": sha256_of(ds_config), "procs": args.procs,
                "max_steps": args.max_steps, "overrides": list(args.overrides)}
    try:
        lock = open_study_folder(study_dir, settings)  # noqa: F841 (held until exit)
    except StudyFolderError as e:
        print(f"scaling_study: error: {e}", file=sys.stderr)
        return 2

    header = (f"# Scaling study ({args.rank_mode} rank)\n\n"
              f"config `{config}`, DeepSpeed `{ds_config or 'built-in ZeRO-0'}`, "
              f"{args.procs} process(es), max_steps {args.max_steps or base.train.max_steps}, "
              f"overrides {args.overrides or 'none'}; model hidden size {hidden}, "
              f"{len(shapes)} adapted linears")
    results: list[PointResult] = [PointResult() for _ in points]
    counts = {"ok": 0, "done": 0, "failed": 0, "invalid": 0}

    def write_tables() -> list[dict]:
        rows = [row_of(p, r, args.procs) for p, r in zip(points, results)]
        write_csv(os.path.join(study_dir, "results.csv"), rows, CSV_COLUMNS)
        write_markdown(os.path.join(study_dir, "results.md"), rows, header)
        return rows

    for i, (p, res) in enumerate(zip(points, results), 1):
        pdir = os.path.join(study_dir, p.point_id)
        tag = f"[{i}/{len(points)}] {p.point_id}"
        if p.invalid_reason:
            res.status, res.reason = "invalid", p.invalid_reason
            log(f"{tag}: skipped (invalid): {p.invalid_reason}")
        elif is_finished(pdir):
            res.status = "done"
            outside = read_json(os.path.join(pdir, "study_point.json")) or {}
            for k in ("returncode", "run_time_s", "peak_rss_mb_max", "peak_rss_mb_per_rank"):
                if outside.get(k) is not None:
                    setattr(res, k, outside[k])
            collect(pdir, res, args.loss_window)
            log(f"{tag}: finished earlier, skipped")
        else:
            if os.path.isdir(pdir):
                # a failed or interrupted attempt: rerun from scratch, see the docstring
                shutil.rmtree(pdir)
            cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", str(args.procs)] if args.procs > 1 else [sys.executable])
            cmd += [TRAIN_SCRIPT, "--config", config]
            cmd += ["--ds_config", ds_config] if ds_config else []
            cmd += ["--output_dir", pdir] + common + p.overrides()
            log(f"{tag}: running ({args.procs} proc); logs in {pdir}/std{{out,err}}.log")
            m = run_point(cmd, child_env(args.procs), pdir, args.poll_interval, args.timeout)
            res.returncode, res.run_time_s = m["returncode"], m["run_time_s"]
            res.peak_rss_mb_max = m["peak_rss_mb_max"]
            res.peak_rss_mb_per_rank = m["peak_rss_mb_per_rank"]
            collect(pdir, res, args.loss_window)
            if m["returncode"] == 0 and is_finished(pdir):
                res.status = "ok"
            else:
                res.status = "failed"
                res.reason, res.stderr_tail = failure_reason(
                    m, pdir, args.timeout, "summary.json does not say finished")
            write_json_atomic(os.path.join(pdir, "study_point.json"),
                              {"point": dataclasses.asdict(p), "cmd": cmd, **m,
                               "status": res.status, "reason": res.reason,
                               "stderr_tail": res.stderr_tail})
            log(f"{tag}: {res.status} in {res.run_time_s:.1f} s"
                + (f": {res.reason}" if res.reason else
                   f" (tokens/s {res.tokens_per_s:.0f}, peak RSS {res.peak_rss_mb_max:.0f} MiB)"))
        counts[res.status] += 1
        write_tables()   # after every point, so a long sweep's progress is readable

    rows = write_tables()
    plots = plot_all(study_dir, rows, args.rank_mode)
    log("\n" + markdown_table(rows))
    print(json.dumps({
        "study_dir": study_dir, "points": len(points),
        "run": counts["ok"] + counts["failed"], "ok": counts["ok"], "failed": counts["failed"],
        "skipped": counts["done"] + counts["invalid"], "skipped_finished": counts["done"],
        "skipped_invalid": counts["invalid"],
        "failed_points": [p.point_id for p, r in zip(points, results) if r.status == "failed"],
        "results_csv": os.path.join(study_dir, "results.csv"),
        "results_md": os.path.join(study_dir, "results.md"), "plots": plots}))
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    interrupt_on_sigterm()      # SIGTERM stops the running point's processes too, as Ctrl-C does
    sys.exit(main())
