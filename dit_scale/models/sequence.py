"""The sequence seams: how a DiT splits its tokens over processes and puts them back together, and how a router
counts the tokens of a micro-batch that several processes share. The single-device defaults are here; sequence and
context parallelism (`dit_scale/parallel/sequence.py`) plug their own objects into the same slots, as the
expert-parallel dispatcher does into `MoEFFN.dispatcher` (`dispatch.py`).

    x = model.sequence.split(x)              # [B, N, ...] -> this process's tokens [B, N/S, ...] (default: all)
    x = model.sequence.gather(x)             # back to every token [B, N, ...]                   (default: as is)
    x = model.sequence.resplit(x, fn)        # this process's tokens of fn(every token)           (default: fn(x))
    total = router.tokens.total(T)           # tokens of the micro-batch, T of them here          (default: T)
    counts = router.tokens.count(counts)     # tokens per expert over the micro-batch            (default: as is)
    loss = router.tokens.sum(loss)           # the micro-batch's loss from this process's share  (default: as is)

`DiT.forward` splits once before its blocks and gathers what leaves them (the output, the hidden states and heads
it returns), so a model with S processes per image computes what one process computes. `resplit` is for a token
reordering between parts of the model (masking's kept-token gather and scatter): its output is split again, so its
gradient is a per-process share, unlike what `gather` hands to the (replicated) loss.
"""
from __future__ import annotations


class LocalSequence:
    """Every token on this device: nothing to split or gather."""
    size = 1

    def split(self, x):
        return x

    def gather(self, x):
        return x

    def resplit(self, x, fn):
        return fn(x)


class LocalTokens:
    """This process routes every token of its micro-batch: the router's statistics are its own."""

    def total(self, num_tokens: int) -> int:
        return num_tokens

    def count(self, counts):
        return counts

    def sum(self, loss):
        return loss
