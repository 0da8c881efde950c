"""model.attention: the named kernel is the one that runs, the math matches PyTorch's own choice, a kernel the device
cannot run is one sentence before the run starts, and the GPU check's attention rows time every kernel."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from dit_scale.benchmarks.attention import time_backends
from dit_scale.benchmarks.gpu_check import attention_line, attention_rows
from dit_scale.build import build, check_attention
from dit_scale.config import load_config
from dit_scale.errors import ConfigError
from dit_scale.models.layers import Attention

FUSED_CPU_OP = "aten::_scaled_dot_product_flash_attention_for_cpu"


def ops_run(module, x) -> set:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        module(x).sum().backward()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("backend, fused", [("flash", True), ("math", False)])
def test_the_named_kernel_runs_and_matches_auto(backend, fused):
    torch.manual_seed(0)
    auto = Attention(72, 1, backend="auto")                 # DiT-XL's head dim, one head
    named = Attention(72, 1, backend=backend)
    named.load_state_dict(auto.state_dict())
    x = torch.randn(2, 16, 72, dtype=torch.float64)
    auto, named = auto.double(), named.double()
    torch.testing.assert_close(named(x), auto(x), rtol=1e-10, atol=1e-12)
    ops = ops_run(named, x)
    assert (FUSED_CPU_OP in ops) == fused, sorted(o for o in ops if "attention" in o)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="attention backend must be one of"):
        Attention(64, 2, backend="fastest")
    with pytest.raises(ConfigError, match="model.attention"):
        load_config(None, ["model.attention=fastest"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])     # fp32, and train.precision=bf16's autocast
@pytest.mark.parametrize("backend, runs", [("auto", True), ("flash", True), ("math", True), ("efficient", False),
                                           ("cudnn", False)])
def test_startup_check_on_cpu(backend, runs, dtype):
    cfg = load_config(None, ["model.name=DiT-XS/4", "model.input_size=16", f"model.attention={backend}"])
    args = build(cfg, device="meta").args
    if runs:
        check_attention(args, torch.device("cpu"), dtype)
        return
    with pytest.raises(ConfigError) as e:
        check_attention(args, torch.device("cpu"), dtype)
    message = str(e.value)
    name = str(dtype).replace("torch.", "")
    assert message.startswith(f"model.attention={backend} cannot run this model's attention (head dim 32, {name}) "
                              "on cpu") and "model.attention=auto" in message and "\n" not in message


def test_time_backends_records_every_kernel():
    cfg = load_config(None, ["model.name=DiT-XS/4", "model.input_size=16"])
    args = build(cfg, device="meta").args
    r = time_backends(args, batch=2, device=torch.device("cpu"), dtype=torch.float32, warmup=1, iters=2)
    assert r["shape"] == [2, args.num_heads, args.num_tokens, args.head_dim]
    assert set(r["backends"]) == {"auto", "flash", "efficient", "cudnn", "math"}
    assert all(r["backends"][k]["ms"] > 0 for k in ("auto", "flash", "math"))
    assert all("unavailable" in r["backends"][k] for k in ("efficient", "cudnn"))
    fastest = min(("auto", "flash", "math"), key=lambda k: r["backends"][k]["ms"])
    assert r["fastest"] == fastest
    assert r["auto_vs_fastest"] == pytest.approx(r["backends"]["auto"]["ms"] / r["backends"][fastest]["ms"], abs=2e-3)


def test_a_kernel_that_refuses_the_real_shape_loses_only_its_own_timing(monkeypatch):
    """The availability probe is a 16-token problem; a kernel can accept it and still refuse the model's shape (as
    cuDNN's can at some lengths on a GPU). That kernel is recorded as unavailable with the reason, the others keep
    their timings, and the row stays whole."""
    import dit_scale.benchmarks.attention as attention
    real = torch.nn.functional.scaled_dot_product_attention
    chosen = []

    def picky(q, k, v, *a, **kw):
        if chosen and chosen[-1] == "flash" and q.shape[2] > 16:
            raise RuntimeError("cuDNN Frontend error: no engine for this shape\nmore lines")
        return real(q, k, v, *a, **kw)

    original_kernel = attention.attention_kernel

    def tracking_kernel(name):
        chosen.append(name)
        return original_kernel(name)
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", picky)
    monkeypatch.setattr(attention, "attention_kernel", tracking_kernel)
    cfg = load_config(None, ["model.name=DiT-XS/4", "model.input_size=32"])     # 64 tokens
    r = time_backends(build(cfg, device="meta").args, batch=2, device=torch.device("cpu"), dtype=torch.float32,
                      warmup=1, iters=2)
    assert r["backends"]["flash"] == {"unavailable": "failed at this shape: cuDNN Frontend error: no engine for "
                                                     "this shape"}
    assert r["backends"]["auto"]["ms"] > 0 and r["backends"]["math"]["ms"] > 0 and r["fastest"] in ("auto", "math")


def test_gpu_check_attention_rows_group_models_by_shape():
    rows = attention_rows(("DiT-XS/4", "DiT-XS/4-4E2A"), 2, torch.device("cpu"), dry=True)
    (shape, row), = rows.items()                            # the MoE model's attention is the dense model's
    assert row["models"] == ["DiT-XS/4", "DiT-XS/4-4E2A"]
    line = attention_line(shape, row)
    assert line.startswith(f"attention {shape} (DiT-XS/4, DiT-XS/4-4E2A), float32 batch 2: auto ")
    assert "efficient n/a" in line and f"fastest {row['fastest']}" in line


@pytest.mark.slow
def test_named_kernel_compiles_in_one_graph():
    """The kernel choice is a context inside the block's forward: torch.compile traces it without a graph break."""
    torch.manual_seed(0)
    named, auto = Attention(64, 2, backend="math"), Attention(64, 2)
    auto.load_state_dict(named.state_dict())
    x = torch.randn(2, 16, 64)
    torch.testing.assert_close(torch.compile(named, fullgraph=True)(x), auto(x), rtol=1e-5, atol=1e-6)
