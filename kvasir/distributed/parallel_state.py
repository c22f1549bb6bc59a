"""Who this process is in a tensor x pipeline parallel run, and the collectives it uses.

A ``ParallelState`` is built once per worker process and passed explicitly to the model
and runner (no module-level group registry). World rank ``r`` is
``pp_rank * tp_size + tp_rank``: the ranks of one pipeline stage form a tensor-parallel
group, and the ranks with the same ``tp_rank`` form a pipeline group.

Collectives run through ``torch.distributed``: NCCL on CUDA, gloo on the CPU. For a group
of one rank every collective is the identity, chosen when the group is built, so a
single-process engine runs no collective code and takes no branch for it.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from kvasir.config import ParallelConfig


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class GroupCoordinator:
    """One process group and this rank's place in it.

    ``all_reduce`` sums in place and returns its input; ``all_gather`` concatenates every
    rank's tensor along ``dim`` (in rank order); ``gather`` does so on ``dst`` only (None
    elsewhere). ``ranks`` are world ranks, ``rank_in_group`` indexes them.
    """

    def __init__(self, ranks: list[int], world_rank: int, group: Any) -> None:
        self.ranks = ranks
        self.world_size = len(ranks)
        self.rank_in_group = ranks.index(world_rank)
        self.group = group
        self.all_reduce: Callable[[torch.Tensor], torch.Tensor] = (
            _identity if self.world_size == 1 else self._all_reduce
        )

    @property
    def is_first_rank(self) -> bool:
        return self.rank_in_group == 0

    @property
    def is_last_rank(self) -> bool:
        return self.rank_in_group == self.world_size - 1

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.world_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)

    def gather(self, x: torch.Tensor, dst: int = 0, dim: int = -1) -> torch.Tensor | None:
        if self.world_size == 1:
            return x
        x = x.contiguous()
        is_dst = self.rank_in_group == dst
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if is_dst else None
        dist.gather(x, parts, dst=self.ranks[dst], group=self.group)
        return torch.cat(parts, dim=dim) if parts is not None else None

    def all_to_all(
        self, x: torch.Tensor, send_counts: list[int], recv_counts: list[int]
    ) -> torch.Tensor:
        """Rows ``x[sum(send_counts[:r]):][:send_counts[r]]`` to group rank ``r``; returns
        the rows every rank sent here, in rank order (``sum(recv_counts)`` of them)."""
        if self.world_size == 1:
            return x
        out = x.new_empty((sum(recv_counts), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=self.group)
        return out

    def send(self, x: torch.Tensor, dst: int) -> None:
        """Point to point to group rank ``dst`` (blocking until the peer takes it)."""
        dist.send(x.contiguous(), dst=self.ranks[dst])

    def recv(self, out: torch.Tensor, src: int) -> torch.Tensor:
        """Receive into ``out`` (its shape and dtype must match the sender's) from group
        rank ``src``."""
        dist.recv(out, src=self.ranks[src])
        return out


@dataclass(frozen=True)
class ParallelState:
    """This rank's tensor-parallel and pipeline-parallel groups and its device."""

    tp: GroupCoordinator
    pp: GroupCoordinator
    device: torch.device
    world_rank: int = 0

    @property
    def tp_rank(self) -> int:
        return self.tp.rank_in_group

    @property
    def tp_size(self) -> int:
        return self.tp.world_size

    @property
    def pp_rank(self) -> int:
        return self.pp.rank_in_group

    @property
    def pp_size(self) -> int:
        return self.pp.world_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp.is_first_rank

    @property
    def is_last_stage(self) -> bool:
        return self.pp.is_last_rank

    @property
    def is_output_rank(self) -> bool:
        """The rank whose sampled tokens go back to the engine: the last stage's TP 0."""
        return self.is_last_stage and self.tp_rank == 0


def single_process_state(device: torch.device) -> ParallelState:
    """The state of an engine of one rank: every collective is the identity."""
    return ParallelState(
        GroupCoordinator([0], 0, None), GroupCoordinator([0], 0, None), torch.device(device)
    )


def init_parallel_state(
    config: ParallelConfig,
    world_rank: int,
    init_method: str,
    device: torch.device,
) -> ParallelState:
    """Join the process group (all ranks call this with the same ``init_method``) and
    build this rank's TP and PP groups. NCCL on CUDA, gloo otherwise; every collective
    fails after ``config.distributed_timeout`` seconds instead of waiting forever."""
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    world = tp * pp
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=config.distributed_timeout)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method=init_method, world_size=world, rank=world_rank, timeout=timeout
    )
    tp_group = pp_group = None
    tp_ranks = pp_ranks = [world_rank]
    # Every rank must create every group, in the same order.
    for stage in range(pp):
        ranks = list(range(stage * tp, (stage + 1) * tp))
        g = dist.new_group(ranks, timeout=timeout) if tp > 1 else None
        if world_rank in ranks:
            tp_group, tp_ranks = g, ranks
    for tp_rank in range(tp):
        ranks = list(range(tp_rank, world, tp))
        g = dist.new_group(ranks, timeout=timeout) if pp > 1 else None
        if world_rank in ranks:
            pp_group, pp_ranks = g, ranks
    return ParallelState(
        GroupCoordinator(tp_ranks, world_rank, tp_group),
        GroupCoordinator(pp_ranks, world_rank, pp_group),
        torch.device(device),
        world_rank,
    )


def loopback_ifname() -> str:
    """The loopback interface, for gloo when every rank is on this host (gloo otherwise
    picks the interface its hostname resolves to, which may not exist in a container)."""
    try:
        names = os.listdir("/sys/class/net")
    except OSError:
        return "lo"
    return "lo" if "lo" in names else (names[0] if names else "lo")


def destroy_parallel_state() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class IntermediateTensors(NamedTuple):
    """What a pipeline stage hands the next one: the residual stream in two parts."""

    hidden_states: torch.Tensor  # [num_tokens, hidden_size]
    residual: torch.Tensor  # [num_tokens, hidden_size]
