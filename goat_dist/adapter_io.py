"""Adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors``, peft-style.

The folder holds everything needed to rebuild the trained model on the ORIGINAL base weights:
experts, routers, the frozen residual factors (res_A, res_B) and the modules_to_save. Loading
recomputes nothing (no SVD), so it reproduces the trained model bit-exactly.

Tensor names are relative to the wrapped model: ``<layer>.lora_A``, ``<layer>.lora_B``,
``<layer>.lora_router.weight``, ``<layer>.res_A``, ``<layer>.res_B``, ``<module>.<param>``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .config import GoatConfig, GoatConfigError
from .model import GoatModel, _under, get_goat_model, saved_module_prefixes
from .svd import GoatPriors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


class AdapterLoadError(ValueError):
    """An adapter folder that cannot be loaded onto this model; the message says why and what to do."""


def adapter_state_dict(goat: GoatModel) -> dict[str, torch.Tensor]:
    """Every tensor of the adapter (CPU, contiguous). Under ZeRO-3 call inside a gather."""
    sd = {}
    for name, layer in goat.goat_layers.items():
        sd[f"{name}.lora_A"] = layer.lora_A
        sd[f"{name}.lora_B"] = layer.lora_B
        sd[f"{name}.lora_router.weight"] = layer.lora_router.weight
        if layer.res_A is not None:
            sd[f"{name}.res_A"] = layer.res_A
            sd[f"{name}.res_B"] = layer.res_B
    sd.update(goat.saved_module_parameters())
    out = {}
    for k, v in sd.items():
        t = v.detach().cpu().contiguous()
        if t.numel() == 0:
            raise RuntimeError(f"adapter tensor {k} is empty (a ZeRO-3 placeholder?): gather the "
                               f"parameters before saving (goat_dist.train.checkpoint.export_adapter)")
        out[k] = t.clone()
    return out


def _atomic_dir_write(path: str, files: dict[str, callable]) -> None:
    """Write files into a temp dir next to ``path`` and rename into place (no half-written folder)."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp_adapter_", dir=parent)
    try:
        for fname, writer in files.items():
            writer(os.path.join(tmp, fname))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(path):
        old = tempfile.mkdtemp(prefix=".old_adapter_", dir=parent)
        os.rename(path, os.path.join(old, "x"))
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)


def adapter_metadata(goat: GoatModel) -> dict:
    model_cfg = getattr(goat.model, "config", None)
    return {
        "format": "goat_dist-adapter",
        "format_version": FORMAT_VERSION,
        "goat_config": goat.goat_config.to_dict(),
        "base_model": {
            "name_or_path": getattr(model_cfg, "_name_or_path", None) or None,
            "model_type": getattr(model_cfg, "model_type", None),
            "architectures": getattr(model_cfg, "architectures", None),
        },
        "layers": {n: {"in_features": l.in_features, "out_features": l.out_features,
                       "scale": l.scale, "residual": l.res_A is not None,
                       "shared_A": l.shared_A}
                   for n, l in goat.goat_layers.items()},
    }


def save_adapter(goat: GoatModel, path: str, state_dict: Optional[dict] = None) -> None:
    """Write the adapter folder atomically (an existing folder is replaced only when complete)."""
    sd = state_dict if state_dict is not None else adapter_state_dict(goat)
    meta = adapter_metadata(goat)

    def write_cfg(p):
        with open(p, "w") as f:
            json.dump(meta, f, indent=2)

    _atomic_dir_write(path, {WEIGHTS_NAME: lambda p: save_file(sd, p, metadata={"format": "pt"}),
                             CONFIG_NAME: write_cfg})


