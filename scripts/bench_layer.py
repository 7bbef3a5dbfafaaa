#!/usr/bin/env python
"""Forward+backward time of ONE adapted linear: base vs LoRA vs GoatLinear vs the official loop.

Variants, measured side by side in one run (same input x, same upstream gradient g):

  base          frozen nn.Linear (weight.requires_grad=False); x.requires_grad=True, so the
                backward computes grad_x (the cost every adapted layer pays anyway).
  lora          plain LoRA of the same total rank r: y = base(x) + s * (x A^T) B^T, A (r, n) and
                B (m, r) trainable, no dropout.
  goat_dense    goat_dist.layer.GoatLinear, compute="dense", init="goat" (SVD priors, so the
                exact W_res correction res_A/res_B is active), lora_dropout=0, training mode
                (router statistics / aux loss recorded, as in training).
  goat_grouped  the same layer with compute="grouped" (same parameters).
  loop          the official per-expert loop (Facico/GOAT-PEFT TopKGOATLayer, as tests/oracle.py
                reference_forward): one base GEMM with W_res PRE-COMPUTED once into a plain frozen
                weight (the official code subtracts it in place at init, so it is not rebuilt
                per call), fp32 router, softmax -> top-k -> renormalise, then a Python loop over
                the E experts (one nn.Linear pair each, as officially) with torch.where, a gather,
                two tiny GEMMs and an index-put accumulation; plus the bincount aux loss.
  goat_fused    (--prototype only) FusedDenseGoat below: a prototype of a faster dense path
                sharing goat_dense's parameters (router fused into the first-stage GEMM, no weight
                gradients for the frozen correction factors).

"goat_auto" in the summary is whichever path GoatLinear picks with compute="auto" (dense unless
r >= grouped_min_rank and top_k < E); it is not timed separately.

Each timed step: zero grads (set_to_none), y = layer(x), loss = (y * g).sum(), loss.backward()
(on CUDA: synchronize before and after). Variants are interleaved round-robin (rotating the
starting variant each round) for --iters rounds after --warmup rounds; medians are reported, plus
"paired" ratios (a/b within each round, median over rounds), which resist load drift.
On Linux, each round's CPU stall fraction is read from PSI (/proc/pressure/cpu: the share of the
round during which some runnable task waited for a CPU, i.e. another job competed for the cores);
rounds above --max-stall are discarded and replaced (up to --max-rounds timed rounds). If too few
quiet rounds remain, all rounds are used and the output says CONTENDED.

dtype: float32 runs everything in fp32. bfloat16 puts the base weight, the input x and g in bf16
while every adapter (LoRA A/B, GOAT experts, routers, correction factors, loop experts) stays fp32
as GoatLinear keeps them: the adapter branch runs on x.float() and the sum is cast back to bf16
(as peft does with fp32 adapters on a bf16 model). The loop's W_res is rounded to bf16, as the
official in-place subtraction does.

Before timing, the dense and grouped GOAT outputs are compared with the loop's output (relative
Frobenius error; must be < 1e-4 in fp32, < 3e-2 in bf16 where the loop's bf16 W_res drops most of
the correction), and the gradients of the expert factors are compared too (informational).

Output: a table, then as the LAST line one JSON object (ratios, raw medians in ms, config).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from goat_dist.config import GoatConfig  # noqa: E402
from goat_dist.layer import GoatLinear  # noqa: E402
from goat_dist.svd import svd_priors  # noqa: E402


# --------------------------------------------------------------------------- baselines
class LoRALinear(nn.Module):
    """Plain LoRA: y = base(x) + s * (x A^T) B^T; adapters in fp32 (x cast to it, out cast back)."""

    def __init__(self, base: nn.Linear, r: int, scale: float, generator: torch.Generator):
        super().__init__()
        self.base_layer = base
        n, m = base.in_features, base.out_features
        dev = base.weight.device
        bound = 1.0 / math.sqrt(n)
        # Non-zero B so every gradient is generic (timing does not depend on the values).
        self.lora_A = nn.Parameter((torch.rand(r, n, generator=generator) * 2 - 1).mul_(bound).to(dev))
        self.lora_B = nn.Parameter((torch.randn(m, r, generator=generator) * 0.01).to(dev))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.base_layer.weight, self.base_layer.bias)
        xa = x.to(self.lora_A.dtype)
        return (y + F.linear(F.linear(xa, self.lora_A), self.lora_B) * self.scale).to(x.dtype)


class LoopGoat(nn.Module):
    """The official per-expert loop, with W_res precomputed once into a plain frozen weight.

    Built from a GoatLinear so that it computes the same function (same router, experts, scale).
    ``expert0_shape=True`` reproduces the official ``torch.zeros_like(self.experts[0](x))``, which
    runs expert 0 on all tokens only to get the output shape (off by default, like the oracle).
    """

    def __init__(self, layer: GoatLinear, dtype: torch.dtype, expert0_shape: bool = False):
        super().__init__()
        base = layer.base_layer
        W = base.weight.detach().double()
        if layer.res_A is not None:
            W = W + layer.res_B.double() @ layer.res_A.double()   # W_res, once, in float64
        self.weight = nn.Parameter(W.to(dtype), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(),
                                                                requires_grad=False)
        n, m, E, r_e = layer.in_features, layer.out_features, layer.num_experts, layer.expert_rank
        dev = W.device
        self.lora_router = nn.Linear(n, E, bias=False, device=dev)
        self.lora_router.weight.data.copy_(layer.lora_router.weight.detach())
        self.experts = nn.ModuleList()
        for i in range(E):
            a = nn.Linear(n, r_e, bias=False, device=dev)
            b = nn.Linear(r_e, m, bias=False, device=dev)
            a.weight.data.copy_(layer.lora_A.detach()[0 if layer.lora_A.shape[0] == 1 else i])
            b.weight.data.copy_(layer.lora_B.detach()[i])
            self.experts.append(nn.Sequential(a, b))
        self.top_k, self.num_experts, self.scale = layer.top_k, E, layer.scale
        self.expert0_shape = expert0_shape
        self.last_aux_loss = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        base = F.linear(x2, self.weight, self.bias)
        xa = x2.float()                                    # fp32 adapters, as GoatLinear
        probs = F.softmax(self.lora_router(xa), dim=-1, dtype=torch.float)
        w, sel = torch.topk(probs, self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        if self.expert0_shape:
            results = torch.zeros_like(self.experts[0](xa))
        else:
            results = torch.zeros(xa.shape[0], base.shape[1], dtype=xa.dtype, device=xa.device)
        for i, expert in enumerate(self.experts):
            batch_idx, nth = torch.where(sel == i)
            results[batch_idx] += w[batch_idx, nth, None] * expert(xa[batch_idx]) * self.scale
        E = self.num_experts
        counts = torch.bincount(sel.reshape(-1), minlength=E).float()
        self.last_aux_loss = E * torch.sum(counts / probs.shape[0] * probs.mean(0))
        return (base.float() + results).to(x.dtype).reshape(*lead, -1)


# --------------------------------------------------------------------------- prototype
class _RowFrozenLinear(torch.autograd.Function):
    """y = x @ cat([W_t, W_f], 0)^T; the backward computes no gradient for the frozen rows W_f."""

    @staticmethod
    def forward(ctx, x, W_t, W_f):
        W = torch.cat([W_t, W_f], 0)
        ctx.save_for_backward(x, W)
        ctx.k = W_t.shape[0]
        return x @ W.t()

    @staticmethod
    def backward(ctx, gy):
        x, W = ctx.saved_tensors
        gx = gy @ W if ctx.needs_input_grad[0] else None
        gWt = gy[:, :ctx.k].t() @ x
        return gx, gWt, None


class _ColFrozenAddmm(torch.autograd.Function):
    """out = base + H @ cat([B_t, B_f], 1)^T; no gradient for the frozen columns B_f."""

    @staticmethod
    def forward(ctx, base, H, B_t, B_f):
        W = torch.cat([B_t, B_f], 1)
        ctx.save_for_backward(H, W)
        ctx.k = B_t.shape[1]
        return torch.addmm(base, H, W.t())

    @staticmethod
    def backward(ctx, go):
        H, W = ctx.saved_tensors
        return go, go @ W, go.t() @ H[:, :ctx.k], None


class FusedDenseGoat(nn.Module):
    """PROTOTYPE of a faster dense path, sharing a GoatLinear's parameters (same function).

    Differences from goat_dist's dense path (no dropout, SVD init with a correction):
      1. the router GEMM is fused into the first-stage GEMM: x @ [A_cat; W_router; res_A]^T
         (width r + E + r instead of a separate width-E GEMM, its width-E backward GEMM and one
         more N x n grad_x accumulation);
      2. custom backward: no weight gradient is computed for the frozen res_A rows / res_B columns
         (autograd computes the full (2r x n) and (m x 2r) gradients of the concatenations and
         throws half away).
    """

    def __init__(self, layer: GoatLinear):
        super().__init__()
        assert layer.res_A is not None and layer.dropout == 0 and layer.lora_A.shape[0] == layer.num_experts
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = self.layer
        lead = x.shape[:-1]
        x2 = x.reshape(-1, L.in_features)
        cdt = L.lora_A.dtype
        base_out = F.linear(x2, L.base_layer.weight, L.base_layer.bias).to(cdt)
        xa = x2.to(cdt)
        E, m, r_e = L.lora_B.shape
        r = E * r_e
        A_cat = L.lora_A.reshape(r, -1)
        W_t = torch.cat([A_cat, L.lora_router.weight.to(cdt)], 0)       # (r + E, n) trainable
        pre = _RowFrozenLinear.apply(xa, W_t, L.res_A.to(cdt))          # (N, r + E + r)
        h_e, logits, h_c = pre.split([r, E, r], dim=1)                  # one backward node
        probs = torch.softmax(logits.float(), dim=-1)
        top_w, top_i = probs.topk(L.top_k, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        if L.training:
            L._record_stats(probs, top_i, None)
        g = torch.zeros_like(probs).scatter(1, top_i, top_w * L.scale).to(cdt)
        g = g.repeat_interleave(r_e, dim=1) if r_e > 1 else g
        H = torch.cat([h_e * g, h_c], 1)                                  # (N, 2r)
        B_cat = L.lora_B.permute(1, 0, 2).reshape(m, r)
        out = _ColFrozenAddmm.apply(base_out, H, B_cat, L.res_B.to(cdt))
        return out.to(x.dtype).reshape(*lead, L.out_features)


# --------------------------------------------------------------------------- helpers
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def cpu_pressure() -> float | None:
    """Linux PSI: % of the last 10 s some task waited for a CPU (other load on a shared machine)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None


