"""SVD segmentation and priors (goat_reference.md section 2) against independent float64 SVDs."""

import math

import pytest
import torch

from goat_dist.config import SVD_INITS, GoatConfigError
from goat_dist.svd import (check_layer_fits, expert_index_sets, layer_priors, random_priors,
                           svd_priors)
from tests.helpers_core import layer_cfg


def _pairs(starts):
    return [[s, s + 1] for s in starts]


# --------------------------------------------------------------------------- index sets
def test_index_sets_goat_worked_example():
    """goat, q=64, E=8, r=16: first r_e=2 components of each chunk of 8: [0,1],[8,9],...,[56,57]."""
    assert expert_index_sets("goat", 64, 8, 16) == _pairs(range(0, 64, 8))


def test_index_sets_goat_mini_worked_example():
    """goat_mini, q=64, E=8, r=16: last 2 components of each chunk: [6,7],[14,15],...,[62,63]."""
    assert expert_index_sets("goat_mini", 64, 8, 16) == _pairs(range(6, 64, 8))


def test_index_sets_pissa_milora_and_mixed():
    """pissa: top r split contiguously; milora: bottom r; pissa_milora: top r/2 then bottom r/2."""
    assert expert_index_sets("pissa", 64, 8, 16) == _pairs(range(0, 16, 2))
    assert expert_index_sets("milora", 64, 8, 16) == _pairs(range(48, 64, 2))
    assert expert_index_sets("pissa_milora", 64, 8, 16) == _pairs([0, 2, 4, 6, 56, 58, 60, 62])
    assert expert_index_sets("pissa", 64, 2, 16) == [list(range(0, 8)), list(range(8, 16))]
    assert expert_index_sets("pissa_milora", 64, 1, 6) == [[0, 1, 2, 61, 62, 63]]


@pytest.mark.parametrize("init", SVD_INITS)
@pytest.mark.parametrize("q, E, r", [(64, 8, 16), (40, 4, 8), (40, 1, 16), (7, 2, 4), (33, 3, 9)])
def test_index_sets_shape_and_disjoint(init, q, E, r):
    """Every init gives E sorted, disjoint lists of r/E indices inside [0, q)."""
    idx = expert_index_sets(init, q, E, r)
    flat = [i for ids in idx for i in ids]
    assert len(idx) == E and all(len(ids) == r // E for ids in idx)
    assert len(set(flat)) == len(flat) and all(0 <= i < q for i in flat)
    assert all(ids == sorted(ids) for ids in idx)


@pytest.mark.parametrize("init", ["goat", "goat_mini"])
def test_chunk_shorter_than_expert_rank_raises(init):
    """q=64, E=8, r=128: chunk 8 < r/E=16 raises GoatConfigError naming both numbers."""
    with pytest.raises(GoatConfigError, match=r"chunk.*8.*16"):
        expert_index_sets(init, 64, 8, 128)


@pytest.mark.parametrize("init", ["pissa", "milora", "pissa_milora"])
def test_contiguous_inits_need_r_components(init):
    """pissa/milora/pissa_milora with r > q raise instead of indexing past the spectrum."""
    with pytest.raises(GoatConfigError, match="min"):
        expert_index_sets(init, 8, 2, 16)


def test_check_layer_fits_names_layer():
    """check_layer_fits names the layer and its shape; random inits always fit."""
    with pytest.raises(GoatConfigError, match=r"model\.layers\.0\.k_proj.*32x64"):
        check_layer_fits(layer_cfg(r=64, num_experts=8), 32, 64, "model.layers.0.k_proj")
    check_layer_fits(layer_cfg(r=64, num_experts=8, init="molora"), 32, 64, "x")
    check_layer_fits(layer_cfg(r=16, num_experts=8), 32, 64, "x")


# --------------------------------------------------------------------------- SVD priors
def _weight_with_spectrum(m, n, seed=0):
    """A float32 (m, n) weight with well separated singular values 3 * 0.93^j (stable fp32 SVD)."""
    g = torch.Generator().manual_seed(seed)
    q = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, q, dtype=torch.float64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, q, dtype=torch.float64, generator=g))
    S = 3.0 * 0.93 ** torch.arange(q, dtype=torch.float64)
    return ((U * S) @ V.T).float()


@pytest.mark.parametrize("init", SVD_INITS)
@pytest.mark.parametrize("m, n", [(40, 48), (48, 40)])
@pytest.mark.parametrize("svd_dtype, tol", [("float32", 1e-4), ("float64", 1e-6)])
def test_svd_priors_hold_one_rho_th_of_their_slice(init, m, n, svd_dtype, tol):
    """s * B0_i A0_i == U_I diag(S_I) Vh_I / rho for each expert (independent fp64 SVD)."""
    W = _weight_with_spectrum(m, n)
    W_before = W.clone()
    E, r, rho, s = 4, 8, 7.0, 3.0
    cfg = layer_cfg(r=r, num_experts=E, top_k=2, init=init, rho=rho, svd_dtype=svd_dtype)
    pri = svd_priors(W, cfg, s)
    assert pri.svd_based
    assert pri.A.shape == (E, r // E, n) and pri.B.shape == (E, m, r // E)
    assert pri.A.dtype == torch.float32 and pri.B.dtype == torch.float32
    assert torch.equal(W, W_before)                                   # weight not modified
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    for i, I in enumerate(expert_index_sets(init, min(m, n), E, r)):
        ref = (U[:, I] * S[I]) @ Vh[I] / rho
        got = s * pri.B[i].double() @ pri.A[i].double()
        assert (got - ref).norm() / ref.norm() < tol, (i, I)


def test_svd_priors_of_bf16_weight():
    """A bf16 weight is factorised as the exact fp64 value of its bf16 entries."""
    W = torch.randn(32, 24).to(torch.bfloat16)
    cfg = layer_cfg(r=4, num_experts=2, top_k=1, svd_dtype="float64")
    pri = svd_priors(W, cfg, 2.0)
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    I = expert_index_sets("goat", 24, 2, 4)[1]
    ref = (U[:, I] * S[I]) @ Vh[I] / cfg.rho
    assert (2.0 * pri.B[1].double() @ pri.A[1].double() - ref).norm() / ref.norm() < 1e-6


def test_layer_priors_dispatch():
    """layer_priors: SVD inits give svd_based priors, random inits random ones."""
    W = torch.randn(12, 10)
    assert layer_priors(W, layer_cfg(r=4, num_experts=2), 1.0).svd_based
    assert not layer_priors(W, layer_cfg(r=4, num_experts=2, init="molora"), 1.0).svd_based


# --------------------------------------------------------------------------- random priors
@pytest.mark.parametrize("init, n_a", [("molora", 4), ("hydralora", 1)])
def test_random_priors(init, n_a):
    """molora: one kaiming-uniform A per expert (bound 1/sqrt(n)); hydralora: one shared A; B = 0."""
    n, m = 400, 30
    cfg = layer_cfg(r=32, num_experts=4, init=init)
    pri = random_priors(cfg, m, n)
    assert not pri.svd_based
    assert pri.A.shape == (n_a, 8, n) and pri.B.shape == (4, m, 8)
    bound = 1 / math.sqrt(n)
    assert pri.A.abs().max() <= bound
    assert pri.A.abs().max() > 0.95 * bound                       # fills the interval
    assert pri.A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.count_nonzero(pri.B) == 0
    if n_a > 1:
        assert not torch.equal(pri.A[0], pri.A[1])                 # independent draws per expert
