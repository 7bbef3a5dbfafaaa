"""Run one study unit as a subprocess tree and measure it from outside.

A training run (torchrun and its workers, or one python process) runs in a session of its own,
so a crash, a hang or an out-of-memory kill stays inside its unit and the whole tree can be
stopped as a group. Peak memory is read from the kernel's per-process high-water marks while it
runs. Used by scripts/scaling_study.py and scripts/compare_methods.py.
"""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Optional

# Variables that would make a child believe it is already a rank of some launcher's world.
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
             "MASTER_ADDR", "MASTER_PORT")


def log(msg: str, prefix: str = "study") -> None:
    """Progress line on stderr: stdout's last line is reserved for a script's JSON summary."""
    print(f"{prefix}: {msg}", file=sys.stderr, flush=True)


class TreeMemory:
    """Peak RSS per rank of a process tree, by polling /proc/<pid>/status VmHWM.

    VmHWM is the kernel's high-water mark of a process's RSS, so one poll after a spike still
    sees it; polling only has to catch every process alive and attribute it to a rank.
    """

    def __init__(self, root_pid: int) -> None:
        import psutil  # a DeepSpeed dependency, so always installed with the trainer
        self._psutil = psutil
        self.root_pid = root_pid
        self.procs: dict[int, dict[str, Any]] = {}   # pid -> {rank, ppid, hwm_kb}

    def sample(self) -> None:
        ps = self._psutil
        try:
            root = ps.Process(self.root_pid)
            tree = [root] + root.children(recursive=True)
        except ps.Error:
            return
        for p in tree:
            info = self.procs.get(p.pid)
            if info is None or info["rank"] is None:
                # Re-read until a RANK shows up: a worker caught between torchrun's fork and its
                # exec still has the launcher's environment (and memory), not its own.
                try:
                    rank = p.environ().get("RANK")
                    ppid = p.ppid()
                except ps.Error:
                    continue
                if info is None or rank is not None:
                    # hwm restarts at exec: the pre-exec value was the launcher's copy
                    info = self.procs[p.pid] = {"rank": None if rank is None else int(rank),
                                                "ppid": ppid, "hwm_kb": 0}
            hwm = vm_hwm_kb(p.pid)
            if hwm is not None:
                info["hwm_kb"] = max(info["hwm_kb"], hwm)

    def per_rank_mb(self) -> list[float]:
        """Peak RSS (MiB) of each rank's main process, ordered by rank.

        A rank's main process is one whose parent is not of the same rank: helpers a rank
        forks (data loader workers, compiler jobs) inherit its RANK and share its pages, so
        counting them would count the same memory twice.
        """
        by_rank: dict[int, float] = {}
        for pid, info in self.procs.items():
            rank = info["rank"]
            if rank is None:
                continue
            parent = self.procs.get(info["ppid"])
            if parent is not None and parent["rank"] == rank:
                continue
            by_rank[rank] = max(by_rank.get(rank, 0.0), info["hwm_kb"] / 1024.0)
        return [round(by_rank[k], 1) for k in sorted(by_rank)]

    def max_mb(self) -> float:
        return max((i["hwm_kb"] / 1024.0 for i in self.procs.values()), default=math.nan)


