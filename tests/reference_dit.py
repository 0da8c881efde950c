"""Small independent implementations of facebookresearch/DiT's and feizc/DiT-MoE's models, for the conversion tests.

Written for these tests (not copied) to follow those repositories' module structure and parameter names, so their
`state_dict()` has the exact key layout of the public checkpoints: timm-style `PatchEmbed.proj`, `Attention.qkv` /
`proj` (or the flash-attention `Wqkv` / `out_proj` / LayerNorm `q_norm`), `Mlp.fc1` / `fc2` (GELU tanh),
`LabelEmbedder.embedding_table`, a `pos_embed` parameter holding the fixed sin-cos table, `FinalLayer.norm_final` /
`linear`; DiT-MoE's `blocks.i.moe` with `gate.weight` (MoEGate), `experts.e.{gate,up,down}_proj` and
`shared_experts` (bias-free SwiGLU). Attention is computed explicitly (softmax of q·kᵀ), the MoE per token over its
top-k experts, the positional table with numpy — a second code path to ours in each case.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def pos_table(dim, grid):
    """MAE's 2-D sin-cos table [grid², dim]: half the channels encode w, half h (w varies fastest)."""
    def axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    w, h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return torch.from_numpy(np.concatenate([axis(dim // 2, w), axis(dim // 2, h)], axis=1)).float()


class PatchEmbed(nn.Module):
    def __init__(self, patch, channels, dim):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim, heads, flash=False):
        super().__init__()
        self.heads, self.flash = heads, flash
        if flash:                                   # DiT-MoE's FlashSelfMHAModified names and q/k LayerNorm
            self.Wqkv = nn.Linear(dim, 3 * dim)
            self.q_norm = nn.LayerNorm(dim // heads, eps=1e-6)
            self.k_norm = nn.LayerNorm(dim // heads, eps=1e-6)
            self.out_proj = nn.Linear(dim, dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        qkv = (self.Wqkv if self.flash else self.qkv)(x).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        if self.flash:
            q, k = self.q_norm(q), self.k_norm(k)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(b, n, d)
        return (self.out_proj if self.flash else self.proj)(out)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TimestepEmbedder(nn.Module):
    def __init__(self, dim, freq=256):
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.freq // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    def __init__(self, classes, dim, dropout=0.1):
        super().__init__()
        self.embedding_table = nn.Embedding(classes + int(dropout > 0), dim)

    def forward(self, y):
        return self.embedding_table(y)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class MoEGate(nn.Module):
    def __init__(self, dim, experts, top_k):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(experts, dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))       # DiT-MoE's init (bound 1/sqrt(dim))

    def forward(self, x):
        scores = F.linear(x, self.weight).softmax(dim=-1)
        return torch.topk(scores, self.top_k, dim=-1)               # weights not renormalised (norm_topk_prob=False)


class MoeMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoeBlock(nn.Module):
    def __init__(self, dim, mlp_ratio, experts, top_k, shared=2):
        super().__init__()
        self.experts = nn.ModuleList([MoeMLP(dim, mlp_ratio * dim) for _ in range(experts)])
        self.gate = MoEGate(dim, experts, top_k)
        self.shared_experts = MoeMLP(dim, shared * dim)

    def forward(self, x):
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        weights, index = self.gate(tokens)
        out = torch.zeros_like(tokens)
        for i in range(tokens.shape[0]):                            # per token: Σ over its k experts
            for w, e in zip(weights[i], index[i]):
                out[i] += w * self.experts[int(e)](tokens[i])
        return (out + self.shared_experts(tokens)).reshape(shape)


class DiTBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4, moe=None, flash=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, flash)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        if moe is None:
            self.mlp = Mlp(dim, int(dim * mlp_ratio))
        else:
            self.moe = SparseMoeBlock(dim, mlp_ratio, *moe)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), s1, sc1))
        ffn = self.mlp if hasattr(self, "mlp") else self.moe
        return x + g2.unsqueeze(1) * ffn(modulate(self.norm2(x), s2, sc2))


class FinalLayer(nn.Module):
    def __init__(self, dim, patch, out):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class RefDiT(nn.Module):
    """facebookresearch/DiT's `DiT` (moe=None) or feizc/DiT-MoE's (moe=(experts, top_k))."""

    def __init__(self, input_size=8, patch=2, channels=4, dim=32, depth=2, heads=2, classes=10, learn_sigma=True,
                 mlp_ratio=4, moe=None, flash=False):
        super().__init__()
        self.patch, self.out = patch, channels * (2 if learn_sigma else 1)
        self.x_embedder = PatchEmbed(patch, channels, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = LabelEmbedder(classes, dim)
        grid = input_size // patch
        self.pos_embed = nn.Parameter(pos_table(dim, grid).unsqueeze(0), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(dim, heads, mlp_ratio, moe, flash) for _ in range(depth)])
        self.final_layer = FinalLayer(dim, patch, self.out)

    def randomize_(self, seed=0, std=0.1):
        """Every trained weight random (DiT's zero-initialised adaLN and readout would hide the blocks)."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name != "pos_embed":
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        n, hw = x.shape[0], int(x.shape[1] ** 0.5)
        x = x.reshape(n, hw, hw, self.patch, self.patch, self.out)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(n, self.out, hw * self.patch, hw * self.patch)
