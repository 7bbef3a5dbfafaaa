"""What clusters do to jobs, for real: stop signals, SIGKILLs (one during a save), non-finite
steps, a hung peer, a failing disk. Every run is a real multi-process DeepSpeed run on the tiny
preset model; faults are injected inside the ranks by hooks (tests/train_helpers.run_train_ranks),
at steps drawn from a seeded RNG, so every run of this file does exactly the same thing.

Oracle: the uninterrupted 2-rank run with the same config (losses and adapter within 1e-6).
"""

from __future__ import annotations

import functools
import glob
import json
import os
import random
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.train_helpers import read_summary, run_train_ranks, tiny_config

pytestmark = pytest.mark.slow

EXIT_DIVERGED, EXIT_TIMEOUT, EXIT_STOPPED = 3, 4, 75
STEPS = 6


# ----------------------------------------------------------------------------- fault injection
# Hooks run in each spawned rank before the trainer starts (they must be picklable: module-level
# functions bound with functools.partial). They wrap Trainer.train_step, which every rank calls
# once per optimizer step with the 0-based step.

def _wrap_train_step(before):
    from goat_dist.train import loop
    orig = loop.Trainer.train_step

    def train_step(self, step, stop=None):
        with before(self, step + 1):
            return orig(self, step, stop)
    loop.Trainer.train_step = train_step


def _nan_hook(rank: int, nan_ranks: tuple, nan_steps: tuple, from_step: int = 0) -> None:
    """NaN logits (a forward hook on lm_head) on ``nan_ranks`` at ``nan_steps`` / from ``from_step``."""
    import contextlib
    if rank not in nan_ranks:
        return

    @contextlib.contextmanager
    def before(trainer, step):
        hit = step in nan_steps or (from_step and step >= from_step)
        h = trainer.engine.module.model.lm_head.register_forward_hook(
            lambda m, i, out: out * float("nan")) if hit else None
        try:
            yield
        finally:
            if h is not None:
                h.remove()
    _wrap_train_step(before)


def _signal_hook(rank: int, at_rank: int, at_step: int, sig: int) -> None:
    """Deliver a real signal to this process as step ``at_step`` begins (only on ``at_rank``)."""
    import contextlib
    if rank != at_rank:
        return

    @contextlib.contextmanager
    def before(trainer, step):
        if step == at_step:
            os.kill(os.getpid(), sig)
        yield
    _wrap_train_step(before)


def _kill_hook(rank: int, at_rank: int, at_step: int = 0, micro: int = 0,
               save_file: str = "") -> None:
    """SIGKILL this rank in the forward of micro-step ``micro`` of step ``at_step``, or, with
    ``save_file``, while it writes that checkpoint file (half written, as a node failure would)."""
    import contextlib
    if rank != at_rank:
        return
    if save_file:
        real_save = torch.save

        def dying_save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and str(f).endswith(save_file):
                with open(f, "wb") as fh:
                    fh.write(b"\x80\x02half a file")
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)
        torch.save = dying_save
        return

    @contextlib.contextmanager
    def before(trainer, step):
        calls = [0]

        def on_forward(m, i, out):
            if step == at_step and calls[0] == micro:
                os.kill(os.getpid(), signal.SIGKILL)
            calls[0] += 1
        h = trainer.engine.module.model.lm_head.register_forward_hook(on_forward)
        try:
            yield
        finally:
            h.remove()
    _wrap_train_step(before)


def _sleep_hook(rank: int, at_rank: int, at_step: int, stamp: str) -> None:
    """Stop answering (sleep, alive) as step ``at_step`` begins; record when."""
    import contextlib
    if rank != at_rank:
        return

    @contextlib.contextmanager
    def before(trainer, step):
        if step == at_step:
            with open(stamp, "w") as f:
                f.write(str(time.time()))
            time.sleep(3600)
        yield
    _wrap_train_step(before)


# ----------------------------------------------------------------------------- helpers
def _history(out: str) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in read_summary(out)["history"]}


