"""Expert compute paths of a GOAT layer: one interface, two implementations, no loop over experts.

Both functions add the mixture of experts (and the frozen rank-r residual correction) to the base
output of a layer:

    out = base_out + sum_{i in topk(x)} w_i * s * B_i A_i drop(x)  +  res_B (res_A x)

``dense``: h = drop(x) A_cat^T (N x r); g = top-k weights scattered to (N x E), repeated r_e times
    along the rank and times s; out += (h * g) B_cat^T. Two GEMMs, no gather, no host sync, static
    shapes; unselected experts contribute exact zeros to outputs and gradients. Cost: one rank-r
    LoRA (plus the correction, fused into the same GEMMs as extra r columns when there is no
    dropout). Dropout: ONE mask per token, shared by all experts of the token.

``grouped``: the N*k (token, expert) pairs are sorted by expert, their inputs gathered, and
    ``torch._grouped_mm`` runs every expert's A and then B over its contiguous segment; results are
    scatter-added back. Cost: k*r_e per token (plus the rank-r correction). No host sync when
    ``torch._grouped_mm`` supports the device/dtype; otherwise a padded batched matmul is used,
    which needs one sync for the capacity. Dropout: an independent mask per (token, expert) pair,
    which is exactly the official code's semantics (it draws a mask per expert).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

_GROUPED_MM_OK: dict[tuple[str, torch.dtype], bool] = {}


def _grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs forward and backward here (probed once per device/dtype).

    On CUDA the fast kernel wants bf16 on sm90+ (other dtypes/archs take torch's own fallback or
    fail, hence the probe); offsets are int32 on the device; every operand's row stride must be a
    multiple of 16 bytes (grouped_matmul pads). The probe runs with autograd forced on: a first
    call under ``torch.no_grad()``/``inference_mode`` (eval, generate) must not cache "unsupported"
    for the training steps that follow (it did, silently switching them to the padded bmm), and
    it draws no random numbers.
    """
    key = (device.type, dtype)
    if key not in _GROUPED_MM_OK:
        ok = hasattr(torch, "_grouped_mm")
        if ok:
            try:
                with torch.inference_mode(False), torch.enable_grad():
                    # Constant operands: drawing them would advance the RNG at a point that
                    # differs between a resumed and an uninterrupted run (dropout masks).
                    x = torch.ones(32, 16, device=device, dtype=dtype, requires_grad=True)
                    w = torch.ones(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
                    offs = torch.tensor([16, 32], device=device, dtype=torch.int32)
                    torch._grouped_mm(x, w, offs=offs).backward(
                        torch.ones(32, 16, device=device, dtype=dtype))
            except Exception:  # unsupported dtype / arch: fall back to padded bmm
                ok = False
        _GROUPED_MM_OK[key] = ok
    return _GROUPED_MM_OK[key]


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor,
                   expert_of_row: torch.Tensor) -> torch.Tensor:
    """Segment-wise matmul: rows of ``x`` belonging to expert e are multiplied by ``w[e]``.

    Args:
        x: (P, d_in), rows sorted by expert.
        w: (E, d_in, d_out).
        counts: (E,) int64 rows per expert (sum = P).
        expert_of_row: (P,) int64 expert of each row (sorted).

    Returns:
        (P, d_out).
    """
    if _grouped_mm_supported(x.device, x.dtype):
        # _grouped_mm wants 16-byte aligned strides: zero-pad d_in / d_out (e.g. r_e = 1 in fp32).
        align = max(1, 16 // x.element_size())
        d_in, d_out = w.shape[1], w.shape[2]
        pad_in, pad_out = -d_in % align, -d_out % align
        if pad_in:
            x = F.pad(x, (0, pad_in))
        w = F.pad(w, (0, pad_out, 0, pad_in)) if (pad_in or pad_out) else w
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        y = torch._grouped_mm(x.contiguous(), w.contiguous(), offs=offs)
        return y[:, :d_out] if pad_out else y
    # Fallback: pad every segment to the largest one and run one bmm.
    E = w.shape[0]
    cap = int(counts.max())  # one host sync
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(x.shape[0], device=x.device) - starts[expert_of_row]
    slot = expert_of_row * cap + pos
    padded = x.new_zeros(E * cap, x.shape[1]).index_copy(0, slot, x).view(E, cap, -1)
    return torch.bmm(padded, w).reshape(E * cap, -1).index_select(0, slot)


def dense_experts(base_out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                  gates: torch.Tensor, scale: float, dropout: float, training: bool,
                  res_A: Optional[torch.Tensor], res_B: Optional[torch.Tensor]) -> torch.Tensor:
    """Dense-masked experts.

    Args:
        base_out: (N, m) base layer output, in the adapter compute dtype.
        x: (N, n) input, in the adapter compute dtype.
        A: (E_A, r_e, n) expert A's (E_A = 1: one A shared by all experts, hydralora).
        B: (E, m, r_e) expert B's.
        gates: (N, E) renormalised top-k weights, zero for unselected experts.
        scale: s.
        dropout, training: adapter-input dropout probability and mode.
        res_A: (r_c, n) or None, frozen residual correction factors; the correction
        res_B: (m, r_c) or None   is res_B res_A x (the -init_cof*s factor is folded into res_B).

    Returns:
        (N, m) base_out + experts + correction.
    """
    E, m, r_e = B.shape
    A_cat = A.expand(E, -1, -1).reshape(E * r_e, -1)            # (r, n)
    B_cat = B.permute(1, 0, 2).reshape(m, E * r_e)              # (m, r)
    g = gates * scale
    if r_e > 1:
        g = g.repeat_interleave(r_e, dim=1)                     # (N, r)
    drop = training and dropout > 0
    x_e = F.dropout(x, dropout, training=True) if drop else x
    if res_A is None:
        return torch.addmm(base_out, F.linear(x_e, A_cat) * g, B_cat.t())
    if drop:  # the correction sees the un-dropped input: two first-stage GEMMs
        h = torch.cat([F.linear(x_e, A_cat) * g, F.linear(x, res_A)], dim=1)
    else:     # one GEMM of width 2r for experts and correction
        h = F.linear(x, torch.cat([A_cat, res_A], dim=0))
        h = torch.cat([h[:, :A_cat.shape[0]] * g, h[:, A_cat.shape[0]:]], dim=1)
    return torch.addmm(base_out, h, torch.cat([B_cat, res_B], dim=1).t())


def grouped_experts(base_out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    top_w: torch.Tensor, top_i: torch.Tensor, scale: float, dropout: float,
                    training: bool, res_A: Optional[torch.Tensor],
                    res_B: Optional[torch.Tensor]) -> torch.Tensor:
    """Sorted-grouped experts. Same arguments as ``dense_experts`` except the gates:

    Args:
        top_w: (N, k) renormalised weights of the selected experts.
        top_i: (N, k) int64 ids of the selected experts.

    Returns:
        (N, m) base_out + experts + correction.
    """
    E, m, r_e = B.shape
    N, k = top_i.shape
    flat_e = top_i.reshape(-1)
    order = torch.argsort(flat_e, stable=True)                  # pairs sorted by expert
    e_sorted = flat_e[order]
    tok = order // k                                            # token of each sorted pair
    counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(
        0, flat_e, torch.ones_like(flat_e))
    xs = x.index_select(0, tok)                                 # (N*k, n)
    if training and dropout > 0:
        xs = F.dropout(xs, dropout, training=True)              # a mask per (token, expert)
    A_t = A.expand(E, -1, -1).transpose(1, 2)                   # (E, n, r_e)
    h = grouped_matmul(xs, A_t, counts, e_sorted)               # (N*k, r_e)
    h = h * (top_w.reshape(-1)[order] * scale).unsqueeze(1)
    y = grouped_matmul(h, B.transpose(1, 2), counts, e_sorted)  # (N*k, m)
    out = base_out.index_add(0, tok, y)
    if res_A is not None:
        out = torch.addmm(out, F.linear(x, res_A), res_B.t())
    return out