def vm_hwm_kb(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


# How long a unit's processes get to exit after the SIGTERM that stops a study (the trainer
# writes a checkpoint on SIGTERM, train/resilience.py) before they are killed.
STOP_GRACE_S = 60.0


def interrupt_on_sigterm() -> None:
    """Make SIGTERM stop a study the way Ctrl-C does.

    A study is stopped with SIGTERM by ``kill``, a batch system's preemption or time limit, and
    by anything started from a script (a shell runs background jobs with SIGINT ignored, so
    Ctrl-C's signal never arrives there). Python's default for SIGTERM is to die at once, which
    would leave the running unit's processes (a session of their own, run_point) training on
    as orphans. As KeyboardInterrupt instead, run_point forwards SIGTERM to the unit, whose
    trainer checkpoints, and the study exits; rerunning its command continues it.
    """
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(procs: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in RANK_VARS and not k.startswith(("TORCHELASTIC_", "PET_"))}
    if procs == 1:
        # Explicit single-process world: launch/train.py would otherwise take SLURM_PROCID /
        # SLURM_NTASKS of an enclosing allocation and wait for ranks that never come. RANK in
        # the environment also lets TreeMemory attribute the process to rank 0.
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    return env


def signal_group(pgid: int, sig: int) -> None:
    """Signal the process group this script created for one point (and nothing else)."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def reap(pid: int, within_s: float):
    """wait4() ``pid`` for up to ``within_s`` seconds: (exit code, rusage) or None."""
    deadline = time.time() + within_s
    while True:
        got, status, usage = os.wait4(pid, os.WNOHANG)
        if got:
            return os.waitstatus_to_exitcode(status), usage
        if time.time() >= deadline:
            return None
        time.sleep(0.1)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_PROGRESS = re.compile(r"\d+%\|")           # tqdm bars
_RANK_PREFIX = re.compile(r"^\[(?:default|rank)\d+\]:\s?")
_EXC_LINE = re.compile(r"^[\w.]*(Error|Exception|Interrupt|Exit|EnforceNotMet)\b.*")
# Errors a rank reports only because ANOTHER rank died (its peer vanished, torchrun stopped it):
# never the root cause when something else was printed.
_SECONDARY = re.compile(r"ChildFailedError|Connection (closed|reset) by peer|Signal \d+ \(SIG|"
                        r"SIGTERM|Broken pipe|DistBackendError: .*(peer|closed)")


def error_summary(stderr_text: str, tail_lines: int = 10) -> tuple[str, str]:
    """(one-line reason, last lines) of a failed run's stderr, progress bars removed.

    The reason is, by preference: the trainer's own ``goat_dist: error:`` line; the ``what():``
    line of a C++ exception that aborted a rank (e.g. gloo's collective-size mismatch, printed
    by the rank that died first); the FIRST exception line that is not a consequence of another
    rank's death (the first is the original cause, later ones are chained or come from peers);
    else the last line.
    """
    lines = []
    for raw in re.split(r"[\r\n]+", stderr_text):
        line = _RANK_PREFIX.sub("", _ANSI.sub("", raw)).rstrip()
        if line.strip() and not _PROGRESS.search(line):
            lines.append(line)
    stripped = [ln.strip() for ln in lines]
    reason = next((ln for ln in reversed(stripped) if ln.startswith("goat_dist: error:")), "")
    if not reason:
        reason = next((ln for ln in stripped if ln.startswith("what():")), "")
    if not reason:
        reason = next((ln for ln in stripped
                       if _EXC_LINE.match(ln) and not _SECONDARY.search(ln)), "")
    if not reason:
        reason = next((ln for ln in stripped if _EXC_LINE.match(ln)), "")
    if not reason and stripped:
        reason = stripped[-1]
    return reason[:500], "\n".join(lines[-tail_lines:])


def run_point(cmd: list[str], env: dict[str, str], out_dir: str, poll_s: float,
              timeout_s: float, cwd: Optional[str] = None) -> dict[str, Any]:
    """Run one point's command with its output in ``out_dir``/{stdout,stderr}.log, measuring
    peak memory from outside. Returns returncode, run_time_s, memory and timeout flag.

    ``cwd``: the command's working directory (None: this process's); relative paths in ``cmd``,
    its executable included, are read from there.
    """
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    timed_out = False
    with open(os.path.join(out_dir, "stdout.log"), "wb") as fo, \
            open(os.path.join(out_dir, "stderr.log"), "wb") as fe:
        # A session of its own: the whole tree (torchrun + workers) can be stopped as a group
        # on a timeout or Ctrl-C without touching anything else.
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, env=env,
                                cwd=cwd, start_new_session=True)
        mem = TreeMemory(proc.pid)
        stop_at = None     # when SIGTERM went out (timeout), to escalate to SIGKILL
        try:
            while True:
                mem.sample()
                # wait4 rather than Popen.wait: it also returns the tree's ru_maxrss
                got = reap(proc.pid, 0)
                if got is not None:
                    rc, usage = got
                    proc.returncode = rc      # reaped here; Popen must not wait again
                    break
                now = time.time()
                if timeout_s and now - t0 > timeout_s and stop_at is None:
                    log(f"timeout after {timeout_s:.0f} s; stopping the point's processes")
                    timed_out, stop_at = True, now
                    signal_group(proc.pid, signal.SIGTERM)
                elif stop_at is not None and now - stop_at > 15:
                    signal_group(proc.pid, signal.SIGKILL)
                time.sleep(poll_s)
        except BaseException:
            # Ctrl-C, SIGTERM (interrupt_on_sigterm) or a bug here: the unit's trainer gets
            # SIGTERM to checkpoint on, no orphaned ranks stay behind, then re-raise
            signal_group(proc.pid, signal.SIGTERM)
            if reap(proc.pid, STOP_GRACE_S) is None:
                signal_group(proc.pid, signal.SIGKILL)
                reap(proc.pid, 15)
            proc.returncode = -1
            raise
        # ranks a crashed launcher left behind would skew the next point's measurements
        signal_group(proc.pid, signal.SIGKILL)
    per_rank = mem.per_rank_mb()
    # ru_maxrss is in KiB on Linux: the max over the launched process and its reaped tree
    peaks = [v for v in (mem.max_mb(), usage.ru_maxrss / 1024.0) if not math.isnan(v)]
    peak = max(peaks) if peaks else math.nan
    return {"returncode": rc, "run_time_s": time.time() - t0, "timed_out": timed_out,
            "peak_rss_mb_per_rank": per_rank, "peak_rss_mb_max": round(peak, 1)}


def failure_reason(m: dict[str, Any], log_dir: str, timeout_s: float,
                   incomplete: str) -> tuple[str, str]:
    """(one-line reason, stderr tail) of a run_point result that did not finish.

    Args:
        m: run_point's result; log_dir: the folder holding its stderr.log.
        incomplete: what to say when the command exited 0 but its outputs are not complete.
    """
    with open(os.path.join(log_dir, "stderr.log"), errors="replace") as f:
        reason, tail = error_summary(f.read())
    rc = m["returncode"]
    if m["timed_out"]:
        reason = f"timeout after {timeout_s:.0f} s; " + reason
    elif rc < 0:
        reason = f"killed by signal {-rc}{' (out of memory?)' if rc == -9 else ''}; " + reason
    elif rc == 0:
        reason = f"exited 0 but {incomplete}; " + reason
    return reason, tail