def _adapter(out: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


def _assert_same_adapter(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def _latest(out: str) -> str:
    with open(os.path.join(out, "checkpoints", "latest.json")) as f:
        return json.load(f)["tag"]


def _cfg(tmp_path, name: str, **train) -> tuple[str, str]:
    """The tiny preset on the demo data, 6 steps, a checkpoint every 2; no evaluation (the
    adapter and the losses are the oracle, evaluation would only cost time)."""
    out = str(tmp_path / name)
    train = {"max_steps": STEPS, "save_every": 2, **train}
    return tiny_config(str(tmp_path / f"{name}.yaml"), out, train=train,
                       data={"eval_file": None, "eval_fraction": 0.0}), out


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """The uninterrupted 2-rank run: per-step losses and the exported adapter."""
    tmp = tmp_path_factory.mktemp("oracle")
    cfg, out = _cfg(tmp, "run")
    assert run_train_ranks(["--config", cfg], world=2) == [0, 0]
    return _history(out), _adapter(out)


# ----------------------------------------------------------------------------- signal
def test_signal_stops_every_rank_after_a_checkpoint_and_rerun_continues_exactly(tmp_path, oracle):
    """SIGUSR1 reaching only rank 1 as step 3 starts: both ranks finish step 3, checkpoint it,
    exit 75; the same command then continues to the oracle's losses and adapter."""
    losses, adapter = oracle
    cfg, out = _cfg(tmp_path, "run")
    hook = functools.partial(_signal_hook, at_rank=1, at_step=3, sig=signal.SIGUSR1)
    assert run_train_ranks(["--config", cfg], world=2, hook=hook) == [EXIT_STOPPED] * 2
    assert _latest(out) == "step_00000003"
    first = read_summary(out)
    assert first["stopped_by"] == "a signal on another rank"     # rank 0 writes the summary
    assert not first["finished"] and first["global_step"] == 3
    seen = _history(out)
    assert run_train_ranks(["--config", cfg], world=2) == [0, 0]
    assert read_summary(out)["resumed_from"].endswith("step_00000003")
    seen.update(_history(out))
    assert sorted(seen) == list(range(1, STEPS + 1))
    for s in seen:
        assert seen[s] == pytest.approx(losses[s], abs=1e-6), s
    _assert_same_adapter(_adapter(out), adapter)


# ----------------------------------------------------------------------------- chaos
def test_three_sigkills_one_during_a_save_end_like_the_uninterrupted_run(tmp_path, oracle):
    """SIGKILL at a random step / micro-step / rank, then while rank 1 writes checkpoint 4,
    then at a random later step; restarted each time (train.resume=auto). Random = seeded."""
    losses, adapter = oracle
    rng = random.Random(20250)
    cfg, out = _cfg(tmp_path, "run")
    kills = [
        functools.partial(_kill_hook, at_rank=rng.randrange(2), at_step=rng.choice([3, 4]),
                          micro=rng.randrange(2)),
        functools.partial(_kill_hook, at_rank=1, save_file=os.path.join("step_00000004",
                                                                          "rng_rank1.pt")),
        functools.partial(_kill_hook, at_rank=rng.randrange(2), at_step=rng.choice([5, 6]),
                          micro=rng.randrange(2)),
    ]
    for i, hook in enumerate(kills):
        rcs = run_train_ranks(["--config", cfg], world=2, hook=hook)
        assert -signal.SIGKILL in rcs, (i, rcs)
        if i == 1:   # killed during the save: the pointer still names the previous checkpoint
            assert _latest(out) == "step_00000002"
            assert os.path.isdir(os.path.join(out, "checkpoints", "step_00000004"))
    assert _latest(out) == "step_00000004"
    assert run_train_ranks(["--config", cfg], world=2) == [0, 0]
    final = _history(out)
    # the whole run's history, each step as the uninterrupted run logged it: steps 1-4 come
    # through checkpoint 4 (logged by the killed attempts), 5-6 from this one
    assert sorted(final) == list(range(1, STEPS + 1))
    for s in final:
        assert final[s] == pytest.approx(losses[s], abs=1e-6), s
    _assert_same_adapter(_adapter(out), adapter)


# ----------------------------------------------------------------------------- non-finite guard
def test_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """NaN logits on rank 1 at step 3: the update is skipped on both ranks (optimizer, scheduler
    untouched), later steps train, everything on disk is finite."""
    cfg, out = _cfg(tmp_path, "run", save_every=0)
    hook = functools.partial(_nan_hook, nan_ranks=(1,), nan_steps=(3,))
    assert run_train_ranks(["--config", cfg], world=2, hook=hook) == [0, 0]
    s = read_summary(out)
    assert s["finished"] and s["skipped_steps"] == 1
    hist = {h["step"]: h for h in s["history"]}
    assert [h["skipped"] for h in s["history"]] == [i == 3 for i in range(1, STEPS + 1)]
    assert hist[3]["lr"] == hist[2]["lr"]             # the scheduler did not step
    assert hist[4]["lr"] != hist[3]["lr"]
    assert all(torch.isfinite(t).all() for t in _adapter(out).values())
    states = torch.load(glob.glob(os.path.join(out, "checkpoints", "step_*",
                                               "mp_rank_00_model_states.pt"))[0],
                        weights_only=False)
    steps = {int(v["step"]) for v in states["optimizer"]["state"].values()}
    assert steps == {STEPS - 1}                        # AdamW stepped once per good step


def test_nan_every_step_stops_with_a_message_and_finite_checkpoint(tmp_path, capfd):
    """NaN from step 3 on (ZeRO-2, whose own overflow path does the skipping): after
    train.max_skipped_steps=2 skips the run exits 3 naming the cause; checkpoint 2 stays
    current and holds only finite values."""
    from tests.train_helpers import ROOT
    cfg, out = _cfg(tmp_path, "run", save_every=1, max_skipped_steps=2)
    hook = functools.partial(_nan_hook, nan_ranks=(0,), nan_steps=(), from_step=3)
    zero2 = os.path.join(ROOT, "ds_configs", "zero2.json")
    assert run_train_ranks(["--config", cfg, "--ds_config", zero2], hook=hook) == [EXIT_DIVERGED]
    err = capfd.readouterr().err
    assert "training diverged: 2 consecutive steps" in err and "max_skipped_steps" in err
    assert _latest(out) == "step_00000002"
    s = read_summary(out)
    assert s["diverged"] and s["skipped_steps"] == 2 and not s["finished"]
    files = glob.glob(os.path.join(out, "checkpoints", "step_00000002", "*.pt"))
    assert len(files) >= 2
    for f in files:
        for t in _tensors(torch.load(f, weights_only=False)):
            assert torch.isfinite(t).all(), f


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


# ----------------------------------------------------------------------------- hang
def test_a_rank_that_stops_answering_ends_the_job_within_the_timeout(tmp_path, capfd):
    """Rank 1 sleeps as step 2 begins; rank 0 gives up after train.dist_timeout_s naming the
    operation and the step, and exits 4 (the margin is generous: the machine may be loaded)."""
    timeout = 20
    cfg, out = _cfg(tmp_path, "run", dist_timeout_s=timeout)
    _prebuild_tokenizer(cfg, out)
    stamp = str(tmp_path / "sleep_started")
    hook = functools.partial(_sleep_hook, at_rank=1, at_step=2, stamp=stamp)
    rcs = run_train_ranks(["--config", cfg], world=2, hook=hook)
    ended = time.time()
    assert rcs[0] == EXIT_TIMEOUT, rcs
    with open(stamp) as f:
        waited = ended - float(f.read())
    assert timeout <= waited + 1 and waited < timeout + 60, waited
    err = capfd.readouterr().err
    assert "rank 0 waited in all-reduce of the step's token counts at step 2" in err, err[-2000:]
    assert "train.dist_timeout_s" in err


def _prebuild_tokenizer(cfg: str, out: str) -> None:
    """Train the preset's tokenizer here, as rank 0 would at start-up, so that no rank waits
    for another during setup longer than the (small) timeout: setup stays symmetric."""
    from goat_dist.train.config import load_run_config
    from goat_dist.train.data import corpus_texts, load_splits
    from goat_dist.train.tokenizer import train_sentencepiece_tokenizer
    run = load_run_config(cfg)
    splits = load_splits(run.data, run.model.task, run.train.seed)
    train_sentencepiece_tokenizer(corpus_texts(splits.train, run.data), run.model.vocab_size,
                                  os.path.join(out, "tokenizer"))


# ----------------------------------------------------------------------------- I/O failure
def _disk_full_hook(rank: int, file: str) -> None:
    import errno
    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and str(f).endswith(file):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)
    torch.save = full


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, capfd):
    """ENOSPC while rank 0 writes checkpoint 4: one message naming the folder and the file,
    exit 1, latest.json still names checkpoint 2 (resuming from it is tested by the chaos run)."""
    cfg, out = _cfg(tmp_path, "run", max_steps=4)
    hook = functools.partial(_disk_full_hook, file=os.path.join("step_00000004", "rng_rank0.pt"))
    assert run_train_ranks(["--config", cfg], hook=hook) == [1]
    err = capfd.readouterr().err
    line = [l for l in err.splitlines() if "goat_dist: error:" in l]
    assert len(line) == 1, err[-3000:]
    assert os.path.join("checkpoints", "step_00000004") in line[0] and "No space left" in line[0]
    assert "step_00000002 stays current" in line[0]
    assert _latest(out) == "step_00000002"
    assert not os.path.exists(os.path.join(out, "adapter"))
