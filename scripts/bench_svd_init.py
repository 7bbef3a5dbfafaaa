#!/usr/bin/env python
"""Initialisation time of GOAT's SVD priors: one process vs 2 ranks vs a warm prior cache.

The model is a LlamaForCausalLM built in code from a LlamaConfig (default hidden 512,
intermediate 1024, 4 decoder layers, vocab 1024; weights drawn from ``--seed``, so every process
holds bit-identical weights) with target_modules="all-linear": q/k/v/o (h x h) and gate/up/down
(i x h, h x i) of every layer, 7 * layers GOAT layers (28 by default). GoatConfig: init="goat",
E=8, r=32 (r_e=4), svd_dtype float32.

Modes, measured side by side in one run (reps interleaved; medians reported):

  one_1t     DistributedSVDInitializer(...).run() in THIS (driver) process, no torch.distributed,
             torch.set_num_threads(1).
  one_default  the same in a separate spawned process left at torch's default thread count (2 on
             this 2-core machine: the fair "one process on this machine" baseline; one_process_s).
             Run ``--reps-default`` times; a run that exceeds ``--timeout-default`` is killed and
             recorded as censored (its wall time is then a lower bound) and not retried.
  dist       2 spawned gloo ranks, 1 thread each (OMP_NUM_THREADS=1), no cache: barrier, then
             wall time of .run() on each rank; the max over ranks.
  dist_cold  the same with a fresh cache_dir (SVDs computed, hashed and written).
  dist_warm  again on the cache filled by dist_cold (must compute 0 SVDs).

While one_1t/one_default run, the ranks sleep-poll a file (their CPU time while waiting is
reported, to show they do not steal the cores); while the ranks run the driver sleep-polls too.
Each rep runs the one-process modes (alternating their order) and then the distributed modes
(alternating dist before/after the cold+warm pair). ``--warmup-reps`` untimed reps come first.

Breakdown per run (max over ranks for distributed modes): time inside layer_priors (the SVD),
cache_key (SHA-256 of the weight bytes), PriorCache.get/put, and _broadcast_owned (which includes
waiting for the other rank's SVD). These are measured by wrapping those functions of
goat_dist.parallel.svd_init in this process only (the source file is not modified).

Checks: the distributed priors (both ranks) and the warm-cache priors are torch.equal to the
one-process (1-thread) priors; the default-thread one-process priors are compared too (informational:
a multi-threaded LAPACK may round differently); the no-cache run computed every SVD exactly once
in total; the warm run computed 0 SVDs on every rank and served every owned layer from the cache.

Output: a table, then as the LAST line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict

from _bench_common import cpu_model, free_port

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_T: dict[str, float] = defaultdict(float)
_SVD_TIMES: list[float] = []          # wall time of each SVD of the current run, in order (= rounds)
COMPONENTS = ("svd", "hash", "cache_get", "cache_put", "bcast")


def _install_timers() -> None:
    """Wrap the initialiser's building blocks with timers accumulating into _T (this process)."""
    from goat_dist.parallel import svd_init as si
    if getattr(si, "_bench_timed", False):
        return

    def timed(fn, key):
        def wrapper(*a, **k):
            t, c = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t
                _T[key] += dt
                if key == "svd":
                    _T["svd_cpu"] += time.process_time() - c
                    _SVD_TIMES.append(dt)
        return wrapper

    si.layer_priors = timed(si.layer_priors, "svd")
    si.cache_key = timed(si.cache_key, "hash")
    si.PriorCache.get = timed(si.PriorCache.get, "cache_get")
    si.PriorCache.put = timed(si.PriorCache.put, "cache_put")
    si.DistributedSVDInitializer._broadcast_owned = timed(si.DistributedSVDInitializer._broadcast_owned, "bcast")
    si._bench_timed = True


