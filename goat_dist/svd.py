"""SVD priors of GOAT experts: spectrum segmentation and initial (A0, B0). Pure tensor math.

For a frozen weight W0 (m x n) with SVD U diag(S) Vh, q = min(m, n), expert i of an SVD init gets
the singular components I_i (goat_reference.md section 2) and

    Sigma_hat = S[I_i] / (s * rho)
    A0_i = diag(sqrt(Sigma_hat)) Vh[I_i, :]        (r_e x n)
    B0_i = U[:, I_i] diag(sqrt(Sigma_hat))         (m x r_e)

so that s * B0_i A0_i = U_I diag(S_I) Vh_I / rho: 1/rho of that spectrum slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import RANDOM_INITS, GoatConfig, GoatConfigError


def expert_index_sets(init: str, q: int, num_experts: int, r: int) -> list[list[int]]:
    """Singular-component indices of each expert, exactly as the official code selects them.

    Args:
        init: an SVD init name (goat, goat_mini, pissa, milora, pissa_milora).
        q: min(m, n), the number of singular values.
        num_experts: E.
        r: total rank; each expert gets r_e = r // E components.

    Returns:
        E lists of r_e indices into the descending spectrum.
    """
    E, r_e = num_experts, r // num_experts
    if init in ("goat", "goat_mini"):
        L = q // E  # chunk length
        if L < r_e:
            raise GoatConfigError(
                f"init={init!r}: a spectrum chunk has {L} components (min(m,n)={q} // E={E}) but each "
                f"expert needs r/E={r_e}; lower r or num_experts, or exclude this layer.")
        if init == "goat":
            return [list(range(i * L, i * L + r_e)) for i in range(E)]
        return [list(range((i + 1) * L - r_e, (i + 1) * L)) for i in range(E)]
    if r > q:
        raise GoatConfigError(f"init={init!r} needs r={r} singular components but min(m,n)={q}; "
                              f"lower r or exclude this layer.")
    if init == "pissa":
        flat = list(range(0, r))
    elif init == "milora":
        flat = list(range(q - r, q))
    elif init == "pissa_milora":
        top = r // 2
        flat = list(range(0, top)) + list(range(q - (r - top), q))
    else:
        raise GoatConfigError(f"init={init!r} has no SVD index set")
    return [flat[i * r_e:(i + 1) * r_e] for i in range(E)]


@dataclass
class GoatPriors:
    """Initial expert factors of one layer.

    Attributes:
        A: (E_A, r_e, n) initial A of each expert (E_A = 1 for hydralora's shared A).
        B: (E, m, r_e) initial B of each expert.
        svd_based: whether the priors come from the SVD (and so carry a residual correction).
    """

    A: torch.Tensor
    B: torch.Tensor
    svd_based: bool


def svd_priors(weight: torch.Tensor, cfg: GoatConfig, scale: float) -> GoatPriors:
    """SVD priors of one frozen weight.

    Args:
        weight: W0, (m, n), any float dtype/device; it is not modified.
        cfg: the adapter config (init, r, E, rho, svd_dtype).
        scale: the layer's scaling s.

    Returns:
        GoatPriors with A (E, r_e, n) and B (E, m, r_e) in float32, on weight's device.
    """
    m, n = weight.shape
    q = min(m, n)
    idx = expert_index_sets(cfg.init, q, cfg.num_experts, cfg.r)
    dtype = getattr(torch, cfg.svd_dtype)
    U, S, Vh = torch.linalg.svd(weight.detach().to(dtype), full_matrices=False)
    flat = torch.tensor([i for ids in idx for i in ids], device=weight.device)
    sqrt_s = torch.sqrt(S[flat] / (scale * cfg.rho))  # (r,)
    A = (sqrt_s[:, None] * Vh[flat]).reshape(cfg.num_experts, cfg.expert_rank, n)
    B = (U[:, flat] * sqrt_s[None, :]).reshape(m, cfg.num_experts, cfg.expert_rank).permute(1, 0, 2)
    return GoatPriors(A=A.float().contiguous(), B=B.float().contiguous(), svd_based=True)


def random_priors(cfg: GoatConfig, out_features: int, in_features: int,
                  generator: torch.Generator | None = None, device=None) -> GoatPriors:
    """Non-SVD baselines: kaiming-uniform(a=sqrt(5)) A (fan_in = n, bound 1/sqrt(n)) and zero B.

    ``molora`` draws one A per expert; ``hydralora`` one A shared by all experts.
    """
    assert cfg.init in RANDOM_INITS
    n_a = 1 if cfg.init == "hydralora" else cfg.num_experts
    bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on an (r_e, n) weight
    A = torch.empty(n_a, cfg.expert_rank, in_features, device=device)
    A.uniform_(-bound, bound, generator=generator)
    B = torch.zeros(cfg.num_experts, out_features, cfg.expert_rank, device=device)
    return GoatPriors(A=A, B=B, svd_based=False)


def layer_priors(weight: torch.Tensor, cfg: GoatConfig, scale: float) -> GoatPriors:
    """Priors for one layer from its full weight (m, n): SVD or random by ``cfg.init``."""
    if cfg.init in RANDOM_INITS:
        m, n = weight.shape
        return random_priors(cfg, m, n, device=weight.device)
    return svd_priors(weight, cfg, scale)


def check_layer_fits(cfg: GoatConfig, out_features: int, in_features: int, name: str = "") -> None:
    """Raise GoatConfigError if ``cfg`` cannot adapt an (out x in) linear (e.g. chunk < r/E)."""
    if cfg.init in RANDOM_INITS:
        return
    try:
        expert_index_sets(cfg.init, min(out_features, in_features), cfg.num_experts, cfg.r)
    except GoatConfigError as e:
        where = f" (layer {name!r}, {out_features}x{in_features})" if name else ""
        raise GoatConfigError(f"{e}{where}") from None
