"""Device assumptions (docs/GPU.md), checked without a GPU where possible and on one with
``--device cuda`` (scripts/gpu_check.sh):

* the layer runs on the ``meta`` device: a tensor created on the CPU by default inside forward or
  backward raises there ("not on the expected device"), and so does any host sync (a meta tensor
  has no value to copy out), exactly as a stray CPU tensor or an ``.item()`` would on CUDA;
* the layer on --device (fp32 and bf16, both paths) matches the fp64 CPU computation;
* the grouped-GEMM probe survives a first call under no_grad and draws no random numbers;
* checkpoint RNG states load with ``weights_only=True`` and restore every generator (CUDA's too
  on a GPU);
* host-side bookkeeping tensors all-reduce through the backend's device (gloo: CPU).
"""

from __future__ import annotations

import copy
import io
import os
import random

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from goat_dist import kernels
from goat_dist.parallel.expert_optim import squared_norm
from goat_dist.train.checkpoint import rng_state, set_rng_state
from tests.helpers_core import f64_copy, layer_cfg, make_layer, rel_err
from tests.train_helpers import free_port

pytestmark = pytest.mark.device_aware

N_IN, N_OUT = 48, 40


def _layer(compute: str, init: str = "goat", dropout: float = 0.0, E: int = 4, k: int = 2):
    """A training-mode layer (CPU) with non-zero B, so every gradient is non-trivial."""
    layer = make_layer(layer_cfg(r=16, num_experts=E, top_k=k, init=init, compute=compute,
                                 lora_dropout=dropout), N_IN, N_OUT).train()
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    return layer


# ----------------------------------------------------------------------------- meta device
META_CASES = [("dense", torch.float32, "goat", 0.0), ("dense", torch.bfloat16, "goat", 0.1),
              ("dense", torch.float32, "molora", 0.1), ("grouped", torch.bfloat16, "goat", 0.0),
              ("grouped", torch.bfloat16, "goat", 0.1), ("grouped", torch.bfloat16, "hydralora", 0.0)]


@pytest.mark.parametrize("compute, dtype, init, dropout", META_CASES,
                         ids=[f"{c}-{str(d)[6:]}-{i}-p{p}" for c, d, i, p in META_CASES])
