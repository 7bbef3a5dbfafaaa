"""Helpers of the core test suite: tiny layers/models, error metrics, fp64 copies for oracles."""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn

from goat_dist.config import GoatConfig
from goat_dist.layer import GoatLinear
from goat_dist.svd import layer_priors


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in float64 (0 when both are zero)."""
    a, ref = a.detach().double(), ref.detach().double()
    d, r = (a - ref).norm().item(), ref.norm().item()
    return d / r if r > 0 else d


def layer_cfg(**kw) -> GoatConfig:
    """A GoatConfig for a stand-alone layer: no dropout unless asked, dummy target_modules."""
    kw.setdefault("lora_dropout", 0.0)
    kw.setdefault("target_modules", ["proj"])
    return GoatConfig(**kw)


def make_layer(cfg: GoatConfig, n: int = 48, m: int = 40, bias: bool = True,
               dtype: torch.dtype = torch.float32, base: Optional[nn.Linear] = None) -> GoatLinear:
    """A GoatLinear over a fresh random nn.Linear(n, m) (or ``base``), priors as get_goat_model does."""
    if base is None:
        base = nn.Linear(n, m, bias=bias).to(dtype)
    return GoatLinear(base, cfg, layer_priors(base.weight, cfg, cfg.scale_for(base.in_features)))


def f64_copy(layer: GoatLinear) -> GoatLinear:
    """A deep copy with base, experts and residual in float64; the router stays fp32.

    The oracle routes on ``x.float()``, so keeping the router in fp32 gives the same routing as the
    layer while every expert product is computed in float64.
    """
    L = copy.deepcopy(layer)
    L.base_layer.double()
    L.lora_A.data = L.lora_A.data.double()
    L.lora_B.data = L.lora_B.data.double()
    if L.res_A is not None:
        L.res_A = L.res_A.double()
        L.res_B = L.res_B.double()
    return L


def goat_param_names(model: nn.Module) -> set[str]:
    """Names of the GOAT expert/router parameters of a model."""
    return {n for n, _ in model.named_parameters()
            if n.endswith((".lora_A", ".lora_B", ".lora_router.weight"))}


# ---------------------------------------------------------------------- tiny HF models
def tiny_llama(seed: int = 0, hidden: int = 64):
    """A 2-layer LlamaForCausalLM (random init, no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                      max_position_embeddings=64, attn_implementation="eager")
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0, num_labels: int = 3, hidden: int = 64):
    """A 2-layer BertForSequenceClassification without dropout (random init, no download)."""
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                     num_attention_heads=4, vocab_size=256, max_position_embeddings=64,
                     num_labels=num_labels, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return BertForSequenceClassification(cfg).eval()


def tiny_roberta(seed: int = 0, num_labels: int = 3, hidden: int = 64):
    """A 2-layer RobertaForSequenceClassification without dropout (random init, no download)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification
    torch.manual_seed(seed)
    cfg = RobertaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                        num_attention_heads=4, vocab_size=256, max_position_embeddings=66,
                        num_labels=num_labels, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=1,
                        attn_implementation="eager")
    return RobertaForSequenceClassification(cfg).eval()


def lm_batch(batch: int = 2, seq: int = 12, vocab: int = 256, pad_last: int = 0, seed: int = 1):
    """(input_ids, attention_mask) with the last ``pad_last`` positions of row 0 padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_last:
        mask[0, -pad_last:] = 0
        ids[0, -pad_last:] = 1
    return ids, mask


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached clone of every parameter and buffer, by name."""
    sd = {n: p.detach().clone() for n, p in model.named_parameters()}
    sd.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return sd


def small_cfg(**kw):
    """A small GoatConfig (r=8, E=4, top-2, no dropout) for injection tests; kw override."""
    from goat_dist.config import GoatConfig
    kw.setdefault("r", 8)
    kw.setdefault("num_experts", 4)
    kw.setdefault("top_k", 2)
    kw.setdefault("lora_dropout", 0.0)
    return GoatConfig(**kw)
