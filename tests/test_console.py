"""Console commands (pyproject [project.scripts]): goat-train and goat-eval are installed, are the
same programs as launch/train.py and launch/evaluate.py, and run under torchrun.

The commands are the ones pip installed next to this interpreter (scripts/setup_env.sh installs
the package editable, which writes them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from tests.train_helpers import ROOT, run_train

BIN = os.path.dirname(sys.executable)
ENV = {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),
       "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
# The embedded demo (configs/demo.yaml), shortened.
# No eval set: the accuracy evaluation costs ~60 s of CPU per process (lm-eval's task index), and
# the training losses are the oracle here.
SHORT_DEMO = ["train.max_steps=2", "data.max_train_samples=32", "data.eval_file=null",
              "data.eval_fraction=0", "train.save_every=0",
              # fp32 and no dropout: the 2-rank and 1-process runs then agree to 1e-4
              "train.bf16=false", "goat.lora_dropout=0"]


def _run(cmd: list[str], cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=ENV, timeout=600)


def test_entry_points_resolve_to_the_programs():
    from goat_dist.eval.cli import main as eval_main
    from goat_dist.train.cli import main as train_main
    eps = {ep.name: ep for ep in entry_points(group="console_scripts")}
    assert eps["goat-train"].value == "goat_dist.train.cli:main"
    assert eps["goat-eval"].value == "goat_dist.eval.cli:main"
    assert eps["goat-train"].load() is train_main and eps["goat-eval"].load() is eval_main
    for name in ("goat-train", "goat-eval"):
        assert os.access(os.path.join(BIN, name), os.X_OK), f"{name} is not installed in {BIN}"


@pytest.mark.parametrize("cmd", [["goat-train", "--help"], ["goat-eval", "--help"],
                                 [sys.executable, "-m", "goat_dist.train", "--help"]],
                         ids=["goat-train", "goat-eval", "python-m"])
def test_help(cmd, tmp_path):
    res = _run(cmd, str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage:")


def test_bad_input_exits_2_with_one_message(tmp_path):
    res = _run(["goat-train", "--config", "missing.yaml"], str(tmp_path))
    assert res.returncode == 2
    assert "goat_dist: error: run config 'missing.yaml' does not exist" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_torchrun_no_python_goat_train_runs_the_demo(tmp_path):
    """torchrun --no-python goat-train on 2 ranks = launch/train.py on one process (same losses)."""
    out2, out1 = str(tmp_path / "torchrun"), str(tmp_path / "one")
    res = _run(["torchrun", "--nproc-per-node", "2", "--no-python", "goat-train",
                "--output_dir", out2, *SHORT_DEMO], str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "goat_dist: finished at step 2/2" in res.stdout
    # the same global batches: W=2 x GA=2 (the demo's) = W=1 x GA=4
    assert run_train(["--output_dir", out1, *SHORT_DEMO, "train.gradient_accumulation_steps=4"],
                     world=1) == 0
    s2, s1 = (json.load(open(os.path.join(o, "summary.json"))) for o in (out2, out1))
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    assert sorted(os.listdir(os.path.join(out2, "adapter"))) == ["adapter_config.json",
                                                                 "adapter_model.safetensors"]
    l2, l1 = ([h["loss"] for h in s["history"]] for s in (s2, s1))
    assert len(l2) == len(l1) == 2
    assert all(abs(a - b) < 1e-4 for a, b in zip(l2, l1)), (l2, l1)
    assert ROOT  # the demo's data paths resolve from the repository, whatever the cwd
