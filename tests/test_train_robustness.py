"""Crash safety of checkpoints and the handling of bad input: one clear message, exit status 2,
and nothing that existed before is changed."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys

import pytest

from tests.train_helpers import (ROOT, free_port, load_launch_module, losses, read_summary, run_train,
                                 tiny_config)

pytestmark = pytest.mark.slow


def _tree_digest(path: str) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _crash_worker(argv: list[str], crash_marker: str) -> None:
    """Run the trainer; the first file written into a checkpoint folder named ``crash_marker``
    is left half-written and the process SIGKILLs itself, as a node failure would."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    import torch
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and crash_marker in str(f):
            with open(f, "wb") as fh:
                fh.write(b"\x80\x02half a checkpoint")
                fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = dying_save
    load_launch_module().main(argv)


def test_sigkill_during_save_leaves_previous_checkpoint(tmp_path):
    out = str(tmp_path / "out")
    cfg = tiny_config(str(tmp_path / "run.yaml"), out, train={"max_steps": 6, "save_every": 2})
    p = multiprocessing.get_context("spawn").Process(
        target=_crash_worker, args=(["--config", cfg], "step_00000004"))
    p.start()
    p.join(300)
    assert p.exitcode == -signal.SIGKILL
    ckpts = os.path.join(out, "checkpoints")
    with open(os.path.join(ckpts, "latest.json")) as f:
        assert json.load(f)["tag"] == "step_00000002"
    assert os.path.isdir(os.path.join(ckpts, "step_00000004"))      # the half-written one
    assert run_train(["--config", cfg]) == 0                         # resume=auto
    s = read_summary(out)
    assert s["resumed_from"].endswith("step_00000002") and s["finished"]
    assert [h["step"] for h in s["history"]] == [1, 2, 3, 4, 5, 6]   # 1-2 through checkpoint 2
    with open(os.path.join(ckpts, "latest.json")) as f:
        assert json.load(f)["tag"] == "step_00000006"