def test_layer_creates_no_host_tensor_and_never_syncs(compute, dtype, init, dropout):
    """Forward + backward of a layer whose parameters and input live on ``meta``: every tensor the
    layer makes must follow its input's device, and no value may come back to the host. (The
    grouped path runs on meta in bf16, where _grouped_mm has a meta kernel; with the padded-bmm
    fallback it syncs once for the capacity, by design.)"""
    layer = _layer(compute, init, dropout).to(device="meta", dtype=dtype)
    layer.expert_counts = layer.expert_counts.to("meta")
    assert kernels._grouped_mm_supported(torch.device("meta"), dtype) or compute == "dense"
    x = torch.empty(3, 5, N_IN, device="meta", dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.device.type == "meta" and y.shape == (3, 5, N_OUT) and y.dtype == dtype
    (y.float().sum() + layer.last_aux_loss).backward()
    for p in (layer.lora_A, layer.lora_B, layer.lora_router.weight, x):
        assert p.grad is not None and p.grad.device.type == "meta"
    assert layer.reset_expert_counts().device.type == "meta"


def test_expert_gradient_norm_stays_on_the_gradients_device():
    """The clipping norm is summed where the gradients are (no per-tensor ``.cpu()`` sync; NCCL
    can reduce it): meta gradients give a meta norm."""
    grads = [torch.empty(4, 3, device="meta"), None, torch.empty(5, device="meta")]
    sq = squared_norm(grads)
    assert sq.device.type == "meta" and sq.dtype == torch.float64
    assert squared_norm([torch.ones(2, 2), torch.full((3,), 2.0)]).item() == 16.0


# ----------------------------------------------------------------------------- on --device
DEVICE_CASES = [(c, d) for c in ("dense", "grouped") for d in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("compute, dtype", DEVICE_CASES,
                         ids=[f"{c}-{str(d)[6:]}" for c, d in DEVICE_CASES])
def test_layer_on_device_matches_fp64(device, compute, dtype):
    """The layer's adapter and base in ``dtype`` on --device (the router in fp32, so routing is
    the reference's) against the same values in fp64 on the CPU: output and gradients of x, A,
    B within the dtype's arithmetic error (fp32 1e-5, bf16 3e-2; gradients, summed over
    tokens, twice that)."""
    with torch.device("cpu"):                  # the reference lives on the CPU whatever --device
        cast = _layer(compute).to(dtype)
        cast.lora_router.float()
        ref = f64_copy(cast)                   # the dtype-rounded values, computed in fp64
    dev_layer = copy.deepcopy(cast).to(device)
    x = torch.randn(4, 16, N_IN, device="cpu").to(dtype)
    g = torch.randn(4, 16, N_OUT, device="cpu").to(dtype)

    def run(L, xx, gg):
        xx = xx.detach().clone().requires_grad_(True)
        y = L(xx)
        ((y * gg).sum()).backward()
        return y.detach(), xx.grad, L.lora_A.grad, L.lora_B.grad

    got = run(dev_layer, x.to(device), g.to(device))
    want = run(ref, x.double(), g.double())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for name, a, b in zip(("y", "dx", "dA", "dB"), got, want):
        assert a.device.type == device.type, name
        assert rel_err(a.cpu(), b) < (tol if name == "y" else 2 * tol), (name, rel_err(a.cpu(), b))
    if device.type == "cuda" and dtype == torch.bfloat16 and compute == "grouped" \
            and torch.cuda.get_device_capability(device) >= (9, 0):
        assert kernels._grouped_mm_supported(device, dtype), "torch._grouped_mm unusable on sm90+"


def test_grouped_probe_first_called_under_no_grad_and_draws_no_random_numbers(device):
    """An eval/generate call (no_grad, inference_mode) before any training forward must not cache
    "unsupported" for training, and probing must not advance the RNG (resume exactness)."""
    for ctx in (torch.no_grad, torch.inference_mode):
        kernels._GROUPED_MM_OK.pop((device.type, torch.float32), None)
        with ctx():
            before = torch.get_rng_state()
            ok = kernels._grouped_mm_supported(device, torch.float32)
            assert torch.equal(before, torch.get_rng_state())
        kernels._GROUPED_MM_OK.pop((device.type, torch.float32), None)
        assert ok == kernels._grouped_mm_supported(device, torch.float32)
    if device.type == "cpu":
        assert ok  # torch >= 2.8 runs fp32 _grouped_mm on the CPU


# ----------------------------------------------------------------------------- RNG in checkpoints
def _draws(device: torch.device):
    out = [random.random(), float(np.random.rand()), torch.rand(3).tolist()]
    if device.type == "cuda":
        out.append(torch.rand(3, device=device).tolist())
    return out


def test_rng_state_round_trips_through_weights_only_load(device):
    """The per-rank RNG file loads with weights_only=True and restores python, numpy, torch and
    (on a GPU) this rank's CUDA generator; the older pickled format still restores."""
    random.seed(3); np.random.seed(3); torch.manual_seed(3)   # noqa: E702
    state = rng_state()
    assert ("cuda" in state) == (device.type == "cuda")
    buf = io.BytesIO()
    torch.save(state, buf)
    first = _draws(device)
    buf.seek(0)
    set_rng_state(torch.load(buf, weights_only=True))
    assert _draws(device) == first
    assert "cuda" not in rng_state(cuda_devices=[])
    legacy = {"python": random.getstate(), "numpy": np.random.get_state(),
              "torch": torch.get_rng_state()}
    again = _draws(torch.device("cpu"))
    set_rng_state(legacy)
    assert _draws(torch.device("cpu")) == again


# ----------------------------------------------------------------------------- collectives
def _all_reduce_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from goat_dist.parallel.comm import all_reduce_, comm_device
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        t = torch.tensor([1.0 + rank, 10.0 * rank], dtype=torch.float64)
        assert all_reduce_(t) is t
        with open(os.path.join(out_dir, f"r{rank}"), "w") as f:
            f.write(f"{comm_device()} {t.tolist()}")
    finally:
        dist.destroy_process_group()


def test_host_tensors_all_reduce_through_the_backend_device(tmp_path):
    """all_reduce_ sums in place over gloo (its device is the CPU) and returns the tensor."""
    mp.start_processes(_all_reduce_worker, args=(2, free_port(), str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    for r in range(2):
        assert (tmp_path / f"r{r}").read_text() == "cpu [3.0, 10.0]"
