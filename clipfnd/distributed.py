"""Every collective the project uses, in one place, each falling back to one process.

Nothing else in clipfnd calls ``torch.distributed``. Functions take no group argument: they
act on the default group when one is initialised, and are the identity otherwise.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

# torch marks this autograd all-gather deprecated in favour of a private API; it is the
# public, documented way to gather with gradients, so keep it and keep logs quiet.
warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*", category=FutureWarning)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0, with gradients flowing back to the owners.

    The backward pass sums, over ranks, the gradient each rank's loss sends to a slice, and
    hands it to the rank that produced the slice.
    """
    if not is_distributed():
        return x
    return torch.cat(dist_nn.all_gather(x), dim=0)


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0 (no gradient). Shapes must agree."""
    if not is_distributed():
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks (a new tensor; ``x`` is left as it is)."""
    if not is_distributed():
        return x.clone()
    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def gather_uneven(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``x`` (dim 0) in rank order, when ranks hold different counts."""
    if not is_distributed():
        return x
    counts = gather(torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)).tolist()
    longest = max(counts)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    everything = gather(padded)
    return torch.cat([everything[r * longest : r * longest + n] for r, n in enumerate(counts)])


def gather_objects(items: list) -> list:
    """Every rank's list of small picklable items, concatenated in rank order."""
    if not is_distributed():
        return items
    out: list = [None] * world_size()
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def shutdown() -> None:
    """Leave the process group cleanly (several gloo ranks may abort at exit otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True when ``flag`` is true on every rank (so all ranks take the same branch)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (small Python objects only)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s ``x`` on every rank; every rank passes a tensor of the same shape and
    dtype (its values are overwritten off ``src``)."""
    if not is_distributed():
        return x
    dist.broadcast(x, src=src)
    return x


def full(x: torch.Tensor) -> torch.Tensor:
    """A parameter as one whole tensor: under FSDP a ``DTensor`` holds only this process's
    shard, and is gathered (with its gradient: every process calls it); any other tensor is
    returned as it is."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def temperature(logit_scale: torch.Tensor) -> torch.Tensor:
    """The model's ``logit_scale`` as a 0-d tensor, whole (``full``), whatever its shape: 0-d,
    or the 1-element vector it is under FSDP (which shards no 0-d parameter)."""
    return full(logit_scale).reshape(())


def label_offset(local_batch: int) -> int:
    """Index of this rank's first sample in the gathered global batch."""
    return rank() * local_batch


def failures(error: str | None) -> list[str]:
    """Every rank's failure message, in rank order; empty when no rank failed.

    Each rank passes its own (None: it succeeded) after a piece of work that can fail on some
    ranks only (a file one rank reads or writes), so that all ranks learn of it and take the
    same branch: no rank is left waiting in a collective for a rank that stopped. Messages
    are prefixed with the rank when there are several."""
    if not is_distributed():
        return [] if error is None else [error]
    return gather_objects([] if error is None else [f"rank {rank()}: {error}"])
