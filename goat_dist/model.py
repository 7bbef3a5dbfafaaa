"""Inject GOAT adapters into a Hugging Face (or any torch) model, and take them out again.

    goat = get_goat_model(model, GoatConfig(r=32, lora_alpha=64, num_experts=8, top_k=2,
                                            target_modules=["q_proj", "v_proj"]))
    out = goat(input_ids=..., attention_mask=..., labels=...)
    loss = out.loss + goat.aux_loss()
    goat.save_adapter("adapter/")                      # see adapter_io.py
    original = goat.unload()                           # the untouched base model

Targets are nn.Linear modules matched by name suffix (peft's rule) or "all-linear" (every
nn.Linear but the output embedding and the modules to save). Everything else is frozen; only the
experts, routers and ``modules_to_save`` train.
"""

from __future__ import annotations

import inspect
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn

from .config import GoatConfig, GoatConfigError
from .layer import GoatLinear, RoutingContext
from .svd import GoatPriors, check_layer_fits, layer_priors

# priors_fn(name, base_linear, cfg, scale) -> GoatPriors. The default computes the SVD locally;
# the trainer passes a ZeRO-3-aware (gathering) or distributed one.
PriorsFn = Callable[[str, nn.Linear, GoatConfig, float], GoatPriors]


def default_priors(name: str, base: nn.Linear, cfg: GoatConfig, scale: float) -> GoatPriors:
    """The layer's SVD priors, computed here.

    A weight partitioned by ZeRO-3 (``zero.Init``, e.g. a model loaded after a Trainer's
    ``TrainingArguments(deepspeed=<stage 3>)``) is gathered for the SVD and released again; every
    rank then computes the same priors. This is a collective: all ranks adapt the same layers in
    the same order (get_goat_model does). goat_dist's launcher uses the distributed initialiser
    instead (each SVD once per job, owner-only gather, cache).
    """
    if hasattr(base.weight, "ds_id"):
        import deepspeed
        with deepspeed.zero.GatheredParameters([base.weight], modifier_rank=None):
            return layer_priors(base.weight.detach().clone(), cfg, scale)
    return layer_priors(base.weight, cfg, scale)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _under(name: str, prefixes: Iterable[str]) -> bool:
    """Whether module/parameter ``name`` is one of ``prefixes`` or inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def saved_module_prefixes(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Full names of the modules matched by ``modules_to_save`` patterns (suffix match)."""
    patterns = list(patterns)
    return [n for n, _ in model.named_modules() if n and _matches(n, patterns)]


