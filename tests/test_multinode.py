"""Multi-node launching without a cluster.

* goat.sbatch end to end on this machine (a fake ``srun`` starts the helper's node stage twice):
  two torchrun "nodes" train like the one-process oracle;
* the Slurm command construction: launch/slurm/launch_cmd.py for a two-node allocation, and
  goat.sbatch itself under bash with a fake ``scontrol`` on PATH (``--dry-run``);
  launch/hostfile_launch.sh in ``--dry-run``;
* launch/train.py started the srun way (SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS, no RANK or
  WORLD_SIZE) as two plain processes trains like the oracle too.

Every process run is a subprocess, killed with all its descendants on failure or timeout; all
training runs use gloo on CPU, one thread per process.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
import time

import pytest

from tests.train_helpers import (ROOT, free_port, load_launch_module, losses, read_summary,
                                 run_train, tiny_config)

ZERO2 = os.path.join(ROOT, "ds_configs", "zero2.json")
ZERO3 = os.path.join(ROOT, "ds_configs", "zero3.json")
TRAIN_PY = os.path.join(ROOT, "launch", "train.py")
SBATCH = os.path.join(ROOT, "launch", "slurm", "goat.sbatch")
HELPER = os.path.join(ROOT, "launch", "slurm", "launch_cmd.py")
HOSTFILE_LAUNCH = os.path.join(ROOT, "launch", "hostfile_launch.sh")
STEPS = 4
RUN_TIMEOUT_S = 180


def _load_helper():
    spec = importlib.util.spec_from_file_location("goat_launch_cmd", HELPER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


launch_cmd = _load_helper()

# A two-node allocation as Slurm describes it inside the job (batch script and srun tasks).
SLURM_TWO_NODES = {
    "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2",
    "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_CPUS_PER_NODE": "64(x2)",
}
PORT_4242 = 29500 + 4242 % 2000   # the helper's per-job default port


def worker_env(**extra: str) -> dict:
    """This environment minus anything that would steer the launch (a launcher's rank variables,
    a real Slurm job's SLURM_* when the suite itself runs under Slurm, the launch scripts'
    settings), CPU settings added."""
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
            "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "NODE_RANK", "CROSS_RANK",
            "GPUS_PER_NODE", "RUN_CONFIG", "DS_CONFIG", "OUTPUT_DIR", "HOSTFILE", "NUM_NODES",
            "PYTHON", "GOAT_ROOT", "DEEPSPEED"}
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_processes(jobs: list[tuple[list[str], dict]], log_dir, timeout: float = RUN_TIMEOUT_S
                  ) -> list[int]:
    """Start every (command, env) at once, wait for all; returns the exit codes. Whatever is
    still running at the deadline or on an error is stopped with all its descendants (torchrun
    starts its workers in sessions of their own, so a process group would miss them), and a
    timeout message carries each process's log tail."""
    procs, logs = [], []
    try:
        for i, (cmd, env) in enumerate(jobs):
            log = open(os.path.join(log_dir, f"proc{i}.log"), "w")
            logs.append(log)
            procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + timeout
        for p in procs:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        return [p.returncode for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"timed out after {timeout} s\n{_tails(log_dir, len(jobs))}")
    finally:
        for p in procs:
            if p.poll() is None:
                _kill_tree(p.pid)
            p.wait()
        for log in logs:
            log.close()


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (psutil comes with deepspeed)."""
    import psutil
    try:
        root = psutil.Process(pid)
        family = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for proc in family:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=10)


def fake_tool(bin_dir, name: str, script: str) -> None:
    """An executable shell script ``bin_dir/name`` standing in for a Slurm command."""
    os.makedirs(bin_dir, exist_ok=True)
    path = os.path.join(bin_dir, name)
    with open(path, "w") as f:
        f.write("#!/usr/bin/env bash\n" + script)
    os.chmod(path, 0o755)


# srun on one machine: the options are logged and skipped, then the command runs once per
# "node" in the background with the variables srun gives a one-task-per-node step.
FAKE_SRUN = """set -u
echo "$@" >> "$(dirname "$0")/srun.calls"
nodes=1
while [[ $# -gt 0 && "$1" == -* ]]; do
    case "$1" in --nodes=*) nodes="${1#--nodes=}" ;; esac
    shift
done
pids=()
for ((i = 0; i < nodes; i++)); do
    SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NTASKS=$nodes SLURM_STEP_ID=0 "$@" &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
exit $rc
"""


def _tails(log_dir, n: int, chars: int = 3000) -> str:
    out = []
    for i in range(n):
        with open(os.path.join(log_dir, f"proc{i}.log"), errors="replace") as f:
            out.append(f"--- process {i} ---\n{f.read()[-chars:]}")
    return "\n".join(out)


def assert_matches_oracle(out: str, oracle: list[float]) -> None:
    got = losses(out)
    assert len(got) == len(oracle) == STEPS
    assert got == pytest.approx(oracle, abs=1e-4), (got, oracle)
    summary = read_summary(out)
    assert summary["world_size"] == 2 and summary["finished"]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory) -> list[float]:
    """One process, micro-batch 2 x accumulation 4: the same global batches as 2 ranks x 2."""
    d = tmp_path_factory.mktemp("oracle")
    cfg = tiny_config(str(d / "run.yaml"), str(d / "out"),
                      train={"gradient_accumulation_steps": 4, "max_steps": STEPS})
    assert run_train(["--config", cfg], world=1) == 0
    ref = losses(str(d / "out"))
    assert abs(ref[0] - ref[-1]) > 1e-3   # training moved, so agreement means something
    return ref


# --------------------------------------------------------------------------- real processes

@pytest.mark.slow
def test_two_torchrun_nodes_match_single_process(tmp_path, oracle):
    """goat.sbatch for a two-node allocation, end to end on this machine with a fake srun: the
    helper's node stage runs on both "nodes", each execs torchrun (--nnodes 2 --nproc-per-node 1
    --node-rank 0/1, static rendezvous on 127.0.0.1), and the two ranks train like the oracle."""
    out = str(tmp_path / "out")
    cfg = tiny_config(str(tmp_path / "run.yaml"), out, train={"max_steps": STEPS})
    bin_dir = str(tmp_path / "bin")
    fake_tool(bin_dir, "srun", FAKE_SRUN)
    port = str(free_port())
    env = worker_env(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="localhost", SLURM_NNODES="2",
                     PYTHON=sys.executable,
                     PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = ["bash", SBATCH, "--gpus-per-node", "1", "--master-addr", "127.0.0.1",
           "--master-port", port, "--config", cfg, "--ds-config", ZERO2]
    rcs = run_processes([(cmd, env)], tmp_path)
    assert rcs == [0], _tails(tmp_path, 1)
    with open(os.path.join(bin_dir, "srun.calls")) as f:
        assert f.read().split()[:5] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                                        "--kill-on-bad-exit=1", sys.executable]
    with open(os.path.join(tmp_path, "proc0.log")) as f:
        log = f.read()
    for node in (0, 1):   # the helper logs the command it execs
        assert (f"launch_cmd: {sys.executable} -m torch.distributed.run --nnodes 2 "
                f"--nproc-per-node 1 --node-rank {node} --rdzv-backend static "
                f"--rdzv-endpoint 127.0.0.1:{port} ") in log
    assert_matches_oracle(out, oracle)


@pytest.mark.slow
def test_srun_style_tasks_match_single_process(tmp_path, oracle):
    """launch/train.py as two srun tasks (SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS only; the
    address and port set explicitly) maps them to rank variables and trains like the oracle."""
    out = str(tmp_path / "out")
    cfg = tiny_config(str(tmp_path / "run.yaml"), out, train={"max_steps": STEPS})
    port = str(free_port())
    jobs = []
    for task in (0, 1):
        env = worker_env(SLURM_JOB_ID="77", SLURM_STEP_ID="0", SLURM_NNODES="1",
                         SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost", SLURM_NTASKS="2",
                         SLURM_PROCID=str(task), SLURM_LOCALID=str(task),
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        jobs.append(([sys.executable, TRAIN_PY, "--config", cfg], env))
    rcs = run_processes(jobs, tmp_path)
    assert rcs == [0, 0], _tails(tmp_path, 2)
    assert_matches_oracle(out, oracle)


# --------------------------------------------------------------------------- Slurm commands

def _torchrun(node: int, gpus: int, endpoint: str, train_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
            "--nproc-per-node", str(gpus), "--node-rank", str(node), "--rdzv-backend", "static",
            "--rdzv-endpoint", endpoint, TRAIN_PY, *train_args]


def test_node_stage_command_for_second_node(tmp_path):
    """srun's task on the second node of gpu[07-08] (no scontrol: the built-in parser) runs
    torchrun with node rank 1, 4 workers, the rendezvous on gpu07 and the training arguments."""
    env = {**SLURM_TWO_NODES, "SLURM_NODEID": "1", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
           "PATH": str(tmp_path)}
    cmds = launch_cmd.build_commands(env, ["--node", "--config", "/cfg/run.yaml",
                                           "--ds-config", "/ds/zero3.json", "--output-dir",
                                           "/runs/a", "train.max_steps=7", "goat.num_experts=4"])
    assert cmds == [_torchrun(1, 4, f"gpu07:{PORT_4242}",
                              ["--config", "/cfg/run.yaml", "--ds_config", "/ds/zero3.json",
                               "--output_dir", "/runs/a", "train.max_steps=7",
                               "goat.num_experts=4"])]


def test_batch_stage_commands(tmp_path, monkeypatch):
    """The batch step runs one srun task per node with the node's CPUs, each re-entering the
    helper with every job-wide value fixed; relative paths become absolute; defaults apply."""
    monkeypatch.chdir(tmp_path)
    env = {**SLURM_TWO_NODES, "SLURM_NODEID": "0", "SLURM_PROCID": "0", "PATH": str(tmp_path),
           "MASTER_PORT": "31000"}
    srun, node0, node1 = launch_cmd.build_commands(env, ["--config", "run.yaml", "a.b=1"])
    cfg = str(tmp_path / "run.yaml")
    assert srun == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                    "--cpus-per-task=64", "--kill-on-bad-exit=1", sys.executable, HELPER,
                    "--node", "--nnodes", "2", "--gpus-per-node", "4", "--master-addr", "gpu07",
                    "--master-port", "31000", "--ds-config", ZERO2, "--config", cfg, "--", "a.b=1"]
    for node, cmd in enumerate((node0, node1)):
        assert cmd == _torchrun(node, 4, "gpu07:31000",
                                ["--config", cfg, "--ds_config", ZERO2, "a.b=1"])


def test_one_task_per_gpu_command(tmp_path):
    """--one-task-per-gpu: srun starts launch/train.py G times per node; address, port and the
    local world size travel in the environment, the CPUs are shared out per task."""
    env = {**SLURM_TWO_NODES, "PATH": str(tmp_path), "GPUS_PER_NODE": "8"}
    (cmd,) = launch_cmd.build_commands(env, ["--one-task-per-gpu", "--ds-config", "/ds/z.json"])
    assert cmd == ["srun", "--nodes=2", "--ntasks=16", "--ntasks-per-node=8",
                   "--cpus-per-task=8", "--kill-on-bad-exit=1",
                   f"--export=ALL,MASTER_ADDR=gpu07,MASTER_PORT={PORT_4242},LOCAL_WORLD_SIZE=8",
                   sys.executable, TRAIN_PY, "--ds_config", "/ds/z.json"]


@pytest.mark.parametrize("env,argv,message", [
    ({}, [], "number of nodes unknown"),
    ({"SLURM_NNODES": "2"}, [], "master address unknown"),
    ({**SLURM_TWO_NODES, "SLURM_NODEID": "2"}, ["--node"], "outside 0..1"),
    ({**SLURM_TWO_NODES}, ["--node"], "node rank unknown"),
    ({**SLURM_TWO_NODES, "GPUS_PER_NODE": "eight"}, [], "not an integer"),
], ids=["no-nodes", "no-nodelist", "node-out-of-range", "no-node-rank", "bad-gpus"])
def test_bad_settings_are_named(tmp_path, env, argv, message):
    with pytest.raises(launch_cmd.LaunchError, match=message):
        launch_cmd.build_commands({**env, "PATH": str(tmp_path)}, argv)


@pytest.mark.parametrize("nodelist,hosts", [
    ("gpu[07-08]", ["gpu07", "gpu08"]),
    ("node[03-05,09],gpu1", ["node03", "node04", "node05", "node09", "gpu1"]),
    ("gpu1,node[8-10]", ["gpu1", "node8", "node9", "node10"]),
    ("nid[0998-1000]-ib", ["nid0998-ib", "nid0999-ib", "nid1000-ib"]),
    ("r[1-2]-n[01-02]", ["r1-n01", "r1-n02", "r2-n01", "r2-n02"]),
    ("login", ["login"]),
])
def test_hostlist_parser(nodelist, hosts):
    """The fallback parser expands host lists as ``scontrol show hostnames`` does."""
    assert launch_cmd.expand_hostlist(nodelist) == hosts


def test_sbatch_dry_run_with_fake_scontrol(tmp_path):
    """goat.sbatch under bash forwards its arguments to the helper; the master address comes
    from ``scontrol show hostnames`` (a fake on PATH that logs its call)."""
    fakebin = tmp_path / "bin"
    fake_tool(fakebin, "scontrol", 'echo "$@" >> "$(dirname "$0")/scontrol.calls"\n'
                                   'printf "gpu07\\ngpu08\\n"\n')
    env = {**worker_env(), **SLURM_TWO_NODES, "SLURM_NODEID": "0", "SLURM_PROCID": "0",
           "PATH": f"{fakebin}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHON": sys.executable}
    res = subprocess.run(["bash", SBATCH, "--dry-run", "--gpus-per-node", "2",
                          "--config", "run.yaml", "--ds-config", ZERO3, "--output-dir", "out",
                          "train.max_steps=7"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert (fakebin / "scontrol.calls").read_text() == "show hostnames gpu[07-08]\n"
    cfg, out = str(tmp_path / "run.yaml"), str(tmp_path / "out")
    node_argv = ["--node", "--nnodes", "2", "--gpus-per-node", "2", "--master-addr", "gpu07",
                 "--master-port", str(PORT_4242), "--ds-config", ZERO3, "--config", cfg,
                 "--output-dir", out, "--", "train.max_steps=7"]
    train = ["--config", cfg, "--ds_config", ZERO3, "--output_dir", out, "train.max_steps=7"]
    lines = res.stdout.strip().split("\n")
    assert lines == [
        shlex.join(["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                    "--cpus-per-task=64", "--kill-on-bad-exit=1", sys.executable, HELPER,
                    *node_argv]),
        "# node 0: " + shlex.join(_torchrun(0, 2, f"gpu07:{PORT_4242}", train)),
        "# node 1: " + shlex.join(_torchrun(1, 2, f"gpu07:{PORT_4242}", train)),
    ]


def test_sbatch_reports_missing_allocation(tmp_path):
    """Outside an allocation the script stops with exit status 2 and says what is missing."""
    res = subprocess.run(["bash", SBATCH, "--dry-run"], env={**worker_env(), "PYTHON":
                         sys.executable}, cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and "number of nodes unknown" in res.stderr


def test_hostfile_launch_dry_run(tmp_path):
    """hostfile_launch.sh: node count from the hostfile, GPUs from its smallest slots=,
    absolute paths, overrides last."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two hosts\ngpu07 slots=8\n\ngpu08 slots=4\n")
    env = {**worker_env(), "DEEPSPEED": "deepspeed"}
    res = subprocess.run(["bash", HOSTFILE_LAUNCH, "--hostfile", "hosts", "--dry-run",
                          "--config", "my run.yaml", "--master-port", "29555",
                          "train.max_steps=7"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert shlex.split(res.stdout) == [
        "deepspeed", "--hostfile", str(hostfile), "--num_nodes", "2", "--num_gpus", "4",
        "--master_port", "29555", TRAIN_PY, "--config", str(tmp_path / "my run.yaml"),
        "--ds_config", ZERO2, "train.max_steps=7"]
    res = subprocess.run(["bash", HOSTFILE_LAUNCH, "--hostfile", "hosts", "--num-nodes", "3",
                          "--dry-run"], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and "lists 2" in res.stderr


# --------------------------------------------------------------------------- launch/train.py

def test_train_maps_srun_variables():
    """launch/train.py's rendezvous_env: SLURM_* become the rank variables; a launcher's own
    variables win."""
    mod = load_launch_module()
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
           "SLURM_JOB_NODELIST": "gpu[07-10]"}
    assert mod.rendezvous_env(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                       "MASTER_ADDR": "gpu07", "MASTER_PORT": "29500"}
    assert mod.rendezvous_env({**env, "MASTER_ADDR": "h", "MASTER_PORT": "1"}) == {
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_PORT": "1"}
    assert mod.rendezvous_env({**env, "RANK": "0", "WORLD_SIZE": "2"}) == {}


@pytest.mark.parametrize("nodelist", [
    "gpu[07-08]", "node[03-05,09],gpu1", "gpu1,node[8-10]", "login", "nid[0998-1000]-ib",
    "r[1-2]-n[01-02]",
])
def test_train_first_host_agrees_with_scontrol_expansion(nodelist):
    """launch/train.py picks the same master host as the helper (and scontrol)."""
    assert load_launch_module().first_host(nodelist) == launch_cmd.expand_hostlist(nodelist)[0]
