"""Distributed helpers: rank queries and an all_gather that keeps gradients.

Metric losses want the global batch: with ``all_gather_with_grad`` every rank mines
and computes the loss over all ranks' embeddings, and gradients flow back to the
rank that produced each embedding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_gather_with_grad",
    "any_rank",
    "barrier",
    "gather_batch",
    "get_rank",
    "get_world_size",
    "is_main_process",
]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank in the default process group (0 without one).

    Examples:
        >>> get_rank()  # no process group
        0
    """
    return dist.get_rank() if _active() else 0


def get_world_size() -> int:
    """Processes in the default process group (1 without one).

    Examples:
        >>> get_world_size()
        1
    """
    return dist.get_world_size() if _active() else 1


def is_main_process() -> bool:
    """Rank 0 (or no process group): the one process that writes files.

    Examples:
        >>> is_main_process()
        True
    """
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank of the default process group (nothing without one).

    Examples:
        >>> barrier()  # one process: returns at once
    """
    if _active():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on this or any other rank (a failure, an interrupt):
    every rank learns it, so none waits in a collective for a rank that has left.
    Without a process group: the flag itself.

    Args:
        flag: this rank's flag.

    Examples:
        >>> any_rank(False), any_rank(True)  # one process
        (False, True)
    """
    if not _active():
        return bool(flag)
    t = torch.tensor([float(flag)])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` [B, ...] from every rank in rank order: [W * B, ...].

    Every rank must pass the same shape (the sampler gives equal batches). The
    backward pass sums, over ranks, the gradients each rank computed for this rank's
    slice; with DDP's gradient averaging that is the gradient of the global loss.
    Without a process group it returns ``x`` itself.

    Args:
        x: [B, ...] this rank's tensor; every rank passes the same shape.

    Examples:
        >>> x = torch.randn(4, 8, requires_grad=True)
        >>> all_gather_with_grad(x) is x  # one process: nothing to gather
        True
    """
    if get_world_size() == 1:
        return x
    out: Tensor = _AllGather.apply(x)
    return out


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums each rank's gradient of this rank's slice (torch's
    own ``torch.distributed.nn.functional.all_gather`` is deprecated)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        world, rank = get_world_size(), get_rank()
        ctx.rows, ctx.rank = x.shape[0], rank
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # gloo has no reduce_scatter: sum all, keep this rank's rows
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_batch(*tensors: Tensor) -> tuple[Tensor, ...]:
    """All-gather a batch: tensors that require grad keep it (embeddings); others
    (labels, scales) are gathered without autograd.

    Examples:
        >>> emb, labels = torch.randn(4, 8, requires_grad=True), torch.arange(4)
        >>> e, y = gather_batch(emb, labels)  # under torchrun: [world_size * 4, ...]
        >>> e.shape, y.shape
        (torch.Size([4, 8]), torch.Size([4]))
    """
    if get_world_size() == 1:
        return tensors
    out = []
    for t in tensors:
        if t.requires_grad:
            out.append(all_gather_with_grad(t))
        else:
            parts = [torch.empty_like(t) for _ in range(get_world_size())]
            dist.all_gather(parts, t.contiguous())
            out.append(torch.cat(parts, dim=0))
    return tuple(out)
