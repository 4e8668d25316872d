"""Every torch.distributed call in commlab lives here (STYLE.md §5).

Each helper is the identity (or a no-op) when no process group is initialised, so objectives and
training code call them unconditionally. Works with gloo on CPU and NCCL on GPU.

Contrastive losses gather embeddings across workers so that every rank sees the global batch as
negatives (SimCLR, Chen et al. ICML 2020; CoMM, Dufumier et al. ICLR 2025). `gather_with_grad`
keeps the graph: its backward all-reduces (sums) the incoming gradient and keeps this rank's rows.
When every rank computes the same loss of the gathered tensor (`identical_loss=True`, as every
commlab objective does: the loss over the global batch), the incoming gradient is the same on
every rank, so that sum is world_size x it and the backward scales it without communicating.
Either way each rank's local gradient is world_size x the single-process one and DDP's gradient
averaging cancels the factor.

Per-rank batch sizes are exchanged before each gather (all_gather needs equal shapes); inside
`equal_batch_sizes()`, a caller that knows every rank holds the same number of rows skips that
collective.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as tdist
from torch import Tensor

R = TypeVar("R")


def is_dist() -> bool:
    """True when torch.distributed is available and a process group is initialised."""
    return tdist.is_available() and tdist.is_initialized()


def get_rank() -> int:
    return tdist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return tdist.get_world_size() if is_dist() else 1


def _all_gather_cat(x: Tensor) -> tuple[Tensor, list[int]]:
    """all_gather `x` (n_r, ...) from every rank and concatenate in rank order.

    Per-rank batch sizes may differ (e.g. a last batch with drop_last=False): sizes are exchanged
    first and shorter tensors padded, because all_gather needs equal shapes.
    Returns the (sum_r n_r, ...) tensor and the list of n_r.
    """
    sizes = gather_sizes(x.shape[0], x.device)
    longest = max(sizes)
    x = x.contiguous()
    if x.shape[0] < longest:
        pad = x.new_zeros((longest - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad])
    bufs = [torch.empty_like(x) for _ in sizes]
    tdist.all_gather(bufs, x)
    return torch.cat([b[:n] for b, n in zip(bufs, sizes, strict=True)]), sizes


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, identical_loss: bool) -> Tensor:
        out, sizes = _all_gather_cat(x)
        rank = get_rank()
        ctx.start = sum(sizes[:rank])
        ctx.stop = ctx.start + sizes[rank]
        ctx.identical_loss = identical_loss
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        if ctx.identical_loss:  # every rank holds this same gradient: the sum is world_size x it
            return grad[ctx.start : ctx.stop] * get_world_size(), None
        # Every rank's loss depends on every rank's rows: sum the contributions, keep ours.
        grad = grad.contiguous().clone()
        tdist.all_reduce(grad, op=tdist.ReduceOp.SUM)
        return grad[ctx.start : ctx.stop], None


def gather_with_grad(x: Tensor, identical_loss: bool = False) -> Tensor:
    """(n, ...) -> (sum over ranks of n, ...), concatenated in rank order, differentiable.

    Backward: all-reduce SUM of the incoming gradient, then this rank's slice. With
    `identical_loss=True` the caller promises that every rank computes the same function of the
    gathered tensor (a loss over the global batch); the backward then returns world_size x this
    rank's slice of its own gradient, the same sum without a collective. A rank-dependent loss
    with `identical_loss=True` gets wrong gradients.
    Identity when not distributed.
    """
    if not is_dist() or get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x, identical_loss)


def gather_no_grad(x: Tensor) -> Tensor:
    """(n, ...) -> (sum over ranks of n, ...) in rank order, detached. Identity (detached) when
    not distributed."""
    if not is_dist() or get_world_size() == 1:
        return x.detach()
    with torch.no_grad():
        return _all_gather_cat(x.detach())[0]


_EQUAL_SIZES = False


@contextlib.contextmanager
def equal_batch_sizes() -> Iterator[None]:
    """Inside, `gather_sizes(n)` is `[n] * world_size` without a collective: for callers that know
    every rank holds the same number of rows (a training loop with equal per-rank batches). Not
    thread-safe: a training process gathers from one thread."""
    global _EQUAL_SIZES
    before, _EQUAL_SIZES = _EQUAL_SIZES, True
    try:
        yield
    finally:
        _EQUAL_SIZES = before


def gather_sizes(n: int, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's value of `n` (e.g. its local batch size), in rank order; `[n]` when not
    distributed; `[n] * world_size` inside `equal_batch_sizes()`."""
    if not is_dist():
        return [n]
    if _EQUAL_SIZES:
        return [n] * get_world_size()
    size = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.zeros_like(size) for _ in range(get_world_size())]
    tdist.all_gather(out, size)
    return [int(s.item()) for s in out]


