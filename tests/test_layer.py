"""GoatLinear: both compute paths against the official per-expert loop (tests/oracle.py), init
invariants, the load-balancing loss, bf16 residual precision and dropout semantics."""

import copy
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from goat_dist.config import INITS, SVD_INITS
from goat_dist.kernels import _grouped_mm_supported, grouped_matmul
from goat_dist.layer import GoatLinear
from goat_dist.svd import layer_priors
from tests.helpers_core import f64_copy, layer_cfg, make_layer, rel_err
from tests.oracle import reference_forward, reference_w_res

# Device-aware: `pytest --device cuda` (scripts/gpu_check.sh) runs every test here on the GPU.
pytestmark = pytest.mark.device_aware

N_IN, N_OUT, R = 48, 40, 16          # q = 40: E=8 -> chunk 5 >= r_e 2
EK = [(E, k) for E in (1, 2, 4, 8) for k in sorted({1, 2, E}) if k <= E]
SCALINGS = ["lora", "rslora", "goat", 2.5]


def _grads(layer, x, g, ref: bool):
    """Loss (y*g).sum() + aux of the layer (ref=False) or of the oracle (ref=True); returns
    (y, aux, grads of x, lora_A, lora_B, router)."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    if ref:
        y, aux = reference_forward(layer, x)
    else:
        y = layer(x)
        aux = layer.last_aux_loss
    ((y * g).sum() + aux).backward()
    return (y.detach(), aux.detach(), x.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone(),
            layer.lora_router.weight.grad.clone())


def _oracle_layer(cfg, n=N_IN, m=N_OUT, bias=True):
    """A layer with non-zero B (so every gradient is non-trivial) in train mode (aux recorded)."""
    layer = make_layer(cfg, n, m, bias=bias).train()
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    return layer


# --------------------------------------------------------------------------- oracle equivalence
@pytest.mark.parametrize("compute", ["dense", "grouped"])
@pytest.mark.parametrize("scaling", SCALINGS, ids=str)
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("E, k", EK, ids=[f"E{E}k{k}" for E, k in EK])
def test_matches_oracle_forward_and_gradients(E, k, init, scaling, compute):
    """Output, aux loss, expert counts and the gradients w.r.t. x, A, B and the router equal the
    official per-expert loop within 1e-5 relative (fp32)."""
    cfg = layer_cfg(r=R, num_experts=E, top_k=k, init=init, scaling=scaling, compute=compute)
    layer = _oracle_layer(cfg)
    assert layer.compute == compute
    x = torch.randn(3, 7, N_IN)
    g = torch.randn(3, 7, N_OUT)
    got = _grads(layer, x, g, ref=False)
    counts = layer.expert_counts.clone()
    ref = _grads(layer, x, g, ref=True)
    names = ["y", "aux", "dx", "dA", "dB", "drouter"]
    for name, a, b in zip(names, got, ref):
        assert a.shape == b.shape, name
        # top_k=1: the renormalised weight p/p is 1, so the exact router gradient is the aux term
        # alone; the (y*g) path adds fp32 cancellation noise (~1e-5 of it) to BOTH implementations.
        tol = 1e-4 if (name == "drouter" and k == 1) else 1e-5
        assert rel_err(a, b) < tol, (name, rel_err(a, b))
    if E > 1:
        assert got[5].abs().sum() > 0                              # the router does learn
    with torch.no_grad():                                           # the oracle's own top-k
        top_i = torch.topk(F.softmax(layer.lora_router(x.reshape(-1, N_IN)), -1), k, -1).indices
    assert torch.equal(counts, torch.bincount(top_i.reshape(-1), minlength=E).float())


@pytest.mark.parametrize("compute", ["dense", "grouped"])
@pytest.mark.parametrize("init", ["goat", "hydralora"])
def test_matches_oracle_in_float64_without_bias(init, compute):
    """A float64 layer (router fp32; grouped uses the padded-bmm fallback) equals the oracle to 1e-12."""
    layer = f64_copy(_oracle_layer(layer_cfg(r=8, num_experts=4, top_k=2, init=init,
                                             compute=compute), bias=False))
    assert layer.base_layer.bias is None
    x = torch.randn(5, 6, N_IN, dtype=torch.float64)
    g = torch.randn(5, 6, N_OUT, dtype=torch.float64)
    got, ref = _grads(layer, x, g, ref=False), _grads(layer, x, g, ref=True)
    for name, a, b in zip(["y", "aux", "dx", "dA", "dB", "drouter"], got, ref):
        assert a.dtype == b.dtype and rel_err(a, b) < (1e-6 if name in ("aux", "drouter") else 1e-12), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_matmul_matches_segment_loop(dtype):
    """grouped_matmul (torch._grouped_mm, or the padded-bmm fallback) equals a per-segment loop,
    including empty segments and widths that need alignment padding."""
    counts = torch.tensor([3, 0, 5, 1, 0, 7])
    E = len(counts)
    x = torch.randn(int(counts.sum()), 5, dtype=dtype)
    w = torch.randn(E, 5, 3, dtype=dtype)
    eor = torch.repeat_interleave(torch.arange(E), counts)
    ref = torch.cat([x[eor == e] @ w[e] for e in range(E)])
    got = grouped_matmul(x, w, counts, eor)
    assert rel_err(got, ref) < (1e-6 if dtype == torch.float32 else 1e-14)


def test_grouped_mm_probe_on_cpu():
    """The probe reports fp32 _grouped_mm on CPU as usable and float64 as not (fallback tested above)."""
    assert _grouped_mm_supported(torch.device("cpu"), torch.float64) is False
    assert isinstance(_grouped_mm_supported(torch.device("cpu"), torch.float32), bool)


def test_auto_compute_choice():
    """auto: grouped iff top_k < E and r >= grouped_min_rank; dense otherwise."""
    def path(**kw):
        return make_layer(layer_cfg(compute="auto", **kw)).compute
    assert path(r=16, num_experts=4, top_k=2, grouped_min_rank=16) == "grouped"
    assert path(r=16, num_experts=4, top_k=4, grouped_min_rank=16) == "dense"
    assert path(r=16, num_experts=4, top_k=2, grouped_min_rank=32) == "dense"


def test_output_shape_and_dtype_and_eval_no_stats():
    """(..., n) -> (..., m) in x's dtype; an eval forward records no aux loss or counts."""
    layer = make_layer(layer_cfg(r=8, num_experts=4, top_k=2)).eval()
    y = layer(torch.randn(2, 3, 5, N_IN))
    assert y.shape == (2, 3, 5, N_OUT) and y.dtype == torch.float32
    assert layer.last_aux_loss is None and layer.expert_counts.sum() == 0


