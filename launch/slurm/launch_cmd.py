#!/usr/bin/env python
"""Build (and run) the commands of a multi-node GOAT job on Slurm.

Two stages, so that every per-node value is read on its own node and nothing needs
shell-escaping inside ``srun bash -c '...'``:

1. batch stage (``goat.sbatch`` runs this on the first node of the allocation): resolve the
   job-wide values once (node count, GPUs per node, master address and port, absolute paths)
   and exec ``srun`` with one task per node, each running this helper again with ``--node``;
2. node stage (``--node``): read the node rank from SLURM_NODEID (or SLURM_PROCID, equal with
   one task per node) and exec ``torchrun`` (``python -m torch.distributed.run``, the same
   program, from the same interpreter) with ``--nproc-per-node`` workers of launch/train.py.

With ``--one-task-per-gpu`` the batch stage instead runs ``srun --ntasks-per-node=G python
launch/train.py ...`` and launch/train.py maps SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS to the
rank variables itself.

``--dry-run`` prints the commands (one per line, shell-quoted; in the batch stage the srun
command, then the torchrun command each node will run, as ``# node i:`` comments) and runs
nothing, so the construction can be checked without Slurm::

    SLURM_JOB_NODELIST='gpu[07-08]' SLURM_NNODES=2 SLURM_JOB_ID=42 \\
        python launch/slurm/launch_cmd.py --dry-run --config run.yaml train.max_steps=10

Each option falls back to an environment variable, then to Slurm's, then to a default:

    --nnodes N           SLURM_NNODES / SLURM_JOB_NUM_NODES (required from one of them)
    --gpus-per-node G    GPUS_PER_NODE, SLURM_GPUS_ON_NODE, else 8
    --config PATH        RUN_CONFIG; default: launch/train.py's embedded demo config
    --ds-config PATH     DS_CONFIG; default: ds_configs/zero2.json
    --output-dir DIR     OUTPUT_DIR; default: the run config's train.output_dir
    --master-addr HOST   MASTER_ADDR; default: first host of SLURM_JOB_NODELIST (scontrol show
                         hostnames, or the built-in parser where scontrol is missing)
    --master-port PORT   MASTER_PORT; default: 29500 + SLURM_JOB_ID % 2000 (jobs sharing a node
                         do not collide on 29500)
Positional ``section.key=value`` arguments are passed through to launch/train.py.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from typing import Callable, Mapping, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_PY = os.path.join(ROOT, "launch", "train.py")
HELPER = os.path.abspath(__file__)
DEFAULT_DS_CONFIG = os.path.join(ROOT, "ds_configs", "zero2.json")
DEFAULT_GPUS_PER_NODE = 8
BASE_PORT, PORT_SPREAD = 29500, 2000   # 29500..31499: below Linux's ephemeral range (32768+)


class LaunchError(ValueError):
    """A missing or inconsistent setting; the message says which."""


# --------------------------------------------------------------------------- host lists

def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: 'a[1,3],b' -> ['a[1,3]', 'b']."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"unbalanced ']' in host list {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise LaunchError(f"unbalanced '[' in host list {text!r}")
    parts.append("".join(cur))
    return [p for p in parts if p]


def _expand_ranges(spec: str) -> list[str]:
    """'01-03,7' -> ['01', '02', '03', '7']; a range keeps its lower bound's zero padding."""
    out = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise LaunchError(f"bad range {item!r} in host list")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise LaunchError(f"descending range {item!r} in host list")
        out.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
    return out


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand a Slurm host list as ``scontrol show hostnames`` does (used where scontrol is
    missing): 'gpu[07-08],cpu1' -> ['gpu07', 'gpu08', 'cpu1']; text after a bracket and several
    brackets are kept: 'rack[1-2]-n[1-2]' -> rack1-n1, rack1-n2, rack2-n1, rack2-n2."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        names = [""]
        for literal, spec in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", item):
            choices = _expand_ranges(spec) if spec else [""]
            names = [n + literal + c for n in names for c in choices]
        hosts.extend(names)
    return hosts


def hostnames(nodelist: str, environ: Mapping[str, str]) -> list[str]:
    """Hosts of a Slurm node list: ``scontrol show hostnames`` (the authority, found on
    environ's PATH) where it exists and works, the pure-python parser otherwise."""
    scontrol = shutil.which("scontrol", path=environ.get("PATH", os.defpath))
    if scontrol:
        try:
            res = subprocess.run([scontrol, "show", "hostnames", nodelist], env=dict(environ),
                                 capture_output=True, text=True, timeout=30, check=True)
            hosts = res.stdout.split()
            if hosts:
                return hosts
        except (OSError, subprocess.SubprocessError) as e:
            print(f"launch_cmd: scontrol failed ({e}); parsing {nodelist!r} myself",
                  file=sys.stderr)
    return expand_hostlist(nodelist)


# --------------------------------------------------------------------------- options

