"""What clusters do to jobs: preemption signals, diverging steps, hung peers; and the exit statuses.

* :class:`GracefulStop` turns SIGTERM / SIGUSR1 (what Slurm's ``--signal`` and preemption send)
  into a flag. The trainer all-reduces it once per optimizer step (:func:`agree`), so every rank
  finishes the same step, writes the same checkpoint and exits with :data:`EXIT_STOPPED`, even
  when only one rank got the signal.
* :func:`agree` also carries the non-finite flag: a NaN/Inf loss on any rank makes every rank
  skip the update (:func:`skip_update`), so nothing non-finite reaches parameters, optimizer
  state, the scheduler or a checkpoint.
* :func:`collective_op` names the collective a rank is waiting in, so a peer that stops answering
  ends the job after ``train.dist_timeout_s`` with :class:`CollectiveTimeout` (rank, operation,
  step) instead of a bare gloo/NCCL error.

Exit statuses of ``launch/train.py`` (docs/CLUSTER.md):

==  ===========================================================================================
0   finished, or stopped at ``train.stop_after_steps`` with a checkpoint
1   an unexpected error (a traceback), or a checkpoint write failed (one message naming the path)
2   bad input: config, data, checkpoint, arguments; nothing was written
3   diverged: ``train.max_skipped_steps`` consecutive non-finite steps; the last checkpoint
    (all finite) stays current
4   a collective timed out or a peer was lost (``train.dist_timeout_s``); rerun to resume
75  stopped by SIGTERM/SIGUSR1 after writing a checkpoint (EX_TEMPFAIL): rerun to continue
==  ===========================================================================================
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from ..parallel.comm import all_reduce_

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_COLLECTIVE_TIMEOUT = 4
EXIT_STOPPED = 75          # sysexits.h EX_TEMPFAIL: "temporary failure, the user may retry"

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class DivergedError(RuntimeError):
    """Too many consecutive non-finite steps; the message names the count and what to change."""


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within ``train.dist_timeout_s`` (or a peer vanished)."""


class GracefulStop:
    """Record SIGTERM / SIGUSR1 instead of dying; the trainer polls ``requested``.

    Handlers can only be installed from the main thread; elsewhere (a test's worker thread)
    this is a no-op and ``requested`` stays False. ``restore()`` puts the previous handlers back.
    """

    def __init__(self, signals: tuple = STOP_SIGNALS) -> None:
        self.signal_name: Optional[str] = None
        self._previous: dict = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        # Only set a flag: the handler runs between bytecodes of the main thread, possibly in
        # the middle of a collective's Python wrapper, where nothing else is safe to do.
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}


def agree(bad: torch.Tensor, stop: bool, step: int) -> tuple[bool, bool]:
    """One all-reduce of this rank's flags: (any rank non-finite, any rank asked to stop).

    Called once per optimizer step by every rank at the same point (before the boundary
    micro-step's backward), so all ranks take the same decision for the same step. It is the
    step's one extra host sync.

    Args:
        bad: () bool/float tensor on the compute device, true when this rank saw a
            non-finite loss in the step (accumulated without host syncs).
        stop: this rank got SIGTERM/SIGUSR1.
        step: the 1-based step, for the timeout message.
    """
    flags = torch.stack([bad.detach().float().reshape(()),
                         torch.tensor(float(stop), device=bad.device)])
    with collective_op("all-reduce of the step's non-finite/stop flags", step):
        all_reduce_(flags)
    bad_any, stop_any = flags.tolist()
    return bad_any > 0, stop_any > 0


def nonfinite(*values: torch.Tensor) -> torch.Tensor:
    """() bool tensor on the values' device: some element is NaN/Inf (no host sync)."""
    return torch.stack([(~torch.isfinite(v.detach().float())).any() for v in values]).any()


def grad_norm(params) -> float:
    """The 2-norm of the ``.grad`` of ``params`` (NaN/Inf when some gradient is). ZeRO-0 keeps
    the reduced gradients there, identical on every rank, so every rank gets the same value;
    ZeRO 1-3 keep them in their own buffers, check them and report the norm themselves."""
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def skip_update(engine) -> None:
    """Close the accumulation boundary without an update: the engine's counters advance and the
    gradients are cleared, but parameters, optimizer state and scheduler stay as they were.

    Call at the boundary micro-step instead of ``engine.step()``. DeepSpeed's engine already has
    this path for fp16 overflows: when its optimizer reports ``overflow`` the engine skips the
    scheduler and counts ``skipped_steps``. For ZeRO 1-3 the optimizer detects non-finite
    gradients itself (the caller poisons them, see Trainer.train_step); the plain torch
    optimizer of ZeRO-0 is told to do nothing and report an overflow.
    """
    opt = engine.optimizer
    if isinstance(opt, torch.optim.Optimizer) and not hasattr(opt, "overflow"):
        def no_update(*args, **kwargs):
            return None
        opt.step, opt.overflow = no_update, True
        try:
            engine.step()
        finally:
            del opt.step, opt.overflow
    else:
        engine.step()
    skipped = not getattr(engine, "_step_applied", False) if hasattr(engine, "_step_applied") \
        else getattr(opt, "overflow", True)
    if not skipped:  # DeepSpeed would have applied a non-finite update: never carry on after that
        raise RuntimeError("internal error: DeepSpeed applied an update the non-finite guard "
                           "meant to skip; report this with the DeepSpeed config")


_TIMEOUT_WORDS = ("timed out", "timeout", "connection closed", "connection reset",
                  "broken pipe", "peer", "socket")


@contextlib.contextmanager
def collective_op(name: str, step: Optional[int] = None) -> Iterator[None]:
    """Name the collective inside: a gloo/NCCL failure there becomes CollectiveTimeout whose
    message says which rank waited in which operation at which step."""
    try:
        yield
    except RuntimeError as e:  # gloo/NCCL raise RuntimeError (DistBackendError is one)
        text = str(e)
        if isinstance(e, CollectiveTimeout) or not any(w in text.lower() for w in _TIMEOUT_WORDS):
            raise
        rank = dist.get_rank() if dist.is_initialized() else 0
        where = f" at step {step}" if step is not None else ""
        first = text.strip().splitlines()[0][:300] if text.strip() else type(e).__name__
        raise CollectiveTimeout(
            f"rank {rank} waited in {name}{where} and a peer rank did not answer within "
            f"train.dist_timeout_s (or was lost): {first}. Another rank probably hung or died; "
            f"see its log. Rerun to resume from the last checkpoint") from None