def test_expert_counts_accumulate_and_reset():
    """expert_counts accumulates over training forwards; reset_expert_counts returns and zeroes it."""
    layer = make_layer(layer_cfg(r=8, num_experts=4, top_k=2)).train()
    for _ in range(3):
        layer(torch.randn(10, N_IN))
    c = layer.reset_expert_counts()
    assert c.sum() == 3 * 10 * 2
    assert layer.expert_counts.sum() == 0


# --------------------------------------------------------------------------- init invariants
@pytest.mark.parametrize("init", SVD_INITS)
@pytest.mark.parametrize("init_cof", [None, 0.5, 1.0])
def test_residual_plus_mean_expert_is_w0(init, init_cof):
    """W_res + init_cof * s * sum_i B0_i A0_i == W0 (float64), with W_res from the layer's buffers."""
    cfg = layer_cfg(r=R, num_experts=4, top_k=2, init=init, init_cof=init_cof)
    layer = make_layer(cfg)
    coef = cfg.residual_coef
    W0 = layer.base_layer.weight.double()
    delta = sum(layer.lora_B[i].double() @ layer.lora_A[i].double() for i in range(4))
    W_res = reference_w_res(layer, torch.float64)
    assert rel_err(W_res + coef * layer.scale * delta, W0) < 1e-7
    assert rel_err(W0 - W_res, coef * layer.scale * delta) < 1e-6   # the correction itself, not just W0


