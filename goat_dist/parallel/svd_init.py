"""Distributed SVD initialiser: every GOAT layer's SVD once per job, cached across jobs.

The official code runs every SVD on every rank (224 full SVDs per rank for Llama-2-7B). Here:

* layers are assigned to ranks by longest-processing-time first on the cost m * n * min(m, n),
  so the slowest rank's share is balanced;
* the owner of a layer gets the full weight: its own copy when weights are replicated, or, when
  ZeRO-3 partitioned them, the other ranks' flat shards sent to it with one ``dist.gather`` (no
  other rank ever materialises that weight, and an owner holds one full weight at a time);
* the owner computes the priors (or reads them from the cache); at the end every owner
  broadcasts all its priors in one message. Every rank needs a layer's full priors for its
  residual correction (rank r = E * r_e); a rank keeps as trainable parameters only the experts
  it holds (expert parallelism slices them in GoatLinear);
* the cache key is the SHA-256 of the weight's bytes plus everything the priors depend on
  (init, r, E, rho, the layer's scale, SVD dtype), so a changed checkpoint or config never hits
  a stale entry. Entries are written atomically.

The result is identical to the one-process initialiser (same SVD code on the same weight).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import RANDOM_INITS, GoatConfig
from ..svd import GoatPriors, layer_priors


def assign_owners(shapes: dict[str, tuple[int, int]], world: int) -> dict[str, int]:
    """Longest-processing-time-first assignment of layers to ranks by SVD cost m*n*min(m,n)."""
    load = [0] * world
    owner = {}
    for name in sorted(shapes, key=lambda n: (-_cost(shapes[n]), n)):
        r = min(range(world), key=lambda i: (load[i], i))
        owner[name] = r
        load[r] += _cost(shapes[name])
    return owner


def _cost(shape: tuple[int, int]) -> int:
    m, n = shape
    return m * n * min(m, n)


def cache_key(weight: torch.Tensor, cfg: GoatConfig, scale: float) -> str:
    """Content key of a layer's priors: the weight's bytes + every field the priors depend on."""
    w = weight.detach().contiguous().cpu()
    h = hashlib.sha256()
    h.update(json.dumps({"shape": list(w.shape), "dtype": str(w.dtype), "init": cfg.init,
                         "r": cfg.r, "E": cfg.num_experts, "rho": cfg.rho, "scale": repr(scale),
                         "svd_dtype": cfg.svd_dtype, "v": 1}, sort_keys=True).encode())
    h.update(w.reshape(-1).view(torch.uint8).numpy())   # the raw bytes, whatever the dtype
    return h.hexdigest()


class PriorCache:
    """On-disk cache of layer priors: ``<dir>/<key>.safetensors`` holding A and B."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, f"{key}.safetensors")

    def get(self, key: str) -> Optional[GoatPriors]:
        from safetensors.torch import load_file
        path = self._path(key)
        if not os.path.isfile(path):
            return None
        try:
            t = load_file(path)
        except Exception:  # a damaged entry is a miss, recomputed and rewritten
            return None
        return GoatPriors(A=t["A"], B=t["B"], svd_based=True)

    def put(self, key: str, priors: GoatPriors) -> None:
        from safetensors.torch import save_file
        os.makedirs(self.directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".safetensors", dir=self.directory)
        os.close(fd)
        save_file({"A": priors.A.contiguous(), "B": priors.B.contiguous()}, tmp)
        os.replace(tmp, self._path(key))


@dataclass
class InitStats:
    """What this rank did: SVDs computed, cache hits, layers owned."""

    svd_computed: int = 0
    cache_hits: int = 0
    layers_owned: list[str] = field(default_factory=list)


def _full_weight_on_owner(w: nn.Parameter, owner: int, rank: int, world: int) -> Optional[torch.Tensor]:
    """The full weight on ``owner`` (None elsewhere). Collective when ZeRO-3 partitioned it."""
    if not hasattr(w, "ds_id"):
        return w.detach() if rank == owner else None
    shard = w.ds_tensor.detach().reshape(-1).to("cpu", torch.float32).contiguous()
    parts = [torch.empty_like(shard) for _ in range(world)] if rank == owner else None
    dist.gather(shard, parts, dst=owner)
    if rank != owner:
        return None
    flat = torch.cat(parts)[: w.ds_numel]
    return flat.view(w.ds_shape)