def all_reduce_mean(t: Tensor) -> Tensor:
    """Mean of `t` over ranks (a new tensor; the input is not modified). Identity when not
    distributed."""
    if not is_dist():
        return t
    out = t.detach().clone()
    if not out.is_floating_point():
        out = out.double()
    tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
    return out / get_world_size()


def all_reduce_sum_later(t: Tensor) -> Callable[[], Tensor]:
    """Start summing `t` over ranks and return a call that waits for the sum (a new tensor),
    so the caller computes meanwhile instead of waiting at the collective. Every rank must
    start it at the same point of its sequence of collectives. Identity when not distributed."""
    if not is_dist():
        return lambda: t
    out = t.detach().clone()
    work = tdist.all_reduce(out, op=tdist.ReduceOp.SUM, async_op=True)

    def result() -> Tensor:
        if work is not None:
            work.wait()
        return out

    return result


def average_gradients_later(
    params: Sequence[Tensor], extra: Tensor | None = None
) -> Callable[[], Tensor | None]:
    """Start averaging the gradients of `params` over ranks, all of them in one flat all-reduce
    (one per dtype), with `extra` summed (not averaged) alongside; return a call that waits,
    writes each parameter's averaged gradient (zeros where it had none) and returns the summed
    `extra`. The caller computes meanwhile: a data-parallel step waits for the sum only before
    the optimiser needs it. Every rank must call it at the same point of its collectives, with
    the same parameters. Not distributed: the gradients stay as they are, `extra` is returned."""
    if not is_dist():
        return lambda: extra
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    groups: dict[torch.dtype, list[int]] = {}
    for i, g in enumerate(grads):
        groups.setdefault(g.dtype, []).append(i)
    pending = []
    carried: Tensor | None = None
    for n, (dtype, idx) in enumerate(groups.items()):
        parts = [grads[i].reshape(-1) for i in idx]
        if n == 0 and extra is not None:
            parts.append(extra.detach().reshape(-1).to(dtype))
        flat = torch.cat(parts)
        pending.append((idx, flat, tdist.all_reduce(flat, op=tdist.ReduceOp.SUM, async_op=True)))
    world = get_world_size()

    def finish() -> Tensor | None:
        nonlocal carried
        for n, (idx, flat, work) in enumerate(pending):
            if work is not None:
                work.wait()
            offset = 0
            for i in idx:
                chunk = flat[offset : offset + grads[i].numel()].view_as(grads[i]).div_(world)
                offset += grads[i].numel()
                if params[i].grad is None:
                    params[i].grad = chunk.clone()
                else:
                    params[i].grad.copy_(chunk)  # type: ignore[union-attr]
            if n == 0 and extra is not None:
                carried = flat[offset:].view_as(extra).to(extra.dtype)
        return carried

    return finish


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Rank `src`'s parameters and buffers on every rank, in place: what DDP does when it wraps
    a module, for a module trained without DDP. No-op when not distributed."""
    if not is_dist():
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            tdist.broadcast(t.data, src=src)


def broadcast_object(obj: R, src: int = 0) -> R:
    """Rank `src`'s picklable `obj` on every rank. Identity when not distributed."""
    if not is_dist():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_dist():
        tdist.barrier()


def rank_zero_only(fn: Callable[..., R]) -> Callable[..., R | None]:
    """Decorator: run `fn` on rank 0 only; other ranks get None. The rank is read at call time."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> R | None:
        if get_rank() == 0:
            return fn(*args, **kwargs)
        return None

    return wrapper
