"""Model loading (local HF folders or tiny presets), ZeRO-3 aware, and GOAT injection.

Under ZeRO-3 a model folder is loaded partitioned: ``HfDeepSpeedConfig`` is created before
``from_pretrained`` (and kept alive), so transformers builds the model inside ``zero.Init`` and no
rank ever holds the full backbone. GOAT's SVD priors come from the distributed initialiser
(parallel/svd_init.py): each layer's owner collects that one full weight, computes (or loads
from cache) its priors and broadcasts them.
GoatLinear calls its base layer and router as submodules, so ZeRO-3's per-module hooks gather
one frozen weight at a time (see inject_goat for why it is not a leaf module).

Presets are tiny random models built from a config in code (seeded, identical on every rank).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..config import GoatConfig
from ..model import GoatModel, find_target_modules, get_goat_model
from ..parallel.svd_init import DistributedSVDInitializer, InitStats
from .config import ConfigError, ModelConfig

CLASSIFIER_HEADS = ("classifier", "score")


def preset_config(preset: str, vocab_size: int, num_labels: int = 2, pad_token_id: int = 0):
    """A tiny transformers config for a preset (hidden 64, 2 layers)."""
    from transformers import BertConfig, LlamaConfig, RobertaConfig

    if preset == "tiny-llama":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                           max_position_embeddings=1024, pad_token_id=pad_token_id,
                           bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, vocab_size=vocab_size, num_labels=num_labels,
                  pad_token_id=pad_token_id, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    if preset == "tiny-bert":
        return BertConfig(max_position_embeddings=512, **common)
    if preset == "tiny-roberta":
        return RobertaConfig(max_position_embeddings=514, **common)
    raise ConfigError(f"unknown model preset {preset!r}")


def build_preset(preset: str, vocab_size: int, num_labels: int = 2, seed: int = 0,
                 pad_token_id: int = 0) -> nn.Module:
    """Build a tiny preset model with weights drawn from ``seed`` (same on every rank)."""
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification)

    cfg = preset_config(preset, vocab_size, num_labels, pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if preset == "tiny-llama":
            return AutoModelForCausalLM.from_config(cfg)
        return AutoModelForSequenceClassification.from_config(cfg)


def load_base_model(mcfg: ModelConfig, vocab_size: int, num_labels: int, seed: int,
                    pad_token_id: int, ds_config: Optional[dict]) -> tuple[nn.Module, object]:
    """The frozen base model.

    Returns:
        (model, keepalive): keepalive is the HfDeepSpeedConfig that must outlive the model
        under ZeRO-3 (transformers holds it through a weak reference), or None.
    """
    dtype = getattr(torch, mcfg.dtype)
    zero3 = bool(ds_config) and ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    if mcfg.preset is not None:
        model = build_preset(mcfg.preset, vocab_size, num_labels, seed, pad_token_id).to(dtype)
        return model, None
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    keepalive = None
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig
        keepalive = HfDeepSpeedConfig(ds_config)  # must exist before from_pretrained
    try:
        AutoConfig.from_pretrained(mcfg.name_or_path, local_files_only=True,
                                   trust_remote_code=mcfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name_or_path={mcfg.name_or_path!r} is not a local Hugging Face "
                          f"model folder ({str(e).splitlines()[0]}); convert or download it first "
                          f"(see scripts/convert_smollm2.py)") from None
    kwargs = dict(local_files_only=True, dtype=dtype, trust_remote_code=mcfg.trust_remote_code)
    if mcfg.task == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(mcfg.name_or_path, **kwargs)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            mcfg.name_or_path, num_labels=num_labels, **kwargs)
    return model, keepalive


def embedding_rows(model: nn.Module) -> int:
    emb = model.get_input_embeddings().weight
    return int(getattr(emb, "ds_shape", emb.shape)[0])


def resolve_modules_to_save(model: nn.Module, goat_cfg: GoatConfig, task: str) -> GoatConfig:
    """A classification head must train and be saved with the adapter: default it by name."""
    if task != "seq_cls" or goat_cfg.modules_to_save:
        return goat_cfg
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    head = next((h for h in CLASSIFIER_HEADS if h in names), None)
    if head is None:
        raise ConfigError("model.task=seq_cls but no classification head (classifier/score) was "
                          "found; set goat.modules_to_save to the head's module name")
    goat_cfg.modules_to_save = [head]
    return goat_cfg


def inject_goat(model: nn.Module, goat_cfg: GoatConfig, expert_parallel=None,
                svd_cache_dir: Optional[str] = None) -> tuple[GoatModel, InitStats]:
    """Inject GOAT; priors from the distributed SVD initialiser (each SVD once per job).

    GoatLinear is deliberately NOT registered as a ZeRO-3 leaf module. Leaf modules exist for MoE
    blocks whose experts run data-dependently (an expert unused on one rank breaks ZeRO-3's
    prefetch trace and its reduce-scatter). Both GOAT compute paths touch every expert parameter
    on every forward (stacked tensors), so the trace is static without it, and GoatLinear calls
    its submodules (base_layer, lora_router) so their own hooks gather them. With DeepSpeed
    0.19.8 the leaf path released the persistent expert tensors before backward (shape-0
    gradient mismatch), see docs/ARCHITECTURE.md.
    """
    init = DistributedSVDInitializer(model, goat_cfg, find_target_modules(model, goat_cfg),
                                     cache_dir=svd_cache_dir).run()
    goat = get_goat_model(model, goat_cfg, priors_fn=init, expert_parallel=expert_parallel)
    return goat, init.stats
