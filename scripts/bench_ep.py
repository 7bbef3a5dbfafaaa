#!/usr/bin/env python
"""When does expert parallelism pay? Step time and per-rank expert memory, ep_size 1 vs 2.

A stack of ``--layers`` GoatLinear layers (n = m = ``--dim``, SVD "goat" priors, so the frozen
rank-r residual correction res_A/res_B is active, as in training) is trained for a few steps on
``--world`` CPU ranks (gloo, spawned workers, 1 thread each) at a fixed per-expert rank r_e while
the number of experts E grows (r = E * r_e). Every rank feeds its own ``--tokens`` tokens.

Variants, interleaved round-robin per E (the starting variant rotates every round):

  ep1_dense    experts replicated, compute="dense"  } ep_size = 1: forward + backward, then ONE
  ep1_grouped  experts replicated, compute="grouped"} flat all-reduce (sum / W) of ALL trainable
               grads (experts + routers) over the ranks, as data parallelism does, then AdamW.
  ep2          ExpertParallelDispatcher (dropless all-to-all; each rank holds E/2 experts of every
               layer), then ExpertOptimizer.reduce_gradients() (the EDP group has size 1 here, so
               this is only the division by W), one flat all-reduce of the router grads, and the
               two AdamW steps (routers; expert shards via ExpertOptimizer.step()).

"ep1_auto" is the path compute="auto" picks (dense below grouped_min_rank=256, grouped from it):
it is the SAME code as ep1_dense or ep1_grouped, so its time is that variant's measurement.

Loss: sum(y * g) / tokens + aux_loss_coef * sum of the layers' aux losses (routers get the
load-balancing gradient as in training). Each timed step: barrier, t0, zero_grad + forward +
backward + reductions + optimizer step(s), barrier, t1; the step time is the max over ranks; the
median over ``--iters`` rounds after ``--warmup`` is reported. Per step the fwd+bwd phase is
also timed (max over ranks, no extra barrier); "reduce+opt" is the step time minus it: gradient
reductions, optimizer step(s), and the barrier/straggler wait (informational).

Memory (per rank, from tensor sizes after one step): expert params + AdamW exp_avg + exp_avg_sq.
Also listed: the router's (replicated either way) and the frozen residual buffers res_A (r, n) +
res_B (m, r), which every rank keeps in full whatever ep_size is (every rank needs the whole
rank-r correction for its own tokens).

Before timing, the ep2 forward is checked against the replicated forward (same weights, same
tokens; lora_dropout=0 by default so the outputs must agree).

Output: a table, then as the LAST line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from _bench_common import cpu_model, free_port

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

VARIANTS = ("ep1_dense", "ep1_grouped", "ep2")


# --------------------------------------------------------------------------- worker
def _worker(rank: int, world: int, port: int, args: argparse.Namespace, result_dir: str) -> None:
    from goat_dist.parallel.local import init_local_process_group
    init_local_process_group(rank, world, port)
    import torch
    import torch.distributed as dist
    import torch.nn as nn

    from goat_dist.config import GoatConfig
    from goat_dist.layer import GoatLinear
    from goat_dist.parallel.dispatch import ExpertParallelDispatcher
    from goat_dist.parallel.expert_optim import ExpertOptimizer
    from goat_dist.parallel.groups import create_expert_parallel_groups
    from goat_dist.svd import layer_priors

    dist.barrier()
    # Time spent inside all_to_all_single (only the ep2 dispatcher calls it; includes waiting for
    # the peer): wrapped in this process only, for the breakdown.
    a2a = {"s": 0.0}
    _a2a = dist.all_to_all_single

    def timed_a2a(*a, **k):
        t = time.perf_counter()
        try:
            return _a2a(*a, **k)
        finally:
            a2a["s"] += time.perf_counter() - t
    dist.all_to_all_single = timed_a2a
    ep_size = world
    d, N, L = args.dim, args.tokens, args.layers
    lr, betas, eps, wd = 1e-4, (0.9, 0.999), 1e-8, 0.0

    def nbytes(ts) -> int:
        return sum(t.numel() * t.element_size() for t in ts)

    results = []
    for E in args.experts:
        r = E * args.expert_rank
        cfgs = {v: GoatConfig(r=r, lora_alpha=16, num_experts=E, top_k=args.top_k,
                              lora_dropout=args.dropout,
                              compute={"ep1_dense": "dense", "ep1_grouped": "grouped",
                                       "ep2": "grouped"}[v]) for v in VARIANTS}
        c_auto = GoatConfig(r=r, num_experts=E, top_k=args.top_k)   # "auto" as GoatLinear resolves it
        auto_path = "grouped" if (c_auto.top_k < E and c_auto.r >= c_auto.grouped_min_rank) else "dense"
        # Same frozen weights and priors on every rank (seeded).
        torch.manual_seed(args.seed)
        bases = [nn.Linear(d, d) for _ in range(L)]
        for b in bases:
            b.requires_grad_(False)
        cfg0 = cfgs["ep1_dense"]
        scale = cfg0.scale_for(d)
        priors = [layer_priors(b.weight.detach(), cfg0, scale) for b in bases]
        groups = create_expert_parallel_groups(ep_size, E)
        disp = ExpertParallelDispatcher(groups, E)

        models, step_fns, mem = {}, {}, {}
        for v in VARIANTS:
            torch.manual_seed(args.seed + 1)   # identical routers in every variant
            layers = nn.ModuleList(GoatLinear(b, cfgs[v], p, expert_parallel=disp if v == "ep2" else None)
                                   for b, p in zip(bases, priors))
            layers.train()
            models[v] = layers
        # Per-rank data (each rank its own tokens).
        gen = torch.Generator().manual_seed(1000 + rank)
        x = torch.randn(N, d, generator=gen)
        g = torch.randn(N, d, generator=gen)

        def forward_loss(layers):
            y = x
            for l in layers:
                y = l(y)
            aux = torch.stack([l.last_aux_loss for l in layers]).sum()
            return (y * g).sum() / N + cfg0.aux_loss_coef * aux, y

        # ---- correctness check of the dispatch (first forward, identical weights)
        with torch.no_grad():
            _, y_rep = forward_loss(models["ep1_dense"])
            _, y_ep = forward_loss(models["ep2"])
            rel = ((y_ep - y_rep).norm() / y_rep.norm()).item()
        check_ok = rel < 1e-4 if args.dropout == 0 else True

        def make_ep1(layers):
            params = [p for p in layers.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=wd)

            def step():
                opt.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                loss, _ = forward_loss(layers)
                loss.backward()
                t1 = time.perf_counter()
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                flat = torch.cat([gr.reshape(-1) for gr in grads])
                dist.all_reduce(flat)
                flat.div_(world)
                off = 0
                for p in params:
                    n = p.numel()
                    p.grad = flat[off:off + n].view_as(p)
                    off += n
                opt.step()
                return t1 - t0, time.perf_counter() - t1

            def memory():
                experts = [t for l in layers for t in (l.lora_A, l.lora_B)]
                routers = [l.lora_router.weight for l in layers]
                def state(ps):
                    return [opt.state[p][k] for p in ps for k in ("exp_avg", "exp_avg_sq")]
                return experts, state(experts), routers, state(routers)
            return step, memory

        def make_ep2(layers):
            routers = [p for p in layers.parameters() if p.requires_grad]
            experts = [t for l in layers for t in (l.lora_A, l.lora_B)]
            assert all(t.shape[0] == E // ep_size for t in experts)
            ropt = torch.optim.AdamW(routers, lr=lr, betas=betas, eps=eps, weight_decay=wd)
            eopt = ExpertOptimizer(experts, groups, lr=lr, betas=betas, eps=eps, weight_decay=wd,
                                   lr_lambda=lambda s: 1.0)

            def step():
                ropt.zero_grad(set_to_none=True)
                eopt.optimizer.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                loss, _ = forward_loss(layers)
                loss.backward()
                t1 = time.perf_counter()
                eopt.reduce_gradients()
                flat = torch.cat([p.grad.reshape(-1) for p in routers])
                dist.all_reduce(flat)
                flat.div_(world)
                off = 0
                for p in routers:
                    n = p.numel()
                    p.grad = flat[off:off + n].view_as(p)
                    off += n
                ropt.step()
                eopt.step()
                return t1 - t0, time.perf_counter() - t1

            def memory():
                st = eopt.optimizer.state
                return (experts, [st[p][k] for p in experts for k in ("exp_avg", "exp_avg_sq")],
                        routers, [ropt.state[p][k] for p in routers for k in ("exp_avg", "exp_avg_sq")])
            return step, memory

        for v in VARIANTS:
            step_fns[v] = make_ep2(models[v]) if v == "ep2" else make_ep1(models[v])

        times = {v: [] for v in VARIANTS}
        phases = {v: [] for v in VARIANTS}
        rounds = args.warmup + args.iters
        for i in range(rounds):
            order = VARIANTS[i % len(VARIANTS):] + VARIANTS[:i % len(VARIANTS)]
            for v in order:
                dist.barrier()
                a2a["s"] = 0.0
                t0 = time.perf_counter()
                fb, ro = step_fns[v][0]()
                dist.barrier()
                dt = time.perf_counter() - t0
                if i >= args.warmup:
                    times[v].append(dt)
                    phases[v].append((fb, ro, a2a["s"]))
            if i == 0:
                for v in VARIANTS:
                    ex, ex_st, ro_p, ro_st = step_fns[v][1]()
                    mem[v] = {"expert_params_bytes": nbytes(ex), "expert_adam_bytes": nbytes(ex_st),
                              "expert_param_plus_adam_bytes": nbytes(ex) + nbytes(ex_st),
                              "router_param_plus_adam_bytes": nbytes(ro_p) + nbytes(ro_st),
                              "residual_buffer_bytes": nbytes(
                                  [t for l in models[v] for t in (l.res_A, l.res_B) if t is not None])}
        # max over ranks, per step
        point = {"E": E, "r": r, "expert_rank": args.expert_rank, "auto_path": auto_path,
                 "dispatch_check_rel_err": rel, "dispatch_check_ok": check_ok}
        for v in VARIANTS:
            t = torch.tensor(times[v], dtype=torch.float64)
            ph = torch.tensor(phases[v], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            fb = ph[:, 0].contiguous()
            a2a_t = ph[:, 2].contiguous()
            dist.all_reduce(a2a_t, op=dist.ReduceOp.MAX)
            dist.all_reduce(fb, op=dist.ReduceOp.MAX)   # the slower rank's fwd+bwd: critical path
            rest = t - fb                                # reductions + optimizer + waiting/barriers
            point[v] = {"median_ms": 1e3 * statistics.median(t.tolist()),
                        "min_ms": 1e3 * min(t.tolist()), "max_ms": 1e3 * max(t.tolist()),
                        "fwd_bwd_median_ms": 1e3 * statistics.median(fb.tolist()),
                        "reduce_opt_median_ms": 1e3 * statistics.median(rest.tolist()),
                        "all_to_all_median_ms": 1e3 * statistics.median(a2a_t.tolist()),
                        "memory": mem[v]}
        point["ep1_auto"] = dict(point[f"ep1_{auto_path}"], same_as=f"ep1_{auto_path}")
        results.append(point)
        if rank == 0:
            print(f"  E={E:4d} r={r:4d}: dense {point['ep1_dense']['median_ms']:8.1f} ms  "
                  f"grouped {point['ep1_grouped']['median_ms']:8.1f} ms  "
                  f"ep2 {point['ep2']['median_ms']:8.1f} ms  (check rel err {rel:.1e})", flush=True)
        del models, step_fns
    if rank == 0:
        with open(os.path.join(result_dir, "result.json"), "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------- driver
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", default="8,16,32,64,128", help="comma-separated E values")
    p.add_argument("--expert-rank", type=int, default=4, help="r_e (fixed); r = E * r_e")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", type=int, default=4, help="GoatLinear layers in the stack")
    p.add_argument("--dim", type=int, default=512, help="n = m of every layer")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank per step")
    p.add_argument("--dropout", type=float, default=0.0, help="lora_dropout")
    p.add_argument("--iters", type=int, default=10, help="timed rounds")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--world", type=int, default=2, help="ranks (= ep_size of the ep2 variant)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.experts = [int(e) for e in args.experts.split(",") if e]
    for E in args.experts:
        if E % args.world:
            p.error(f"E={E} is not divisible by --world={args.world}")

    import torch.multiprocessing as mp

    print(f"bench_ep: world={args.world} (gloo, 1 thread/rank) layers={args.layers} n=m={args.dim} "
          f"tokens/rank={args.tokens} r_e={args.expert_rank} top_k={args.top_k} "
          f"dropout={args.dropout} iters={args.iters} warmup={args.warmup}", flush=True)
    print(f"cpu: {cpu_model()}, {os.cpu_count()} logical cores", flush=True)
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(args.world, free_port(), args, tmp), nprocs=args.world,
                           start_method="spawn", join=True)
        with open(os.path.join(tmp, "result.json")) as f:
            points = json.load(f)
    wall = time.time() - t_start

    MiB = 1 / 2 ** 20
    print()
    hdr = (f"{'E':>4} {'r':>4} {'auto':>7} | {'dense':>8} {'grouped':>8} {'auto':>8} {'ep2':>8} "
           f"{'ep2/auto':>8} {'ep2/best':>8} | {'fb+ro auto':>15} {'fb+ro ep2':>15} {'a2a ep2':>7} | "
           f"{'expMiB ep1':>10} {'ep2':>7} {'ratio':>6} {'resbufMiB':>9}")
    print("step time: median ms (max over ranks); fb+ro = fwd+bwd / reduce+optimizer medians (ms); "
          "a2a = time inside all_to_all_single per step (counts + tokens, fwd + bwd, incl. waiting); "
          "expMiB = expert params + AdamW state per rank")
    print(hdr)
    print("-" * len(hdr))
    summary = []
    for pt in points:
        a, e = pt["ep1_auto"], pt["ep2"]
        best = min(pt["ep1_dense"]["median_ms"], pt["ep1_grouped"]["median_ms"])
        m1 = a["memory"]["expert_param_plus_adam_bytes"]
        m2 = e["memory"]["expert_param_plus_adam_bytes"]
        row = {"E": pt["E"], "r": pt["r"], "auto_path": pt["auto_path"],
               "ep1_dense_ms": pt["ep1_dense"]["median_ms"],
               "ep1_grouped_ms": pt["ep1_grouped"]["median_ms"], "ep1_auto_ms": a["median_ms"],
               "ep2_ms": e["median_ms"], "time_ratio_ep2_over_auto": e["median_ms"] / a["median_ms"],
               "time_ratio_ep2_over_best_ep1": e["median_ms"] / best,
               "ep1_auto_fwd_bwd_ms": a["fwd_bwd_median_ms"],
               "ep1_auto_reduce_opt_ms": a["reduce_opt_median_ms"],
               "ep2_fwd_bwd_ms": e["fwd_bwd_median_ms"], "ep2_reduce_opt_ms": e["reduce_opt_median_ms"],
               "ep2_all_to_all_ms": e["all_to_all_median_ms"],
               "ep1_dense_fwd_bwd_ms": pt["ep1_dense"]["fwd_bwd_median_ms"],
               "ep1_grouped_fwd_bwd_ms": pt["ep1_grouped"]["fwd_bwd_median_ms"],
               "ep1_expert_mem_bytes": m1, "ep2_expert_mem_bytes": m2, "mem_ratio_ep2_over_ep1": m2 / m1,
               "router_mem_bytes": a["memory"]["router_param_plus_adam_bytes"],
               "residual_buffer_bytes": a["memory"]["residual_buffer_bytes"],
               "mem_ratio_incl_router_and_residual": (
                   (m2 + e["memory"]["router_param_plus_adam_bytes"] + e["memory"]["residual_buffer_bytes"])
                   / (m1 + a["memory"]["router_param_plus_adam_bytes"] + a["memory"]["residual_buffer_bytes"])),
               "dispatch_check_rel_err": pt["dispatch_check_rel_err"]}
        summary.append(row)
        print(f"{pt['E']:>4} {pt['r']:>4} {pt['auto_path']:>7} | {row['ep1_dense_ms']:8.1f} "
              f"{row['ep1_grouped_ms']:8.1f} {row['ep1_auto_ms']:8.1f} {row['ep2_ms']:8.1f} "
              f"{row['time_ratio_ep2_over_auto']:8.2f} {row['time_ratio_ep2_over_best_ep1']:8.2f} | "
              f"{row['ep1_auto_fwd_bwd_ms']:7.1f}/{row['ep1_auto_reduce_opt_ms']:<7.1f} "
              f"{row['ep2_fwd_bwd_ms']:7.1f}/{row['ep2_reduce_opt_ms']:<7.1f} {row['ep2_all_to_all_ms']:7.1f} | "
              f"{m1 * MiB:10.2f} {m2 * MiB:7.2f} {m2 / m1:6.2f} {row['residual_buffer_bytes'] * MiB:9.2f}")

    def pays_from(key: str):
        """Smallest E from which ep2 is faster at that E and every larger E of the sweep."""
        ans = None
        for row in reversed(summary):
            if row[key] < 1.0:
                ans = row["E"]
            else:
                break
        return ans

    ep_time = pays_from("time_ratio_ep2_over_auto")
    ep_time_best = pays_from("time_ratio_ep2_over_best_ep1")
    mem_from = next((row["E"] for row in summary if row["mem_ratio_ep2_over_ep1"] < 1.0), None)
    checks_ok = all(pt["dispatch_check_ok"] for pt in points)
    print()
    print(f"dispatch check (ep2 forward == replicated forward): {'OK' if checks_ok else 'FAIL'}")
    print(f"EP pays in time (vs ep1 auto) from E = {ep_time}; vs the best ep1 path from E = {ep_time_best}")
    print(f"EP pays in expert memory from E = {mem_from} (ratios "
          + ", ".join(f"E={r['E']}: {r['mem_ratio_ep2_over_ep1']:.2f}" for r in summary) + ")")
    print(f"total wall time {wall:.0f} s")
    out = {"benchmark": "bench_ep", "cpu": cpu_model(), "cores": os.cpu_count(),
           "config": {"world": args.world, "ep_sizes": [1, args.world], "layers": args.layers,
                      "dim": args.dim, "tokens_per_rank": args.tokens, "expert_rank": args.expert_rank,
                      "top_k": args.top_k, "dropout": args.dropout, "iters": args.iters,
                      "warmup": args.warmup, "threads_per_rank": 1, "backend": "gloo"},
           "ep_pays_from_E": ep_time, "ep_pays_from_E_vs_best_ep1": ep_time_best,
           "ep_mem_pays_from_E": mem_from,
           "mem_ratios": {str(r["E"]): r["mem_ratio_ep2_over_ep1"] for r in summary},
           "mem_ratios_incl_router_and_residual": {str(r["E"]): r["mem_ratio_incl_router_and_residual"]
                                                   for r in summary},
           "dispatch_check_ok": checks_ok, "points": summary, "wall_s": wall}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
