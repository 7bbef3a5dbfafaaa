"""One resumable study unit: train (picking an interrupted run up from its checkpoint), then
evaluate, each stage a measured subprocess tree; a rerun skips the stages already done.

A unit's folder::

    <unit_dir>/train/            the trainer's output_dir (checkpoints, adapter/, summary.json)
    <unit_dir>/eval_<name>/      launch/evaluate.py's output_dir for one evaluation set (e.g.
                                 ``val`` for model selection, ``test`` for the final numbers)
    <unit_dir>/unit.json         what ran: commands, attempts, time and memory per stage

One trained adapter can be evaluated on several sets (the learning-rate sweep's best run is
also a seed of the final table) without training it again.

A study folder may be committed without its weights (for results/<study>/ the repository's
.gitignore keeps the numbers, summaries and unit records, not checkpoints, adapters or logs), so a
long study can span machines and fresh clones. A unit whose training finished but whose adapter export is gone is therefore
skipped when its evaluation is done too, and trained again from scratch when an evaluation
still needs the adapter (training is deterministic for a given seed, tests/test_train_distributed.py).

Unlike scripts/scaling_study.py's points (which are rerun from scratch so that throughput covers
one whole run), a unit resumes: what matters here is the trained adapter's accuracy, and resume
is exact (tests/test_train_distributed.py), so an interrupted hour of training is not thrown
away. Time is summed over attempts; peak memory is the max over attempts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional

from ..train.resilience import EXIT_OK, EXIT_STOPPED
from .process import failure_reason, log, run_point
from .readback import is_finished, read_json


@dataclass
class StageRecord:
    """What one stage (train or eval) of a unit cost, over all its attempts.

    Attributes:
        status: ``planned``, ``ok`` (ran now and finished), ``done`` (finished earlier, skipped
            now; unit.json keeps the ``ok`` its finishing run wrote), ``stopped`` (training
            ended early on purpose, e.g. ``train.stop_after_steps`` or a preemption signal,
            with a checkpoint to resume from) or ``failed``.
        attempts: how many times the stage was started, this run and earlier ones.
        run_time_s: wall time summed over attempts (subprocess start to exit).
        peak_rss_mb_max: peak resident memory of the tree (MiB), max over attempts.
        peak_rss_mb_per_rank: per-rank peaks of the last attempt.
        returncode, reason, stderr_tail: of the last attempt (reason empty when it succeeded).
        cmd: the last attempt's command line.
    """

    status: str = "planned"
    attempts: int = 0
    run_time_s: float = 0.0
    peak_rss_mb_max: float = math.nan
    peak_rss_mb_per_rank: list[float] = field(default_factory=list)
    returncode: Optional[int] = None
    reason: str = ""
    stderr_tail: str = ""
    cmd: list[str] = field(default_factory=list)


@dataclass
class UnitResult:
    """The two stages of a unit (training, one evaluation set) and where their outputs are."""

    unit_id: str
    unit_dir: str
    eval_name: str = "test"
    train: StageRecord = field(default_factory=StageRecord)
    eval: StageRecord = field(default_factory=StageRecord)

    @property
    def train_dir(self) -> str:
        return os.path.join(self.unit_dir, "train")

    @property
    def eval_dir(self) -> str:
        return os.path.join(self.unit_dir, f"eval_{self.eval_name}")

    @property
    def ok(self) -> bool:
        return self.train.status in ("ok", "done") and self.eval.status in ("ok", "done")


def eval_finished(eval_dir: str) -> bool:
    return read_json(os.path.join(eval_dir, "eval_results.json")) is not None


def adapter_exported(train_dir: str) -> bool:
    """Whether the run's final adapter export (``<train_dir>/adapter``) is on disk."""
    from ..adapter_io import WEIGHTS_NAME
    from ..train.checkpoint import ADAPTER_DIR
    return os.path.isfile(os.path.join(train_dir, ADAPTER_DIR, WEIGHTS_NAME))


def _stage_from(saved: Optional[dict]) -> StageRecord:
    rec = StageRecord()
    if saved:
        names = {f.name for f in dataclasses.fields(StageRecord)}
        for k, v in saved.items():
            if k in names:
                setattr(rec, k, v)
    return rec


