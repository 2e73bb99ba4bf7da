"""Data parallelism over specimens: which rank solves which specimens, and the reductions.

A fit's cost is the material solves, one per specimen (and per particle, Hessian direction
or trajectory point), and specimens meet only through the global sites. So each rank of a
``torch.distributed`` group solves a shard of the specimens and the ranks add up what the
global sites see. Two autograd operations carry that:

* :meth:`Shard.copy_to_shard` -- forward: a full tensor's entries of this rank's specimens;
  backward: the gradient put back into the full shape and all-reduced (summed), so that a
  global parameter's gradient collects every shard's share;
* :meth:`Shard.reduce_from_shard` -- forward: all-reduce (sum) of a per-rank tensor;
  backward: identity, because every rank computes the same loss from the sum.

With both, every rank holds the same global values, the same log density and the same
gradient, and Pyro's MAP, Laplace, SVI and NUTS code runs unchanged on every rank, drawing
the same random numbers from the same seed. A rank that is not the writer (rank 0) writes no
file and shows no progress.

Nothing here is global state: a :class:`Communicator` (this process's rank in its group) is
made once by the command line (:func:`from_environment`) and passed down explicitly; a
:class:`Shard` is derived from it for one set of specimens. Without a communicator (a single
process) none of this runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist

#: How long a rank waits for the others in one collective before the job fails. A peer that
#: died is normally noticed at once (its connection closes); this bounds a peer that hangs.
TIMEOUT = timedelta(minutes=30)

#: A tensor of two or more elements whose copies on all ranks hold at most this many
#: elements in all is reduced by gathering every rank's copy and reducing them here, in
#: rank order; a single value or a larger tensor by the backend's all-reduce. Reason: the
#: reductions of a fit are small (a log density, a gradient, a solve report), and on the
#: 2-core machine gloo's all-reduce of 8 to 1000 float64 values took 2.2-3.6x as long as
#: the gather and the sum, of one value 0.37x (``benchmarks/collectives.py``); a gather's
#: memory grows with the number of ranks.
GATHER_ELEMENTS = 1 << 16


def gathered_reduction(tensor: torch.Tensor, op, world: int, group=None) -> torch.Tensor:
    """The sum (``op`` SUM) or maximum (MAX) over the ``world`` ranks of the contiguous
    ``tensor``: every rank's copy gathered by torch's single-tensor all-gather
    (``all_gather_single`` from torch 2.13, which deprecates the older name) and reduced here
    in rank order, so the same bits on every rank."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    copies = tensor.new_empty(world * tensor.numel())
    gather(copies, tensor.reshape(-1), group=group)
    copies = copies.view(world, *tensor.shape)
    return copies.sum(dim=0) if op == dist.ReduceOp.SUM else copies.amax(dim=0)


@dataclass(frozen=True)
class Communicator:
    """This process's place in a ``torch.distributed`` process group (``group`` None: the
    default group)."""

    rank: int
    world: int
    group: Any = None

    @property
    def writer(self) -> bool:
        """Whether this rank writes files and shows progress (rank 0)."""
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``tensor`` (a new tensor; no autograd), the same bits on
        every rank."""
        return self._reduce(tensor, dist.ReduceOp.SUM)

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise maximum over ranks of ``tensor`` (a new tensor; no autograd)."""
        return self._reduce(tensor, dist.ReduceOp.MAX)

    def _reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        tensor = tensor.detach().contiguous()
        if tensor.numel() < 2 or tensor.numel() * self.world > GATHER_ELEMENTS:
            out = tensor.clone()
            dist.all_reduce(out, op=op, group=self.group)
            return out
        return gathered_reduction(tensor, op, self.world, self.group)

    def barrier(self) -> None:
        """Wait for every rank (e.g. before rank 0 overwrites a file the others read)."""
        dist.barrier(group=self.group)

    def shard(self, costs: Sequence[float]) -> Shard:
        """This rank's shard of items with the given costs (:func:`partition`)."""
        parts = partition(costs, self.world)
        return Shard(self, torch.tensor(parts[self.rank], dtype=torch.long), len(costs))


