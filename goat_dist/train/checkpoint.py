"""Checkpoints that survive a crash mid-save, exact resume, and adapter export from any ZeRO stage.

Layout of ``<output_dir>/checkpoints``:

    step_00000040/            DeepSpeed's files (adapter params, optimizer, scheduler; the frozen
                              base is excluded) + rng_rank<r>.pt + run_config.json (the run
                              config, world size, step and the precision it trained in)
        adapter/              the adapter at this step, exported like the end-of-run export
                              (safetensors, gathered from ZeRO-3 / expert shards): what
                              ``launch/evaluate.py --adapter <step folder>`` and load_adapter read
    step_00000080/
    latest.json               the pointer: {"tag": "step_00000080", "global_step": 80, ...}

The pointer is replaced atomically (temp file + os.replace) only after every rank has finished
writing the new tag, so a process killed while writing leaves ``latest.json`` naming the previous,
complete checkpoint. The data position needs no state of its own: the micro-batch plan is a pure
function of (seed, global step) (see data.StepPlan).

An error while writing (disk full, permission denied) raises CheckpointWriteError naming the path;
the pointer still names the previous checkpoint, and the next successful save deletes the partial
folder.

Loading and trust: goat_dist's own files load without executing code: run_config.json and the
pointer are JSON, ``rng_rank<r>.pt`` and ``experts_rank<r>.pt`` go through
``torch.load(weights_only=True)``. DeepSpeed's own files (``mp_rank_*_model_states.pt``,
``*_optim_states.pt``) are loaded by ``engine.load_checkpoint``, which unpickles them in full:
resume only from checkpoint folders you (or your job) wrote. Adapters (adapter_io.py) are
safetensors only.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..adapter_io import adapter_state_dict, save_adapter
from ..model import GoatModel
from .config import ConfigError, RunConfig
from .ds_config import precision_name

POINTER = "latest.json"
# The run's per-step log up to the checkpoint (rank 0 writes it): a resumed run's summary.json
# then holds the whole run's loss curve, not only the steps since the last restart.
HISTORY = "history.json"
ADAPTER_DIR = "adapter"      # in a checkpoint step folder, and in the run's output folder


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (disk full, permission denied, ...); the previous checkpoint
    stays current. The message names the path and the fix."""

