"""Expert parallelism against its oracles: the replicated layer (numerics of the dispatch) and
the ep_size = 1 / one-process training run (the whole update, clipping included)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.train_helpers import (ROOT, adapter_eval_loss, free_port, losses, read_summary,
                                 run_train, tiny_config)

ZERO2 = os.path.join(ROOT, "ds_configs", "zero2.json")
ZERO3 = os.path.join(ROOT, "ds_configs", "zero3.json")

pytestmark = pytest.mark.slow


def _layer_worker(rank: int, world: int, port: int, result_dir: str) -> None:
    """Each rank runs its half of a token batch through an EP layer (ep_size=2) and compares
    outputs and gradients with the replicated layer run on the full batch."""
    from goat_dist.parallel.local import init_local_process_group
    init_local_process_group(rank, world, port)
    import torch.distributed as dist
    from goat_dist.config import GoatConfig
    from goat_dist.layer import GoatLinear
    from goat_dist.parallel.dispatch import ExpertParallelDispatcher
    from goat_dist.parallel.groups import create_expert_parallel_groups
    from goat_dist.svd import layer_priors

    report = []
    # (top_k, starve): with a zero router every token picks experts 0..k-1, so the second
    # rank's experts get no token at all (its dispatch must still join every exchange)
    for top_k, starve in ((1, False), (2, False), (1, True), (2, True)):
        cfg = GoatConfig(r=16, lora_alpha=32, num_experts=8, top_k=top_k, lora_dropout=0.0)
        torch.manual_seed(0)
        base = torch.nn.Linear(48, 40)
        pri = layer_priors(base.weight, cfg, cfg.scale_for(48))
        with torch.no_grad():
            pri.B.normal_()
        groups = create_expert_parallel_groups(2, cfg.num_experts)
        disp = ExpertParallelDispatcher(groups, cfg.num_experts)
        torch.manual_seed(1)
        full = GoatLinear(base, cfg, pri)
        torch.manual_seed(1)
        ep = GoatLinear(base, cfg, pri, expert_parallel=disp)
        if starve:
            with torch.no_grad():
                full.lora_router.weight.zero_()
                ep.lora_router.weight.zero_()
        # exactly E / ep_size experts, and not registered (the engine must not see them)
        assert ep.lora_A.shape[0] == ep.lora_B.shape[0] == cfg.num_experts // 2
        assert all(p is not ep.lora_A and p is not ep.lora_B for p in ep.parameters())
        torch.manual_seed(2)
        x = torch.randn(2, 10, 48, requires_grad=True)  # as hidden states in training
        g = torch.randn(2, 10, 40)
        y_full = full(x)
        (y_full * g).sum().backward()     # (the aux loss is per-batch statistics: not split-invariant)
        mine = slice(rank, rank + 1)
        x_mine = x.detach()[mine].requires_grad_(True)
        y_ep = ep(x_mine)
        (y_ep * g[mine]).sum().backward()
        # both ranks ran the same exchanges: the next collective pairs up correctly
        probe = torch.tensor([float(rank + 1)] * 7)
        dist.all_reduce(probe)
        assert torch.equal(probe, torch.full((7,), 3.0)), "ranks fell out of step"
        ref_y = y_full[mine]
        assert ((y_ep - ref_y).norm() / ref_y.norm()).item() < 1e-6
        ref_gx = x.grad[mine]
        assert ((x_mine.grad - ref_gx).norm() / ref_gx.norm()).item() < 1e-5
        # expert grads: the owner's shard holds the sum over both ranks' tokens
        lo, hi = disp.offset, disp.offset + disp.num_local
        for name in ("lora_A", "lora_B"):
            gs = getattr(ep, name).grad.clone()
            ref = getattr(full, name).grad[lo:hi]
            assert ((gs - ref).norm() / ref.norm().clamp(min=1e-30)).item() < 1e-5 or \
                (starve and rank == 1 and gs.abs().max() == 0 and ref.abs().max() == 0), (name, top_k)
        report.append((top_k, starve))
    with open(os.path.join(result_dir, f"ok{rank}"), "w") as f:
        f.write(str(report))
    dist.barrier()
    dist.destroy_process_group()


def test_dispatch_matches_replicated_layer(tmp_path):
    """Outputs and expert gradients of the dropless all-to-all equal the replicated layer's."""
    mp.start_processes(_layer_worker, args=(2, free_port(), str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()


@pytest.fixture(scope="module")
def oracles(tmp_path_factory):
    """One-process runs (global batch 8) for top_k 1 and 2, with clipping active."""
    out = {}
    for k in (1, 2):
        d = tmp_path_factory.mktemp(f"oracle_k{k}")
        cfg = tiny_config(str(d / "run.yaml"), str(d / "out"), goat={"top_k": k},
                          optim={"max_grad_norm": 0.3}, train={"gradient_accumulation_steps": 4})
        assert run_train(["--config", cfg]) == 0
        out[k] = losses(str(d / "out"))
    return out


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("ds_config", [ZERO2, ZERO3], ids=["zero2", "zero3_offload_param"])
def test_ep2_matches_single_process(tmp_path, oracles, ds_config, top_k):
    out = str(tmp_path / "out")
    cfg = tiny_config(str(tmp_path / "run.yaml"), out, goat={"top_k": top_k},
                      optim={"max_grad_norm": 0.3}, train={"ep_size": 2})
    assert run_train(["--config", cfg, "--ds_config", ds_config], world=2) == 0
    s = read_summary(out)
    assert s["ep_size"] == 2 and s["finished"]
    # clipping was active, so the joint-norm clipping is what is being compared
    assert max(h["grad_norm"] for h in s["history"]) > 0.3
    assert losses(out) == pytest.approx(oracles[top_k], abs=1e-5)


def test_ep2_under_zero1_matches_single_process(tmp_path, oracles):
    """ZeRO stage 1 (optimizer states of the engine-held params partitioned) with EP."""
    import json
    ds = tmp_path / "zero1.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto",
                              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                              "zero_optimization": {"stage": 1}}))
    out = str(tmp_path / "out")
    cfg = tiny_config(str(tmp_path / "run.yaml"), out, goat={"top_k": 2},
                      optim={"max_grad_norm": 0.3}, train={"ep_size": 2})
    assert run_train(["--config", cfg, "--ds_config", str(ds)], world=2) == 0
    assert read_summary(out)["zero_stage"] == 1
    assert losses(out) == pytest.approx(oracles[2], abs=1e-5)