def partition(costs: Sequence[float], world: int) -> list[list[int]]:
    """Items ``0..n-1`` split into ``world`` non-empty parts of about equal solve cost.

    A rank solves its specimens in one batch padded to its longest, so a part costs
    ``len(part) * max(cost)``. Items go, longest first, to the part whose cost grows least
    (ties: the lower rank); each part is returned in ascending order. Deterministic, so
    every rank computes the same split.
    """
    n = len(costs)
    if not 1 <= world <= n:
        raise ValueError(f"cannot split {n} specimens over {world} ranks")
    order = sorted(range(n), key=lambda j: (-costs[j], j))
    parts: list[list[int]] = [[] for _ in range(world)]
    longest = [0.0] * world
    for j in order:
        grown = [(len(p) + 1) * max(m, costs[j]) for p, m in zip(parts, longest)]
        r = min(range(world), key=lambda k: (grown[k], k))
        parts[r].append(j)
        longest[r] = max(longest[r], costs[j])
    return [sorted(p) for p in parts]


class _CopyToShard(torch.autograd.Function):
    """Forward: the entries of ``index`` along ``dim``; backward: all-reduced full gradient."""

    @staticmethod
    def forward(ctx, full, index, dim, comm):
        ctx.index, ctx.dim, ctx.comm, ctx.shape = index, dim, comm, full.shape
        return full.index_select(dim, index)

    @staticmethod
    def backward(ctx, grad):
        full = grad.new_zeros(ctx.shape).index_copy(ctx.dim, ctx.index, grad)
        return ctx.comm.all_reduce(full), None, None, None


class _ReduceFromShard(torch.autograd.Function):
    """Forward: all-reduce (sum) over ranks; backward: identity."""

    @staticmethod
    def forward(ctx, local, comm):
        return comm.all_reduce(local)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


@dataclass(frozen=True)
class Shard:
    """This rank's specimens (``index``, ascending, of ``n`` in all) and the operations
    between full tensors (every specimen, the same on every rank) and shard tensors."""

    comm: Communicator
    index: torch.Tensor
    n: int

    def copy_to_shard(self, full: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """``full``'s entries of this shard's specimens along ``dim`` (whose size is ``n``);
        the gradient flows back summed over ranks."""
        dim = dim % full.dim()
        if not full.requires_grad:
            return full.index_select(dim, self.index)
        return _CopyToShard.apply(full, self.index, dim, self.comm)

    def reduce_from_shard(self, local: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``local`` (same shape on every rank); the gradient flows
        back unchanged to every rank's share."""
        if not local.requires_grad:
            return self.comm.all_reduce(local)
        return _ReduceFromShard.apply(local, self.comm)

    def gather(self, local: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The full tensor along ``dim`` from every rank's shard of it: each rank's entries
        placed in zeros of the full shape, then :meth:`reduce_from_shard` (so its gradient
        is this rank's entries of the full gradient)."""
        dim = dim % local.dim()
        shape = list(local.shape)
        shape[dim] = self.n
        full = local.new_zeros(shape).index_copy(dim, self.index, local)
        return self.reduce_from_shard(full)


# ----------------------------------------------------------------------- the process group


def world_from_environment(environ: Mapping[str, str] = os.environ) -> tuple[int, int] | None:
    """``(rank, world size)`` of a launched job, from torchrun's (or ``--workers``')
    ``RANK``/``WORLD_SIZE``, or SLURM's ``SLURM_PROCID``/``SLURM_NTASKS`` under ``srun``;
    None for a single process (no launcher, or a world of one)."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ and "MASTER_ADDR" in environ:
        rank, world = int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"])
    else:
        return None
    return None if world <= 1 else (rank, world)


def from_environment(environ: Mapping[str, str] = os.environ) -> Communicator | None:
    """Join the job's process group (gloo, on CPU) when launched as one of several ranks
    (:func:`world_from_environment`; ``MASTER_ADDR`` and ``MASTER_PORT`` say where rank 0
    listens); None for a single process, which then takes today's code path unchanged."""
    placed = world_from_environment(environ)
    if placed is None:
        return None
    rank, world = placed
    if not dist.is_initialized():
        _check_rendezvous(environ)
        # env:// reads MASTER_ADDR and MASTER_PORT, and under torchrun joins its agent's store
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world,
                                timeout=TIMEOUT)
    return Communicator(rank, world)


def _check_rendezvous(environ: Mapping[str, str]) -> None:
    """A clear message when the rendezvous address is missing (env:// would name only the
    variable)."""
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(name)]
    if missing:
        raise RuntimeError(f"this process is one of several ranks but {' and '.join(missing)} "
                           "is not set: launch with torchrun, srun (exporting MASTER_ADDR and "
                           "MASTER_PORT) or bayescal --workers")


def shutdown(comm: Communicator | None) -> None:
    """Leave the process group (at the end of a command)."""
    if comm is not None and dist.is_initialized():
        dist.destroy_process_group()
