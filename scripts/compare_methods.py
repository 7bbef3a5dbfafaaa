#!/usr/bin/env python
"""Compare fine-tuning methods, or GOAT expert counts, on a real model: train, evaluate, tabulate.

    # the method table of docs/RESULTS.md: a learning-rate sweep on the validation split, then
    # every method at its best learning rate with 3 seeds, evaluated on the full test sets
    python scripts/compare_methods.py --config configs/smollm2_std.yaml \\
        --lrs 1e-4 2e-4 5e-4 --seeds 0 1 2 --study-dir outputs/compare_methods

    # the expert-count study of docs/SCALING_STUDY.md (GOAT at fixed total rank)
    python scripts/compare_methods.py --config configs/smollm2_std.yaml --methods \\
        --expert-grid 2 4 8 16 --top-k 1 2 --ep-size 1 --expert-points 8:2:2 --lrs 2e-4 \\
        --seeds 0 --study-dir outputs/expert_count

    # plan only: every unit, its overrides and its commands
    python scripts/compare_methods.py --config configs/smollm2_std.yaml --dry-run

Methods (every one at the run config's total rank goat.r, targets and schedule; the table is
METHODS below): ``lora`` (E=1, kaiming A / zero B), ``pissa`` (E=1, top-r SVD), ``milora``
(E=1, bottom-r SVD), ``molora`` (E=8, k=2, random experts), ``hydralora`` (E=8, k=2, one shared
A), ``goat`` (E=8, k=2, SVD segments), ``goat_mini`` (E=8, k=2, the segments' minor
components), and ``base``: the model evaluated without an adapter.

Phases:
    sweep   each method of --sweep-methods (default lora goat) at each --lrs value, seed
            --seeds[0], evaluated on --val-tasks (the validation split). The best value by the
            average --metric picks the learning rate of its family: methods with E = 1 take the
            best of ``lora``, mixtures take the best of ``goat`` (LR_FAMILY), unless swept
            themselves. One --lrs value = no sweep.
    final   every method at its learning rate, every seed, evaluated on --test-tasks. A final
            unit that the sweep already trained (same method, lr, seed) is not trained again.

Resuming: every trained adapter lives in <study-dir>/runs/<method>_lr<lr>_s<seed>/ (see
goat_dist/study/units.py). A study folder under results/ can be committed as it fills (the
repository ignores its weights, logs and checkpoints) and continued from a fresh clone: a unit
whose evaluation is done is skipped, one that still needs its lost adapter is trained again. A rerun skips finished stages, resumes interrupted training from its
last checkpoint, and reruns failed evaluations; results.csv / results.md are rewritten after
every unit, so partial tables can be committed while a long study runs. <study-dir>/study.json
records the settings every unit shares; a rerun with other settings is refused. Training and
evaluation run from the repository root, so the config's paths (and --set's) are read from
there, and a folder inside the repository records only repository-relative paths.
``--stop-after-steps N`` ends every training invocation at global step N with a checkpoint (a
run then shows as ``stopped``): for a job with a time limit; rerun without it to continue.

Outputs in --study-dir: results.csv (one row per unit and evaluation set: every task's metric
and stderr, time, memory, throughput, load CV), results.md (per-method mean +- std over seeds
per task, the chosen learning rates, the sweep), loss_curves.png, accuracy.png (and, with
--expert-grid or --expert-points, accuracy_vs_E.png). The last line on stdout is a JSON summary.

Exit status: 0 when every unit finished, 1 when some unit failed or stopped, 2 on bad input,
130 when stopped by Ctrl-C or SIGTERM (the running unit's trainer checkpoints first; rerun the
same command to continue).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from goat_dist.study.process import child_env, interrupt_on_sigterm, log as _log  # noqa: E402
from goat_dist.study.folder import StudyFolderError, open_study_folder, sha256_of  # noqa: E402
from goat_dist.study.report import (average, beside_paper, compute_hours, eval_dtype,  # noqa: E402
                                     eval_metrics, fmt, method_table, plot, significance_notes,
                                     train_figures, write_csv)
from goat_dist.study.readback import read_json  # noqa: E402
from goat_dist.study.units import UnitResult, run_unit  # noqa: E402

TRAIN_SCRIPT = os.path.join(ROOT, "launch", "train.py")
EVAL_SCRIPT = os.path.join(ROOT, "launch", "evaluate.py")
DEFAULT_DS_CONFIG = os.path.join(ROOT, "ds_configs", "zero2.json")

# name -> GOAT overrides. Total rank, alpha, targets, dropout and aux coefficient come from the
# run config, so every method gets the same budget (the paper's Table 3 protocol).
METHODS: dict[str, dict[str, Any]] = {
    "lora": {"goat.num_experts": 1, "goat.top_k": 1, "goat.init": "molora"},
    "pissa": {"goat.num_experts": 1, "goat.top_k": 1, "goat.init": "pissa"},
    "milora": {"goat.num_experts": 1, "goat.top_k": 1, "goat.init": "milora"},
    "molora": {"goat.num_experts": 8, "goat.top_k": 2, "goat.init": "molora"},
    "hydralora": {"goat.num_experts": 8, "goat.top_k": 2, "goat.init": "hydralora"},
    "goat": {"goat.num_experts": 8, "goat.top_k": 2, "goat.init": "goat"},
    "goat_mini": {"goat.num_experts": 8, "goat.top_k": 2, "goat.init": "goat_mini"},
}
# Model selection evaluates the tasks that have training data, on the validation split.
VAL_TASKS = ["cs_std_boolq", "cs_std_arc_easy", "cs_std_arc_challenge", "cs_std_obqa"]
# Whose swept learning rate a method takes when it is not swept itself.
LR_FAMILY = {"lora": "lora", "pissa": "lora", "milora": "lora", "molora": "goat",
             "hydralora": "goat", "goat": "goat", "goat_mini": "goat"}
# Keys each unit sets itself; a --set of one of them would be silently overridden.
UNIT_KEYS = ("goat.num_experts", "goat.top_k", "goat.init", "optim.lr", "train.seed",
             "train.ep_size", "train.output_dir", "train.resume", "train.overwrite_output_dir",
             "train.stop_after_steps")


def in_repo(path: Optional[str]) -> Optional[str]:
    """``path`` relative to the repository when it lies inside it (machine-independent), else as is."""
    if path is None:
        return None
    rel = os.path.relpath(path, ROOT)
    return path if rel.startswith("..") else rel


def log(msg: str) -> None:
    _log(msg, "compare_methods")


@dataclass
class Variant:
    """One thing to train: a method of METHODS or a point of the expert grid.

    Attributes:
        name: unit-name prefix (``goat``, ``goat_E4_k1_ep1``, ``base``).
        overrides: run-config overrides that make it (``section.key=value``).
        family: whose learning rate it takes when not swept (LR_FAMILY; itself for grid points).
        trains: False for the zero-shot base model (evaluated only).
    """

    name: str
    overrides: list[str] = field(default_factory=list)
    family: str = ""
    trains: bool = True


@dataclass
class Unit:
    """A (variant, lr, seed) training run and one evaluation set of it."""

    variant: Variant
    lr: Optional[float]
    seed: Optional[int]
    phase: str          # sweep | final | base
    eval_name: str      # val | test

    @property
    def run_id(self) -> str:
        if not self.variant.trains:
            return "base"
        return f"{self.variant.name}_lr{self.lr:g}_s{self.seed}"


def variants_of(args: argparse.Namespace) -> list[Variant]:
    out = []
    for m in args.methods:
        if m == "base":
            out.append(Variant("base", [], "", trains=False))
        else:
            out.append(Variant(m, [f"{k}={v}" for k, v in METHODS[m].items()], LR_FAMILY[m]))
    grid = [(E, k, ep) for E in args.expert_grid or [] for k in args.top_k for ep in args.ep_size]
    for E, k, ep in dict.fromkeys(grid + list(args.expert_points)):    # ordered, no repeats
        if k > E or E % ep:
            log(f"expert grid: skipping E={E} k={k} ep={ep} (top_k > E or ep_size does not "
                f"divide E)")
            continue
        name = f"goat_E{E}_k{k}_ep{ep}"
        out.append(Variant(name, [f"goat.num_experts={E}", f"goat.top_k={k}", "goat.init=goat",
                                  f"train.ep_size={ep}"], name))
    return out


def expert_point(text: str) -> tuple[int, int, int]:
    """``E:k:ep`` (argparse type of --expert-points)."""
    try:
        E, k, ep = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not E:k:ep (three integers, e.g. 8:2:2)")
    if min(E, k, ep) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: E, k and ep must be >= 1")
    return E, k, ep


# ---------------------------------------------------------------------------- commands
# Commands run from the repository root (run_unit's cwd=ROOT) with paths relative to it where
# they lie inside it: what the trainer and evaluator record (unit.json's commands, summary.json's
# output_dir, eval_results.json's adapter) then names no path of this machine, so a study folder
# under results/ is committed as it is and continues from a clone anywhere.
def python_cmd(procs: int) -> list[str]:
    py = in_repo(sys.executable)
    return ([py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)]
            if procs > 1 else [py])


def train_cmd(args, unit: Unit, run_dir: str) -> list[str]:
    cmd = python_cmd(args.procs)
    cmd += [in_repo(TRAIN_SCRIPT), "--config", in_repo(args.config)]
    cmd += ["--ds_config", in_repo(args.ds_config)] if args.ds_config else []
    cmd += ["--output_dir", in_repo(os.path.join(run_dir, "train"))]
    cmd += list(args.overrides) + unit.variant.overrides
    # resume=auto picks an interrupted run up from its checkpoint; overwrite_output_dir lets a
    # run that died before its first checkpoint start again in the same folder
    cmd += [f"optim.lr={unit.lr!r}", f"train.seed={unit.seed}", "train.resume=auto",
            "train.overwrite_output_dir=true"]
    if args.stop_after_steps:
        cmd.append(f"train.stop_after_steps={args.stop_after_steps}")
    return cmd


def eval_cmd(args, unit: Unit, run_dir: str) -> list[str]:
    cmd = python_cmd(args.eval_procs)
    cmd += [in_repo(EVAL_SCRIPT), "--model", in_repo(args.model)]
    if unit.variant.trains:
        cmd += ["--adapter", in_repo(os.path.join(run_dir, "train"))]
    tasks, data_dir = ((args.val_tasks, args.val_data_dir) if unit.eval_name == "val"
                       else (args.test_tasks, args.test_data_dir))
    cmd += ["--tasks", *tasks,
            "--output_dir", in_repo(os.path.join(run_dir, f"eval_{unit.eval_name}"))]
    cmd += ["--data_dir", in_repo(data_dir)] if data_dir else []
    cmd += ["--limit", str(args.limit)] if args.limit else []
    cmd += ["--dtype", args.eval_dtype, "--batch_size", str(args.eval_batch_size)]
    return cmd


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="base run config (model, data, schedule)")
    p.add_argument("--ds-config", default=DEFAULT_DS_CONFIG,
                   help="DeepSpeed JSON (default ds_configs/zero2.json); 'none' = built-in ZeRO-0")
    p.add_argument("--methods", nargs="*", default=list(METHODS) + ["base"],
                   help=f"methods to compare, of {sorted(METHODS) + ['base']} (default: all); "
                        "give none with --expert-grid")
    p.add_argument("--expert-grid", type=int, nargs="+", default=None, metavar="E",
                   help="also GOAT at these expert counts (fixed total rank goat.r)")
    p.add_argument("--top-k", type=int, nargs="+", default=[2], help="top_k values of the grid")
    p.add_argument("--ep-size", type=int, nargs="+", default=[1], help="ep_size values of the grid")
    p.add_argument("--expert-points", type=expert_point, nargs="+", default=[], metavar="E:k:ep",
                   help="GOAT points added to the grid's cross product, e.g. 8:2:2 for one "
                        "expert-parallel point beside a grid at ep_size 1")
    p.add_argument("--lrs", type=float, nargs="+", default=None,
                   help="learning rates to sweep (default: the config's optim.lr, no sweep)")
    p.add_argument("--sweep-methods", nargs="+", default=["lora", "goat"],
                   help="methods whose learning rate is swept (default lora goat)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--procs", type=int, default=2, help="training processes per run (default 2)")
    p.add_argument("--eval-procs", type=int, default=1, help="evaluation processes (default 1)")
    p.add_argument("--model", default=None,
                   help="base model folder for evaluation (default: the config's model.name_or_path)")
    p.add_argument("--val-tasks", nargs="+", default=VAL_TASKS,
                   help="tasks of the validation evaluation (default: the four trained tasks in "
                        "standard form)")
    p.add_argument("--val-file", default=os.path.join(ROOT, "data", "commonsense", "validation.json"),
                   help="validation records (LLM-Adapters form with a `source` field; default "
                        "data/commonsense/validation.json, carved from the training data)")
    p.add_argument("--test-tasks", nargs="+", default=["commonsense_std"],
                   help="tasks of the final evaluation (default commonsense_std)")
    p.add_argument("--test-data-dir", default=None, help="test data folder (default data/eval)")
    p.add_argument("--metric", default="acc", help="metric averaged and tabulated (default acc)")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N records per task")
    p.add_argument("--eval-dtype", default="auto", help="launch/evaluate.py --dtype (default auto)")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                   metavar="section.key=value", help="override applied to every training run")
    p.add_argument("--stop-after-steps", type=int, default=0,
                   help="end each training invocation at this global step (resumable; not part "
                        "of the study's settings)")
    p.add_argument("--study-dir", default=os.path.join("outputs", "compare_methods"))
    p.add_argument("--timeout", type=float, default=0, help="seconds per stage attempt (0 = none)")
    p.add_argument("--dry-run", action="store_true", help="print the plan; run and write nothing")
    args = p.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS and m != "base"]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {sorted(METHODS) + ['base']}")
    if not args.methods and not args.expert_grid and not args.expert_points:
        p.error("nothing to run: give --methods and/or --expert-grid / --expert-points")
    if min(args.seeds) < 0 or args.procs < 1 or args.eval_procs < 1:
        p.error("--seeds must be >= 0, --procs and --eval-procs >= 1")
    if args.lrs is not None and any(not (x > 0 and math.isfinite(x)) for x in args.lrs):
        p.error(f"--lrs must be positive finite numbers, got {args.lrs}")
    return args


def swept_names(args, variants: list[Variant]) -> set[str]:
    """Variants whose learning rate is swept: --sweep-methods, plus any variant whose family
    representative is not swept in this study (it has nobody to borrow a learning rate from)."""
    names = {v.name for v in variants if v.trains}
    direct = {n for n in names if n in args.sweep_methods}
    return direct | {v.name for v in variants if v.trains and v.family not in direct}


def plan(args, variants: list[Variant], best: dict[str, float]) -> tuple[list[Unit], list[Unit]]:
    """(sweep units, final units); final units whose learning rate is not known yet (their
    family's sweep is unfinished: ``best`` lacks it) are left out."""
    sweep, final = [], []
    lrs = args.lrs or [args.base_lr]
    swept = swept_names(args, variants) if len(lrs) > 1 else set()
    for v in variants:
        if v.name in swept:
            sweep += [Unit(v, lr, args.seeds[0], "sweep", "val") for lr in lrs]
    # seed-major: every method's first seed comes before any method's second, so a study cut
    # short (a CPU budget spread over days) still has a row for every method
    final += [Unit(v, None, None, "base", "test") for v in variants if not v.trains]
    for s in args.seeds:
        for v in variants:
            if not v.trains:
                continue
            lr = lrs[0] if len(lrs) == 1 else best.get(v.name if v.name in swept else v.family)
            if lr is not None:
                final.append(Unit(v, lr, s, "final", "test"))
    # final units the sweep trained go first: their adapters are on disk now, while a study
    # folder committed without weights and continued elsewhere would have to train them again
    trained = {u.run_id for u in sweep}
    final.sort(key=lambda u: u.run_id not in trained)      # stable: seed-major otherwise
    return sweep, final


def split_by_source(path: str, out_dir: str) -> str:
    """Lay a mixture file out as launch/evaluate.py's data folder: <out_dir>/<source>/test.json.

    The validation split is one file with a ``source`` field per record (the training mixture's
    layout); the evaluator reads one test file per dataset folder.
    """
    from goat_dist.train.monitor import write_json_atomic

    with open(path) as f:
        records = json.load(f)
    by_source: dict[str, list] = {}
    for r in records:
        by_source.setdefault(r.get("source", "unknown"), []).append(r)
    for src, recs in by_source.items():
        os.makedirs(os.path.join(out_dir, src), exist_ok=True)
        write_json_atomic(os.path.join(out_dir, src, "test.json"), recs)
    return out_dir


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from goat_dist.train.config import ConfigError, load_run_config

    args.config = os.path.abspath(args.config)
    args.ds_config = None if args.ds_config.lower() == "none" else os.path.abspath(args.ds_config)
    study_dir = os.path.abspath(args.study_dir)
    clash = [o for o in args.overrides if o.split("=", 1)[0] in UNIT_KEYS]
    if clash:
        print(f"compare_methods: error: --set {clash} sets a key each unit sets itself "
              f"({', '.join(UNIT_KEYS)}); use --methods/--lrs/--seeds/--expert-grid",
              file=sys.stderr)
        return 2
    if args.ds_config is not None and not os.path.isfile(args.ds_config):
        print(f"compare_methods: error: --ds-config {args.ds_config} does not exist",
              file=sys.stderr)
        return 2
    try:
        base = load_run_config(args.config, list(args.overrides))
    except ConfigError as e:
        print(f"compare_methods: error: {e}", file=sys.stderr)
        return 2
    args.base_lr = base.optim.lr
    # the config's paths are read from the repository root, where the commands run (train_cmd)
    args.model = (os.path.abspath(args.model) if args.model
                  else os.path.join(ROOT, base.model.name_or_path or ""))
    if not os.path.isdir(args.model):
        print(f"compare_methods: error: evaluation needs a model folder; {args.model!r} is not "
              f"one (set model.name_or_path in the config or pass --model)", file=sys.stderr)
        return 2
    args.val_file = os.path.abspath(args.val_file)
    args.test_data_dir = args.test_data_dir and os.path.abspath(args.test_data_dir)
    args.val_data_dir = os.path.join(study_dir, "validation_data")
    variants = variants_of(args)
    # planning before the sweep has run: NaN stands for "the family's best learning rate"
    swept = swept_names(args, variants)
    sweep, final = plan(args, variants, {n: math.nan for v in variants for n in (v.name, v.family)})
    if sweep and not os.path.isfile(args.val_file):
        print(f"compare_methods: error: --val-file {args.val_file} does not exist (build it "
              f"with scripts/make_commonsense_data.py)", file=sys.stderr)
        return 2
    if args.dry_run:
        for u in sweep + final:
            fam = u.variant.name if u.variant.name in swept else u.variant.family
            rid = (u.run_id if u.lr is None or not math.isnan(u.lr)
                   else f"{u.variant.name}_lr<best of {fam}>_s{u.seed}")
            print(f"{u.phase:5s} {rid:34s} eval={u.eval_name} {' '.join(u.variant.overrides)}",
                  file=sys.stderr)
        print(json.dumps({"dry_run": True, "sweep_units": len(sweep),
                          "final_units": len(final), "study_dir": study_dir}))
        return 0

    # paths relative to the repository, so a committed study folder continues from any clone
    settings = {"config": in_repo(args.config), "config_sha256": sha256_of(args.config),
                "ds_config": in_repo(args.ds_config),
                "ds_config_sha256": sha256_of(args.ds_config),
                "procs": args.procs, "overrides": list(args.overrides), "model": in_repo(args.model),
                "metric": args.metric, "limit": args.limit, "eval_dtype": args.eval_dtype,
                "val_tasks": args.val_tasks, "test_tasks": args.test_tasks,
                "val_file_sha256": sha256_of(args.val_file) if sweep else None}
    try:
        lock = open_study_folder(study_dir, settings)
    except StudyFolderError as e:
        print(f"compare_methods: error: {e}", file=sys.stderr)
        return 2
    # released on return or exception, not whenever the file object is collected: main() runs
    # several times in one process (tests, notebooks) and a lingering lock reads as a busy folder
    with lock:
        try:
            return run_study(args, study_dir, variants, sweep)
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM: run_point has stopped the running unit (its trainer
            # checkpointed); the tables hold what finished
            print("compare_methods: interrupted; rerun the same command to continue the study",
                  file=sys.stderr)
            return 130


def run_study(args, study_dir: str, variants: list[Variant], sweep: list[Unit]) -> int:
    """The sweep, then the final units, in a locked study folder; the exit status of main()."""
    if sweep:
        split_by_source(args.val_file, args.val_data_dir)
    env = child_env(1)
    env_multi = child_env(2)
    rows: list[dict] = []
    curves: dict[str, list] = {}
    results: list[UnitResult] = []

    def execute(u: Unit, tag: str) -> dict:
        run_dir = os.path.join(study_dir, "runs", u.run_id)
        tcmd = train_cmd(args, u, run_dir) if u.variant.trains else None
        res = run_unit(u.run_id, run_dir, tcmd, eval_cmd(args, u, run_dir),
                       env if args.procs == 1 else env_multi, eval_name=u.eval_name,
                       timeout_s=args.timeout, tag=tag, cwd=ROOT)
        results.append(res)
        row = {"phase": u.phase, "variant": u.variant.name, "run_id": u.run_id, "lr": u.lr,
               "seed": u.seed, "eval": u.eval_name}
        ov = dict(o.split("=", 1) for o in u.variant.overrides)
        row.update(E=int(ov.get("goat.num_experts", 0)) or None,
                   top_k=int(ov.get("goat.top_k", 0)) or None,
                   ep_size=int(ov.get("train.ep_size", 1)), init=ov.get("goat.init"))
        row.update({"train_status": table_status(res.train.status),
                    "train_attempts": res.train.attempts,
                    "train_time_s": res.train.run_time_s or math.nan,
                    "train_peak_rss_mb": res.train.peak_rss_mb_max,
                    "eval_status": table_status(res.eval.status),
                    "eval_time_s": res.eval.run_time_s or math.nan,
                    "reason": res.train.reason or res.eval.reason})
        if u.variant.trains and res.train.status in ("ok", "done"):
            fig = train_figures(res.train_dir)
            row.update({k: v for k, v in fig.items() if k != "loss_curve"})
            if u.phase != "sweep" and u.variant.name not in curves:
                curves[u.variant.name] = fig["loss_curve"]
        metrics = eval_metrics(res.eval_dir, args.metric)
        row["eval_dtype"] = eval_dtype(res.eval_dir)
        for t, (v, se) in sorted(metrics.items()):
            row[t], row[f"{t}_stderr"] = v, se
        row["avg"], row["avg_stderr"] = average(metrics)
        return row

    def flush() -> None:
        # tables and plots after every unit: a study spread over days is committed as it fills
        write_csv(os.path.join(study_dir, "results.csv"), rows)
        write_markdown(study_dir, rows, args, chosen)
        plot(study_dir, rows, curves, bool(args.expert_grid or args.expert_points))

    chosen: dict[str, float] = {}
    for i, u in enumerate(sweep, 1):
        rows.append(execute(u, f"[sweep {i}/{len(sweep)}] {u.run_id}"))
        flush()
    for fam in {u.variant.name for u in sweep}:
        done = [r for r in rows if r["phase"] == "sweep" and r["variant"] == fam
                and not math.isnan(r["avg"])]
        if len({r["lr"] for r in done}) == len(args.lrs or []):
            chosen[fam] = max(done, key=lambda r: (r["avg"], -r["lr"]))["lr"]
            log(f"learning rate of {fam}: {chosen[fam]:g} (validation {args.metric} "
                f"{max(r['avg'] for r in done):.4f})")
        else:
            log(f"sweep of {fam} is incomplete: its family's final runs wait for a rerun")
    _, final = plan(args, variants, chosen)
    for i, u in enumerate(final, 1):
        rows.append(execute(u, f"[final {i}/{len(final)}] {u.run_id}"))
        flush()
    flush()
    plots = plot(study_dir, rows, curves, bool(args.expert_grid or args.expert_points))
    status = [r.train.status for r in results] + [r.eval.status for r in results]
    failed = sum(s == "failed" for s in status)
    stopped = sum(s == "stopped" for s in status)
    print(json.dumps({"study_dir": study_dir, "units": len(rows),
                      "finished": sum(r.ok for r in results), "failed": failed,
                      "stopped": stopped, "learning_rates": chosen,
                      "results_csv": os.path.join(study_dir, "results.csv"),
                      "results_md": os.path.join(study_dir, "results.md"), "plots": plots}))
    return 1 if failed or stopped or len(final) < sum(
        len(args.seeds) if v.trains else 1 for v in variants) else 0


def study_title(args) -> str:
    """results.md's heading: what the study compares (methods, GOAT expert points, or both)."""
    grid = bool(args.expert_grid or args.expert_points)
    if grid:
        return "Method comparison and expert-count study" if args.methods else "Expert-count study"
    return "Method comparison"


def table_status(status: str) -> str:
    """A stage's status as the tables print it: "ok" (ran now) and "done" (ran earlier) both
    read "done", so rerunning a finished study rewrites its tables byte for byte."""
    return "done" if status == "ok" else status


def last_update(study_dir: str, rows: list[dict]) -> str:
    """When the newest of the rows' units last recorded a stage ("YYYY-MM-DD HH:MM"): the time
    the table's contents changed, so re-rendering an unchanged study gives the same file."""
    stamps = [(read_json(os.path.join(study_dir, "runs", r["run_id"], "unit.json")) or {})
              .get("updated", "") for r in rows]
    newest = max(stamps, default="")
    return newest[:16] or time.strftime("%Y-%m-%d %H:%M")


def write_markdown(study_dir: str, rows: list[dict], args, chosen: dict[str, float]) -> None:
    test_tasks = sorted({k for r in rows if r["eval"] == "test" for k in r
                         if k + "_stderr" in r and not k.endswith("_stderr") and k != "avg"})
    val_tasks = sorted({k for r in rows if r["eval"] == "val" for k in r
                        if k + "_stderr" in r and not k.endswith("_stderr") and k != "avg"})
    parts = [f"# {study_title(args)}\n\nconfig `{in_repo(args.config)}`, DeepSpeed "
             f"`{in_repo(args.ds_config) or 'built-in ZeRO-0'}`, {args.procs} training process(es), "
             f"overrides {args.overrides or 'none'}; metric `{args.metric}` (x100), "
             f"mean ± std over seeds"
             + (f"; the first {args.limit} records of each task" if args.limit else "")
             + f"; updated {last_update(study_dir, rows)}.\n"]
    # trained tasks: the validation tasks (those with training data); the rest measure transfer
    table, stats = method_table(rows, ("final", "base"), "test", test_tasks, args.metric,
                                trained=args.val_tasks)
    parts += ["## Test sets\n", table, ""]
    notes = significance_notes(stats, "goat")
    if notes:
        parts += ["Differences from GOAT (significant when larger than twice the combined "
                  "standard error of seed spread and test-set sampling):", *notes, ""]
    paper = beside_paper(stats, test_tasks)
    if paper:
        parts += ["## Ordering beside the paper (Table 3, LLaMA-2-7B)\n", *paper, ""]
    if chosen:
        parts += ["## Learning rates chosen on the validation split\n"]
        parts += [f"- {k}: {v:g}" for k, v in sorted(chosen.items())] + [""]
    sweep_rows = [r for r in rows if r["phase"] == "sweep"]
    if sweep_rows:
        parts += ["## Learning-rate sweep (validation)\n",
                  "| method | lr | " + " | ".join(val_tasks) + " | avg | status |",
                  "|" + "---|" * (len(val_tasks) + 4)]
        for r in sweep_rows:
            parts.append(f"| {r['variant']} | {r['lr']:g} | "
                         + " | ".join(fmt(100 * r[t], 3) if t in r else "" for t in val_tasks)
                         + f" | {fmt(100 * r['avg'], 4)} | {r['train_status']}/{r['eval_status']} |")
        parts.append("")
    unit_lines = ["## Every unit\n", "| unit | eval | train | eval | train min | tokens/s | "
                  "peak RSS MiB | load CV | dtype (train/eval) | avg | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        unit_lines.append(
            f"| {r['run_id']} | {r['eval']} | {r['train_status']} | {r['eval_status']} | "
            f"{fmt(r['train_time_s'] / 60, 3) if not math.isnan(r['train_time_s']) else ''} | "
            f"{fmt(r.get('tokens_per_s'))} | {fmt(r['train_peak_rss_mb'])} | {fmt(r.get('load_cv'))} | "
            f"{r.get('train_dtype') or '-'}/{r.get('eval_dtype') or '-'} | "
            f"{fmt(100 * r['avg'], 4) if not math.isnan(r['avg']) else ''} | "
            f"{(r['reason'] or '')[:100].replace('|', '/')} |")
    parts += unit_lines
    hours = compute_hours(os.path.join(study_dir, "runs"))
    parts += ["", f"Compute so far: {hours['total']:.1f} h wall-clock over {hours['units']} units "
              f"({hours['train']:.1f} h training, {hours['eval']:.1f} h evaluation), every attempt "
              "counted, each training once however many evaluations reuse it."]
    tmp = os.path.join(study_dir, "results.md.tmp")
    with open(tmp, "w") as f:
        f.write("\n".join(parts) + "\n")
    os.replace(tmp, os.path.join(study_dir, "results.md"))


if __name__ == "__main__":
    interrupt_on_sigterm()
    sys.exit(main())