def _run_stage(rec: StageRecord, cmd: list[str], env: dict[str, str], out_dir: str,
               log_dir: str, poll_s: float, timeout_s: float, finished,
               cwd: Optional[str] = None) -> None:
    """Run ``cmd`` once more (``rec`` accumulates) and judge it by ``finished()``."""
    rec.attempts += 1
    rec.cmd = list(cmd)
    t0 = time.time()
    try:
        m = run_point(cmd, env, log_dir, poll_s, timeout_s, cwd=cwd)
    except KeyboardInterrupt:
        # the study is being stopped (run_point has stopped the stage's processes): the attempt
        # still counts, so a unit's time covers every attempt, interrupted ones included
        rec.run_time_s += time.time() - t0
        rec.status, rec.reason = "stopped", "interrupted (Ctrl-C or SIGTERM)"
        raise
    rec.run_time_s += m["run_time_s"]
    peaks = [v for v in (rec.peak_rss_mb_max, m["peak_rss_mb_max"])
             if isinstance(v, (int, float)) and not math.isnan(v)]
    rec.peak_rss_mb_max = max(peaks) if peaks else math.nan
    rec.peak_rss_mb_per_rank = m["peak_rss_mb_per_rank"]
    rec.returncode = m["returncode"]
    if m["returncode"] == 0 and finished():
        rec.status, rec.reason, rec.stderr_tail = "ok", "", ""
        return
    summary = read_json(os.path.join(out_dir, "summary.json")) or {}
    if m["returncode"] in (EXIT_OK, EXIT_STOPPED) and summary.get("finished") is False:
        rec.status, rec.reason = "stopped", f"stopped at step {summary.get('global_step')}"
        return
    rec.status = "failed"
    rec.reason, rec.stderr_tail = failure_reason(m, log_dir, timeout_s,
                                                 f"its outputs in {out_dir} are not complete")


def run_unit(unit_id: str, unit_dir: str, train_cmd: Optional[list[str]],
             eval_cmd: list[str], env: dict[str, str], eval_name: str = "test",
             poll_s: float = 0.5, timeout_s: float = 0.0, tag: str = "",
             cwd: Optional[str] = None) -> UnitResult:
    """Train then evaluate one unit, skipping what an earlier run finished.

    Args:
        train_cmd: the training command; it must write to ``<unit_dir>/train`` and resume from
            its latest checkpoint (launch/train.py's default ``train.resume=auto``). ``None``
            for a unit that only evaluates (the zero-shot base model).
        eval_cmd: the evaluation command, writing to ``<unit_dir>/eval_<eval_name>`` (and
            reading the adapter from ``<unit_dir>/train`` when there is one).
        env: the subprocesses' environment (see process.child_env).
        timeout_s: per stage attempt; 0 = none.
        cwd: the commands' working directory (None: this process's). ``unit_dir`` is read and
            written by this process, so give it as an absolute path when ``cwd`` is set.
    """
    from ..train.monitor import write_json_atomic

    os.makedirs(unit_dir, exist_ok=True)
    res = UnitResult(unit_id, unit_dir, eval_name)
    path = os.path.join(unit_dir, "unit.json")
    saved = read_json(path) or {}
    res.train = _stage_from(saved.get("train"))
    res.eval = _stage_from((saved.get("eval") or {}).get(eval_name))

    def save() -> None:
        # re-read: another evaluation set of this unit may have been recorded meanwhile
        current = read_json(path) or {}
        evals = dict(current.get("eval") or {})
        evals[eval_name] = dataclasses.asdict(res.eval)
        write_json_atomic(path, {"unit_id": unit_id,
                                 "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "train": dataclasses.asdict(res.train), "eval": evals})

    train_skipped = True
    if train_cmd is None:
        res.train.status = "done"
    elif is_finished(res.train_dir) and (eval_finished(res.eval_dir)
                                         or adapter_exported(res.train_dir)):
        res.train.status = "done"
        log(f"{tag}: training finished earlier, skipped")
    else:
        if is_finished(res.train_dir):
            log(f"{tag}: training finished earlier but its adapter export is gone (a study "
                f"folder committed without weights?) and evaluation needs it: training again "
                f"from scratch")
            res.train = StageRecord()       # a new run: its time is not added to the lost one
        train_skipped = False
        how = "resuming" if res.train.attempts else "training"
        log(f"{tag}: {how}; logs in {unit_dir}/train_log/")
        try:
            _run_stage(res.train, train_cmd, env, res.train_dir,
                       os.path.join(unit_dir, "train_log"), poll_s, timeout_s,
                       lambda: is_finished(res.train_dir), cwd=cwd)
        finally:
            save()
        if res.train.status in ("failed", "stopped"):
            log(f"{tag}: training {res.train.status}: {res.train.reason}")
            return res
    if eval_finished(res.eval_dir):
        res.eval.status = "done"
        log(f"{tag}: evaluation finished earlier, skipped")
        if train_skipped and os.path.isfile(path):
            # nothing ran: keep the record as the run that finished wrote it, so rerunning a
            # finished study leaves its committed unit.json files byte for byte
            return res
    else:
        log(f"{tag}: evaluating ({eval_name}); logs in {unit_dir}/eval_{eval_name}_log/")
        try:
            _run_stage(res.eval, eval_cmd, env, res.eval_dir,
                       os.path.join(unit_dir, f"eval_{eval_name}_log"),
                       poll_s, timeout_s, lambda: eval_finished(res.eval_dir), cwd=cwd)
        except KeyboardInterrupt:
            save()
            raise
        if res.eval.status == "failed":
            log(f"{tag}: evaluation failed: {res.eval.reason}")
    save()
    return res