def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="launch_cmd.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="print the commands (shell-quoted, one per line) and run nothing")
    p.add_argument("--node", action="store_true",
                   help="node stage (what srun runs on each node): exec torchrun for this node")
    p.add_argument("--one-task-per-gpu", action="store_true",
                   help="srun one launch/train.py task per GPU instead of one torchrun per node")
    p.add_argument("--nnodes", type=int, default=None,
                   help="nodes to use (default: SLURM_NNODES, all of the allocation)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="workers per node (default: GPUS_PER_NODE, SLURM_GPUS_ON_NODE, else 8)")
    p.add_argument("--config", default=None,
                   help="run config (default: RUN_CONFIG, else launch/train.py's demo)")
    p.add_argument("--ds-config", default=None,
                   help="DeepSpeed config (default: DS_CONFIG, else ds_configs/zero2.json)")
    p.add_argument("--output-dir", default=None,
                   help="output folder (default: OUTPUT_DIR, else the run config's)")
    p.add_argument("--master-addr", default=None,
                   help="rendezvous host (default: MASTER_ADDR, else the job's first node)")
    p.add_argument("--master-port", type=int, default=None,
                   help="rendezvous port (default: MASTER_PORT, else 29500 + job id %% 2000)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="passed through to launch/train.py")
    return p.parse_args(list(argv))


def _int_setting(name: str, value, source: str) -> int:
    try:
        n = int(str(value).strip())
    except ValueError:
        raise LaunchError(f"{name}: {value!r} (from {source}) is not an integer") from None
    if n < 1:
        raise LaunchError(f"{name}: {n} (from {source}) must be at least 1")
    return n


def resolve(args: argparse.Namespace, environ: Mapping[str, str],
            list_hosts: Callable[[str, Mapping[str, str]], list[str]] = hostnames,
            ) -> argparse.Namespace:
    """Fill every unset option from the environment (see the module docstring); paths are
    made absolute against the current directory, so every node reads the same files."""
    r = argparse.Namespace(**vars(args))
    if r.nnodes is None:
        src = next((k for k in ("SLURM_NNODES", "SLURM_JOB_NUM_NODES") if environ.get(k)), None)
        if src is None:
            raise LaunchError("number of nodes unknown: pass --nnodes or run inside a Slurm "
                              "allocation (SLURM_NNODES)")
        r.nnodes = _int_setting("nnodes", environ[src], src)
    else:
        r.nnodes = _int_setting("nnodes", r.nnodes, "--nnodes")
    if r.gpus_per_node is None:
        src = next((k for k in ("GPUS_PER_NODE", "SLURM_GPUS_ON_NODE") if environ.get(k)), None)
        r.gpus_per_node = (_int_setting("gpus per node", environ[src], src) if src
                           else DEFAULT_GPUS_PER_NODE)
    else:
        r.gpus_per_node = _int_setting("gpus per node", r.gpus_per_node, "--gpus-per-node")
    r.config = r.config or environ.get("RUN_CONFIG") or None
    r.ds_config = r.ds_config or environ.get("DS_CONFIG") or DEFAULT_DS_CONFIG
    r.output_dir = r.output_dir or environ.get("OUTPUT_DIR") or None
    for key in ("config", "ds_config", "output_dir"):
        if getattr(r, key) is not None:
            setattr(r, key, os.path.abspath(getattr(r, key)))
    if r.master_port is None:
        if environ.get("MASTER_PORT"):
            r.master_port = _int_setting("master port", environ["MASTER_PORT"], "MASTER_PORT")
        elif environ.get("SLURM_JOB_ID", "").isdigit():
            r.master_port = BASE_PORT + int(environ["SLURM_JOB_ID"]) % PORT_SPREAD
        else:
            r.master_port = BASE_PORT
    if r.master_addr is None:
        r.master_addr = environ.get("MASTER_ADDR") or None
    if r.master_addr is None:
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        if not nodelist:
            raise LaunchError("master address unknown: pass --master-addr or run inside a Slurm "
                              "allocation (SLURM_JOB_NODELIST)")
        hosts = list_hosts(nodelist, environ)
        if not hosts:
            raise LaunchError(f"no hosts in SLURM_JOB_NODELIST={nodelist!r}")
        r.master_addr = hosts[0]
    return r


def train_args(r: argparse.Namespace) -> list[str]:
    """launch/train.py and its arguments."""
    cmd = [TRAIN_PY]
    if r.config is not None:
        cmd += ["--config", r.config]
    cmd += ["--ds_config", r.ds_config]
    if r.output_dir is not None:
        cmd += ["--output_dir", r.output_dir]
    return cmd + list(r.overrides)


def node_rank(environ: Mapping[str, str], nnodes: int) -> int:
    """This node's rank: SLURM_NODEID, else SLURM_PROCID (the same with one task per node)."""
    src = next((k for k in ("SLURM_NODEID", "SLURM_PROCID") if environ.get(k)), None)
    if src is None:
        raise LaunchError("node rank unknown: SLURM_NODEID / SLURM_PROCID not set (the node "
                          "stage must be started by srun)")
    try:
        rank = int(environ[src])
    except ValueError:
        raise LaunchError(f"{src}={environ[src]!r} is not an integer") from None
    if not 0 <= rank < nnodes:
        raise LaunchError(f"{src}={rank} is outside 0..{nnodes - 1}: run one srun task on each "
                          f"of the job's {nnodes} nodes")
    return rank


def torchrun_command(r: argparse.Namespace, rank: int) -> list[str]:
    """torchrun on node ``rank``. Static rendezvous: node r hosts global ranks r*G..r*G+G-1, so
    global rank 0 and the rendezvous store live on the master node, as the logs expect."""
    return [sys.executable, "-m", "torch.distributed.run",
            "--nnodes", str(r.nnodes), "--nproc-per-node", str(r.gpus_per_node),
            "--node-rank", str(rank),
            "--rdzv-backend", "static", "--rdzv-endpoint", f"{r.master_addr}:{r.master_port}",
            *train_args(r)]


def cpus_per_node(environ: Mapping[str, str]) -> Optional[int]:
    """CPUs the job holds on its smallest node: SLURM_JOB_CPUS_PER_NODE ('32(x2),16' -> 16),
    else SLURM_CPUS_ON_NODE; None when neither is set."""
    spec = environ.get("SLURM_JOB_CPUS_PER_NODE", "")
    counts = [int(m) for m in re.findall(r"(\d+)(?:\(x\d+\))?", spec)]
    if counts:
        return min(counts)
    value = environ.get("SLURM_CPUS_ON_NODE", "")
    return int(value) if value.isdigit() else None


def _srun_common(r: argparse.Namespace, environ: Mapping[str, str], tasks_per_node: int
                 ) -> list[str]:
    cmd = ["srun", f"--nodes={r.nnodes}", f"--ntasks={r.nnodes * tasks_per_node}",
           f"--ntasks-per-node={tasks_per_node}"]
    cpus = cpus_per_node(environ)
    if cpus:
        # share the node's CPUs out explicitly: Slurm >= 22.05 no longer hands sbatch's
        # --cpus-per-task to srun, and with the default of 1 the one task per node (torchrun and
        # all its workers) would be confined to a single CPU
        cmd.append(f"--cpus-per-task={max(1, cpus // tasks_per_node)}")
    # one failed node must end the job instead of leaving the others blocked in a collective
    cmd.append("--kill-on-bad-exit=1")
    return cmd


def build_commands(environ: Mapping[str, str], argv: Sequence[str],
                   list_hosts: Callable[[str, Mapping[str, str]], list[str]] = hostnames,
                   ) -> list[list[str]]:
    """The commands of a launch with options ``argv`` in ``environ``; the first is the one this
    process runs.

    * node stage (``--node``): ``[torchrun for this node]``;
    * batch stage: ``[srun ..., torchrun for node 0, ..., torchrun for node N-1]``: srun
      starts the helper's node stage on each node, which runs the matching torchrun;
    * batch stage with ``--one-task-per-gpu``: ``[srun ... python launch/train.py ...]``.
    """
    args = parse_args(argv)
    r = resolve(args, environ, list_hosts)
    if args.node:
        return [torchrun_command(r, node_rank(environ, r.nnodes))]
    if args.one_task_per_gpu:
        # launch/train.py maps SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS itself; the address and
        # port go through the environment so that every task agrees on them
        srun = _srun_common(r, environ, r.gpus_per_node)
        srun.append(f"--export=ALL,MASTER_ADDR={r.master_addr},MASTER_PORT={r.master_port},"
                    f"LOCAL_WORLD_SIZE={r.gpus_per_node}")
        return [srun + [sys.executable, *train_args(r)]]
    node_argv = ["--node", "--nnodes", str(r.nnodes), "--gpus-per-node", str(r.gpus_per_node),
                 "--master-addr", r.master_addr, "--master-port", str(r.master_port),
                 "--ds-config", r.ds_config]
    if r.config is not None:
        node_argv += ["--config", r.config]
    if r.output_dir is not None:
        node_argv += ["--output-dir", r.output_dir]
    if r.overrides:
        node_argv += ["--", *r.overrides]
    srun = _srun_common(r, environ, 1) + [sys.executable, HELPER, *node_argv]
    # what each node's stage will build from exactly these arguments (SLURM_NODEID = i there)
    per_node = [build_commands({**environ, "SLURM_NODEID": str(i)}, node_argv, list_hosts)[0]
                for i in range(r.nnodes)]
    return [srun, *per_node]


def format_commands(commands: list[list[str]]) -> str:
    """The dry-run text: the command this process runs, shell-quoted, then the per-node
    commands of a batch-stage launch as ``# node i:`` comment lines."""
    return "\n".join([shlex.join(commands[0])]
                     + [f"# node {i}: {shlex.join(c)}" for i, c in enumerate(commands[1:])])


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        commands = build_commands(os.environ, argv)
    except LaunchError as e:
        print(f"launch_cmd: error: {e}", file=sys.stderr)
        return 2
    if parse_args(argv).dry_run:
        print(format_commands(commands))
        return 0
    print(f"launch_cmd: {shlex.join(commands[0])}", file=sys.stderr, flush=True)
    # exec, not a child: srun / Slurm's signals (time limit, scancel) reach the launcher itself
    os.execvp(commands[0][0], commands[0])
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
