"""GoatConfig: every knob of a GOAT adapter, validated at construction.

Vocabulary follows peft (``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``,
``modules_to_save``) so a peft user can read a config without a manual. The method's own knobs
(``num_experts``, ``top_k``, ``init``, ``scaling``, ``rho``, ``init_cof``, ``aux_loss_coef``) follow
goat_reference.md; where the official code reads environment variables (ETA, SCALING) they are
fields here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

SVD_INITS = ("goat", "goat_mini", "pissa", "milora", "pissa_milora")
RANDOM_INITS = ("molora", "hydralora")
INITS = SVD_INITS + RANDOM_INITS
SCALINGS = ("lora", "rslora", "goat")
COMPUTE_PATHS = ("auto", "dense", "grouped")


class GoatConfigError(ValueError):
    """An invalid GOAT configuration. The message names the field and how to fix it."""


@dataclass
class GoatConfig:
    """Configuration of the GOAT adapters injected into a model.

    Attributes:
        r: total LoRA rank of one adapted linear, summed over experts. Each expert gets
            ``r_e = r // num_experts``; ``r`` must be divisible by ``num_experts`` (the official
            code silently drops the remainder; we refuse it).
        lora_alpha: alpha of the ``lora``/``rslora`` scalings.
        num_experts: E, the number of low-rank experts per adapted linear.
        top_k: experts activated per token (1 <= top_k <= E). Gate weights are renormalised
            over the selected experts, as in the official code.
        init: expert initialisation. SVD-based: ``goat`` (first r_e components of each of E
            equal spectrum chunks; the paper's method), ``goat_mini`` (last r_e of each chunk),
            ``pissa`` (top r components split contiguously), ``milora`` (bottom r components),
            ``pissa_milora`` (top r/2 and bottom r/2). Random: ``molora`` (kaiming-uniform A,
            zero B per expert), ``hydralora`` (one shared kaiming A, E zero B's).
        scaling: ``lora`` (s = alpha / r_e, the official default: 16 in every paper run),
            ``rslora`` (alpha / sqrt(r_e)), ``goat`` (s = sqrt(3 * eta * n / r_e), the paper's
            theoretical factor, n = in_features, so it differs per layer), or a number.
            Note: the official code hard-codes s = 2 for ``pissa``; pass ``scaling=2`` for that.
        eta: learning-rate ratio in the ``goat`` scaling (official env var ETA).
        rho: the adapter of an SVD init holds 1/rho of its spectrum slice (official: 10).
        init_cof: residual coefficient, W_res = W0 - init_cof * s * sum_i B_i A_i.
            ``None`` means 1/E (the official default, which makes the layer equal W0 in
            expectation under uniform routing).
        lora_dropout: dropout on the adapter input. See kernels.py for how each compute path
            draws its masks.
        target_modules: module names (suffix match, as in peft) or ``"all-linear"`` (every
            nn.Linear except the output embedding and ``modules_to_save``).
        exclude_modules: names (suffix match) never adapted, even if targeted.
        modules_to_save: modules trained in full and saved with the adapter (a task head such
            as ``classifier`` or ``score``).
        aux_loss_coef: coefficient of the router load-balancing loss, summed over layers.
        aux_loss_ignore_padding: exclude padding tokens (attention_mask == 0) from the router
            statistics. The official code includes them; True is the improvement.
        compute: ``dense`` (two GEMMs over all E*r_e ranks, masked; no gather, no host sync),
            ``grouped`` (tokens sorted by expert, one grouped GEMM; costs k*r_e per token), or
            ``auto`` (dense unless r >= ``grouped_min_rank`` and top_k < E).
        grouped_min_rank: the total rank from which ``auto`` picks the grouped path.
        svd_dtype: dtype name of the SVD ("float32" as the official code, or "float64").
    """

    r: int = 8
    lora_alpha: float = 16.0
    num_experts: int = 8
    top_k: int = 2
    init: str = "goat"
    scaling: Union[str, float] = "lora"
    eta: float = 1.0
    rho: float = 10.0
    init_cof: Optional[float] = None
    lora_dropout: float = 0.05
    target_modules: Union[str, list[str]] = "all-linear"
    exclude_modules: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    aux_loss_coef: float = 1e-3
    aux_loss_ignore_padding: bool = True
    compute: str = "auto"
    grouped_min_rank: int = 256
    svd_dtype: str = "float32"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self.exclude_modules = list(self.exclude_modules)
        self.modules_to_save = list(self.modules_to_save)
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        def bad(msg: str) -> None:
            raise GoatConfigError(msg)

        for name in ("r", "num_experts", "top_k", "grouped_min_rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(f"GoatConfig.{name} must be a positive integer, got {v!r}")
        if self.r % self.num_experts != 0:
            bad(f"GoatConfig.r={self.r} is not divisible by num_experts={self.num_experts}: every "
                f"expert needs the same rank r/E. Use r a multiple of {self.num_experts} "
                f"(e.g. r={self.num_experts * max(1, self.r // self.num_experts)}).")
        if self.top_k > self.num_experts:
            bad(f"GoatConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}; "
                f"choose 1 <= top_k <= num_experts.")
        if self.init not in INITS:
            bad(f"GoatConfig.init={self.init!r} is unknown; choose one of {', '.join(INITS)}.")
        if isinstance(self.scaling, bool):
            bad(f"GoatConfig.scaling must be one of {SCALINGS} or a positive number, got {self.scaling!r}")
        if isinstance(self.scaling, str):
            try:  # YAML/CLI may hand numbers over as strings
                self.scaling = float(self.scaling)
            except ValueError:
                if self.scaling not in SCALINGS:
                    bad(f"GoatConfig.scaling={self.scaling!r} is unknown; choose one of "
                        f"{', '.join(SCALINGS)} or a positive number.")
        if isinstance(self.scaling, (int, float)):
            if not math.isfinite(self.scaling) or self.scaling <= 0:
                bad(f"GoatConfig.scaling must be positive and finite, got {self.scaling!r}")
            self.scaling = float(self.scaling)
        for name in ("lora_alpha", "eta", "rho"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                bad(f"GoatConfig.{name} must be a positive number, got {v!r}")
        if self.init_cof is not None and (not isinstance(self.init_cof, (int, float))
                                          or not math.isfinite(self.init_cof) or self.init_cof < 0):
            bad(f"GoatConfig.init_cof must be >= 0 (or null for 1/E), got {self.init_cof!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            bad(f"GoatConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.aux_loss_coef, (int, float)) or isinstance(self.aux_loss_coef, bool) \
                or not math.isfinite(self.aux_loss_coef) or self.aux_loss_coef < 0:
            bad(f"GoatConfig.aux_loss_coef must be >= 0, got {self.aux_loss_coef!r}")
        if self.compute not in COMPUTE_PATHS:
            bad(f"GoatConfig.compute={self.compute!r} is unknown; choose one of {', '.join(COMPUTE_PATHS)}.")
        if self.svd_dtype not in ("float32", "float64"):
            bad(f"GoatConfig.svd_dtype must be 'float32' or 'float64', got {self.svd_dtype!r}")
        tm = self.target_modules
        if isinstance(tm, str):
            if tm != "all-linear":
                bad(f"GoatConfig.target_modules={tm!r}: give a list of module names "
                    f"(e.g. ['q_proj', 'v_proj']) or 'all-linear'.")
        elif not tm or not all(isinstance(t, str) and t for t in tm):
            bad("GoatConfig.target_modules must be a non-empty list of module names or 'all-linear'.")
        if self.init == "pissa_milora" and self.r < 2:
            bad("GoatConfig.init='pissa_milora' needs r >= 2 (half top, half bottom components).")

    # ------------------------------------------------------------------ derived values
    @property
    def expert_rank(self) -> int:
        """r_e = r / E, the rank of one expert."""
        return self.r // self.num_experts

    @property
    def residual_coef(self) -> float:
        """init_cof, with ``None`` resolved to the official 1/E."""
        return 1.0 / self.num_experts if self.init_cof is None else float(self.init_cof)

    def scale_for(self, in_features: int) -> float:
        """The scaling s of a layer with ``in_features`` inputs (only ``goat`` depends on it)."""
        r_e = self.expert_rank
        if isinstance(self.scaling, float):
            return self.scaling
        if self.scaling == "lora":
            return self.lora_alpha / r_e
        if self.scaling == "rslora":
            return self.lora_alpha / math.sqrt(r_e)
        return math.sqrt(3.0 * self.eta * in_features / r_e)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GoatConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise GoatConfigError(f"unknown GoatConfig field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