def read_adapter(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and sanity-check an adapter folder: (metadata, tensors)."""
    cfg_path, w_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    if not os.path.isdir(path):
        raise AdapterLoadError(f"adapter folder {path!r} does not exist; pass the folder that "
                               f"save_adapter / the trainer's export wrote")
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise AdapterLoadError(f"{p} is missing: {path!r} is not a complete goat_dist adapter "
                                   f"folder (it needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        with open(cfg_path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise AdapterLoadError(f"{cfg_path} is not valid JSON ({e}); re-export the adapter") from None
    if not isinstance(meta, dict) or meta.get("format") != "goat_dist-adapter":
        raise AdapterLoadError(f"{cfg_path} is not a goat_dist adapter config (format="
                               f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    missing = [k for k in ("goat_config", "layers", "base_model") if k not in meta]
    if missing:
        raise AdapterLoadError(f"{cfg_path} lacks {missing}; the adapter folder is damaged, "
                               f"re-export it")
    try:
        tensors = load_file(w_path)
    except Exception as e:  # safetensors raises several types for corrupt files
        raise AdapterLoadError(f"{w_path} cannot be read ({e}); the file is corrupt or truncated, "
                               f"re-export the adapter") from None
    return meta, tensors


def load_adapter(model: nn.Module, path: str) -> GoatModel:
    """Inject the adapter saved at ``path`` into ``model`` (the original base model).

    Nothing is recomputed: priors, residual factors, experts and routers come from the file.

    Raises:
        AdapterLoadError: missing/corrupt files, or an adapter made for a different model.
    """
    meta, tensors = read_adapter(path)
    try:
        cfg = GoatConfig.from_dict(meta["goat_config"])
    except GoatConfigError as e:
        raise AdapterLoadError(f"the adapter config in {path!r} is invalid ({e}); re-export it") from None
    layers_meta = meta["layers"]
    _check_adapter_fits(model, cfg, layers_meta, tensors, path,
                        meta["base_model"].get("model_type"))

    def file_priors(name, base, c, scale):
        A, B = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
        return GoatPriors(A=A.to(base.weight.device), B=B.to(base.weight.device),
                          svd_based=layers_meta[name]["residual"])

    pinned = GoatConfig.from_dict({**cfg.to_dict(), "target_modules": list(layers_meta)})
    goat = get_goat_model(model, pinned, priors_fn=file_priors)
    goat.goat_config = cfg
    with torch.no_grad():
        for name, layer in goat.goat_layers.items():
            layer.lora_router.weight.copy_(tensors[f"{name}.lora_router.weight"])
            if layer.res_A is not None:
                layer.res_A.copy_(tensors[f"{name}.res_A"])
                layer.res_B.copy_(tensors[f"{name}.res_B"])
        for k, p in goat.saved_module_parameters().items():
            p.copy_(tensors[k])
    return goat


def _check_adapter_fits(model: nn.Module, cfg: GoatConfig, layers_meta: dict,
                        tensors: dict[str, torch.Tensor], path: str, model_type) -> None:
    """Every check of load_adapter that can fail, run before the model is touched."""
    E, r_e = cfg.num_experts, cfg.expert_rank
    expected: dict[str, tuple] = {}
    for name, info in layers_meta.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise AdapterLoadError(f"adapter layer {name!r} does not exist in this model: the "
                                   f"adapter at {path!r} was trained on a different architecture "
                                   f"({model_type})") from None
        m, n = info["out_features"], info["in_features"]
        if not isinstance(mod, nn.Linear) or (mod.out_features, mod.in_features) != (m, n):
            raise AdapterLoadError(f"adapter layer {name!r} expects an nn.Linear {m}x{n} but the "
                                   f"model has {mod}; load it onto the base model it was trained on")
        expected[f"{name}.lora_A"] = (1 if info.get("shared_A") else E, r_e, n)
        expected[f"{name}.lora_B"] = (E, m, r_e)
        expected[f"{name}.lora_router.weight"] = (E, n)
        if info["residual"]:
            expected[f"{name}.res_A"] = (E * r_e, n)
            expected[f"{name}.res_B"] = (m, E * r_e)
    params = dict(model.named_parameters())
    prefixes = saved_module_prefixes(model, cfg.modules_to_save)
    for k, p in params.items():
        if _under(k, prefixes):
            expected[k] = tuple(p.shape)
    got = set(tensors)
    if set(expected) != got:
        raise AdapterLoadError(f"adapter {path!r} does not match this model: missing tensors "
                               f"{sorted(set(expected) - got)[:5]}, unexpected "
                               f"{sorted(got - set(expected))[:5]}; re-export it or load it onto "
                               f"the model it was trained on")
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != shape:
            raise AdapterLoadError(f"adapter tensor {k} has shape {tuple(tensors[k].shape)} but "
                                   f"this model needs {shape} (e.g. a head with another number "
                                   f"of labels); load it onto the model it was trained on")
