"""DiT / DiT-MoE: shapes, the DiT paper's table, FLOP accounting against torch's counter, CFG label dropout."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dit_scale.config import load_config
from dit_scale.build import build_model, model_args
from dit_scale.models import list_models, parse_model_name
from dit_scale.models.dit import DiT
from dit_scale.models.flops import forward_macs, model_info
from dit_scale.models.layers import LabelEmbedder
from dit_scale.models.masking import draw_keep_indices
from dit_scale.models.roles import param_roles
from dit_scale.mup import param_groups

from tiny import tiny_cfg


def small_cfg(*extra):
    return tiny_cfg(*extra, **{"model.num_classes": 5, "model.num_heads": 4})


@pytest.mark.parametrize("name, out_ch", [("DiT-XS/4-4E2A", 3), ("DiT-XS/4", 3)])
def test_forward_shapes_and_aux(name, out_ch):
    model = build_model(small_cfg(f"model.name={name}"))
    x, t, y = torch.randn(3, 3, 16, 16), torch.rand(3) * 1000, torch.tensor([0, 4, 2])
    out, aux = model(x, t, y)
    assert out.shape == (3, out_ch, 16, 16)
    assert aux["moe_loss"].ndim == 0
    if "E" in name.split("/")[1]:
        assert aux["tokens_per_expert"].shape == (2, 4)
        assert aux["tokens_per_expert"].sum().item() == 2 * 3 * 16 * 2      # layers × tokens × k
    out.float().mean().backward()


def test_learn_sigma_doubles_output_channels():
    cfg = small_cfg("diffusion.objective=ddpm", "model.learn_sigma=true")
    assert model_args(cfg).out_channels == 6


# DiT paper, Table 4 (Gflops) and DiT-XL/2's parameter count; DiT-MoE's published sizes.
DIT_TABLE = {"DiT-S/2": 6.06, "DiT-B/2": 23.01, "DiT-L/2": 80.71, "DiT-XL/2": 118.64}


@pytest.mark.parametrize("name, gflops", DIT_TABLE.items())
def test_registry_reproduces_dit_table(name, gflops):
    cfg = load_config(None, [f"model.name={name}"])
    info = model_info(model_args(cfg).replace(out_channels=8))
    assert round(info["gflops"], 2) == gflops


def test_parameter_counts():
    def info(name):
        return model_info(model_args(load_config(None, [f"model.name={name}"])).replace(out_channels=8))
    assert abs(info("DiT-XL/2")["params"] - 675e6) < 1e6
    assert info("DiT-XL/2")["params"] == info("DiT-XL/2")["active_params"]
    s = info("DiT-S/2-8E2A")                       # DiT-MoE: 199M total, 71M activated
    assert round(s["params"] / 1e6) == 199 and round(s["active_params"] / 1e6) == 72
    assert round(info("DiT-G/2-16E2A")["params"] / 1e9, 1) == 16.5


def test_registry_names():
    names = list_models()
    for name in ("DiT-S/2-8E2A", "DiT-B/2-8E2A", "DiT-XL/2-8E2A", "DiT-G/2-16E2A", "DiT-L/8"):
        assert name in names
    spec = parse_model_name("DiT-G/2-16E2A")
    assert (spec.depth, spec.hidden_size, spec.num_heads, spec.num_experts, spec.top_k) == (40, 1408, 16, 16, 2)


@pytest.mark.parametrize("name, overlap", [("DiT-XS/4", 0), ("DiT-XS/4-4E2A", 0), ("DiT-XS/4-4E2A", 2)])
def test_analytic_flops_match_torch_flop_counter(name, overlap):
    """forward_macs minus its LayerNorm term equals torch's count of matmul/conv/attention FLOPs / 2."""
    cfg = small_cfg(f"model.name={name}", "moe.expert_impl=loop", f"model.patch_overlap={overlap}")
    kwargs = model_args(cfg)
    model = DiT(kwargs)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):       # the math backend's bmm calls are counted on CPU
        model(torch.randn(1, 3, 16, 16), torch.tensor([500.0]), torch.tensor([1]))
    tokens, d = (16 // 4) ** 2, kwargs.hidden_size
    norms = kwargs.depth * 2 * tokens * d + tokens * d
    assert forward_macs(kwargs) - norms == counter.get_total_flops() // 2


def test_analytic_flops_of_the_kept_token_output_match_torch_flop_counter():
    """Masked, kept_only (the training loss's output when only kept tokens are scored): the backbone and the final
    layer run on the kept tokens, the patch-mixer on every token; forward_macs(kept, kept_output=True) minus its
    LayerNorm terms equals torch's count."""
    cfg = small_cfg("model.name=DiT-XS/4-4E2A", "moe.expert_impl=loop", "mask.ratio=0.75", "mask.mixer_depth=1")
    kwargs = model_args(cfg)
    model = DiT(kwargs)
    tokens, kept, d = (16 // 4) ** 2, 4, kwargs.hidden_size
    keep = draw_keep_indices(1, tokens, 0.75, torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        model(torch.randn(1, 3, 16, 16), torch.tensor([500.0]), torch.tensor([1]), mask=keep, kept_only=True)
    norms = 2 * tokens * d + kwargs.depth * 2 * kept * d + kept * d         # mixer block, backbone, final layer
    assert forward_macs(kwargs, kept, kept_output=True) - norms == counter.get_total_flops() // 2


def test_patch_overlap_reads_the_neighbouring_pixels_and_nothing_further():
    """model.patch_overlap=o: a token's embedding is a direct convolution of its patch widened by o pixels on every
    side (zero padding at the image border); a pixel o or fewer pixels past the patch border changes it, one further
    does not. o = 0 is DiT's patch embedding."""
    plain = build_model(small_cfg())
    assert plain.x_embedder.proj.kernel_size == (4, 4) and plain.x_embedder.proj.padding == (0, 0)
    model = build_model(small_cfg("model.patch_overlap=2"))
    conv = model.x_embedder.proj
    assert conv.weight.shape[-2:] == (8, 8)
    x = torch.randn(2, 3, 16, 16)
    tokens = model.x_embedder(x)                                    # [B, 16, D]: a 4 × 4 grid of 4×4 patches
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    direct = torch.einsum("bchw,dchw->bd", padded[:, :, 4:12, 4:12], conv.weight) + conv.bias   # token (1, 1)
    torch.testing.assert_close(tokens[:, 1 * 4 + 1], direct)
    for row, moves in ((9, True), (10, False)):                     # token (1, 1) covers rows 4..7, reads 2..9
        x2 = x.clone()
        x2[:, :, row, 5] += 1.0
        changed = (model.x_embedder(x2)[:, 1 * 4 + 1] - tokens[:, 1 * 4 + 1]).abs().amax() > 1e-6
        assert changed == moves, row


def test_label_dropout_for_cfg():
    emb = LabelEmbedder(num_classes=10, hidden_size=8, dropout=0.3)
    labels = torch.arange(10).repeat(1000)
    torch.manual_seed(0)
    dropped = emb.drop_labels(labels)
    frac = (dropped == 10).float().mean().item()
    assert abs(frac - 0.3) < 0.02
    assert torch.equal(dropped[dropped != 10], labels[dropped != 10])
    force = torch.tensor([True, False, True])
    assert emb.drop_labels(torch.tensor([1, 2, 3]), force).tolist() == [10, 2, 10]
    # evaluation: no dropout, the null class is an ordinary row of the table
    assert torch.equal(emb(torch.tensor([1, 2]), train=False), emb.table.weight[[1, 2]])


def test_adaln_zero_init_makes_blocks_identity():
    model = build_model(small_cfg())
    x = torch.randn(2, 64, 64)
    c = torch.randn(2, 64)
    out, _ = model.blocks[0](x, c)
    assert torch.equal(out, x)


def test_parameter_roles_and_groups():
    model = build_model(small_cfg())
    roles = param_roles(model)
    assert roles["x_embedder.proj.weight"] == "input"
    assert roles["y_embedder.table.weight"] == "input"
    assert roles["blocks.0.attn.qkv.weight"] == "hidden"
    assert roles["blocks.0.attn.qkv.bias"] == "vector"
    assert roles["blocks.0.ffn.router.weight"] == "router"
    assert roles["blocks.0.ffn.experts.w13"] == "expert"
    assert roles["blocks.0.ffn.shared.gate.weight"] == "hidden"
    assert roles["final_layer.linear.weight"] == "output"
    groups = {g["role"]: g for g in param_groups(model, weight_decay=0.1)}
    assert groups["vector"]["weight_decay"] == 0.0 and groups["router"]["weight_decay"] == 0.0
    assert groups["expert"]["weight_decay"] == 0.1
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_bench_dense_twin_has_the_same_active_parameters():
    from dit_scale.benchmarks.model import dense_twin
    kwargs = model_args(load_config(None, ["model.name=DiT-S/2-8E2A"]))
    sparse, dense = model_info(kwargs), model_info(dense_twin(kwargs))
    router, dense_biases = 12 * 384 * 8, 12 * (15 * 384 + 384)      # GELU MLP biases; SwiGLU experts have none
    assert sparse["active_params"] - router + dense_biases == dense["params"]
    assert forward_macs(kwargs) - forward_macs(dense_twin(kwargs)) == 256 * router    # router matmuls


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = build_model(small_cfg())
        for p in model.parameters():                    # leave adaLN-Zero so every block contributes
            torch.nn.init.normal_(p, std=0.05)
        model.grad_checkpointing = flag
        model.train()
        torch.manual_seed(1)
        out, aux = model(torch.randn(2, 3, 16, 16), torch.tensor([10.0, 900.0]), torch.tensor([1, 2]))
        (out.square().mean() + aux["moe_loss"]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_unconditional_model_has_one_null_row():
    """model.num_classes=0: every label is the null class 0 (shards without labels, caption-only data)."""
    model = build_model(small_cfg("diffusion.cfg_scale=1", "model.num_classes=0"))
    assert model.y_embedder.table.weight.shape[0] == 1
    out, _ = model(torch.randn(2, 3, 16, 16), torch.tensor([1.0, 500.0]), torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 3, 16, 16)
