"""DeepSpeed JSON handling: read, fill ``"auto"`` values from the run config, refuse contradictions.

As in HF Trainer, a DeepSpeed config may leave batch sizes, clipping, optimizer hyper-parameters
and bf16 as ``"auto"``; they are filled from the run config. An explicit value that disagrees with
the run config is an error (the run would silently train with something other than what the run
config says).
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Optional

import torch

from .config import ConfigError, RunConfig

DEFAULT_DS_CONFIG: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "zero_optimization": {"stage": 0},
    "bf16": {"enabled": "auto"},
    "steps_per_print": 1_000_000_000,
    "wall_clock_breakdown": False,
}


def read_ds_config(path: Optional[str]) -> dict[str, Any]:
    """The DeepSpeed config at ``path`` (JSON), or the built-in ZeRO-0 default when None."""
    if path is None:
        return copy.deepcopy(DEFAULT_DS_CONFIG)
    if not os.path.isfile(path):
        raise ConfigError(f"DeepSpeed config {path!r} does not exist; pass --ds_config "
                          f"ds_configs/zero2.json (or zero3.json, zero3_offload.json)")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path!r} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"DeepSpeed config {path!r} must be a JSON object")
    return cfg


# CPU features with native bf16 arithmetic (AVX512-BF16: dot products; AMX-BF16: tile matmuls).
# Without them torch emulates bf16 GEMMs through fp32 and bf16 training is slower than fp32.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_native_bf16(cpuinfo: Optional[str] = None) -> bool:
    """Whether the CPU computes bf16 natively: any of CPU_BF16_FLAGS among the ``flags`` of
    ``cpuinfo`` (the text of /proc/cpuinfo, read when None; False where it cannot be read)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and set(value.split()) & set(CPU_BF16_FLAGS):
            return True
    return False


def precision_name(bf16: bool) -> str:
    """"bf16" or "fp32": how messages and tables name a resolved train.bf16."""
    return "bf16" if bf16 else "fp32"


def accelerator_type() -> str:
    """The device type the DeepSpeed engine will train on: "cuda", "cpu", ... (its accelerator)."""
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().device_name()


def bf16_wanted(run: RunConfig, device_type: Optional[str] = None) -> bool:
    """Resolve train.bf16. ``auto`` is on where bf16 is native on ``device_type`` (default: the
    DeepSpeed accelerator's): CUDA devices that support it (torch.cuda.is_bf16_supported) and
    CPUs with AVX512-BF16 or AMX-BF16 (measured 1.9x faster than fp32 for SmolLM2-135M on an
    AVX512-BF16 EPYC, docs/BENCHMARKS.md); off elsewhere (emulated bf16 is slower than fp32)."""
    v = str(run.train.bf16).lower()
    if v in ("true", "false"):
        return v == "true"
    device_type = device_type or accelerator_type()
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return cpu_native_bf16()
    return False


def _fill(section: dict, key: str, value: Any, where: str, source: str) -> None:
    cur = section.get(key, "auto")
    if cur == "auto":
        section[key] = value
    elif cur != value and not (isinstance(cur, (int, float)) and isinstance(value, (int, float))
                               and abs(cur - value) <= 1e-12 * max(1.0, abs(value))):
        raise ConfigError(f"DeepSpeed config sets {where}={cur!r} but the run config gives "
                          f"{value!r} ({source}); set it to \"auto\" in the DeepSpeed config or "
                          f"make the two agree")


def resolve_ds_config(ds: dict[str, Any], run: RunConfig, world_size: int,
                      bf16: Optional[bool] = None) -> dict[str, Any]:
    """A copy of ``ds`` with every ``"auto"`` filled from ``run``; contradictions raise ConfigError.

    ``bf16``: the precision to train in instead of resolving ``train.bf16`` on this machine
    (a resumed run's, checkpoint.resume_bf16); None resolves it (bf16_wanted).
    """
    ds = copy.deepcopy(ds)
    t, o = run.train, run.optim
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size,
          "train_micro_batch_size_per_gpu", "train.micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", t.gradient_accumulation_steps,
          "gradient_accumulation_steps", "train.gradient_accumulation_steps")
    _fill(ds, "train_batch_size", t.micro_batch_size * t.gradient_accumulation_steps * world_size,
          "train_batch_size", f"micro_batch_size x gradient_accumulation_steps x {world_size} ranks")
    _fill(ds, "gradient_clipping", float(o.max_grad_norm), "gradient_clipping", "optim.max_grad_norm")
    if "scheduler" in ds:
        raise ConfigError("the DeepSpeed config has a \"scheduler\" block; goat_dist schedules the "
                          "learning rate from the run config's optim section (warmup + cosine): "
                          "remove the block")
    if "optimizer" in ds:
        opt = ds["optimizer"]
        if str(opt.get("type", "")).lower() not in ("adam", "adamw"):
            raise ConfigError(f"DeepSpeed optimizer type {opt.get('type')!r} is not supported; "
                              f"use AdamW (or drop the block to use torch AdamW)")
        params = opt.setdefault("params", {})
        _fill(params, "lr", o.lr, "optimizer.params.lr", "optim.lr")
        _fill(params, "weight_decay", o.weight_decay, "optimizer.params.weight_decay", "optim.weight_decay")
        _fill(params, "eps", o.eps, "optimizer.params.eps", "optim.eps")
        betas = params.get("betas", "auto")
        if betas == "auto":
            params["betas"] = list(o.betas)
        elif list(betas) != list(o.betas):
            raise ConfigError(f"DeepSpeed config sets optimizer.params.betas={betas} but the run "
                              f"config gives {list(o.betas)} (optim.betas); make them agree")
    bf16_section = ds.setdefault("bf16", {})
    if bf16 is None:
        _fill(bf16_section, "enabled", bf16_wanted(run), "bf16.enabled", "train.bf16")
    else:
        _fill(bf16_section, "enabled", bf16, "bf16.enabled",
              "train.bf16, as the checkpoint being resumed trained")
    if ds.get("fp16", {}).get("enabled") in (True, "auto"):
        raise ConfigError("fp16 is not supported (GOAT adapters train in fp32 or bf16); set "
                          "fp16.enabled=false and use bf16")
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage={stage!r} must be 0, 1, 2 or 3")
    if zero.get("offload_param") and stage != 3:
        raise ConfigError("zero_optimization.offload_param needs stage 3")
    if zero.get("offload_optimizer") and "optimizer" not in ds:
        # torch AdamW on the CPU master copy; DeepSpeed refuses a client optimizer otherwise.
        ds["zero_force_ds_cpu_optimizer"] = False
    ds.setdefault("steps_per_print", 1_000_000_000)
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
