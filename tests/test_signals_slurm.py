"""goat.sbatch's preemption plumbing under bash, with fake Slurm tools on PATH: the SIGUSR1
Slurm sends before the time limit (--signal=B:USR1@...) becomes SIGTERM for the training step,
the script waits for the step to end and requeues the job."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from tests.train_helpers import ROOT

SBATCH = os.path.join(ROOT, "launch", "slurm", "goat.sbatch")

# Stands in for the interpreter running launch_cmd.py (and so for the whole training step):
# announces itself, exits 75 on SIGTERM like launch/train.py after its checkpoint.
FAKE_STEP = """#!/bin/bash
trap 'echo TERM >> "$FAKE_DIR/step.signals"; exit 75' TERM
echo $$ > "$FAKE_DIR/step.pid"
while true; do sleep 0.1; done
"""
# scancel --signal=TERM <job>: Slurm would signal every process of the job's steps.
FAKE_SCANCEL = """#!/bin/bash
echo "$@" >> "$FAKE_DIR/scancel.calls"
kill -TERM "$(cat "$FAKE_DIR/step.pid")"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$@" >> "$FAKE_DIR/scontrol.calls"
"""


def _tool(path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def _wait_for(path, deadline_s: float = 60.0) -> None:
    end = time.monotonic() + deadline_s
    while not path.exists():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)


def test_usr1_before_the_time_limit_stops_the_step_and_requeues(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    step = _tool(bin_dir / "fake_python", FAKE_STEP)
    _tool(bin_dir / "scancel", FAKE_SCANCEL)
    _tool(bin_dir / "scontrol", FAKE_SCONTROL)
    env = dict(os.environ, FAKE_DIR=str(tmp_path), PYTHON=step, SLURM_JOB_ID="4242",
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.Popen(["bash", SBATCH, "--config", "run.yaml"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(tmp_path / "step.pid")
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err
    assert (tmp_path / "step.signals").read_text() == "TERM\n"
    assert (tmp_path / "scancel.calls").read_text() == "--signal=TERM 4242\n"
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 4242\n"
    assert "got SIGUSR1" in err and "requeueing job 4242" in err


def test_a_step_that_ends_by_itself_is_not_requeued(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    step = _tool(bin_dir / "fake_python", "#!/bin/bash\nexit 0\n")
    _tool(bin_dir / "scontrol", FAKE_SCONTROL)
    env = dict(os.environ, FAKE_DIR=str(tmp_path), PYTHON=step, SLURM_JOB_ID="4242",
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    res = subprocess.run(["bash", SBATCH], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "scontrol.calls").exists()