class DistributedSVDInitializer:
    """Computes every target layer's priors once per job; use as ``get_goat_model``'s priors_fn.

    Args:
        model: the model (replicated or ZeRO-3 partitioned), before injection.
        cfg: the adapter config.
        names: target linear names (goat_dist.model.find_target_modules), same on every rank.
        cache_dir: prior cache folder, or None for no cache.

    ``run()`` is collective; afterwards ``__call__`` serves each layer's priors.
    """

    def __init__(self, model: nn.Module, cfg: GoatConfig, names: list[str],
                 cache_dir: Optional[str] = None) -> None:
        self.model, self.cfg, self.names = model, cfg, list(names)
        self.cache = PriorCache(cache_dir) if cache_dir else None
        self.priors: dict[str, GoatPriors] = {}
        self.stats = InitStats()

    def run(self) -> "DistributedSVDInitializer":
        if self.cfg.init in RANDOM_INITS:
            return self   # nothing to compute: priors are drawn per layer (seeded) on demand
        distributed = dist.is_available() and dist.is_initialized()
        rank = dist.get_rank() if distributed else 0
        world = dist.get_world_size() if distributed else 1
        layers = {n: self.model.get_submodule(n) for n in self.names}
        shapes = {n: (l.out_features, l.in_features) for n, l in layers.items()}
        owner = assign_owners(shapes, world)
        queues = [sorted((n for n in self.names if owner[n] == r), key=lambda n: -_cost(shapes[n]))
                  for r in range(world)]
        self.stats.layers_owned = queues[rank]
        for j in range(max(len(q) for q in queues)):
            round_layers = [q[j] if j < len(q) else None for q in queues]
            mine = None
            for r, name in enumerate(round_layers):     # each owner collects its weight
                if name is None:
                    continue
                full = _full_weight_on_owner(layers[name].weight, r, rank, world) \
                    if distributed else layers[name].weight.detach()
                if r == rank:
                    mine = (name, full)
            if mine is not None:                         # owners compute in parallel
                self.priors[mine[0]] = self._compute(mine[0], mine[1], layers[mine[0]])
        if distributed:
            # One broadcast per owner at the end (not two per layer per round): no rank waits
            # for the slowest SVD of every round, and the small messages are merged.
            for r in range(world):
                self._broadcast_owned(queues[r], shapes, r, rank)
        return self

    def _compute(self, name: str, weight: torch.Tensor, layer: nn.Linear) -> GoatPriors:
        scale = self.cfg.scale_for(layer.in_features)
        key = cache_key(weight, self.cfg, scale) if self.cache else None
        if key is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.stats.cache_hits += 1
                return hit
        pri = layer_priors(weight.float().cpu(), self.cfg, scale)
        self.stats.svd_computed += 1
        if key is not None:
            self.cache.put(key, pri)
        return pri

    def _broadcast_owned(self, names: list[str], shapes: dict[str, tuple[int, int]], src: int,
                         rank: int) -> None:
        """Send every prior rank ``src`` owns to all ranks in one flat fp32 broadcast."""
        if not names:
            return
        E, r_e = self.cfg.num_experts, self.cfg.expert_rank
        sizes = []
        for name in names:
            m, n = shapes[name]
            sizes += [(E, r_e, n), (E, m, r_e)]
        if rank == src:
            flat = torch.cat([t.reshape(-1).float() for name in names
                              for t in (self.priors[name].A, self.priors[name].B)])
        else:
            flat = torch.empty(sum(a * b * c for a, b, c in sizes))
        dist.broadcast(flat, src)
        if rank == src:
            return
        parts = flat.split([a * b * c for a, b, c in sizes])
        for i, name in enumerate(names):
            self.priors[name] = GoatPriors(A=parts[2 * i].view(sizes[2 * i]).clone(),
                                           B=parts[2 * i + 1].view(sizes[2 * i + 1]).clone(),
                                           svd_based=True)

    def __call__(self, name: str, base: nn.Linear, cfg: GoatConfig, scale: float) -> GoatPriors:
        if cfg.init in RANDOM_INITS:
            return layer_priors(torch.empty(base.out_features, base.in_features), cfg, scale)
        return self.priors[name]
