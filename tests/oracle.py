"""The official GOAT forward (Facico/GOAT-PEFT ``TopKGOATLayer``), per-expert Python loop: the oracle.

It reads the parameters of a GoatLinear but computes everything the official way: an explicit
W_res matrix (built in float64 from the priors, then cast), softmax -> top-k -> renormalise, and a
loop over experts with ``torch.where`` gathers and ``index_put`` accumulation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from goat_dist.layer import GoatLinear


def reference_w_res(layer: GoatLinear, dtype=torch.float64) -> torch.Tensor:
    """W_res = W0 - init_cof * s * sum_i B0_i A0_i (res_B already carries -init_cof*s), (m, n)."""
    W = layer.base_layer.weight.detach().to(dtype)
    if layer.res_A is None:
        return W
    return W + layer.res_B.to(dtype) @ layer.res_A.to(dtype)


def reference_forward(layer: GoatLinear, x: torch.Tensor, w_res: torch.Tensor | None = None,
                      token_mask: torch.Tensor | None = None):
    """Official-style forward. Returns (y, aux_loss) with y: (..., m)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, layer.in_features)
    if w_res is None:
        w_res = reference_w_res(layer, x.dtype)
    bias = layer.base_layer.bias
    base = F.linear(x2, w_res.to(x2.dtype), None if bias is None else bias.to(x2.dtype))
    probs = F.softmax(layer.lora_router(x2.float()), dim=-1)
    w, sel = torch.topk(probs, layer.top_k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    results = torch.zeros_like(base)
    for i in range(layer.num_experts):
        batch_idx, nth = torch.where(sel == i)
        A = layer.lora_A[0 if layer.lora_A.shape[0] == 1 else i]   # (r_e, n)
        B = layer.lora_B[i]                                       # (m, r_e)
        out = F.linear(F.linear(x2[batch_idx], A), B) * layer.scale
        results[batch_idx] += w[batch_idx, nth, None] * out
    # Switch-style aux loss, over tokens (optionally only unmasked ones)
    E = layer.num_experts
    if token_mask is not None:
        keep = token_mask.reshape(-1).bool()
        probs_k, sel_k = probs[keep], sel[keep]
    else:
        probs_k, sel_k = probs, sel
    counts = torch.bincount(sel_k.reshape(-1), minlength=E).float()
    aux = E * torch.sum(counts / probs_k.shape[0] * probs_k.mean(0))
    return (base + results).reshape(*lead, -1), aux
