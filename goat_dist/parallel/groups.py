"""Expert-parallel process groups, taken from DeepSpeed's MoE group machinery.

With world size W and expert-parallel degree P, DeepSpeed's E+D layout gives
    expert-parallel (EP) groups      [0..P-1], [P..2P-1], ...     tokens travel inside these
    expert-data-parallel (EDP) groups [0, P, 2P, ...], [1, P+1, ...] replicas of the same experts
so goat_dist's topology is exactly the one a DeepSpeed MoE model would get.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass
class ExpertParallelGroups:
    """Where this rank sits in the expert-parallel topology.

    Attributes:
        ep_size: P, ranks sharing one copy of every layer's experts.
        ep_rank: this rank's index inside its EP group; it holds experts
            [ep_rank * E/P, (ep_rank + 1) * E/P) of every GOAT layer.
        ep_group: the EP process group (all-to-all of tokens).
        edp_group: the expert-data-parallel group (all-reduce of expert gradients).
        edp_size: W / P.
        world_size: W, the data-parallel world of the dense parameters.
    """

    ep_size: int
    ep_rank: int
    ep_group: Any
    edp_group: Any
    edp_size: int
    world_size: int

    def expert_range(self, num_experts: int) -> tuple[int, int]:
        n_local = num_experts // self.ep_size
        return self.ep_rank * n_local, (self.ep_rank + 1) * n_local


def create_expert_parallel_groups(ep_size: int, num_experts: int) -> ExpertParallelGroups:
    """Create (or reuse) DeepSpeed's ``ep_size_<P>`` groups. Collective: every rank calls it.

    Raises:
        ValueError: ep_size does not divide the number of experts or the world size.
    """
    from deepspeed.utils import groups

    world = dist.get_world_size()
    if ep_size < 1 or num_experts % ep_size:
        raise ValueError(f"train.ep_size={ep_size} must divide goat.num_experts={num_experts}")
    if world % ep_size:
        raise ValueError(f"train.ep_size={ep_size} must divide the world size {world} "
                         f"(number of processes); launch a multiple of {ep_size} ranks")
    name = f"ep_size_{ep_size}"
    if name not in groups._EXPERT_PARALLEL_GROUP:
        groups._create_expert_and_data_parallel(ep_size)
    ep_group = groups._get_expert_parallel_group(name)
    edp_group = groups._get_expert_data_parallel_group(name)
    return ExpertParallelGroups(ep_size=ep_size, ep_rank=dist.get_rank(group=ep_group),
                                ep_group=ep_group, edp_group=edp_group,
                                edp_size=dist.get_world_size(group=edp_group), world_size=world)