def test_ep_checkpoint_resume_and_export(tmp_path):
    """ep_size=2: stop + resume equals the straight run; the exported adapter has every expert
    in the ep_size=1 layout and reproduces the eval loss in one process."""
    from safetensors.torch import load_file

    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    a = tiny_config(str(tmp_path / "a.yaml"), straight, train={"ep_size": 2, "max_steps": 4})
    b = tiny_config(str(tmp_path / "b.yaml"), split, train={"ep_size": 2, "max_steps": 4})
    assert run_train(["--config", a, "--ds_config", ZERO2], world=2) == 0
    assert run_train(["--config", b, "--ds_config", ZERO2, "train.stop_after_steps=2"], world=2) == 0
    first = losses(split)
    assert run_train(["--config", b, "--ds_config", ZERO2], world=2) == 0
    # the resumed summary's history is the whole run's (steps 1-2 through the checkpoint)
    assert losses(split)[:2] == first
    assert losses(split) == pytest.approx(losses(straight), abs=1e-6)
    ta = load_file(os.path.join(straight, "adapter", "adapter_model.safetensors"))
    tb = load_file(os.path.join(split, "adapter", "adapter_model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=1e-6)
    # every expert is in the folder: (E, r_e, n) / (E, m, r_e)
    a_keys = [k for k in ta if k.endswith(".lora_A")]
    assert a_keys and all(ta[k].shape[0] == 4 for k in a_keys)

    assert adapter_eval_loss(a, straight) == pytest.approx(
        read_summary(straight)["final_metrics"]["eval/loss"], rel=1e-5)


def test_ep_size_must_divide_experts_and_world(tmp_path):
    out = str(tmp_path / "out")
    cfg = tiny_config(str(tmp_path / "run.yaml"), out, train={"ep_size": 3}, goat={"num_experts": 4})
    from tests.test_train_robustness import _assert_refused, _run_cli
    _assert_refused(_run_cli(["--config", cfg]), "ep_size=3", "num_experts=4")
    cfg2 = tiny_config(str(tmp_path / "run2.yaml"), out, train={"ep_size": 2})
    _assert_refused(_run_cli(["--config", cfg2]), "ep_size=2", "world size 1")
    assert not os.path.exists(out)
