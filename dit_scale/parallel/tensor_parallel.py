"""Tensor parallelism (Megatron's column / row split) with sequence parallelism, applied to a DiT from the outside
with DTensor's `parallelize_module` on the "tp" mesh (`parallelize.py` calls it before FSDP shards anything):

    apply_tensor_parallel(model, topology)

Per DiTBlock (patch-mixer and backbone):
    attn.qkv       column split by heads: rank r holds q, k and v of heads [r·H/tp, (r+1)·H/tp)
    attn.proj      row split (the same heads' columns)
    ffn (Mlp)      fc1 column, fc2 row
    ffn (MoEFFN)   shared experts: gate / up (GELU experts: fc1) column, down (fc2) row, on the layer's tokens;
                   router and routed experts stay whole (experts are expert-parallel over the data-parallel ranks)
    cross_attn     text models: q column split by heads (on the image tokens, all-gathered under sequence
                   parallelism), the fused k|v column split head-grouped (on the caption tokens, the same on every
                   tp rank), proj row split
Replicated: the adaLN modulation, the norms, embedders (the caption projection too), final layer and heads.

With sequence parallelism (`parallel.sp`, the default) the activations between the splits hold 1/tp of the
tokens: a column split all-gathers the tokens in its forward (reduce-scatter in its backward), a row split
reduce-scatters its output; the norms, modulation, residuals, router and experts run on this rank's tokens, so each
token is routed once. Without it every tp rank holds every token (the row splits all-reduce), and the MoE layer
scatters its tokens over the tp ranks around routing (`sequence.scatter` / `gather`): again routed once.

Gradients: the split layers' gradients are whole on each tp rank; every other parameter's gradient is this rank's
tokens' share under sequence parallelism, or the same on every tp rank without it (except the router's and the
qk-norm gains', which see 1/tp of the tokens or heads). `fsdp_groups` tells the FSDP engine how to reduce each.

Parameters keep their names and global shapes (μP's table and the roles read names), so checkpoints hold global
tensors. One exception in the layout of the pieces: the fused q|k|v projection is split head-grouped, so rank r's
piece is rows [q_r; k_r; v_r], three row ranges of the global tensor (a cross-attention's fused k|v likewise, two
ranges). `HeadGrouped` maps a global tensor to that layout and back (initialisation, consolidated and sharded
checkpoints).
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               parallelize_module)

from dit_scale.models.layers import Attention, Mlp, SwiGLU
from dit_scale.models.moe import MoEFFN
from dit_scale.models.roles import canonical_name
from dit_scale.parallel.sequence import gather, scatter


def head_grouped(full: torch.Tensor, tp: int, parts: int = 3) -> torch.Tensor:
    """Fused rows [parts·D, ...] (q|k|v, or a cross-attention's k|v) -> [q_0; k_0; v_0; q_1; ...] (tp groups of
    heads): the layout whose Shard(0) pieces are whole heads of each part."""
    return full.reshape(parts, tp, -1, *full.shape[1:]).transpose(0, 1).reshape(full.shape)


def head_ungrouped(grouped: torch.Tensor, tp: int, parts: int = 3) -> torch.Tensor:
    """Inverse of `head_grouped`."""
    return grouped.reshape(tp, parts, -1, *grouped.shape[1:]).transpose(0, 1).reshape(grouped.shape)


class HeadColwiseParallel(ColwiseParallel):
    """ColwiseParallel for a fused projection of `parts` head-split outputs (q|k|v: 3, a cross-attention's k|v: 2):
    the weight and bias are distributed head-grouped, so each rank's output columns are every part of its own heads
    (`Attention.forward` and `CrossAttention.forward` read the head count from them)."""

    def __init__(self, parts: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.parts = parts

    def _partition_linear_fn(self, name, module, device_mesh):
        for pname, param in module.named_parameters():
            grouped = head_grouped(param.detach(), device_mesh.size(), self.parts)
            module.register_parameter(pname, nn.Parameter(
                distribute_tensor(grouped, device_mesh, [Shard(0)], src_data_rank=self.src_data_rank),
                requires_grad=param.requires_grad))


class HeadGrouped:
    """The (canonical) names of the head-grouped parameters (q|k|v, and a cross-attention's k|v) with their part
    counts, and the maps between their global tensors and the layout their tensor-parallel pieces are cut from (an
    identity for every other name, and for tp = 1)."""

    def __init__(self, model: nn.Module, tp: int):
        self.tp = tp
        self.parts: Dict[str, int] = {}
        if tp > 1:
            for block_name, block in _blocks(model):
                fused = [("attn.qkv", block.attn.qkv, 3)]
                if getattr(block, "cross_attn", None) is not None:
                    fused.append(("cross_attn.kv", block.cross_attn.kv, 2))
                for path, module, parts in fused:
                    self.parts.update({canonical_name(f"{block_name}.{path}.{p}"): parts
                                       for p, _ in module.named_parameters()})

    def __contains__(self, name: str) -> bool:
        return name in self.parts

    def to_pieces(self, name: str, full: torch.Tensor) -> torch.Tensor:
        return head_grouped(full, self.tp, self.parts[name]) if name in self.parts else full

    def to_global(self, name: str, grouped: torch.Tensor) -> torch.Tensor:
        return head_ungrouped(grouped, self.tp, self.parts[name]) if name in self.parts else grouped


def _blocks(model: nn.Module):
    """(name, block) of every DiT block: the patch-mixer's and the backbone's."""
    return [(f"mixer.{i}", b) for i, b in enumerate(model.mixer)] + \
           [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]


def _block_plan(block: nn.Module, sp: bool) -> dict:
    tokens = Shard(1) if sp else Replicate()          # the activations around the split layers
    plan = {"attn.qkv": HeadColwiseParallel(input_layouts=tokens),
            "attn.proj": RowwiseParallel(output_layouts=tokens)}
    ffn = block.ffn
    if isinstance(ffn, Mlp):
        plan.update({"ffn.fc1": ColwiseParallel(input_layouts=tokens), "ffn.fc2": RowwiseParallel(output_layouts=tokens)})
    elif isinstance(ffn, MoEFFN) and ffn.shared is not None:
        # the MoE layer's tokens are flattened [T, D] and split over the tp ranks (dim 0) either way
        if isinstance(ffn.shared, SwiGLU):             # one all-gather of the tokens for both column splits
            plan.update({"ffn.shared": PrepareModuleInput(input_layouts=(Shard(0),), desired_input_layouts=(Replicate(),)),
                         "ffn.shared.gate": ColwiseParallel(), "ffn.shared.up": ColwiseParallel(),
                         "ffn.shared.down": RowwiseParallel(output_layouts=Shard(0))})
        else:
            plan.update({"ffn.shared.fc1": ColwiseParallel(input_layouts=Shard(0)),
                         "ffn.shared.fc2": RowwiseParallel(output_layouts=Shard(0))})
    if getattr(block, "cross_attn", None) is not None:  # text: q from the image tokens, k|v from the (replicated)
        plan.update({"cross_attn.q": ColwiseParallel(input_layouts=tokens),       # caption tokens, split by heads
                     "cross_attn.kv": HeadColwiseParallel(parts=2),
                     "cross_attn.proj": RowwiseParallel(output_layouts=tokens)})
    return plan


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `factor` backward."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def apply_tensor_parallel(model: nn.Module, topology) -> None:
    """Split every DiT block over the "tp" mesh (see the module docstring); a no-op for tp = 1."""
    if topology.tp_size == 1:
        return
    mesh, group = topology.mesh["tp"], topology.group("tp")
    for _, block in _blocks(model):
        parallelize_module(block, mesh, _block_plan(block, topology.sp))
        if getattr(block, "cross_attn", None) is not None and topology.sp:
            # The caption tokens are the same on every tp rank, so their gradient leaves the k|v column split whole
            # (all-reduced over the heads). Under sequence parallelism every other gradient upstream is this rank's
            # share, summed over the tp ranks by the gradient reduction: make this one a share too (1/tp of it).
            share = 1.0 / topology.tp_size
            block.cross_attn.kv.register_forward_pre_hook(
                lambda _m, args: (_ScaleGrad.apply(args[0], share), *args[1:]), prepend=True)
        if isinstance(block.ffn, MoEFFN) and not topology.sp:          # route each token once: 1/tp per rank
            block.ffn.register_forward_pre_hook(lambda _m, args: (scatter(args[0], group), *args[1:]))
            block.ffn.register_forward_hook(lambda _m, _args, out: (gather(out[0], group), *out[1:]))


def split_modules(block: nn.Module) -> List[nn.Module]:
    """The modules of a block whose parameters `apply_tensor_parallel` split (their gradients are whole per rank)."""
    return [block.get_submodule(n) for n in _block_plan(block, True) if n != "ffn.shared"]


def partial_modules(block: nn.Module) -> List[nn.Module]:
    """Without sequence parallelism: the replicated modules of a block that see 1/tp of the tokens (the router) or of
    the heads (qk-norm gains); their gradients are shares, unlike the rest of the replicated parameters."""
    out = [block.attn.q_norm, block.attn.k_norm] if isinstance(block.attn, Attention) else []
    if getattr(block, "cross_attn", None) is not None:
        out += [block.cross_attn.q_norm, block.cross_attn.k_norm]
    out = [m for m in out if any(True for _ in m.parameters())]
    if isinstance(block.ffn, MoEFFN):
        out.append(block.ffn.router)
    return out
