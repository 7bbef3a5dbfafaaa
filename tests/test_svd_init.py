"""The distributed SVD initialiser against the one-process initialiser, and its cache."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.multiprocessing as mp

from goat_dist.config import GoatConfig
from goat_dist.parallel.svd_init import _cost, assign_owners, cache_key
from tests.train_helpers import free_port, leave_process_group_and_exit


def test_owner_assignment_balances_cost():
    shapes = {f"l{i}.q": (64, 64) for i in range(4)} | {f"l{i}.up": (128, 64) for i in range(4)}
    owner = assign_owners(shapes, 2)
    load = [sum(_cost(shapes[n]) for n in shapes if owner[n] == r) for r in range(2)]
    assert load[0] == load[1]
    assert assign_owners(shapes, 1) == {n: 0 for n in shapes}


def test_cache_key_tracks_weight_and_config():
    w = torch.randn(32, 16)
    cfg = GoatConfig(r=8, num_experts=4)
    k = cache_key(w, cfg, 4.0)
    assert k == cache_key(w.clone(), cfg, 4.0)
    w2 = w.clone()
    w2[3, 3] += 1e-6
    assert cache_key(w2, cfg, 4.0) != k
    assert cache_key(w, GoatConfig(r=8, num_experts=4, rho=5), 4.0) != k
    assert cache_key(w, cfg, 8.0) != k
    assert cache_key(w, GoatConfig(r=8, num_experts=4, init="goat_mini"), 4.0) != k


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    from goat_dist.parallel.local import init_local_process_group
    init_local_process_group(rank, world, port)
    import deepspeed
    import torch.distributed as dist
    from goat_dist.model import find_target_modules
    from goat_dist.parallel.svd_init import DistributedSVDInitializer
    from goat_dist.svd import layer_priors
    from goat_dist.train.modeling import build_preset

    cfg = GoatConfig(r=8, lora_alpha=16, num_experts=4, top_k=2)
    model = build_preset("tiny-llama", vocab_size=128, seed=0)
    names = find_target_modules(model, cfg)
    # the oracle: the one-process initialiser on the full weights
    oracle = {n: layer_priors(model.get_submodule(n).weight.detach().float(), cfg,
                              cfg.scale_for(model.get_submodule(n).in_features)) for n in names}
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    partitioned = copy.deepcopy(model)
    deepspeed.zero.Init(module=partitioned, config_dict_or_path=ds)
    w = partitioned.get_submodule(names[0]).weight
    assert w.numel() == 0 and hasattr(w, "ds_id")        # really partitioned

    cache = os.path.join(tmp, "cache")
    init = DistributedSVDInitializer(partitioned, cfg, names, cache_dir=cache).run()
    for n in names:
        assert torch.equal(init.priors[n].A, oracle[n].A), n
        assert torch.equal(init.priors[n].B, oracle[n].B), n
    svd_total = torch.tensor([init.stats.svd_computed])
    dist.all_reduce(svd_total)
    assert svd_total.item() == len(names)                 # each SVD exactly once per job
    assert 0 < init.stats.svd_computed < len(names)        # and shared between the ranks

    # second job: the cache serves everything, torch.linalg.svd must not run
    real_svd = torch.linalg.svd

    def no_svd(*a, **k):
        raise AssertionError("SVD computed despite a warm cache")

    torch.linalg.svd = no_svd
    try:
        again = DistributedSVDInitializer(partitioned, cfg, names, cache_dir=cache).run()
    finally:
        torch.linalg.svd = real_svd
    for n in names:
        assert torch.equal(again.priors[n].A, oracle[n].A)
    assert again.stats.svd_computed == 0 and again.stats.cache_hits == len(again.stats.layers_owned)
    with open(os.path.join(tmp, f"ok{rank}"), "w") as f:
        f.write("ok")
    # not a plain destroy + return: zero.Init leaves gloo threads running at exit (SIGABRT flake)
    leave_process_group_and_exit(0)


@pytest.mark.slow
def test_distributed_priors_equal_one_process_and_cache_skips_svd(tmp_path):
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()
