"""Dropless expert-parallel dispatch of GOAT experts.

Each rank of an expert-parallel group holds E/P experts of every layer. Per layer and forward:

1. the (token, expert) pairs of the local tokens are sorted by expert id, so they are grouped by
   destination rank (rank p holds the ids [p*E/P, (p+1)*E/P));
2. per-expert counts are exchanged with one ``all_to_all_single`` of E integers, then the
   split sizes come to the host (one sync: uneven all-to-all needs them);
3. the pairs' inputs go to their experts with an uneven ``all_to_all_single`` (no capacity, no
   padding, no dropped token), the local experts run as one grouped GEMM, and the outputs come
   back with the reverse all-to-all;
4. the source rank weights each pair by its gate and scatter-adds it into its tokens' outputs.

Both all-to-alls are autograd functions whose backward is the reverse exchange, so expert
gradients accumulate on the owning rank from every rank's tokens, and router gradients stay on
the token's rank (gates are applied at the source). Dropout draws one mask per (token, expert)
pair at the source, like the grouped path and the official code.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..kernels import grouped_matmul
from .groups import ExpertParallelGroups


class _AllToAllV(torch.autograd.Function):
    """Uneven all_to_all_single; backward sends gradients back along the same routes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        gi = g.new_empty((sum(ctx.in_splits),) + tuple(g.shape[1:]))
        dist.all_to_all_single(gi, g.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return gi, None, None, None


class ExpertParallelDispatcher:
    """Runs a GoatLinear's experts across its expert-parallel group (see module docstring).

    Args:
        groups: this rank's expert-parallel topology.
        num_experts: E (global).
    """

    def __init__(self, groups: ExpertParallelGroups, num_experts: int) -> None:
        self.groups = groups
        self.num_experts = num_experts
        self.num_local = num_experts // groups.ep_size
        self.offset = groups.ep_rank * self.num_local

    def run_experts(self, base_out: torch.Tensor, x: torch.Tensor, A: torch.Tensor,
                    B: torch.Tensor, top_w: torch.Tensor, top_i: torch.Tensor, scale: float,
                    dropout: float, training: bool, res_A: Optional[torch.Tensor],
                    res_B: Optional[torch.Tensor]) -> torch.Tensor:
        """Same contract as kernels.grouped_experts, with A (E/P, r_e, n), B (E/P, m, r_e) local.

        Returns:
            (N, m) base_out + the mixture over all E experts + the residual correction.
        """
        P, El, E = self.groups.ep_size, self.num_local, self.num_experts
        group = self.groups.ep_group
        m = B.shape[1]
        k = top_i.shape[1]
        flat_e = top_i.reshape(-1)
        order = torch.argsort(flat_e, stable=True)
        tok = order // k
        counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(
            0, flat_e, torch.ones_like(flat_e))
        recv_counts = torch.empty_like(counts)             # [source p][local expert j]
        dist.all_to_all_single(recv_counts, counts, group=group)
        recv_counts = recv_counts.view(P, El)
        send_splits = counts.view(P, El).sum(1).tolist()   # host sync: split sizes
        recv_splits = recv_counts.sum(1).tolist()

        xs = x.index_select(0, tok)
        if training and dropout > 0:
            xs = F.dropout(xs, dropout, training=True)
        xr = _AllToAllV.apply(xs, recv_splits, send_splits, group)       # (R, n)
        if xr.shape[0] == 0:
            # No token for my experts this time. y must still depend on xr (and A, B): every
            # rank has to run the backward of BOTH all-to-alls, or the exchanges mismatch.
            y = F.linear(xr, xr.new_zeros(m, xr.shape[1])) + 0.0 * (A.sum() + B.sum())
            ys = _AllToAllV.apply(y, send_splits, recv_splits, group)
            return self._combine(base_out, x, ys, top_w, order, tok, res_A, res_B)
        # Received rows come grouped by source, then by local expert: regroup by expert.
        local_e = torch.arange(El, device=x.device).repeat(P).repeat_interleave(recv_counts.reshape(-1))
        perm = torch.argsort(local_e, stable=True)
        local_counts = recv_counts.sum(0)
        h = grouped_matmul(xr.index_select(0, perm), A.transpose(1, 2), local_counts,
                           local_e[perm]) * scale
        y = grouped_matmul(h, B.transpose(1, 2), local_counts, local_e[perm])  # (R, m)
        y = torch.zeros_like(y).index_copy(0, perm, y)                        # back to arrival order
        ys = _AllToAllV.apply(y, send_splits, recv_splits, group)             # (N*k, m)
        return self._combine(base_out, x, ys, top_w, order, tok, res_A, res_B)

    @staticmethod
    def _combine(base_out, x, ys, top_w, order, tok, res_A, res_B) -> torch.Tensor:
        """Weight the returned pair outputs by their gates and add them (and the correction)."""
        ys = ys * top_w.reshape(-1)[order].unsqueeze(1)
        out = base_out.index_add(0, tok, ys)
        if res_A is not None:
            out = torch.addmm(out, F.linear(x, res_A), res_B.t())
        return out