# Fields that must agree between a checkpoint and the run resuming it: they change the model's
# shapes or the data order, so a resume under a different value would not continue the same run.
_RESUME_KEYS = {
    "model": ("name_or_path", "preset", "task", "num_labels", "vocab_size", "dtype"),
    "goat": ("r", "num_experts", "top_k", "init", "scaling", "eta", "rho", "init_cof",
             "target_modules", "exclude_modules", "modules_to_save"),
    "data": ("train_file", "format", "prompt_template", "max_length", "max_train_samples"),
    "train": ("micro_batch_size", "gradient_accumulation_steps", "seed", "max_steps", "num_epochs",
              "ep_size"),
}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def _atomic_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state(cuda_devices: Optional[list[int]] = None) -> dict[str, Any]:
    """This process's RNG states, made of tensors, ints, strings and tuples only, so the file
    loads with ``torch.load(weights_only=True)``.

    Args:
        cuda_devices: CUDA devices whose generators are saved. None: this rank's current device
            when CUDA is available (not every visible GPU: ``get_rng_state_all`` would create a
            CUDA context, ~0.5 GB, on each of the node's GPUs from every rank); [] for none.
    """
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if cuda_devices is None:
        cuda_devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    if cuda_devices:
        state["cuda_devices"] = [int(d) for d in cuda_devices]
        state["cuda"] = [torch.cuda.get_rng_state(d) for d in cuda_devices]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved (also the older format: numpy tuple, all-device list)."""
    random.setstate(tuple(state["python"]) if isinstance(state["python"], list) else state["python"])
    npst = state["numpy"]
    if isinstance(npst, dict):
        npst = (npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                npst["has_gauss"], npst["gauss"])
    np.random.set_state(npst)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        devices = state.get("cuda_devices", range(len(state["cuda"])))
        for d, s in zip(devices, state["cuda"]):
            torch.cuda.set_rng_state(s, d)


def save_checkpoint(engine, run: RunConfig, global_step: int, world_size: int,
                    expert_state: Optional[dict] = None,
                    history: Optional[list[dict]] = None) -> str:
    """Write checkpoint ``step_<global_step>`` and move the pointer to it. Collective.

    ``expert_state``: this rank's expert shards + their optimizer (expert parallelism), saved
    as ``experts_rank<r>.pt`` beside DeepSpeed's files.
    ``history``: the run's per-step records up to ``global_step`` (rank 0's are written, as
    ``history.json``; see load_history).

    Returns:
        The checkpoint folder.
    """
    root = checkpoint_dir(run.train.output_dir)
    tag = f"step_{global_step:08d}"
    path = os.path.join(root, tag)
    rank = _rank()
    try:
        os.makedirs(root, exist_ok=True)
        engine.save_checkpoint(root, tag=tag, client_state={"global_step": global_step},
                               save_latest=False, exclude_frozen_parameters=True)
        torch.save(rng_state(), os.path.join(path, f"rng_rank{rank}.pt"))
        if expert_state is not None:
            torch.save(expert_state, os.path.join(path, f"experts_rank{rank}.pt"))
        # a peft/HF-Trainer user evaluates checkpoint-N folders directly: give each step the
        # same loadable adapter the run's end writes (collective: gathers ZeRO-3 / expert shards)
        export_adapter(engine.module, os.path.join(path, ADAPTER_DIR))
    except OSError as e:
        raise _write_error(e, path, root) from None
    _barrier()                                   # every rank's files are complete
    if rank == 0:
        try:
            # "bf16": the resolved precision (train.bf16=auto differs between machines)
            _atomic_json(os.path.join(path, "run_config.json"),
                         {"run": run.to_dict(), "world_size": world_size, "global_step": global_step,
                          "bf16": bool(engine.bfloat16_enabled())})
            if history is not None:
                _atomic_json(os.path.join(path, HISTORY), history)
            _atomic_json(os.path.join(root, POINTER), {"tag": tag, "global_step": global_step})
        except OSError as e:
            raise _write_error(e, path, root) from None
        _prune(root, keep=run.train.keep_checkpoints, current=tag)
    _barrier()
    return path


def _write_error(e: OSError, path: str, root: str) -> CheckpointWriteError:
    """The message for a failed checkpoint write: what failed where, what is still current."""
    try:
        with open(os.path.join(root, POINTER)) as f:
            previous = f"the previous checkpoint {os.path.join(root, json.load(f)['tag'])} stays current"
    except (OSError, ValueError, KeyError):
        previous = "there is no earlier checkpoint"
    where = e.filename or path
    return CheckpointWriteError(
        f"could not write checkpoint {path} ({e.strerror or e} at {where}); {previous}. Free "
        f"disk space or fix the permissions of {root}, then rerun the same command to resume")


def _prune(root: str, keep: int, current: str) -> None:
    """Keep ``current`` and the ``keep - 1`` newest older checkpoints. Folders newer than
    ``current`` are leftovers of a crashed save (or of an abandoned run's future) and go too."""
    tags = sorted(d for d in os.listdir(root) if d.startswith("step_") and d != current)
    older = [t for t in tags if t < current]
    doomed = [t for t in tags if t > current] + older[:max(0, len(older) - (keep - 1))]
    for old in doomed:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The folder the pointer names, or None when there is no (complete) checkpoint."""
    root = checkpoint_dir(output_dir)
    ptr = os.path.join(root, POINTER)
    if not os.path.isfile(ptr):
        return None
    try:
        with open(ptr) as f:
            tag = json.load(f)["tag"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ConfigError(f"checkpoint pointer {ptr} is unreadable ({e}); point train.resume at a "
                          f"checkpoint folder explicitly") from None
    return os.path.join(root, tag)


def check_resumable(path: str, run: RunConfig, world_size: int) -> dict:
    """Validate that checkpoint ``path`` belongs to this run; returns its metadata."""
    meta_path = os.path.join(path, "run_config.json")
    if not os.path.isfile(meta_path):
        raise ConfigError(f"{path} is not a complete goat_dist checkpoint (no run_config.json); "
                          f"resume from the folder named in checkpoints/{POINTER}")
    with open(meta_path) as f:
        meta = json.load(f)
    saved, now = meta["run"], run.to_dict()
    diffs = [f"{sec}.{k}: checkpoint {saved[sec].get(k)!r} vs now {now[sec].get(k)!r}"
             for sec, keys in _RESUME_KEYS.items() for k in keys
             if _norm(saved[sec].get(k)) != _norm(now[sec].get(k))]
    if meta["world_size"] != world_size:
        diffs.append(f"world size: checkpoint {meta['world_size']} vs now {world_size}")
    if diffs:
        raise ConfigError(f"checkpoint {path} comes from a different run configuration ("
                          + "; ".join(diffs) + "). Resume with the original configuration, or "
                          "start a fresh run in a new train.output_dir (or train.resume=none "
                          "with train.overwrite_output_dir=true)")
    return meta


def resume_bf16(meta: dict, run: RunConfig) -> Optional[bool]:
    """The precision a resumed run continues in: the one its checkpoint trained in.

    ``train.bf16=auto`` resolves per machine (bf16 where it is native), so a run requeued onto a
    node of another type would otherwise switch precision mid-run, which DeepSpeed's checkpoint
    loading does not survive (it crashed either way); ``auto`` follows the checkpoint instead
    (slower where bf16 is emulated, but the run's numerics stay as they were). An explicit
    ``true``/``false`` that contradicts the checkpoint is refused.

    Args:
        meta: the checkpoint's run_config.json (check_resumable's return value).
    Returns:
        True/False for bf16/fp32; None for a checkpoint written before the precision was
        recorded (train.bf16 then resolves as for a fresh run).
    """
    saved = meta.get("bf16")
    if saved is None:
        return None
    want = str(run.train.bf16).lower()
    if want != "auto" and (want == "true") != saved:
        raise ConfigError(f"train.bf16={want} but the checkpoint being resumed trained in "
                          f"{precision_name(saved)}: a run cannot change precision mid-way. "
                          f"Resume with train.bf16=auto (or {str(saved).lower()}) to continue it "
                          f"in {precision_name(saved)}, or start a fresh run in a new "
                          f"train.output_dir")
    return saved


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def load_checkpoint(engine, path: str) -> tuple[int, Optional[dict]]:
    """Restore engine state and this rank's RNG from ``path``.

    Returns:
        (global step, this rank's expert state or None).
    """
    root, tag = os.path.split(path.rstrip("/"))
    load_path, client = engine.load_checkpoint(root, tag=tag, load_module_strict=False,
                                               load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
    if load_path is None:
        raise ConfigError(f"DeepSpeed could not load checkpoint {path}")
    rng_file = os.path.join(path, f"rng_rank{_rank()}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(_load_tensors_only(rng_file))
    expert_file = os.path.join(path, f"experts_rank{_rank()}.pt")
    expert_state = _load_tensors_only(expert_file) if os.path.isfile(expert_file) else None
    return int(client["global_step"]), expert_state


def load_history(path: str, global_step: int) -> list[dict]:
    """The per-step records a checkpoint holds, up to ``global_step``; [] for a checkpoint
    written before they were saved (or an unreadable file: the curve is a record, not state)."""
    try:
        with open(os.path.join(path, HISTORY)) as f:
            history = json.load(f)
    except (OSError, ValueError):
        return []
    if not isinstance(history, list):
        return []
    return [h for h in history if isinstance(h, dict) and h.get("step", 0) <= global_step]


def _load_tensors_only(file: str):
    """torch.load restricted to tensors and plain containers: a tampered file cannot run code."""
    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{file} cannot be loaded as tensors only ({first}); it is damaged or "
                          f"was not written by this goat_dist. Resume from another checkpoint "
                          f"(train.resume=<folder>) or start a fresh run") from None


def adapter_parameters(goat: GoatModel) -> list[torch.nn.Parameter]:
    params = []
    for layer in goat.goat_layers.values():
        params += [layer.lora_A, layer.lora_B, layer.lora_router.weight]
    return params + list(goat.saved_module_parameters().values())


def _gather_expert_shards(goat: GoatModel) -> dict[str, torch.Tensor]:
    """Full (E, ...) expert tensors of every layer, gathered over the expert-parallel group."""
    ep = goat.expert_parallel
    if ep is None:
        return {}
    group, P = ep.groups.ep_group, ep.groups.ep_size
    full = {}
    for name, layer in goat.goat_layers.items():
        for attr in ("lora_A", "lora_B"):
            local = getattr(layer, attr).detach().float().contiguous()
            parts = [torch.empty_like(local) for _ in range(P)]
            dist.all_gather(parts, local, group=group)
            full[f"{name}.{attr}"] = torch.cat(parts, 0).cpu()
    return full


def export_adapter(goat: GoatModel, path: str) -> None:
    """Save the adapter folder (rank 0), gathering ZeRO-3 partitions and expert shards first,
    so the folder is the same whatever the ZeRO stage or ep_size. Collective."""
    experts = _gather_expert_shards(goat)
    params = [p for p in adapter_parameters(goat) if hasattr(p, "ds_id")]
    partitioned = bool(params)
    if partitioned:
        import deepspeed
        ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    else:
        import contextlib
        ctx = contextlib.nullcontext()
    with ctx:
        if _rank() == 0:
            sd = {k: v.float() if v.is_floating_point() else v
                  for k, v in adapter_state_dict(goat).items()}
            sd.update(experts)
            save_adapter(goat, path, state_dict=sd)
    _barrier()