def _build(args):
    """The model (seeded), the GoatConfig and the target names."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from goat_dist.config import GoatConfig
    from goat_dist.model import find_target_modules

    lc = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                     num_hidden_layers=args.layers, num_attention_heads=args.heads,
                     num_key_value_heads=args.heads, vocab_size=args.vocab,
                     max_position_embeddings=256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(lc).eval()
    cfg = GoatConfig(r=args.rank, lora_alpha=2 * args.rank // args.experts, num_experts=args.experts,
                     top_k=2, init=args.init, target_modules="all-linear", svd_dtype=args.svd_dtype)
    return model, cfg, find_target_modules(model, cfg)


def _timed_run(model, cfg, names, cache_dir, barrier=None):
    from goat_dist.parallel.svd_init import DistributedSVDInitializer
    _T.clear()
    _SVD_TIMES.clear()
    if barrier is not None:
        barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    init = DistributedSVDInitializer(model, cfg, names, cache_dir=cache_dir).run()
    wall = time.perf_counter() - t0
    rec = {"wall": wall, "cpu": time.process_time() - c0, "svd_cpu": _T.get("svd_cpu", 0.0),
           "svd_times": list(_SVD_TIMES), **{k: _T.get(k, 0.0) for k in COMPONENTS},
           "svd_computed": init.stats.svd_computed, "cache_hits": init.stats.cache_hits,
           "owned": len(init.stats.layers_owned)}
    return init, rec


def _loadavg() -> float:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return float("nan")


def _wait_for(path: str, poll: float = 0.005, timeout: float = 1800.0) -> None:
    t0 = time.time()
    while not os.path.exists(path):
        if time.time() - t0 > timeout:
            raise TimeoutError(path)
        time.sleep(poll)


def _save_priors(init, path: str) -> None:
    import torch
    torch.save({n: (p.A, p.B) for n, p in init.priors.items()}, path)


# --------------------------------------------------------------------------- worker
def _worker(rank: int, world: int, port: int, args: argparse.Namespace, tmp: str) -> None:
    from goat_dist.parallel.local import init_local_process_group
    init_local_process_group(rank, world, port)
    import torch
    import torch.distributed as dist

    model, cfg, names = _build(args)
    _install_timers()
    # warm-up: gloo connections, LAPACK initialisation
    dist.all_reduce(torch.zeros(8))
    torch.linalg.svd(torch.randn(64, 64), full_matrices=False)
    dist.barrier()
    open(os.path.join(tmp, f"ready{rank}"), "w").close()

    def gather(rec):
        out = [None] * world
        dist.all_gather_object(out, rec)
        return out

    total = args.warmup_reps + args.reps
    for rep in range(total):
        c0, w0 = time.process_time(), time.perf_counter()
        _wait_for(os.path.join(tmp, f"go{rep}"))
        idle = {"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - w0}
        cache = os.path.join(tmp, f"cache_rep{rep}")
        recs = {}
        seq = ["dist", "cold", "warm"] if rep % 2 == 0 else ["cold", "warm", "dist"]
        for mode in seq:
            init, rec = _timed_run(model, cfg, names, None if mode == "dist" else cache, dist.barrier)
            recs[mode] = gather(rec)
            if rep == args.warmup_reps and mode in ("dist", "warm"):
                _save_priors(init, os.path.join(tmp, f"priors_{mode}_rank{rank}.pt"))
            del init
        idles = gather(idle)
        if rank == 0:
            with open(os.path.join(tmp, f".done{rep}"), "w") as f:
                json.dump({"runs": recs, "idle": idles}, f)
            os.replace(os.path.join(tmp, f".done{rep}"), os.path.join(tmp, f"done{rep}"))
        dist.barrier()
        if rank == 0:
            shutil.rmtree(cache, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()


def _default_threads_worker(_idx: int, args: argparse.Namespace, tmp: str) -> None:
    """The one-process baseline at torch's default thread count, in its own process (so that a
    pathologically slow multi-threaded run can be stopped: see --timeout-default)."""
    import torch
    model, cfg, names = _build(args)
    _install_timers()
    torch.linalg.svd(torch.randn(64, 64), full_matrices=False)
    with open(os.path.join(tmp, "ready_default"), "w") as f:
        f.write(str(torch.get_num_threads()))
    for k in range(args.reps_default):
        _wait_for(os.path.join(tmp, f"go_default{k}"))
        init, rec = _timed_run(model, cfg, names, None)
        if k == 0:
            _save_priors(init, os.path.join(tmp, "priors_default.pt"))
        del init
        with open(os.path.join(tmp, f".done_default{k}"), "w") as f:
            json.dump(rec, f)
        os.replace(os.path.join(tmp, f".done_default{k}"), os.path.join(tmp, f"done_default{k}"))


# --------------------------------------------------------------------------- driver
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4, help="decoder layers (7 GOAT layers each)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--rank", type=int, default=32, help="total rank r")
    p.add_argument("--init", default="goat")
    p.add_argument("--svd-dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--reps", type=int, default=5, help="timed reps of every mode")
    p.add_argument("--reps-default", type=int, default=3,
                   help="timed reps of the one-process default-threads mode (the first ones)")
    p.add_argument("--timeout-default", type=float, default=60.0,
                   help="seconds after which a default-threads one-process run is stopped and recorded "
                        "as censored (>= this); no further such run is attempted (multi-threaded "
                        "LAPACK can slow down 10-100x when other work oversubscribes the cores)")
    p.add_argument("--warmup-reps", type=int, default=1, help="untimed reps first")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch
    import torch.multiprocessing as mp

    torch.set_num_threads(1)      # the driver times the 1-thread mode; a helper the default one
    model, cfg, names = _build(args)
    _install_timers()
    shapes = sorted({tuple(model.get_submodule(n).weight.shape) for n in names})
    print(f"bench_svd_init: Llama hidden={args.hidden} intermediate={args.intermediate} "
          f"layers={args.layers} -> {len(names)} GOAT layers (shapes {shapes}); init={cfg.init} "
          f"E={cfg.num_experts} r={cfg.r} svd_dtype={cfg.svd_dtype}; reps={args.reps} "
          f"(+{args.warmup_reps} warm-up)", flush=True)
    torch.linalg.svd(torch.randn(64, 64), full_matrices=False)

    runs = defaultdict(list)     # mode -> list of records (dist modes: list over ranks)
    idle_cpu = []
    loads = [_loadavg()]
    censored = 0
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_worker, args=(args.world, free_port(), args, tmp),
                                 nprocs=args.world, start_method="spawn", join=False)
        dctx = mp.start_processes(_default_threads_worker, args=(args, tmp), nprocs=1,
                                  start_method="spawn", join=False)
        try:
            for r in range(args.world):
                _wait_for(os.path.join(tmp, f"ready{r}"))
            _wait_for(os.path.join(tmp, "ready_default"))
            with open(os.path.join(tmp, "ready_default")) as f:
                default_threads = int(f.read())
            print(f"cpu: {cpu_model()}, {os.cpu_count()} logical cores; torch default threads "
                  f"{default_threads}; distributed: {args.world} gloo ranks x 1 thread", flush=True)
            one_priors = {}
            k_default = 0
            for rep in range(args.warmup_reps + args.reps):
                timed = rep >= args.warmup_reps
                for mode in (("one_1t", "one_default") if rep % 2 == 0 else ("one_default", "one_1t")):
                    if mode == "one_1t":
                        init, rec = _timed_run(model, cfg, names, None)
                        if rep == args.warmup_reps:
                            one_priors[1] = init.priors
                        if timed:
                            runs[mode].append(rec)
                        del init
                        continue
                    if not timed or censored or k_default >= args.reps_default:
                        continue
                    open(os.path.join(tmp, f"go_default{k_default}"), "w").close()
                    try:
                        _wait_for(os.path.join(tmp, f"done_default{k_default}"),
                                  timeout=args.timeout_default)
                        with open(os.path.join(tmp, f"done_default{k_default}")) as f:
                            runs[mode].append(json.load(f))
                    except TimeoutError:
                        if not dctx.processes[0].is_alive():
                            raise RuntimeError("the default-threads baseline process died")
                        dctx.processes[0].terminate()
                        censored += 1
                        runs[mode].append({"wall": args.timeout_default, "censored": True})
                    k_default += 1
                open(os.path.join(tmp, f"go{rep}"), "w").close()
                _wait_for(os.path.join(tmp, f"done{rep}"))
                with open(os.path.join(tmp, f"done{rep}")) as f:
                    res = json.load(f)
                if timed:
                    for mode, per_rank in res["runs"].items():
                        runs[mode].append(per_rank)
                    idle_cpu.append(max(i["cpu_s"] for i in res["idle"]))
                loads.append(_loadavg())
                one_msg = "  ".join(
                    f"{m} {'>=' if runs[m][-1].get('censored') else ''}{runs[m][-1]['wall']:.3f} s"
                    for m in ("one_1t", "one_default")
                    if timed and len(runs[m]) > rep - args.warmup_reps)
                print(f"  rep {rep}{'' if timed else ' (warm-up)'}: {one_msg}  "
                      + "  ".join(f"{m} {max(r['wall'] for r in res['runs'][m]):.3f} s"
                                  for m in ("dist", "cold", "warm"))
                      + f"  (loadavg {loads[-1]})", flush=True)
            while not ctx.join():
                pass
            if not censored:
                while not dctx.join():
                    pass
            # ---- checks
            pri = {k: torch.load(os.path.join(tmp, k + ".pt")) for k in
                   [f"priors_{m}_rank{r}" for m in ("dist", "warm") for r in range(args.world)]}
            p_default = os.path.join(tmp, "priors_default.pt")
            pri_default = torch.load(p_default) if os.path.exists(p_default) else None
        except BaseException:
            for proc in ctx.processes + dctx.processes:
                if proc.is_alive():
                    proc.terminate()
            raise
    wall_total = time.time() - t_start

    def equal(a: dict, ref: dict) -> bool:
        return set(a) == set(ref) and all(torch.equal(a[n][0], ref[n].A) and torch.equal(a[n][1], ref[n].B)
                                          for n in ref)

    ref = one_priors[1]
    dist_equal = all(equal(pri[f"priors_dist_rank{r}"], ref) for r in range(args.world))
    warm_equal = all(equal(pri[f"priors_warm_rank{r}"], ref) for r in range(args.world))
    two_t_equal = equal(pri_default, ref) if pri_default is not None else None
    n_layers = len(names)
    dist_svd_ok = all(sum(r["svd_computed"] for r in per) == n_layers for per in runs["dist"])
    warm_zero = all(all(r["svd_computed"] == 0 and r["cache_hits"] == r["owned"] for r in per)
                    for per in runs["warm"])
    cold_svd_ok = all(sum(r["svd_computed"] for r in per) == n_layers for per in runs["cold"])

    # ---- summary
    def summarize(mode: str) -> dict:
        recs = runs[mode]
        if mode.startswith("one"):
            walls = [r["wall"] for r in recs]
            per_run = [dict(r, cpu_util=r["cpu"] / r["wall"], svd_sum=sum(r["svd_times"]),
                            svd_cpu_max=r["svd_cpu"]) for r in recs if not r.get("censored")]
            if not per_run:   # every run censored: only a lower bound on the wall time
                return {"median_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls),
                        "walls_s": walls, "censored_runs": len(walls), "svd_computed": 0,
                        "cache_hits": 0, "cpu_util_median": float("nan"),
                        "svd_sum_median_s": float("nan"), "svd_cpu_max_median_s": float("nan"),
                        **{f"{k}_median_s": float("nan") for k in COMPONENTS}}
        else:   # per run: wall and each component = max over ranks
            per_run = []
            for per in recs:
                st = [r["svd_times"] for r in per]
                rounds = max(len(t) for t in st)
                per_run.append({k: max(r[k] for r in per) for k in ("wall",) + COMPONENTS}
                               | {"svd_computed": sum(r["svd_computed"] for r in per),
                                  "cache_hits": sum(r["cache_hits"] for r in per),
                                  "cpu_util": statistics.mean(r["cpu"] / r["wall"] for r in per),
                                  "svd_sum": sum(sum(t) for t in st),
                                  "svd_cpu_max": max(r["svd_cpu"] for r in per),
                                  "svd_cpu_util": statistics.mean(r["svd_cpu"] / r["svd"] if r["svd"] else 0.0
                                                                  for r in per),
                                  # SVD time if ranks only met at the end (max of per-rank sums) vs
                                  # as run (every round waits for its slowest SVD: sum of maxima)
                                  "svd_no_round_sync": max(sum(t) for t in st),
                                  "svd_round_sync": sum(max(t[j] if j < len(t) else 0.0 for t in st)
                                                        for j in range(rounds))})
            walls = [r["wall"] for r in per_run]
        out = {"median_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls),
               "walls_s": walls, "censored_runs": sum(1 for r in recs if isinstance(r, dict)
                                                      and r.get("censored")),  # lower bounds
               "svd_computed": per_run[0]["svd_computed"],
               "cache_hits": per_run[0]["cache_hits"],
               "cpu_util_median": statistics.median(r["cpu_util"] for r in per_run),
               "svd_sum_median_s": statistics.median(r["svd_sum"] for r in per_run),
               "svd_cpu_max_median_s": statistics.median(r["svd_cpu_max"] for r in per_run)}
        for k in COMPONENTS:
            out[f"{k}_median_s"] = statistics.median(r[k] for r in per_run)
        if not mode.startswith("one"):
            for k in ("svd_no_round_sync", "svd_round_sync", "svd_cpu_util"):
                out[f"{k}_median_s"] = statistics.median(r[k] for r in per_run)
        return out

    modes = {"one_1t": "one process, 1 thread", "one_default": f"one process, {default_threads} threads (default)",
             "dist": "distributed 2x1t, no cache", "cold": "distributed, cache cold (fill)",
             "warm": "distributed, cache warm"}
    S = {m: summarize(m) for m in modes}
    one = S["one_default"]["median_s"]
    print()
    print(f"wall time of .run(), median over {args.reps} reps (distributed: max over ranks); "
          f"components: median of the per-run max over ranks; 'bcast+wait' includes waiting for "
          f"the other rank")
    hdr = (f"{'mode':34s} {'n':>2} {'median s':>9} {'min':>7} {'max':>7} {'x vs one':>8} {'x vs 1t':>8} {'cpu/wall':>8} | "
           f"{'svd':>7} {'hash':>7} {'get':>7} {'put':>7} {'bcast+wait':>10} | {'SVDs':>4} {'hits':>4}")
    print(hdr)
    print("-" * len(hdr))
    for m, label in modes.items():
        s = S[m]
        if s["censored_runs"]:
            label = f"{label}*"
        print(f"{label:34s} {len(s['walls_s']):2d} {s['median_s']:9.3f} {s['min_s']:7.3f} {s['max_s']:7.3f} "
              f"{one / s['median_s']:8.2f} {S['one_1t']['median_s'] / s['median_s']:8.2f} "
              f"{s['cpu_util_median']:8.2f} | "
              f"{s['svd_median_s']:7.3f} {s['hash_median_s']:7.4f} {s['cache_get_median_s']:7.4f} "
              f"{s['cache_put_median_s']:7.4f} {s['bcast_median_s']:10.4f} | "
              f"{s['svd_computed']:4d} {s['cache_hits']:4d}")
    sp_dist = one / S["dist"]["median_s"]
    sp_cached = one / S["warm"]["median_s"]
    print()
    print(f"'one process' baseline = torch default threads ({default_threads}): {one:.3f} s"
          + (f" (*{S['one_default']['censored_runs']} of {len(S['one_default']['walls_s'])} runs stopped "
             f"at --timeout-default={args.timeout_default:g} s and counted as that: a LOWER bound, so "
             f"the speedups 'vs one' are lower bounds too)" if S["one_default"]["censored_runs"] else ""))
    d = S["dist"]
    print(f"SVD work: one process (1 thread) spent {S['one_1t']['svd_sum_median_s']:.3f} s in SVDs; "
          f"distributed, summed over both ranks {d['svd_sum_median_s']:.3f} s "
          f"({d['svd_sum_median_s'] / S['one_1t']['svd_sum_median_s']:.2f}x: per-SVD slowdown when both "
          f"ranks compute at once); slowest rank {d['svd_no_round_sync_median_s']:.3f} s; "
          f"with the per-round synchronisation (sum over rounds of the slower SVD) "
          f"{d['svd_round_sync_median_s']:.3f} s; .run() wall {d['median_s']:.3f} s")
    cpu_est = S["one_1t"]["svd_cpu_max_median_s"] / d["svd_cpu_max_median_s"]
    print(f"SVD CPU time: one process {S['one_1t']['svd_cpu_max_median_s']:.3f} s, busiest rank "
          f"{d['svd_cpu_max_median_s']:.3f} s -> {cpu_est:.2f}x less CPU on the critical rank (the speedup "
          f"with a dedicated core per rank, before communication); ranks got "
          f"{d['svd_cpu_util_median_s']:.2f} CPU-s per wall-s inside their SVDs, the one-process run "
          f"{S['one_1t']['svd_cpu_max_median_s'] / S['one_1t']['svd_median_s']:.2f}")
    print(f"loadavg (1 min) during the run: min {min(loads):.2f} max {max(loads):.2f} "
          f"(2 vCPUs; other work shares them)")
    print(f"checks: distributed priors == one-process (1 thread) priors on every rank: {dist_equal}; "
          f"warm-cache priors equal: {warm_equal}; one-process default-thread priors equal to 1-thread: "
          f"{two_t_equal}; no-cache runs computed each SVD once in total: {dist_svd_ok}; cold runs "
          f"too: {cold_svd_ok}; warm runs computed 0 SVDs and hit the cache for every owned layer: "
          f"{warm_zero}")
    print(f"idle ranks' CPU time while the driver ran the one-process modes: max "
          f"{max(idle_cpu) * 1e3:.1f} ms per rep")
    print(f"targets: distributed >= 1.6x: {sp_dist:.2f}x ({'MET' if sp_dist >= 1.6 else 'MISSED'}; "
          f"vs 1 thread {S['one_1t']['median_s'] / S['dist']['median_s']:.2f}x); cached >= 20x: "
          f"{sp_cached:.1f}x ({'MET' if sp_cached >= 20 else 'MISSED'})")
    print(f"total wall time {wall_total:.0f} s")
    out = {"benchmark": "bench_svd_init", "cpu": cpu_model(), "cores": os.cpu_count(),
           "config": {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers,
                      "goat_layers": n_layers, "shapes": shapes, "init": cfg.init, "E": cfg.num_experts,
                      "r": cfg.r, "svd_dtype": cfg.svd_dtype, "reps": args.reps,
                      "warmup_reps": args.warmup_reps, "world": args.world,
                      "default_threads": default_threads},
           "one_process_s": one, "one_process_1thread_s": S["one_1t"]["median_s"],
           "one_process_default_threads": default_threads,
           "one_process_default_threads_s": S["one_default"]["median_s"],
           "one_process_default_censored_runs": S["one_default"]["censored_runs"],
           "distributed_s": S["dist"]["median_s"], "cached_cold_s": S["cold"]["median_s"],
           "cached_s": S["warm"]["median_s"],
           "speedup_distributed": sp_dist, "speedup_cached": sp_cached,
           "speedup_distributed_vs_1thread": S["one_1t"]["median_s"] / S["dist"]["median_s"],
           "speedup_cached_vs_1thread": S["one_1t"]["median_s"] / S["warm"]["median_s"],
           "svd_cpu_speedup_estimate": cpu_est,
           "target_distributed_met": sp_dist >= 1.6, "target_cached_met": sp_cached >= 20,
           "checks": {"distributed_equal_one_process": dist_equal, "cached_equal_one_process": warm_equal,
                      "one_process_default_threads_equal_1t": two_t_equal, "each_svd_once": dist_svd_ok and cold_svd_ok,
                      "cached_zero_svds": warm_zero},
           "modes": S, "idle_rank_cpu_s_max": max(idle_cpu), "loadavg": loads, "wall_s": wall_total}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
