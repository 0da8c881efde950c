"""Splitting each image's tokens over the ranks that share it (sequence and context parallelism), and the router
statistics of a micro-batch whose tokens several ranks hold. These fill the model's sequence seams
(`dit_scale/models/sequence.py`).

    model.sequence = SequenceShards(group)       # DiT splits before its blocks, gathers what leaves them
    router.tokens = SharedTokens(group)          # balance / z-loss over the whole micro-batch

Gradients. Every rank of the group computes the same loss from the gathered output, and each rank's parameter
gradients are its tokens' share of the gradient: `split` is a plain slice (its backward leaves the other tokens'
gradients to their ranks) and `gather`'s backward keeps this rank's slice of a gradient that is the same on every
rank (`resplit`, a gather whose output is split again after masking's token reordering, sums the shares over the
group in its backward instead). The shares are summed by the gradient reduction (FSDP's reduce-scatter sums over the group instead of
averaging; `parallelize.py` sets it up), exactly what one process computes with every token. The MoE losses are
built from local scores and the micro-batch's counts (megatron-core's rule for sequence parallelism), summed over
the group in the forward with an identity backward: every rank reports the micro-batch's loss and backpropagates
its own tokens' share of it.

`scatter` / `gather` with `complete=True` are the pair for a region whose input is the same on every rank (the MoE
layer under tensor parallelism without sequence parallelism: its tokens are routed once, 1/tp per rank): the
scatter's backward all-gathers, so the gradient upstream is whole again.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _gather_dim1(x, group, size):
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _my_part(x, rank, size):
    return x.chunk(size, dim=1)[rank].contiguous()


class _Gather(torch.autograd.Function):
    """All-gather along dim 1; backward: this rank's slice of the (same on every rank) gradient."""

    @staticmethod
    def forward(ctx, x, group, rank, size):
        ctx.rank, ctx.size = rank, size
        return _gather_dim1(x, group, size)

    @staticmethod
    def backward(ctx, grad):
        return _my_part(grad, ctx.rank, ctx.size), None, None, None


class _GatherShares(torch.autograd.Function):
    """All-gather along dim 1 of a tensor that is split again after a per-token map (`SequenceShards.resplit`);
    backward: each rank's gradient is its own tokens' share, so sum them over the group and keep this rank's slice."""

    @staticmethod
    def forward(ctx, x, group, rank, size):
        ctx.group, ctx.rank, ctx.size = group, rank, size
        return _gather_dim1(x, group, size)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return _my_part(grad, ctx.rank, ctx.size), None, None, None


class _Scatter(torch.autograd.Function):
    """This rank's slice along dim 1 of a tensor that is the same on every rank; backward: all-gather."""

    @staticmethod
    def forward(ctx, x, group, rank, size):
        ctx.group, ctx.size = group, size
        return _my_part(x, rank, size)

    @staticmethod
    def backward(ctx, grad):
        return _gather_dim1(grad, ctx.group, ctx.size), None, None, None


class _SumForward(torch.autograd.Function):
    """All-reduce (sum) in the forward, identity in the backward: a loss made of the group's shares, which every rank
    then backpropagates into its own share."""

    @staticmethod
    def forward(ctx, x, group):
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class SequenceShards:
    """DiT's sequence seam over `group`: rank r of the group holds tokens [r·N/S, (r+1)·N/S) of every image."""

    def __init__(self, group):
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)

    def split(self, x):
        return x.chunk(self.size, dim=1)[self.rank]

    def gather(self, x):
        return _Gather.apply(x, self.group, self.rank, self.size)

    def resplit(self, x, fn):
        """This rank's tokens of fn(every token): fn reorders tokens (masking), so a token's gradient can come from
        another rank's share; the gather's backward sums the shares (all-reduce) before keeping this rank's slice."""
        return self.split(fn(_GatherShares.apply(x, self.group, self.rank, self.size)))


def scatter(x, group):
    """This rank's tokens (dim 1) of `x`, which is the same on every rank of `group`; the gradient upstream is whole."""
    return _Scatter.apply(x, group, dist.get_rank(group), dist.get_world_size(group))


def gather(x, group):
    """Every rank's tokens (dim 1), concatenated in rank order; backward: this rank's slice."""
    return _Gather.apply(x, group, dist.get_rank(group), dist.get_world_size(group))


class SharedTokens:
    """A router's token statistics when the ranks of `group` each hold an equal share of the micro-batch's tokens."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)

    def total(self, num_tokens: int) -> int:
        return num_tokens * self.size

    def count(self, counts):
        counts = counts.detach().clone()
        dist.all_reduce(counts, group=self.group)
        return counts

    def sum(self, loss):
        return _SumForward.apply(loss, self.group)


def split_sequence(model, topology) -> None:
    """Fill the model's sequence seams for the layout: its tokens split over the cp ranks (and the tp ranks under
    sequence parallelism), every router counting over the ranks that share an image. A no-op for cp = tp = 1."""
    if topology.image_size == 1:
        return
    if topology.cp_size * (topology.tp_size if topology.sp else 1) > 1:
        model.sequence = SequenceShards(topology.group("image") if topology.sp or topology.tp_size == 1
                                        else topology.group("cp"))
    for layer in model.moe_layers():
        layer.router.tokens = SharedTokens(topology.group("image"))
