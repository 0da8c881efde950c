"""Model zoo: DiT sizes × patch sizes, dense or sparse, named as DiT and DiT-MoE name them.

    DiT-XL/2         dense DiT-XL, patch 2 (DiT paper: 675M params, 118.64 GFLOPs at 256×256)
    DiT-XL/2-8E2A    DiT-MoE: every FFN is a mixture of 8 routed experts, 2 active per token, plus shared experts
    DiT-G/2-16E2A    DiT-MoE's 16.5B model (depth 40, width 1408, 16 heads)

`DiT-XS` (depth 6, width 128, 4 heads) is our own size for CPU smoke tests and the quickstart.
Any `-{E}E{k}A` suffix is accepted (E experts, k active); sizes and patches are the table below.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# size name -> (depth, hidden_size, num_heads)
SIZES = {
    "XS": (6, 128, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "G": (40, 1408, 16),
}
PATCHES = (2, 4, 8)
# The sparse variants DiT-MoE publishes, listed by `list_models`; other E/k combinations parse as well.
SPARSE_SUFFIXES = ("8E2A", "16E2A")

_NAME = re.compile(r"^DiT-(?P<size>[A-Z]+)/(?P<patch>\d+)(?:-(?P<experts>\d+)E(?P<active>\d+)A)?$")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    num_experts: int = 0      # 0: dense
    top_k: int = 0


def parse_model_name(name: str) -> ModelSpec:
    """'DiT-S/2-8E2A' -> ModelSpec(depth=12, hidden_size=384, num_heads=6, patch_size=2, num_experts=8, top_k=2)."""
    match = _NAME.match(str(name))
    if (match is None or match["size"] not in SIZES or int(match["patch"]) not in PATCHES
            or (match["experts"] and not 1 <= int(match["active"]) <= int(match["experts"]))):
        raise KeyError(
            f"model.name={name!r} is not in the registry; use DiT-{{{','.join(SIZES)}}}/{{2,4,8}} optionally "
            f"followed by -<E>E<k>A with 1 <= k <= E (e.g. DiT-S/2, DiT-XL/2-8E2A, DiT-G/2-16E2A).")
    depth, width, heads = SIZES[match["size"]]
    experts = int(match["experts"] or 0)
    return ModelSpec(name=name, depth=depth, hidden_size=width, num_heads=heads, patch_size=int(match["patch"]),
                     num_experts=experts, top_k=int(match["active"] or 0))


def list_models() -> list:
    names = []
    for size in SIZES:
        for patch in PATCHES:
            names.append(f"DiT-{size}/{patch}")
            names += [f"DiT-{size}/{patch}-{suffix}" for suffix in SPARSE_SUFFIXES]
    return names