def find_target_modules(model: nn.Module, cfg: GoatConfig) -> list[str]:
    """Names of the nn.Linear modules ``cfg`` adapts, in module order.

    Linears inside ``modules_to_save`` (trained in full) and ``exclude_modules`` and the output
    embedding are never adapted.

    Raises:
        GoatConfigError: if a named target does not exist or is not an nn.Linear.
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    keep_full = saved_module_prefixes(model, cfg.modules_to_save)
    excluded = saved_module_prefixes(model, cfg.exclude_modules)
    skip = {n for n, m in linears.items()
            if m is out_emb or _under(n, keep_full) or _under(n, excluded)}
    if cfg.target_modules == "all-linear":
        names = [n for n in linears if n not in skip]
    else:
        names = [n for n in linears if n not in skip and _matches(n, cfg.target_modules)]
        found = {p for p in cfg.target_modules for n in names if _matches(n, [p])}
        missing = [p for p in cfg.target_modules if p not in found]
        if missing:
            others = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise GoatConfigError(f"target_modules {missing} match no nn.Linear in the model; "
                                  f"linear module names present: {others}")
    if not names:
        raise GoatConfigError("no module to adapt: target_modules selected no nn.Linear")
    return names


class GoatModel(nn.Module):
    """A model whose target linears are GoatLinear layers.

    Attribute access falls through to the wrapped model (``config``, ``generate`` ...).

    Attributes:
        model: the wrapped model.
        goat_config: the GoatConfig.
        goat_layers: name -> GoatLinear, in module order (names relative to ``model``).
    """

    def __init__(self, model: nn.Module, cfg: GoatConfig, layers: dict[str, GoatLinear],
                 context: RoutingContext, saved_requires_grad: dict[str, bool]) -> None:
        super().__init__()
        self.model = model
        self.goat_config = cfg
        self._layers = layers            # plain dict: the modules are registered inside model
        self._context = context
        self._saved_requires_grad = saved_requires_grad

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)

    @property
    def goat_layers(self) -> dict[str, GoatLinear]:
        return self._layers

    def _attention_mask(self, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        if "attention_mask" in kwargs or len(args) < 2:
            return kwargs.get("attention_mask")
        try:  # passed positionally: bind against the wrapped model's signature
            bound = inspect.signature(self.model.forward).bind_partial(*args, **kwargs)
        except TypeError:
            return None
        return bound.arguments.get("attention_mask")

    def forward(self, *args, **kwargs):
        self._context.token_mask = self._attention_mask(args, kwargs)
        try:
            return self.model(*args, **kwargs)
        finally:
            self._context.token_mask = None

    def generate(self, *args, **kwargs):
        self._context.token_mask = self._attention_mask(args, kwargs)
        try:
            return self.model.generate(*args, **kwargs)
        finally:
            self._context.token_mask = None

    def aux_loss(self) -> torch.Tensor:
        """aux_loss_coef * sum over layers of the last training forward's load-balancing loss."""
        losses = [l.last_aux_loss for l in self._layers.values() if l.last_aux_loss is not None]
        if not losses:
            return torch.zeros(())
        return self.goat_config.aux_loss_coef * torch.stack(losses).sum()

    def reset_expert_counts(self) -> dict[str, torch.Tensor]:
        """Per-layer expert selection counts accumulated since the last call, (E,) each."""
        return {n: l.reset_expert_counts() for n, l in self._layers.items()}

    def saved_module_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters of ``modules_to_save`` (trained in full, saved with the adapter)."""
        prefixes = saved_module_prefixes(self.model, self.goat_config.modules_to_save)
        return {n: p for n, p in self.model.named_parameters() if _under(n, prefixes)}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Trainable registered parameters (what the DeepSpeed engine optimises)."""
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def expert_parallel(self):
        """The expert-parallel dispatcher shared by the layers, or None (experts replicated)."""
        return next(iter(self._layers.values())).expert_parallel if self._layers else None

    def expert_shard_parameters(self) -> list[nn.Parameter]:
        """Expert shards held outside the module's registered parameters (expert parallelism)."""
        if self.expert_parallel is None:
            return []
        return [p for l in self._layers.values() for p in (l.lora_A, l.lora_B)]

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) numbers of parameters (ZeRO-3 aware via ds_numel)."""
        def numel(p):
            return getattr(p, "ds_numel", p.numel())
        shards = sum(p.numel() for p in self.expert_shard_parameters())
        tr = sum(numel(p) for p in self.parameters() if p.requires_grad) + shards
        total = sum(numel(p) for p in self.parameters()) + shards
        return tr, total

    def save_adapter(self, path: str, **kwargs) -> None:
        from .adapter_io import save_adapter
        save_adapter(self, path, **kwargs)

    # ------------------------------------------------------------- peft's names and semantics
    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """peft's name for save_adapter: writes the adapter folder only, never the base weights.

        Defined here so that attribute fall-through does not reach the wrapped model's
        ``save_pretrained`` (which would write the whole base model with GOAT modules in it).
        """
        self.save_adapter(save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, is_trainable: bool = False) -> "GoatModel":
        """Load the adapter folder ``model_id`` onto ``model`` (the original base model), as
        ``peft.PeftModel.from_pretrained(model, model_id)`` does.

        Like peft, the result is for inference unless ``is_trainable=True``: every parameter is
        frozen and the model is put in eval mode. With ``is_trainable=True`` the experts, routers
        and ``modules_to_save`` train (what :func:`goat_dist.load_adapter` returns).

        Raises:
            goat_dist.AdapterLoadError: missing/corrupt files, or an adapter for another model.
        """
        from .adapter_io import load_adapter
        goat = load_adapter(model, model_id)
        if not is_trainable:
            for p in goat.parameters():
                p.requires_grad_(False)
            goat.eval()
        return goat

    def get_base_model(self) -> nn.Module:
        """The wrapped model, with its GOAT layers in place (peft's name)."""
        return self.model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, as peft's method of the same name (ZeRO-3 aware)."""
        return self.parameter_counts()

    def print_trainable_parameters(self) -> None:
        """Print peft's line: ``trainable params: T || all params: A || trainable%: P``.

        "all" counts the base model, the adapter and the frozen residual factors' parameters;
        res_A/res_B are buffers (frozen), so they are not counted, as peft does not count buffers.
        """
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    def unload(self) -> nn.Module:
        """Remove every GOAT layer and return the original model (base weights were never touched)."""
        for name, layer in self._layers.items():
            _set_submodule(self.model, name, layer.base_layer)
        for n, p in self.model.named_parameters():
            if n in self._saved_requires_grad:
                p.requires_grad_(self._saved_requires_grad[n])
        self._layers = {}
        return self.model


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def get_goat_model(model: nn.Module, cfg: GoatConfig, priors_fn: Optional[PriorsFn] = None,
                   expert_parallel=None) -> GoatModel:
    """Freeze ``model`` and replace its target linears with GoatLinear layers.

    Every target is validated before anything is changed, so a config that does not fit the
    model raises GoatConfigError and leaves the model untouched.

    Args:
        model: the model to adapt (modified in place: target linears are swapped).
        cfg: the adapter config.
        priors_fn: computes each layer's priors; defaults to a local SVD of the weight.
        expert_parallel: an object that runs a layer's experts across ranks (see
            parallel/dispatch.py: ``offset``, ``num_local``, ``run_experts``); each layer then
            keeps only experts [offset, offset + num_local). None: all experts on every rank.
    """
    if isinstance(model, GoatModel):
        raise GoatConfigError("the model already has GOAT adapters; unload() them first")
    names = find_target_modules(model, cfg)
    for n in names:
        lin = model.get_submodule(n)
        shape = getattr(lin.weight, "ds_shape", lin.weight.shape)
        check_layer_fits(cfg, shape[0], shape[1], n)
    for p in cfg.modules_to_save:
        if not saved_module_prefixes(model, [p]):
            raise GoatConfigError(f"modules_to_save entry {p!r} matches no module of the model")
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    keep_full = saved_module_prefixes(model, cfg.modules_to_save)
    for n, p in model.named_parameters():
        p.requires_grad_(_under(n, keep_full))
    priors_fn = priors_fn or default_priors
    context = RoutingContext()
    layers: dict[str, GoatLinear] = {}
    for n in names:
        base = model.get_submodule(n)
        scale = cfg.scale_for(base.in_features)
        layer = GoatLinear(base, cfg, priors_fn(n, base, cfg, scale), context, expert_parallel)
        _set_submodule(model, n, layer)
        layers[n] = layer
    return GoatModel(model, cfg, layers, context, saved)