def test_init_cof_zero_has_no_residual():
    """init_cof=0: no residual buffers, the base weight is used as is."""
    layer = make_layer(layer_cfg(r=8, num_experts=4, init_cof=0.0))
    assert layer.res_A is None and layer.res_B is None


def test_base_weight_untouched():
    """Wrapping never writes the base weight (it stays bit-identical)."""
    base = nn.Linear(N_IN, N_OUT)
    W = base.weight.detach().clone()
    layer = make_layer(layer_cfg(r=8, num_experts=4), base=base)
    layer.train()(torch.randn(4, N_IN)).sum().backward()
    assert torch.equal(base.weight, W) and base.weight.grad is None
    assert not base.weight.requires_grad and not base.bias.requires_grad


@pytest.mark.parametrize("init", SVD_INITS)
@pytest.mark.parametrize("compute", ["dense", "grouped"])
def test_single_expert_full_residual_is_identity_at_init(init, compute):
    """E=1, init_cof=1: the layer output at init equals the base layer output (1e-5)."""
    layer = make_layer(layer_cfg(r=8, num_experts=1, top_k=1, init=init, init_cof=1.0,
                                 compute=compute, scaling="goat"))
    x = torch.randn(4, 9, N_IN)
    base = layer.base_layer(x)
    assert rel_err(layer(x), base) < 1e-5
    # ... and the residual is really applied (W_res != W0 by 1/rho of the slice)
    assert rel_err(F.linear(x, reference_w_res(layer, torch.float32)), base) > 1e-3


@pytest.mark.parametrize("init", SVD_INITS)
@pytest.mark.parametrize("E", [2, 4, 8])
@pytest.mark.parametrize("compute", ["dense", "grouped"])
def test_uniform_routing_all_experts_is_w0_at_init(init, E, compute):
    """top_k=E with a zero router (probs = 1/E) and init_cof=1/E: output == base(x) (1e-5), while a
    single expert (top_k=1) deviates: equality holds only in expectation."""
    cfg = layer_cfg(r=R, num_experts=E, top_k=E, init=init, compute=compute)
    layer = make_layer(cfg)
    with torch.no_grad():
        layer.lora_router.weight.zero_()
    x = torch.randn(3, 7, N_IN)
    assert rel_err(layer(x), layer.base_layer(x)) < 1e-5
    one = make_layer(layer_cfg(r=R, num_experts=E, top_k=1, init=init, compute=compute),
                     base=layer.base_layer)
    assert rel_err(one(x), layer.base_layer(x)) > 1e-4