def cpu_stall_us() -> int | None:
    """Linux PSI cumulative microseconds during which some runnable task waited for a CPU."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().split("total=")[1])
    except (OSError, IndexError, ValueError):
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(mod: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    mod.zero_grad(set_to_none=True)
    x.grad = None
    y = mod(x)
    (y * g).sum().backward()


def build(args):
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    n, m, N = args.n, args.m, args.tokens

    # Frozen base with a realistic decaying spectrum is not needed for timing; a scaled Gaussian is.
    base = nn.Linear(n, m, bias=args.bias, device=device, dtype=torch.float32)
    with torch.no_grad():
        base.weight.copy_(torch.randn(m, n, generator=gen).div_(math.sqrt(n)))
        if base.bias is not None:
            base.bias.copy_(torch.randn(m, generator=gen) * 0.1)
    base.to(dtype)
    base.weight.requires_grad_(False)
    if base.bias is not None:
        base.bias.requires_grad_(False)

    def cfg(compute: str) -> GoatConfig:
        return GoatConfig(r=args.rank, num_experts=args.experts, top_k=args.top_k, init="goat",
                          lora_dropout=0.0, compute=compute)

    c_dense = cfg("dense")
    scale = c_dense.scale_for(n)
    priors = svd_priors(base.weight, c_dense, scale)    # SVD in fp32 on the (possibly bf16) W0
    goat = {}
    for path in ("dense", "grouped"):
        torch.manual_seed(args.seed + 1)                 # identical router init for both paths
        goat[path] = GoatLinear(base, cfg(path), priors).to(device).train()
    goat["grouped"].lora_router.weight.data.copy_(goat["dense"].lora_router.weight.data)
    auto = GoatLinear(base, cfg("auto"), priors).compute   # the path compute="auto" picks

    lora = LoRALinear(base, args.rank, scale, gen).to(device).train()
    loop = LoopGoat(goat["dense"], dtype, expert0_shape=args.loop_expert0_shape).to(device).train()

    x = torch.randn(N, n, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    g = torch.randn(N, m, generator=gen).to(device=device, dtype=dtype)
    variants = {
        "base": base,
        "lora": lora,
        "goat_dense": goat["dense"],
        "goat_grouped": goat["grouped"],
        "loop": loop,
    }
    if args.prototype:
        variants["goat_fused"] = FusedDenseGoat(goat["dense"]).train()
    if args.adapter_dtype == "same":
        # As DeepSpeed's bf16 mode runs a model: adapters (routers, experts, LoRA) in bf16 too,
        # so on CUDA the grouped path runs torch._grouped_mm in bf16. The loop stays fp32.
        for mod in (goat["dense"], goat["grouped"], lora):
            mod.to(dtype)
    return device, dtype, variants, auto, x, g


def verify(variants, x, g, dtype) -> dict:
    """Outputs (and expert-factor gradients) of dense/grouped GOAT vs the loop."""
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    loop = variants["loop"]
    step(loop, x, g)
    y_loop = loop(x).detach()
    gA_loop = torch.stack([e[0].weight.grad for e in loop.experts])
    gB_loop = torch.stack([e[1].weight.grad for e in loop.experts])
    gR_loop = loop.lora_router.weight.grad.clone()
    gx_loop = x.grad.clone()
    res = {"tol": tol}
    ok = True
    for path in ("dense", "grouped", "fused"):
        if f"goat_{path}" not in variants:
            continue
        mod = variants[f"goat_{path}"]
        layer = getattr(mod, "layer", mod)
        layer.zero_grad(set_to_none=True)
        step(mod, x, g)
        y = mod(x).detach()
        e_y = rel_err(y, y_loop)
        e_A = rel_err(layer.lora_A.grad, gA_loop)
        e_B = rel_err(layer.lora_B.grad, gB_loop)
        e_R = rel_err(layer.lora_router.weight.grad, gR_loop)
        e_x = rel_err(x.grad, gx_loop)
        res[path] = {"out": e_y, "grad_A": e_A, "grad_B": e_B, "grad_router": e_R, "grad_x": e_x}
        good = e_y < tol
        ok &= good
        print(f"check goat_{path:7s} vs loop: rel err out {e_y:.2e} ({'OK' if good else 'FAIL'} < {tol:g}); "
              f"grad_A {e_A:.2e} grad_B {e_B:.2e} grad_router {e_R:.2e} grad_x {e_x:.2e}")
    res["ok"] = ok
    for mod in variants.values():
        mod.zero_grad(set_to_none=True)
    x.grad = None
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2048, help="in_features")
    p.add_argument("--m", type=int, default=2048, help="out_features")
    p.add_argument("--tokens", type=int, default=2048, help="N = tokens per step (batch*seq)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--rank", type=int, default=32, help="total rank r (GOAT: r/E per expert)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--adapter-dtype", choices=("float32", "same"), default="float32",
                   help="adapters in fp32 (as GoatLinear keeps them on a bf16 base; default) or in "
                        "--dtype (as under DeepSpeed bf16, where the whole model is cast)")
    p.add_argument("--iters", type=int, default=20, help="timed round-robin rounds")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--bias", action="store_true", help="give the base linear a bias")
    p.add_argument("--loop-expert0-shape", action="store_true",
                   help="loop: also run expert 0 on all tokens for the output shape, as the official "
                        "code does (off by default, as tests/oracle.py)")
    p.add_argument("--prototype", action="store_true",
                   help="also time goat_fused, a prototype of a faster dense path (see FusedDenseGoat)")
    p.add_argument("--max-stall", type=float, default=0.10,
                   help="discard (and replace) a round during which tasks waited for a CPU more than "
                        "this fraction of the time (Linux PSI; other load on a shared machine); 0 keeps all")
    p.add_argument("--max-rounds", type=int, default=0,
                   help="give up replacing contended rounds after this many timed rounds (default 3*iters)")
    p.add_argument("--skip", default="", help="comma-separated variants not to time")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")

    t_build = time.perf_counter()
    device, dtype, variants, auto, x, g = build(args)
    t_build = time.perf_counter() - t_build
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else (cpu or platform.processor())
    print(f"bench_layer: n={args.n} m={args.m} tokens={args.tokens} E={args.experts} "
          f"top_k={args.top_k} r={args.rank} (r_e={args.rank // args.experts}) dtype={args.dtype} "
          f"device={args.device} ({hw}) threads={torch.get_num_threads()} torch={torch.__version__}; "
          f"auto path = {auto}; setup {t_build:.1f}s")

    check = verify(variants, x, g, dtype)

    psi_start = cpu_pressure()
    skip = {s for s in args.skip.split(",") if s}
    names = [k for k in variants if k not in skip]
    times = {k: [] for k in names}       # accepted rounds
    all_times = {k: [] for k in names}   # every timed round
    stalls = []
    max_rounds = args.max_rounds or 3 * args.iters
    rnd = timed = 0
    use_psi = args.max_stall > 0 and cpu_stall_us() is not None
    while timed < max_rounds and len(times[names[0]]) < args.iters:
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        s0, w0 = cpu_stall_us(), time.perf_counter()
        this = {}
        for k in order:
            sync(device)
            t0 = time.perf_counter()
            step(variants[k], x, g)
            sync(device)
            this[k] = (time.perf_counter() - t0) * 1e3
        stall = ((cpu_stall_us() - s0) / ((time.perf_counter() - w0) * 1e6)) if use_psi else 0.0
        rnd += 1
        if rnd <= args.warmup:
            continue
        timed += 1
        stalls.append(stall)
        for k in names:
            all_times[k].append(this[k])
        if stall <= args.max_stall or not use_psi:
            for k in names:
                times[k].append(this[k])
    contended = use_psi and len(times[names[0]]) < max(min(3, args.iters), args.iters // 2)
    if contended:   # too few quiet rounds: use them all, and say so
        times = all_times
    accepted = len(times[names[0]])
    psi_end = cpu_pressure()
    med = {k: statistics.median(v) for k, v in times.items()}
    mins = {k: min(v) for k, v in times.items()}
    # Paired ratios: a/b within the same round, then the median over rounds. More robust than the
    # ratio of medians when the machine's load drifts during the run (shared CPUs).
    paired = dict(times)
    if f"goat_{auto}" in times:
        paired["goat_auto"] = times[f"goat_{auto}"]
    q = {k: (sorted(v)[len(v) // 4], sorted(v)[(3 * len(v)) // 4]) for k, v in times.items()}
    if f"goat_{auto}" in med:
        med["goat_auto"] = med[f"goat_{auto}"]
    b = med.get("base")
    print()
    if psi_start is not None:
        print(f"CPU pressure (PSI some avg10) at start/end of timing: {psi_start:.0f}% / {psi_end:.0f}%; "
              f"rounds: {accepted} used of {timed} timed (max stall {args.max_stall:g}, median stall "
              f"{statistics.median(stalls):.3f})" + ("  ** CONTENDED: too few quiet rounds, all used **"
                                                      if contended else ""))
    print(f"{'variant':<16}{'median ms':>11}{'IQR ms':>19}{'min ms':>10}{'x base':>9}{'x base paired':>15}")
    for k in names:
        rb = f"{med[k] / b:9.3f}" if b else f"{'-':>9}"
        pb = (f"{statistics.median(u / v for u, v in zip(times[k], times['base'])):15.3f}"
              if b else f"{'-':>15}")
        tag = "  (auto)" if k == f"goat_{auto}" else ""
        print(f"{k:<16}{med[k]:11.2f}{q[k][0]:10.2f}-{q[k][1]:<8.2f}{mins[k]:10.2f}{rb}{pb}{tag}")

    def ratio(a, c):
        return round(med[a] / med[c], 4) if a in med and c in med else None

    def pratio(a, c):
        if a not in paired or c not in paired:
            return None
        return round(statistics.median(x / y for x, y in zip(paired[a], paired[c])), 4)

    summary = {
        "goat_over_lora": ratio("goat_auto", "lora"),
        "goat_dense_over_lora": ratio("goat_dense", "lora"),
        "goat_grouped_over_lora": ratio("goat_grouped", "lora"),
        "loop_over_goat": ratio("loop", "goat_auto"),
        "loop_over_goat_dense": ratio("loop", "goat_dense"),
        "loop_over_goat_grouped": ratio("loop", "goat_grouped"),
        "goat_fused_over_lora": ratio("goat_fused", "lora"),
        "goat_over_base": ratio("goat_auto", "base"),
        "lora_over_base": ratio("lora", "base"),
        "paired": {"goat_over_lora": pratio("goat_auto", "lora"),
                   "goat_dense_over_lora": pratio("goat_dense", "lora"),
                   "goat_grouped_over_lora": pratio("goat_grouped", "lora"),
                   "loop_over_goat": pratio("loop", "goat_auto"),
                   "goat_over_base": pratio("goat_auto", "base")},
        "auto_path": auto,
        "median_ms": {k: round(v, 3) for k, v in med.items()},
        "min_ms": {k: round(v, 3) for k, v in mins.items()},
        "check": {"ok": check["ok"], "tol": check["tol"],
                  **{f"{k}_rel_err": v["out"] for k, v in check.items() if isinstance(v, dict)}},
        "config": {"n": args.n, "m": args.m, "tokens": args.tokens, "experts": args.experts,
                   "top_k": args.top_k, "rank": args.rank, "dtype": args.dtype,
                   "adapter_dtype": args.adapter_dtype, "device": args.device, "hardware": hw, "threads": torch.get_num_threads(),
                   "iters": args.iters, "warmup": args.warmup, "seed": args.seed, "bias": args.bias,
                   "loop_expert0_shape": args.loop_expert0_shape, "torch": torch.__version__,
                   "cpu_pressure_avg10": [psi_start, psi_end]},
        "rounds": {"used": accepted, "timed": timed, "max_stall": args.max_stall,
                   "median_stall": round(statistics.median(stalls), 4) if stalls else None,
                   "contended": contended},
    }
    print()
    print(json.dumps(summary))
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
