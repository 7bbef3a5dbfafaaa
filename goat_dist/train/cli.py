"""Fine-tune a Hugging Face model with GOAT adapters on DeepSpeed (``goat-train``, launch/train.py).

    deepspeed --num_accelerators 2 launch/train.py --ds_config ds_configs/zero3.json --config configs/demo.yaml
    torchrun --nproc-per-node 2 launch/train.py --ds_config ds_configs/zero2.json --config run.yaml train.max_steps=50
    srun ... python launch/train.py ...          (ranks from SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS)
    python launch/train.py                       (the embedded demo: configs/demo.yaml, one process)

Overrides follow the options as section.key=value (values parsed as YAML).
Exit status (docs/CLUSTER.md): 0 finished (or stopped at train.stop_after_steps), 1 unexpected
error, 2 bad input (config, data, checkpoint; nothing written), 3 diverged (train.max_skipped_steps
non-finite steps in a row), 4 a collective timed out / a peer was lost (train.dist_timeout_s),
75 stopped by SIGTERM/SIGUSR1 after a checkpoint (rerun the same command to continue).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys

# The repository root (editable installs): the embedded demo's config and data live there.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_CONFIG = os.path.join(ROOT, "configs", "demo.yaml")


def config_reference() -> str:
    """Every run-config key with its default, generated from the dataclasses (documented there)."""
    import dataclasses
    from goat_dist.train.config import _SECTIONS
    lines = ["run config keys (section.key=default; see goat_dist/train/config.py and "
             "goat_dist/config.py for what each means):"]
    for name, cls in _SECTIONS.items():
        fields = [f"{f.name}={f.default if f.default is not dataclasses.MISSING else f.default_factory()!r}"
                  for f in dataclasses.fields(cls)]
        lines.append(f"  {name}: " + ", ".join(fields))
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=config_reference() if any(a in ("-h", "--help") for a in argv) else None)
    p.add_argument("--config", default=None,
                   help="run config, YAML or JSON (sections: model, data, goat, optim, train). "
                        "Default: the embedded demo, configs/demo.yaml")
    p.add_argument("--ds_config", "--deepspeed", dest="ds_config", default=None,
                   help="DeepSpeed JSON; \"auto\" values are filled from the run config. "
                        "Default: a built-in ZeRO-0 config")
    p.add_argument("--output_dir", default=None, help="shortcut for train.output_dir=...")
    p.add_argument("--resume", default=None,
                   help="shortcut for train.resume=...: auto (latest checkpoint in output_dir, "
                        "the default), none, or a checkpoint folder")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher; read from the environment otherwise")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. train.max_steps=20 goat.num_experts=4")
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendezvous_env(environ: dict) -> dict:
    """Rank variables for torch.distributed, from a launcher (deepspeed, torchrun), from Slurm
    (srun starting this script directly), or for a single local process."""
    env = {}
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return env
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        env["RANK"] = environ["SLURM_PROCID"]
        env["WORLD_SIZE"] = environ["SLURM_NTASKS"]
        env["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in environ:
            # a step may run on a subset of the job's nodes: rank 0 is on the step's first node
            nodes = environ.get("SLURM_STEP_NODELIST", environ.get(
                "SLURM_JOB_NODELIST", environ.get("SLURM_NODELIST", "127.0.0.1")))
            env["MASTER_ADDR"] = first_host(nodes)
        env.setdefault("MASTER_PORT", environ.get("MASTER_PORT", "29500"))
        return env
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()))
    return env


def first_host(nodelist: str) -> str:
    """First host of a Slurm nodelist, as `scontrol show hostnames` lists it: 'node[03-05,09],gpu1'
    -> 'node03', 'nid[01-04]-ib' -> 'nid01-ib', 'r[1-2]-n[01-02]' -> 'r1-n01'."""
    item = re.match(r"(?:[^,\[]|\[[^\]]*\])*", nodelist.strip()).group(0)  # first top-level entry
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0], item)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.update(rendezvous_env(os.environ))
    world = int(os.environ["WORLD_SIZE"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get(
        "LOCAL_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", world))))
    import torch
    if "OMP_NUM_THREADS" not in os.environ and local_world > 1:
        # the deepspeed launcher does not split cores between ranks; oversubscription costs ~5x.
        # sched_getaffinity honours srun's CPU binding, cpu_count does not.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, (cores or 1) // local_world))

    from goat_dist.adapter_io import AdapterLoadError
    from goat_dist.config import GoatConfigError
    from goat_dist.train.config import ConfigError, load_run_config
    from goat_dist.train.data import DataError
    from goat_dist.train.ds_config import read_ds_config
    from goat_dist.train.loop import Trainer, shutdown
    from goat_dist.train import resilience as rs
    from goat_dist.train.checkpoint import CheckpointWriteError
    from goat_dist.train.tokenizer import TokenizerError

    overrides = list(args.overrides)
    if args.output_dir is not None:
        overrides.append(f"train.output_dir={args.output_dir}")
    if args.resume is not None:
        overrides.append(f"train.resume={args.resume}")
    config_path = args.config
    if config_path is None:
        config_path = DEMO_CONFIG
        os.chdir(ROOT)  # the demo's paths are relative to the repository
    bad_input = (ConfigError, GoatConfigError, DataError, TokenizerError, AdapterLoadError)
    rank = int(os.environ["RANK"])
    clean = False   # whether every rank reached the same end, so a closing barrier is safe
    try:
        run = load_run_config(config_path, overrides)
        ds = read_ds_config(args.ds_config)
        summary = Trainer(run, ds).run()
        clean = True
    except bad_input as e:
        clean = True    # every rank validates the same input and fails alike
        if rank == 0:
            print(f"goat_dist: error: {e}", file=sys.stderr)
        return rs.EXIT_BAD_INPUT
    except rs.DivergedError as e:
        clean = True    # every rank counts the same agreed skips
        if rank == 0:
            print(f"goat_dist: error: {e}", file=sys.stderr)
        return rs.EXIT_DIVERGED
    except rs.CollectiveTimeout as e:
        print(f"goat_dist: error: {e}", file=sys.stderr, flush=True)   # every rank: says who waited
        return rs.EXIT_COLLECTIVE_TIMEOUT
    except CheckpointWriteError as e:
        print(f"goat_dist: error: rank {rank}: {e}", file=sys.stderr, flush=True)
        return rs.EXIT_ERROR
    finally:
        shutdown(barrier=clean)
    if rank == 0:
        m = summary["final_metrics"]
        print(f"goat_dist: {'finished' if summary['finished'] else 'stopped'} at step "
              f"{summary['global_step']}/{summary['total_steps']}; "
              + ", ".join(f"{k}={v:.4f}" for k, v in m.items())
              + f"; outputs in {run.train.output_dir}")
    if summary.get("stopped_by"):
        if rank == 0:
            print(f"goat_dist: stopped by {summary['stopped_by']} after the checkpoint of step "
                  f"{summary['global_step']}; rerun the same command to continue "
                  f"(exit status {rs.EXIT_STOPPED})", file=sys.stderr)
        return rs.EXIT_STOPPED
    return rs.EXIT_OK

