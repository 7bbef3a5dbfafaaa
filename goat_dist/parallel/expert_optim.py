"""The optimizer of expert shards under expert parallelism, and clipping by the joint norm.

Expert shards live outside the DeepSpeed engine (see layer.py): ZeRO would otherwise reduce,
partition or average them across all ranks as if every rank held the same tensor. Their update
must still equal the ep_size = 1 run's, so:

* gradients are summed over the expert-data-parallel group (the ranks holding the same experts)
  and divided by the full data-parallel world W, DeepSpeed's own MoE convention: every expert
  then gets the mean over all W ranks' tokens, as a replicated expert would;
* clipping uses the global norm over ALL trainable parameters (engine-held routers/heads and
  every expert exactly once), and scales both sides by the same coefficient;
* AdamW and the learning-rate schedule are the run's own (torch AdamW, same hyper-parameters,
  same lambda), stepped at the same optimizer steps.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from .groups import ExpertParallelGroups


class ExpertOptimizer:
    """AdamW over this rank's expert shards, with EDP gradient reduction.

    Args:
        params: the expert shard parameters of this rank.
        groups: the expert-parallel topology.
        lr, betas, eps, weight_decay: AdamW.
        lr_lambda: the run's schedule multiplier, step -> factor.
    """

    def __init__(self, params: list[torch.nn.Parameter], groups: ExpertParallelGroups, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float,
                 lr_lambda: Callable[[int], float]) -> None:
        self.params = params
        self.groups = groups
        self.optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps,
                                           weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)

    def reduce_gradients(self) -> None:
        """Sum over the EDP group, divide by W (one flat all-reduce)."""
        for p in self.params:
            if p.grad is None:  # an expert that received no token still takes a (zero) step
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in self.params])
        if self.groups.edp_size > 1:
            dist.all_reduce(flat, group=self.groups.edp_group)
        flat.div_(self.groups.world_size)
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p))
            offset += n

    def squared_norm(self) -> torch.Tensor:
        """Sum of squared expert gradients over every expert once (reduced over the EP group).

        Returns:
            () float64 on the gradients' device: no host sync here (the caller syncs once per
            step), and the all-reduce runs on a device tensor, which NCCL requires.
        """
        sq = _sum_of_squares(p.grad for p in self.params)
        if self.groups.ep_size > 1:
            dist.all_reduce(sq, group=self.groups.ep_group)
        return sq

    def scale_gradients(self, coef: float) -> None:
        for p in self.params:
            p.grad.mul_(coef)

    def step(self) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"params": [p.detach().cpu().clone() for p in self.params],
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, state["params"], strict=True):
                p.copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def engine_gradients(params: Iterable[torch.nn.Parameter]) -> list:
    """Full gradients of engine-held parameters (any ZeRO stage; None where there is none).
    Collective: each partitioned gradient is assembled across the data-parallel group."""
    from deepspeed.utils import safe_get_full_grad
    return [safe_get_full_grad(p) for p in params]


def _sum_of_squares(grads: Iterable) -> torch.Tensor:
    """() float64 sum of squares of the non-None tensors, on their device (CPU when empty)."""
    parts = [g.double().pow(2).sum() for g in grads if g is not None]
    if not parts:
        return torch.zeros((), dtype=torch.float64)
    dev = parts[0].device
    return torch.stack([p.to(dev) for p in parts]).sum()


def squared_norm(grads: Iterable) -> torch.Tensor:
    """() float64 sum of squared gradients (None entries skipped), on the gradients' device."""
    return _sum_of_squares(grads)


def scale_engine_gradients(params: Iterable[torch.nn.Parameter], grads: list, coef: float) -> None:
    """Write ``coef * grad`` back into the engine's (possibly partitioned) gradients."""
    from deepspeed.utils import safe_set_full_grad
    for p, g in zip(params, grads):
        if g is not None:
            safe_set_full_grad(p, g * coef)


def clip_coefficient(total_sq_norm: float, max_norm: float) -> float:
    """DeepSpeed's/torch's clipping factor for a global norm (1.0 when no clipping applies)."""
    if max_norm <= 0:
        return 1.0
    norm = math.sqrt(total_sq_norm)
    return min(1.0, max_norm / (norm + 1e-6))
