"""Which attention kernel is fastest for a model's attention shape (the GPU check's `attention` rows; DiT-XL's head
dim is 72, which not every fused kernel favours): forward + backward of `scaled_dot_product_attention` on
[batch, heads, tokens, head_dim] under each `model.attention` setting, timed alternately, in one run.

    rows = time_backends(model_args, batch=32, device=torch.device("cuda"), dtype=torch.bfloat16)
"""
from functools import partial

import torch
import torch.nn.functional as F

from dit_scale.benchmarks.common import alternate
from dit_scale.models.layers import ATTENTION_BACKENDS, attention_backend_error, attention_kernel


def time_backends(model_args, batch: int, device, dtype: torch.dtype, warmup: int = 3, iters: int = 10) -> dict:
    """{"shape", "dtype", "backends": {name: {"ms": median forward+backward ms} or {"unavailable": why}},
    "fastest", "auto_vs_fastest"}: every setting of model.attention on this model's self-attention shape."""
    heads, head_dim, tokens = model_args.num_heads, model_args.head_dim, model_args.num_tokens
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype, generator=g,
                           requires_grad=True) for _ in range(3))
    grad = torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype, generator=g)
    rows, runnable = {}, []
    for name in ATTENTION_BACKENDS:
        why = attention_backend_error(name, device, head_dim, dtype)
        if why is None:
            runnable.append(name)
        else:
            rows[name] = {"unavailable": why}

    def once(name):
        with attention_kernel(name):
            out = F.scaled_dot_product_attention(q, k, v)
        out.backward(grad)
        q.grad = k.grad = v.grad = None

    for name in list(runnable):     # a kernel the small availability probe accepted can still refuse this shape
        try:
            once(name)
        except RuntimeError as e:
            runnable.remove(name)
            rows[name] = {"unavailable": f"failed at this shape: {str(e).splitlines()[0] if str(e) else type(e)}"}
            q.grad = k.grad = v.grad = None
    times = alternate({name: partial(once, name) for name in runnable}, device, warmup, iters)
    for name in runnable:
        rows[name] = {"ms": round(1e3 * times[name], 3)}
    result = {"shape": [batch, heads, tokens, head_dim], "dtype": str(dtype).replace("torch.", ""),
              "backends": {name: rows[name] for name in ATTENTION_BACKENDS}}
    if runnable:
        fastest = min(runnable, key=lambda n: rows[n]["ms"])
        result["fastest"] = fastest
        if "auto" in runnable:
            result["auto_vs_fastest"] = round(rows["auto"]["ms"] / rows[fastest]["ms"], 3)
    return result

