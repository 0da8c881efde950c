"""Building blocks of the DiT: embedders, attention, dense FFNs, positional embeddings.

Everything here is plain single-device PyTorch; the MoE FFN lives in `moe.py`.
"""
from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ----------------------------------------------------------------------------------------------------------------
# Embedders
# ----------------------------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """[B, C, H, W] -> [B, (H/p)*(W/p), D] with a strided convolution (DiT / timm layout). `overlap` o > 0: each
    token also reads o pixels of its neighbours on every side (kernel p + 2o, stride p, zero padding o)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int, overlap: int = 0):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size + 2 * overlap, stride=patch_size,
                              padding=overlap)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps (DiT scale 0..1000) -> sinusoidal features -> 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def sinusoidal(t, dim: int, max_period: float = 10000.0):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t):
        return self.mlp(self.sinusoidal(t, self.frequency_size).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; during training labels are replaced by the null class `num_classes` with
    probability `dropout` (classifier-free guidance). `force_drop` (bool [B]) drops exactly those labels."""

    def __init__(self, num_classes: int, hidden_size: int, dropout: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout = dropout
        # num_classes=0 (unconditional): one row, the null class, which every label is
        self.table = nn.Embedding(max(1, num_classes + int(dropout > 0)), hidden_size)

    def drop_labels(self, labels, force_drop=None):
        if force_drop is None:
            force_drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout
        return torch.where(force_drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels, train: bool, force_drop=None):
        if (train and self.dropout > 0) or force_drop is not None:
            labels = self.drop_labels(labels, force_drop)
        return self.table(labels)


def sincos_pos_embed(hidden_size: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine positional embedding [grid*grid, D] (MAE / DiT)."""
    def one_axis(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    coords = np.arange(grid_size, dtype=np.float32)
    grid_w, grid_h = np.meshgrid(coords, coords)
    emb = np.concatenate([one_axis(hidden_size // 2, grid_w), one_axis(hidden_size // 2, grid_h)], axis=1)
    return torch.from_numpy(emb).float()


# ----------------------------------------------------------------------------------------------------------------
# Attention and dense FFNs
# ----------------------------------------------------------------------------------------------------------------

def dot_product_attention(q, k, v, scale=None):
    """The attention core: q, k, v [B, H, N, hd] -> [B, H, N, hd] (`scaled_dot_product_attention`)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


# Which kernel `scaled_dot_product_attention` may use: "auto" lets PyTorch pick per call (its order: flash, memory-
# efficient, cuDNN, math, as each accepts the shapes and dtype); a name restricts it to that one kernel. The math is
# the same up to rounding; the speed differs by GPU, head dim (DiT-XL: 72) and dtype (see the GPU check's
# `attention` rows). On a CPU only "flash" (PyTorch's fused CPU kernel) and "math" exist.
ATTENTION_BACKENDS = {"auto": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                      "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def check_backend(backend: str) -> str:
    """`backend` if it names an entry of ATTENTION_BACKENDS, else a ValueError of one sentence."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}.")
    return backend


def attention_kernel(backend: str):
    """The context under which attention runs with `backend` (a nullcontext for "auto")."""
    kernel = ATTENTION_BACKENDS[check_backend(backend)]
    return nullcontext() if kernel is None else sdpa_kernel([kernel])


def attention_backend_error(backend: str, device, head_dim: int, dtype: torch.dtype) -> Optional[str]:
    """Why `backend` cannot run self-attention of head dim `head_dim` in `dtype` on `device` (a forward and backward
    of a tiny problem), or None when it can."""
    q = torch.randn(1, 1, 16, head_dim, device=device, dtype=dtype, requires_grad=True)
    with warnings.catch_warnings(record=True) as reasons:   # on a GPU PyTorch warns why each kernel declined
        warnings.simplefilter("always")
        try:
            with attention_kernel(backend):
                F.scaled_dot_product_attention(q, q, q).sum().backward()
        except RuntimeError as e:
            said = [str(w.message) for w in reasons] + [str(e)]
            first = next((line.strip() for text in said for line in text.splitlines() if line.strip()),
                         type(e).__name__)
            return first[:200].rstrip(".")
    return None


class Attention(nn.Module):
    """Multi-head self-attention through `scaled_dot_product_attention`; optional RMS qk-norm per head.
    `scale`: softmax temperature, None for 1/sqrt(head_dim) (μP's option is 1/head_dim).

    Two things let `dit_scale/parallel/` split it without a process group in here: the number of heads and tokens
    is read from the projection's output (tensor parallelism keeps this rank's heads, sequence parallelism gathers
    every token before it), and `core` is the attention core `core(q, k, v, scale)`, a slot like the MoE
    dispatcher's (context parallelism puts an all-to-all one there)."""

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool = False, scale=None, backend: str = "auto"):
        super().__init__()
        self.backend = check_backend(backend)       # which attention kernel (ATTENTION_BACKENDS); "auto": PyTorch's
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scale = scale
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.core = dot_product_attention

    def forward(self, x):
        qkv = self.qkv(x)
        b, n = qkv.shape[:2]
        q, k, v = qkv.view(b, n, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        with attention_kernel(self.backend):       # "auto": a nullcontext
            out = self.core(q, k, v, self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    """DiT's dense FFN: Linear -> GELU(tanh) -> Linear."""

    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SwiGLU(nn.Module):
    """Bias-free SwiGLU FFN (DiT-MoE's expert MLP); used for the always-on shared experts."""

    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.gate = nn.Linear(hidden_size, mlp_hidden, bias=False)
        self.up = nn.Linear(hidden_size, mlp_hidden, bias=False)
        self.down = nn.Linear(mlp_hidden, hidden_size, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))
