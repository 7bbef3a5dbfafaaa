"""GoatLinear: a frozen nn.Linear plus a top-k router over E stacked low-rank experts.

    y = x W0^T + b  -  init_cof * s * (x A0_cat^T) B0_cat^T  +  sum_{i in T(x)} w_i * s * B_i A_i drop(x)

The first two terms are x W_res^T + b with W_res = W0 - init_cof * s * sum_i B0_i A0_i, computed
without ever writing W_res: the base weight stays bit-identical to the checkpoint (so ZeRO-3 can
partition and offload the original weights, and unload restores the model exactly), and the
correction keeps full precision even when W0 is bf16 (the official code subtracts it in place
from a bf16 weight and rounds most of it away). The frozen factors live in the buffers
``res_A`` (r, n) and ``res_B`` (m, r) = -init_cof * s * B0_cat.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .config import GoatConfig
from .kernels import dense_experts, grouped_experts
from .svd import GoatPriors


class RoutingContext:
    """Per-forward information shared by all GOAT layers of a model (set by GoatModel).

    Attributes:
        token_mask: (batch, seq) attention mask of the current forward, or None. Tokens whose
            mask is 0 are excluded from the router statistics when the config asks for it.
    """

    def __init__(self) -> None:
        self.token_mask: Optional[torch.Tensor] = None


def _flat_token_mask(mask: Optional[torch.Tensor], lead_shape: torch.Size) -> Optional[torch.Tensor]:
    """The (N,) mask aligned with a layer input of leading shape ``lead_shape``, or None."""
    if mask is None:
        return None
    if tuple(mask.shape) == tuple(lead_shape):
        return mask.reshape(-1)
    # Incremental decoding: the mask covers past + current tokens; the layer sees the current ones.
    if mask.dim() == 2 and len(lead_shape) == 2 and mask.shape[0] == lead_shape[0] \
            and mask.shape[1] > lead_shape[1]:
        return mask[:, -lead_shape[1]:].reshape(-1)
    return None


class GoatLinear(nn.Module):
    """A GOAT-adapted linear layer.

    Args:
        base_layer: the frozen nn.Linear (m = out_features, n = in_features); kept untouched.
        cfg: the adapter config.
        priors: initial expert factors; ``priors.svd_based`` adds the residual correction.
        context: the model-wide RoutingContext (token mask); a private one if None.

    Parameters (trainable, fp32 unless cast by the caller):
        lora_A: (E_A, r_e, n) expert A's (E_A = 1 for hydralora's shared A, else E).
        lora_B: (E, m, r_e) expert B's.
        lora_router.weight: (E, n) router.
    Buffers (frozen): res_A (r, n), res_B (m, r), present for SVD inits with init_cof > 0.
    """

    def __init__(self, base_layer: nn.Linear, cfg: GoatConfig, priors: GoatPriors,
                 context: Optional[RoutingContext] = None, expert_parallel=None) -> None:
        super().__init__()
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        n, m = base_layer.in_features, base_layer.out_features
        E = cfg.num_experts
        self.in_features, self.out_features = n, m
        self.num_experts, self.top_k, self.expert_rank = E, cfg.top_k, cfg.expert_rank
        self.scale = cfg.scale_for(n)
        self.dropout = float(cfg.lora_dropout)
        self.ignore_padding = cfg.aux_loss_ignore_padding
        if cfg.compute == "auto":
            grouped = cfg.top_k < E and cfg.r >= cfg.grouped_min_rank
            self.compute = "grouped" if grouped else "dense"
        else:
            self.compute = cfg.compute
        device = priors.A.device
        self.lora_router = nn.Linear(n, E, bias=False, device=device, dtype=torch.float32)
        self.shared_A = priors.A.shape[0] == 1 and E > 1
        self.expert_parallel = expert_parallel
        if expert_parallel is None:
            self.lora_A = nn.Parameter(priors.A.detach().to(torch.float32).clone())
            self.lora_B = nn.Parameter(priors.B.detach().to(torch.float32).clone())
        else:
            # Expert shards are NOT registered parameters: the DeepSpeed engine (and ZeRO-3's
            # partitioning) must never treat them as replicated data-parallel tensors. The
            # expert optimizer (parallel/expert_optim.py) owns, reduces and steps them.
            if self.shared_A:
                raise ValueError("init='hydralora' (one A shared by all experts) cannot be "
                                 "expert-parallel; use ep_size=1")
            lo, hi = expert_parallel.offset, expert_parallel.offset + expert_parallel.num_local
            object.__setattr__(self, "lora_A",
                               nn.Parameter(priors.A[lo:hi].detach().to(torch.float32).clone()))
            object.__setattr__(self, "lora_B",
                               nn.Parameter(priors.B[lo:hi].detach().to(torch.float32).clone()))
        coef = cfg.residual_coef
        if priors.svd_based and coef > 0:
            A0, B0 = priors.A.detach().float(), priors.B.detach().float()
            self.register_buffer("res_A", A0.reshape(E * self.expert_rank, n).clone())
            self.register_buffer("res_B", (-coef * self.scale) * B0.permute(1, 0, 2).reshape(m, -1))
        else:
            self.res_A = None
            self.res_B = None
        self.context = context if context is not None else RoutingContext()
        # Statistics of the last training forward (tensors, never synced to host here).
        self.last_aux_loss: Optional[torch.Tensor] = None
        # Accumulated selections, reset by the logger; on the adapter's device (a plain attribute,
        # not a buffer, so it stays out of state dicts; _record_stats follows the input's device).
        self.expert_counts = torch.zeros(E, device=device)

    # ------------------------------------------------------------------ routing
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities and renormalised top-k.

        Args:
            x: (N, n).
        Returns:
            probs (N, E) fp32, top_w (N, k) fp32 renormalised, top_i (N, k) int64.
        """
        # Call the submodules (not F.linear on their weights): ZeRO-3 gathers a partitioned
        # parameter in its owning module's forward hooks.
        probs = torch.softmax(self.lora_router(x.to(self.lora_router.weight.dtype)).float(), dim=-1)
        top_w, top_i = probs.topk(self.top_k, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return probs, top_w, top_i

    def _record_stats(self, probs: torch.Tensor, top_i: torch.Tensor,
                      mask: Optional[torch.Tensor]) -> None:
        """Switch-style aux loss E * sum_j f_j P_j and per-expert selection counts."""
        E = self.num_experts
        sel = torch.zeros_like(probs).scatter_(1, top_i, 1.0)          # (N, E), no grad
        if mask is not None:
            m = mask.to(probs.dtype).unsqueeze(1)
            n_tok = m.sum().clamp(min=1.0)
            counts = (sel * m).sum(0)
            mean_p = (probs * m).sum(0) / n_tok
        else:
            n_tok = probs.shape[0]
            counts = sel.sum(0)
            mean_p = probs.mean(0)
        self.last_aux_loss = E * torch.sum(counts / n_tok * mean_p)
        if self.expert_counts.device != counts.device:
            self.expert_counts = self.expert_counts.to(counts.device)
        self.expert_counts += counts.detach()

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., n) -> (..., m), in x's dtype."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        cdt = self.lora_A.dtype
        base_out = self.base_layer(x2).to(cdt)
        xa = x2.to(cdt)
        probs, top_w, top_i = self.route(xa)
        if self.training:
            mask = _flat_token_mask(self.context.token_mask, lead) if self.ignore_padding else None
            self._record_stats(probs, top_i, mask)
        res_A = self.res_A.to(cdt) if self.res_A is not None else None
        res_B = self.res_B.to(cdt) if self.res_B is not None else None
        if self.expert_parallel is not None:
            out = self.expert_parallel.run_experts(base_out, xa, self.lora_A, self.lora_B,
                                                   top_w.to(cdt), top_i, self.scale, self.dropout,
                                                   self.training, res_A, res_B)
        elif self.compute == "dense":
            gates = torch.zeros_like(probs).scatter(1, top_i, top_w).to(cdt)
            out = dense_experts(base_out, xa, self.lora_A, self.lora_B, gates, self.scale,
                                self.dropout, self.training, res_A, res_B)
        else:
            out = grouped_experts(base_out, xa, self.lora_A, self.lora_B, top_w.to(cdt), top_i,
                                  self.scale, self.dropout, self.training, res_A, res_B)
        return out.to(x.dtype).reshape(*lead, self.out_features)

    def reset_expert_counts(self) -> torch.Tensor:
        """Return the accumulated selection counts (E,) and start a new accumulation."""
        counts, self.expert_counts = self.expert_counts, torch.zeros_like(self.expert_counts)
        return counts

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"experts={self.num_experts}, top_k={self.top_k}, r_e={self.expert_rank}, "
                f"scale={self.scale:g}, "
                f"compute={'expert-parallel' if self.expert_parallel is not None else self.compute}, "
                f"residual={'rank-' + str(self.res_A.shape[0]) if self.res_A is not None else 'none'}")