@pytest.mark.parametrize("init", ["molora", "hydralora"])
@pytest.mark.parametrize("compute", ["dense", "grouped"])
def test_random_inits_are_identity_at_init(init, compute):
    """molora/hydralora: B = 0, no residual, so output == base(x) exactly; hydralora shares one A."""
    layer = make_layer(layer_cfg(r=R, num_experts=4, top_k=2, init=init, compute=compute)).train()
    E_A = 1 if init == "hydralora" else 4
    assert layer.lora_A.shape == (E_A, R // 4, N_IN) and layer.lora_B.shape == (4, N_OUT, R // 4)
    assert layer.lora_A.abs().max() <= 1 / N_IN ** 0.5
    assert layer.res_A is None and torch.count_nonzero(layer.lora_B) == 0
    x = torch.randn(3, 7, N_IN)
    assert torch.allclose(layer(x), layer.base_layer(x), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- load-balancing loss
def _cyclic_layer(E, k, scale=4.0):
    """n = E, token t = e_t; router logits: expert t gets 2c, expert t+1 gets c, others 0.
    Then top-2 of token t is {t, t+1}: every expert is picked k times over E tokens (f_j = k/E)
    and, by cyclic symmetry, every mean probability is 1/E."""
    layer = make_layer(layer_cfg(r=E, num_experts=E, top_k=k, init="molora"), n=E, m=3).train()
    Wr = torch.zeros(E, E)
    for t in range(E):
        Wr[t, t] = 2 * scale
        Wr[(t + 1) % E, t] = scale
    with torch.no_grad():
        layer.lora_router.weight.copy_(Wr)
    return layer, torch.eye(E)


@pytest.mark.parametrize("E, k", [(4, 1), (4, 2), (8, 2), (8, 1)])
def test_aux_loss_is_top_k_at_perfect_balance(E, k):
    """f_j = k/E and mean P_j = 1/E (non-uniform per token) gives aux == top_k."""
    layer, x = _cyclic_layer(E, k)
    layer(x)
    c = layer.reset_expert_counts()
    assert torch.equal(c, torch.full((E,), float(k)))
    probs = layer.route(x)[0]
    assert probs.max() > 0.9                                         # tokens are not uniform
    assert torch.allclose(probs.mean(0), torch.full((E,), 1 / E), atol=1e-6)
    assert layer.last_aux_loss.item() == pytest.approx(k, rel=1e-5)


def test_aux_loss_zero_router_is_top_k():
    """Uniform probabilities give E * sum_j f_j / E = sum_j f_j = top_k whatever the tie-breaking."""
    layer = make_layer(layer_cfg(r=8, num_experts=4, top_k=3)).train()
    with torch.no_grad():
        layer.lora_router.weight.zero_()
    layer(torch.randn(11, N_IN))
    assert layer.last_aux_loss.item() == pytest.approx(3.0, rel=1e-6)


def test_aux_loss_hand_computed_imbalanced():
    """aux = E * sum_j f_j P_j, checked against a hand computation on an imbalanced router."""
    layer, x = _cyclic_layer(4, 2)
    with torch.no_grad():
        layer.lora_router.weight[0] += 6.0                           # expert 0 favoured by all
    layer(x)
    probs = torch.softmax(x @ layer.lora_router.weight.detach().T, dim=-1)
    top = probs.topk(2, dim=-1).indices
    f = torch.stack([(top == j).any(-1).float().mean() for j in range(4)])
    expected = 4 * (f * probs.mean(0)).sum()
    assert f[0] == 1.0 and expected > 2.0                           # imbalance raises the loss
    assert layer.last_aux_loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_aux_loss_layer_token_mask():
    """With a token mask in the routing context, the aux loss and counts use unmasked tokens only;
    with aux_loss_ignore_padding=False the mask is ignored."""
    x = torch.randn(2, 6, N_IN)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 3:] = 0
    for ignore in (True, False):
        torch.manual_seed(1)
        layer = make_layer(layer_cfg(r=8, num_experts=4, top_k=2,
                                     aux_loss_ignore_padding=ignore)).train()
        layer.context.token_mask = mask
        layer(x)
        _, aux_masked = reference_forward(layer, x, token_mask=mask)
        _, aux_all = reference_forward(layer, x)
        top_i = layer.route(x.reshape(-1, N_IN))[2]
        keep = mask.reshape(-1).bool() if ignore else torch.ones(12, dtype=torch.bool)
        assert torch.equal(layer.expert_counts, torch.bincount(top_i[keep].reshape(-1), minlength=4).float())
        want, other = (aux_masked, aux_all) if ignore else (aux_all, aux_masked)
        assert layer.last_aux_loss.item() == pytest.approx(want.item(), rel=1e-6)
        assert abs(layer.last_aux_loss.item() - other.item()) > 1e-4


# --------------------------------------------------------------------------- bf16 base weight
def _bf16_layer(cfg, W=None, n=256):
    base = nn.Linear(n, n).to(torch.bfloat16)
    if W is not None:
        with torch.no_grad():
            base.weight.copy_(W.to(torch.bfloat16))
    layer = GoatLinear(base, cfg, layer_priors(base.weight, cfg, cfg.scale_for(n)))
    return layer, base


def test_bf16_output_within_bf16_gemm_error():
    """bf16 base, fp32 adapters, bf16 input: |y - y64| (y64 = fp64 oracle with fp64 W_res) is of the
    size of the bf16 base GEMM's own error: RMS <= 1.5x, max <= one bf16 ulp of max|y64|.

    (The output is rounded twice, once by the bf16 base GEMM and once at the end, so the max error
    can reach 1 ulp where the base GEMM alone has 0.5 ulp; RMS is about 1.35x. Dropping the
    correction gives ~2x, the official in-place bf16 residual ~1.56x.)"""
    cfg = layer_cfg(r=8, num_experts=8, top_k=2)
    layer, base = _bf16_layer(cfg)
    x = torch.randn(64, 256).to(torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
        assert y.dtype == torch.bfloat16
        y64, _ = reference_forward(f64_copy(layer), x.double(), w_res=reference_w_res(layer))
        err = (y.double() - y64).abs()
        err_base = (base(x).double() - F.linear(x.double(), base.weight.double(),
                                                base.bias.double())).abs()
        # the official layer: residual subtracted in place from the bf16 weight, no correction term
        official = copy.deepcopy(layer)
        official.base_layer.weight += (official.res_B.double() @ official.res_A.double()).to(torch.bfloat16)
        official.res_A = official.res_B = None
        err_official = (official(x).double() - y64).abs()
    rms = lambda e: e.pow(2).mean().sqrt()
    ulp = 2.0 ** (torch.floor(torch.log2(y64.abs().max())) - 7)
    assert err.max() <= ulp * 1.01
    assert rms(err) <= 1.5 * rms(err_base)
    assert rms(err_official) > 1.1 * rms(err)


def test_bf16_residual_correction_is_kept_where_inplace_bf16_loses_it():
    """The official in-place bf16 update W0 -= (c*s*sum B0A0).to(bf16) loses most of the
    correction (> 10% relative error); ours applies it within a few % at the output.

    Construction: milora (bottom components, 0.3 vs 1.0 elsewhere), E=4, rho=5, so the correction
    is ~0.2% of a weight entry (below half a bf16 ulp) but, for inputs in the span of the chosen
    right singular vectors, 1/(E rho) = 5% of the output (several output ulps)."""
    n, E, r = 256, 4, 4
    g = torch.Generator(torch.get_default_device()).manual_seed(0)
    Q1, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    Q2, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    S = torch.ones(n, dtype=torch.float64)
    S[-r:] = 0.3
    cfg = layer_cfg(r=r, num_experts=E, top_k=1, init="milora", rho=5.0)
    layer, base = _bf16_layer(cfg, W=(Q1 * S) @ Q2.T)
    W64 = base.weight.double()
    corr64 = reference_w_res(layer, torch.float64) - W64             # -c*s*sum B0A0, fp64
    # official: in-place subtraction in bf16
    W_off = base.weight.detach().clone()
    W_off -= (-corr64).to(torch.bfloat16)
    applied = W_off.double() - W64
    assert rel_err(applied, corr64) > 0.1
    # ours: experts silenced (B = 0) so the layer is exactly x W_res^T + b
    with torch.no_grad():
        layer.lora_B.zero_()
        Vh = torch.linalg.svd(W64)[2]
        x = ((torch.randn(512, r, dtype=torch.float64, generator=g) @ Vh[-r:]) * 16).to(torch.bfloat16)
        eff = layer(x).double() - base(x).double()
        want = x.double() @ corr64.T
    assert rel_err(eff, want) < 0.08
    assert rel_err(F.linear(x, W_off, base.bias).double() - base(x).double(), want) > 0.15


# --------------------------------------------------------------------------- dropout
def _dropout_layer(compute, p=0.5, E=2):
    """E experts, top_k=E, zero router (weights 1/E), molora with random non-zero B, no residual."""
    layer = make_layer(layer_cfg(r=2 * E, num_experts=E, top_k=E, init="molora", lora_dropout=p,
                                 compute=compute), n=6, m=5)
    with torch.no_grad():
        layer.lora_router.weight.zero_()
        layer.lora_B.normal_()
        layer.lora_A.normal_()
    return layer


def _expert_contribs(layer, x_tok):
    """Per-expert contributions w_i * s * B_i A_i x of one token (no dropout), (E, m)."""
    E = layer.num_experts
    return torch.stack([layer.lora_B[i] @ (layer.lora_A[i] @ x_tok) * layer.scale / E
                        for i in range(E)]).detach()


@pytest.mark.parametrize("compute", ["dense", "grouped"])
def test_dropout_off_in_eval(compute):
    """Eval mode: dropout is off, the output is deterministic and equals the p=0 output."""
    layer = _dropout_layer(compute).eval()
    x = torch.randn(20, 6)
    y = layer(x)
    assert torch.equal(y, layer(x))
    layer.dropout = 0.0
    assert torch.equal(y, layer.train()(x))


@pytest.mark.parametrize("compute, shared", [("dense", True), ("grouped", False)])
def test_dropout_mask_sharing(compute, shared):
    """Tokens with a single non-zero feature: each expert's contribution is kept (x 1/(1-p)) or
    dropped whole. Dense shares one mask per token across experts (delta in {0, sum}); grouped
    draws one per (token, expert) pair (single-expert deltas occur)."""
    p, E, N = 0.5, 2, 400
    layer = _dropout_layer(compute, p, E).train()
    x = torch.zeros(N, 6)
    x[:, 2] = 1.0
    with torch.no_grad():
        delta = layer(x) - layer.base_layer(x)
    c = _expert_contribs(layer, x[0]) / (1 - p)                     # (E, m)
    combos = {mask: sum((c[i] for i in range(E) if mask[i]), torch.zeros(5))
              for mask in itertools.product([0, 1], repeat=E)}
    seen = []
    for d in delta:
        hits = [mk for mk, v in combos.items() if torch.allclose(d, v, atol=1e-5)]
        assert len(hits) == 1, "each token's delta is one of the 2^E keep/drop combinations"
        seen.append(hits[0])
    kinds = set(seen)
    assert {(0, 0), (1, 1)} <= kinds
    mixed = {(0, 1), (1, 0)} & kinds
    assert (not mixed) if shared else (mixed == {(0, 1), (1, 0)})
    # inverted dropout: the mean over tokens estimates the no-dropout contribution
    assert torch.allclose(delta.mean(0), c.sum(0) * (1 - p), rtol=0, atol=0.1 * c.abs().sum(0).max())


@pytest.mark.parametrize("compute", ["dense", "grouped"])
def test_residual_correction_sees_undropped_input(compute):
    """SVD init with B = 0: with dropout in train mode the output is x W_res^T + b, identical to eval
    (the frozen correction is never dropped)."""
    layer = make_layer(layer_cfg(r=8, num_experts=4, top_k=2, lora_dropout=0.5, compute=compute))
    with torch.no_grad():
        layer.lora_B.zero_()
    x = torch.randn(30, N_IN)
    y_train = layer.train()(x)
    y_eval = layer.eval()(x)
    assert torch.allclose(y_train, y_eval, rtol=0, atol=1e-5)
    assert rel_err(y_eval, F.linear(x, reference_w_res(layer, torch.float32), layer.base_layer.bias)) < 1e-5