def _run_cli(args: list[str], cwd: str = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _assert_refused(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, res.stderr[-3000:]
    err = [l for l in res.stderr.splitlines() if l.startswith("goat_dist: error:")]
    assert len(err) == 1, res.stderr[-3000:]
    for n in needles:
        assert n in err[0], err[0]


@pytest.fixture
def existing_run(tmp_path):
    """An output folder holding a finished run, to check bad input never touches it."""
    out = str(tmp_path / "out")
    cfg = tiny_config(str(tmp_path / "run.yaml"), out, train={"max_steps": 2, "save_every": 1})
    assert run_train(["--config", cfg]) == 0
    return cfg, out, _tree_digest(out)


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def test_bad_inputs_are_refused_without_damage(tmp_path, existing_run):
    cfg, out, before = existing_run
    cases = []
    cases.append((["--config", str(tmp_path / "missing.yaml")], ("does not exist",)))
    cases.append((["--config", _write(tmp_path / "garbled.yaml", "model: [unclosed\n")],
                  ("cannot be parsed",)))
    cases.append((["--config", cfg, "train.bogus=1"], ("train.bogus",)))
    ds_bad = _write(tmp_path / "ds.json", json.dumps({"train_batch_size": 7,
                                                      "train_micro_batch_size_per_gpu": "auto"}))
    cases.append((["--config", cfg, "--ds_config", ds_bad], ("train_batch_size=7", "auto")))
    ds_clip = _write(tmp_path / "ds2.json", json.dumps({"gradient_clipping": 0.5}))
    cases.append((["--config", cfg, "--ds_config", ds_clip], ("gradient_clipping=0.5",)))
    cases.append((["--config", cfg, "--ds_config", _write(tmp_path / "ds3.json", "{oops")],
                  ("not valid JSON",)))
    cases.append((["--config", cfg, "goat.r=6"], ("not divisible",)))
    cases.append((["--config", cfg, "optim.lr=.nan"], ("optim.lr=nan must be a finite number",)))
    for args, needles in cases:
        _assert_refused(_run_cli(args), *needles)
    assert _tree_digest(out) == before


def test_bad_data_is_refused_without_damage(tmp_path, existing_run):
    cfg, out, before = existing_run
    no_output = _write(tmp_path / "nofield.json", json.dumps([{"instruction": "x"}] * 20))
    empty = _write(tmp_path / "empty.json", "[]")
    mistyped = _write(tmp_path / "mistyped.json", json.dumps(
        [{"instruction": "x", "output": "y"}] * 20 + [{"instruction": 7, "output": "y"}]))
    fresh = str(tmp_path / "fresh")
    for path, needle in [(str(tmp_path / "nope.json"), "nope.json"), (no_output, "output"),
                         (empty, "empty"), (mistyped, "record 20 has field 'instruction'")]:
        _assert_refused(_run_cli(["--config", cfg, f"data.train_file={path}",
                                  f"train.output_dir={fresh}"]), needle)
    # too few records to fill one global batch
    _assert_refused(_run_cli(["--config", cfg, f"train.output_dir={fresh}",
                              "data.max_train_samples=3"]), "global batch")
    assert _tree_digest(out) == before
    assert not os.path.exists(fresh)                      # nothing written for the new run


def test_checkpoint_from_another_config_is_refused(existing_run):
    cfg, out, before = existing_run
    _assert_refused(_run_cli(["--config", cfg, "goat.num_experts=2", "train.max_steps=4"]),
                    "goat.num_experts", "different run configuration")
    _assert_refused(_run_cli(["--config", cfg, "train.resume=none"]), "already holds another run")
    assert _tree_digest(out) == before


def _rewind(out: str, tag: str) -> None:
    """Make ``tag`` the latest checkpoint and drop the later ones, as if the job had been
    preempted right after saving ``tag``."""
    ckpts = os.path.join(out, "checkpoints")
    for name in os.listdir(ckpts):
        if name.startswith("step_") and name > tag:
            shutil.rmtree(os.path.join(ckpts, name))
    with open(os.path.join(ckpts, "latest.json"), "w") as f:
        json.dump({"tag": tag, "global_step": int(tag.split("_")[1])}, f)


def test_resume_keeps_the_checkpoints_precision(tmp_path, existing_run):
    """train.bf16=auto resolves per machine (bf16 where native), so a job requeued onto a node of
    another type must not switch precision mid-run: auto continues in the checkpoint's precision
    (the resumed losses equal the uninterrupted run's, whatever this CPU would pick for a fresh
    run), and an explicit value that contradicts the checkpoint is refused without damage."""
    cfg, out, before = existing_run                     # trained in fp32
    _assert_refused(_run_cli(["--config", cfg, "train.bf16=true"]),
                    "train.bf16=true", "trained in fp32", "train.bf16=auto")
    assert _tree_digest(out) == before
    for bf16 in (False, True):
        run_out = str(tmp_path / f"bf16_{bf16}")
        run_cfg = tiny_config(str(tmp_path / f"bf16_{bf16}.yaml"), run_out,
                              train={"max_steps": 4, "save_every": 2, "bf16": bf16})
        assert run_train(["--config", run_cfg]) == 0
        uninterrupted = losses(run_out)
        _rewind(run_out, "step_00000002")
        assert run_train(["--config", run_cfg, "train.bf16=auto"]) == 0
        s = read_summary(run_out)
        assert s["resumed_from"].endswith("step_00000002") and s["finished"]
        assert s["bf16"] is bf16 and s["ds_config"]["bf16"]["enabled"] is bf16
        assert losses(run_out) == uninterrupted


def test_tokenizer_that_does_not_fit_the_model(tmp_path, existing_run):
    """A local model whose embedding is smaller than the tokenizer's vocabulary."""
    cfg, out, before = existing_run
    from goat_dist.train.modeling import build_preset
    model_dir = str(tmp_path / "small_llama")
    build_preset("tiny-llama", vocab_size=64).save_pretrained(model_dir)
    res = _run_cli(["--config", cfg, "model.preset=null", f"model.name_or_path={model_dir}",
                    f"model.tokenizer={os.path.join(out, 'tokenizer')}",
                    f"train.output_dir={tmp_path / 'fresh'}"])
    _assert_refused(res, "64")
    assert _tree_digest(out) == before
