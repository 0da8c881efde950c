"""Text conditioning (model.conditioning=text): cross-attention against a direct computation with a padding mask, the
null caption equals dropped conditioning, a fresh model ignores captions, masking with cross-attention, guidance
with the null caption, μP multipliers / roles / init of the new layers (against microsoft's `mup`), FLOPs against
torch's counter, the shard builder's caption features against the encoder, manifests, and start-up checks."""
import io
import json
import math
import os
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from data_tools import build_shards as bs
from dit_scale.build import build_model, model_args, mup_table
from dit_scale.config import ConfigError
from dit_scale.data import build_loader
from dit_scale.data.manifest import Manifest
from dit_scale.diffusion.objective import build_objective
from dit_scale.diffusion.samplers import sample
from dit_scale.generation.text_encoder import TextEncoder
from dit_scale.models.dit import DiT
from dit_scale.models.flops import forward_macs
from dit_scale.models.masking import draw_keep_indices, kept_mask
from dit_scale.models.text import Captions, CrossAttention
from dit_scale.mup import param_groups
from dit_scale.optim import build_optimizer

from tiny_text import TEXT_DIM, TEXT_LEN, text_cfg, write_tiny_encoder

B = 3


def randomized(model, std=0.1, seed=0, keep_zero=()):
    """Leave the zero inits (adaLN-Zero, zero readout, zero cross-attention output) so every branch matters;
    `keep_zero`: parameter names (suffixes) left as they are."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(tuple(keep_zero)):
                p.normal_(0.0, std)
    return model.eval()


def captions(seed=2, lengths=(3, TEXT_LEN, 1)):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(len(lengths), TEXT_LEN, TEXT_DIM, generator=g)
    mask = torch.arange(TEXT_LEN)[None] < torch.tensor(lengths)[:, None]
    return Captions(features * mask[..., None], mask)


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 16, 16, generator=g), torch.rand(B, generator=g) * 1000


def model_at(*extra, **fields):
    return randomized(build_model(text_cfg(*extra, **{"model.num_heads": 4, **fields})))


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------

def test_cross_attention_against_a_direct_computation():
    torch.manual_seed(0)
    attn = CrossAttention(32, 4).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.2)
    x, ctx = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 7, 32, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1] * 7], dtype=torch.bool)
    out = attn(x, ctx, mask)

    xn = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)
    q = xn @ attn.q.weight.T + attn.q.bias
    kv = ctx @ attn.kv.weight.T + attn.kv.bias
    k, v = kv[..., :32], kv[..., 32:]
    heads = []
    for h in range(4):
        s = slice(8 * h, 8 * (h + 1))
        logits = q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(8)
        logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
        heads.append(torch.softmax(logits, -1) @ v[..., s])
    expected = torch.cat(heads, -1) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    ctx2 = ctx.clone()
    ctx2[0, 3:] = 100.0                                      # padding tokens do not matter
    torch.testing.assert_close(attn(x, ctx2, mask), out, rtol=0, atol=0)


def test_the_model_ignores_padding_tokens_and_reads_the_caption():
    model = model_at()
    x, t = inputs()
    y = captions()
    out = model(x, t, y)[0]
    noisy = Captions(y.features + 50.0 * (~y.mask)[..., None], y.mask)
    torch.testing.assert_close(model(x, t, noisy)[0], out, rtol=1e-5, atol=1e-6)
    other = Captions(y.features.roll(1, dims=0), y.mask.roll(1, dims=0))
    assert not torch.allclose(model(x, t, other)[0], out, atol=1e-3)


def test_null_caption_equals_dropped_conditioning():
    model = model_at("model.caption_dropout=0.5")
    x, t = inputs()
    y = captions()
    drop = torch.tensor([True, False, True])
    null = torch.zeros_like(y.features)
    null[:, 0] = model.caption_embedder.null_caption.detach()
    null_mask = (torch.arange(TEXT_LEN) == 0).expand(B, TEXT_LEN)
    direct = Captions(torch.where(drop[:, None, None], null, y.features), torch.where(drop[:, None], null_mask,
                                                                                        y.mask))
    expected = model(x, t, direct)[0]
    torch.testing.assert_close(model(x, t, y, force_drop=drop)[0], expected, rtol=0, atol=0)
    torch.testing.assert_close(model(x, t, Captions(y.features, y.mask, drop))[0], expected, rtol=0, atol=0)
    # guidance's doubled batch: its second half is the null caption for every row
    doubled = model(torch.cat([x, x]), torch.cat([t, t]), y.with_null())[0]
    all_null = model(x, t, y, force_drop=torch.ones(B, dtype=torch.bool))[0]
    torch.testing.assert_close(doubled[B:], all_null, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(doubled[:B], model(x, t, y)[0], rtol=1e-5, atol=1e-6)
    # an empty caption is no caption; caption_dropout in training draws the null caption
    empty = Captions(y.features, torch.zeros_like(y.mask))
    torch.testing.assert_close(model(x, t, empty)[0], all_null, rtol=0, atol=0)
    model.caption_embedder.dropout = 1.0
    model.train()
    torch.testing.assert_close(model(x, t, y)[0], all_null, rtol=0, atol=0)


def test_a_fresh_text_model_ignores_captions():
    """The zero-initialised cross-attention output and pooled-caption projection make a fresh text model the
    class-free DiT: with every other weight random, captions change nothing until those two learn."""
    cfg = text_cfg()
    fresh = build_model(cfg)
    zero = ("cross_attn.proj.weight", "cross_attn.proj.bias", "caption_embedder.pool.weight",
            "caption_embedder.pool.bias")
    for name, p in fresh.named_parameters():
        if name.endswith(zero):
            assert torch.count_nonzero(p) == 0, name
    assert fresh.caption_embedder.null_caption.std().item() == pytest.approx(TEXT_DIM ** -0.5, rel=0.6)
    model = randomized(fresh, keep_zero=zero)
    x, t = inputs()
    a, b = captions(seed=2), captions(seed=3, lengths=(5, 2, 9))
    torch.testing.assert_close(model(x, t, a)[0], model(x, t, b)[0], rtol=0, atol=0)


def test_masking_with_cross_attention():
    """With every token kept the masked path equals the unmasked one; the backbone sees only kept tokens (dropped
    patches change nothing) while the caption still conditions the kept ones."""
    model = model_at("mask.ratio=0.75", "mask.mixer_depth=1")
    x, t = inputs()
    y = captions()
    everything = torch.arange(16).expand(B, 16)
    torch.testing.assert_close(model(x, t, y, mask=everything)[0], model(x, t, y)[0], rtol=1e-5, atol=1e-6)
    plain = model_at("mask.ratio=0.75")
    keep = draw_keep_indices(B, 16, 0.75, torch.Generator().manual_seed(3))
    x2 = x.clone()
    for b in range(B):
        for n in (~kept_mask(keep, 16))[b].nonzero().flatten().tolist():
            i, j = divmod(n, 4)
            x2[b, :, i * 4:(i + 1) * 4, j * 4:(j + 1) * 4] += 5.0
    out = plain(x, t, y, mask=keep)[0]
    torch.testing.assert_close(plain(x2, t, y, mask=keep)[0], out)
    other = Captions(y.features.roll(1, dims=0), y.mask.roll(1, dims=0))
    assert not torch.allclose(plain(x, t, other, mask=keep)[0], out, atol=1e-3)


def test_guidance_with_the_null_caption():
    """One Euler step with cfg 3: uncond + 3 (cond - uncond) with the null caption as uncond; outside the guidance
    interval the conditional velocity alone."""
    model = model_at()
    objective = build_objective(text_cfg().diffusion)
    x, _ = inputs()
    y = captions()
    t1 = torch.full((B,), objective.model_time(1.0))
    cond = model(x, t1, y)[0]
    uncond = model(x, t1, y, force_drop=torch.ones(B, dtype=torch.bool))[0]
    fn = (lambda xx, tt, c: model(xx, tt, c)[0])
    out = sample(objective, fn, x, y, num_steps=1, cfg_scale=3.0)
    torch.testing.assert_close(out, x - (uncond + 3.0 * (cond - uncond)), rtol=1e-5, atol=1e-5)
    outside = sample(objective, fn, x, y, num_steps=1, cfg_scale=3.0, guidance_interval=(0.0, 0.5))
    torch.testing.assert_close(outside, x - cond, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("objective, sampler", [("flow", "euler"), ("flow", "heun"), ("ddpm", "ddim"),
                                                ("ddpm", "ancestral")])
def test_every_sampler_guides_with_the_null_caption_inside_the_interval(objective, sampler):
    """A second code path: each sampler run with cfg 3 and a guidance interval equals the same sampler run without
    guidance on a model function that does the guidance by hand: at times inside the interval, uncond + 3 (cond -
    uncond) on the eps / velocity channels, with uncond the model under `force_drop` (the null caption) and the
    learned variance from cond; outside it, cond alone. DDPM with the learned variance (DiT's layout)."""
    extra = ("diffusion.objective=ddpm", "model.learn_sigma=true") if objective == "ddpm" else ()
    cfg = text_cfg(*extra, **{"model.num_heads": 4})
    model = randomized(build_model(cfg))
    obj = build_objective(cfg.diffusion, learn_sigma=cfg.model.learn_sigma)
    y = captions()
    noise = torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    low, high, scale = 0.3, 0.8, 3.0
    per_time = (obj.time_scale if objective == "flow" else obj.num_timesteps)
    guided_times = []

    def by_hand(x, t_model, c):
        cond = model(x, t_model, c)[0]
        time = float(t_model[0]) / per_time
        if not low <= time <= high:
            return cond
        guided_times.append(time)
        uncond = model(x, t_model, c, force_drop=torch.ones(len(c), dtype=torch.bool))[0]
        guided = uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3])
        return torch.cat([guided, cond[:, 3:]], dim=1)

    fn = (lambda x, t_model, c: model(x, t_model, c)[0])
    steps = 4
    out = sample(obj, fn, noise, y, num_steps=steps, sampler=sampler, cfg_scale=scale, guidance_interval=(low, high),
                 generator=torch.Generator().manual_seed(9))
    expected = sample(obj, by_hand, noise, y, num_steps=steps, sampler=sampler,
                      generator=torch.Generator().manual_seed(9))
    assert guided_times and len(guided_times) < {"heun": 2 * steps - 1}.get(sampler, steps)   # both kinds of step
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    unguided = sample(obj, fn, noise, y, num_steps=steps, sampler=sampler, generator=torch.Generator().manual_seed(9))
    assert not torch.allclose(out, unguided, atol=1e-3)


def test_analytic_flops_match_torch_flop_counter():
    cfg = text_cfg("moe.expert_impl=loop", **{"model.num_heads": 4})
    args = model_args(cfg)
    model = DiT(args)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        model(torch.randn(1, 3, 16, 16), torch.tensor([500.0]), captions(lengths=(4,)))
    tokens, d = 16, args.hidden_size
    norms = args.depth * 3 * tokens * d + tokens * d             # norm1, norm2, the cross-attention's; final
    assert forward_macs(args) - norms == counter.get_total_flops() // 2
    class_args = model_args(text_cfg(**{"model.conditioning": "class"}))
    assert forward_macs(args) > forward_macs(class_args)


# ----------------------------------------------------------------------------------------------------------------
# μP, roles, init
# ----------------------------------------------------------------------------------------------------------------

LR, WD, BASE = 1e-3, 0.1, 64


def cfg_at(width, mup=True):
    return text_cfg(f"mup.enabled={str(mup).lower()}", f"mup.base_width={BASE}", f"optim.lr={LR}",
                    f"optim.weight_decay={WD}", **{"model.name": "DiT-XS/4-4E2A", "model.hidden_size": width,
                                                   "model.num_heads": width // 32})


def test_mup_multipliers_roles_and_init_of_the_text_layers():
    m = 2
    table = mup_table(cfg_at(m * BASE))
    expect = {   # name: (role, μP class, lr mult, init std at the base width)
        "caption_embedder.proj.fc1.weight": ("input", "input-like", 1.0, math.sqrt(2 / (TEXT_DIM + BASE))),
        "caption_embedder.proj.fc2.weight": ("hidden", "hidden", 1 / m, math.sqrt(2 / (2 * BASE))),
        "caption_embedder.pool.weight": ("hidden", "hidden", 1 / m, 0.0),
        "caption_embedder.null_caption": ("vector", "input-like", 1.0, TEXT_DIM ** -0.5),
        "blocks.0.cross_attn.q.weight": ("hidden", "hidden", 1 / m, math.sqrt(2 / (2 * BASE))),
        "blocks.0.cross_attn.kv.weight": ("hidden", "hidden", 1 / m, math.sqrt(2 / (3 * BASE))),
        "blocks.0.cross_attn.proj.weight": ("hidden", "hidden", 1 / m, 0.0),
        "blocks.1.cross_attn.kv.bias": ("vector", "input-like", 1.0, 0.0),
    }
    for name, (role, scaling, lr_mult, base_std) in expect.items():
        info = table[name]
        assert (info.role, info.scaling, info.lr_mult) == (role, scaling, lr_mult), name
        std = base_std / math.sqrt(m) if scaling == "hidden" else base_std
        assert info.init_std == pytest.approx(std), name
    groups = param_groups(build_model(cfg_at(m * BASE)), WD, mup=table)
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert wd["caption_embedder.null_caption"] == 0.0 and wd["caption_embedder.proj.fc1.weight"] == WD
    assert wd["blocks.0.cross_attn.q.weight"] == pytest.approx(WD * m)
    # at the base width μP is SP: every multiplier 1
    assert all(info.lr_mult == 1.0 for info in mup_table(cfg_at(BASE)).values())


def test_mup_learning_rates_match_mup_package():
    mup = pytest.importorskip("mup")

    def sp_model(w):
        model = DiT(model_args(cfg_at(w, mup=False)))
        old = model.final_layer.linear
        model.final_layer.linear = mup.MuReadout(old.in_features, old.out_features, readout_zero_init=True)
        return model

    width = 4 * BASE
    ref = mup.set_base_shapes(sp_model(width), sp_model(BASE), rescale_params=False)
    decay = [p for p in ref.parameters() if p.ndim >= 2]
    no_decay = [p for p in ref.parameters() if p.ndim < 2]
    opt = mup.MuAdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=LR, weight_decay=WD)
    ref_lr = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    ref_by_name = {n: ref_lr[id(p)] for n, p in ref.named_parameters()}
    cfg = cfg_at(width)
    ours = build_model(cfg)
    groups = build_optimizer(cfg.optim, ours, mup_table(cfg)).param_groups
    ours_lr = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    for name, p in ours.named_parameters():
        if "caption" not in name and "cross_attn" not in name:
            continue
        lr, wd = ours_lr[id(p)]
        assert lr == pytest.approx(ref_by_name[name][0], rel=1e-12), name
        assert lr * wd == pytest.approx(ref_by_name[name][0] * ref_by_name[name][1], rel=1e-12), name


# ----------------------------------------------------------------------------------------------------------------
# Data: caption features in shards, manifests, start-up checks
# ----------------------------------------------------------------------------------------------------------------

CAPTIONS = ["a small red circle in the top left", "a large blue square in the center", "a ring",
            "a small green triangle in the bottom right", "a large orange ring in the middle left"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return write_tiny_encoder(tmp_path_factory.mktemp("t5") / "t5")


def write_images(folder, n, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = rng.integers(18, 40, 2)
        path = os.path.join(folder, "img%d.png" % i)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def members_of(out):
    found = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(out, name)) as tar:
                found.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return found


def test_caption_features_round_trip_through_shards(tmp_path, encoder):
    """`path<TAB>caption` lists: the stored float16 features and masks are the encoder's on the same caption, and
    the loader delivers them (float32 [B, L, T], bool [B, L]) with the caption text."""
    paths = write_images(str(tmp_path / "img"), len(CAPTIONS))
    (tmp_path / "list.tsv").write_text("".join("%s\t%s\n" % (p, c) for p, c in zip(paths, CAPTIONS)))
    assert bs.read_list_file(str(tmp_path / "list.tsv"))[0] == (paths[0], None, CAPTIONS[0])
    out = str(tmp_path / "shards")
    manifest = bs.build_shards(out, list_file=str(tmp_path / "list.tsv"), resolution=16, pixels=True,
                               text_encoder=encoder, max_length=TEXT_LEN, samples_per_shard=3, batch_size=2,
                               progress=False)
    assert manifest["text_key"] == "caption_feat.npy" and manifest["text_mask_key"] == "caption_mask.npy"
    assert manifest["text_shape"] == [TEXT_LEN, TEXT_DIM] and manifest["text_dtype"] == "float16"
    assert {k: manifest["text_encoder"][k] for k in ("width", "max_length", "model_type")} == {
        "width": TEXT_DIM, "max_length": TEXT_LEN, "model_type": "t5"}
    assert json.load(open(os.path.join(out, "manifest.json"))) == manifest
    direct_feat, direct_mask = TextEncoder(encoder, TEXT_LEN)(CAPTIONS)
    by_caption = {c: (f, m) for c, f, m in zip(CAPTIONS, direct_feat, direct_mask)}
    stored = members_of(out)
    for key in ("%08d" % i for i in range(len(CAPTIONS))):
        caption = stored[key + ".caption.txt"].decode()
        feat = np.load(io.BytesIO(stored[key + ".caption_feat.npy"]), allow_pickle=False)
        mask = np.load(io.BytesIO(stored[key + ".caption_mask.npy"]), allow_pickle=False)
        assert feat.dtype == np.float16 and feat.shape == (TEXT_LEN, TEXT_DIM) and mask.dtype == bool
        f, m = by_caption[caption]
        assert torch.equal(torch.from_numpy(mask), m) and m.sum() == len(caption.split()) + 1    # words + </s>
        torch.testing.assert_close(torch.from_numpy(feat.astype(np.float32)), f.half().float(), rtol=0, atol=0)
    loader = build_loader(SimpleNamespace(path=out, batch_size=5, shuffle_buffer=0),
                          expect={"x": (3, 16, 16), "text_dim": TEXT_DIM, "text_len": TEXT_LEN, "num_classes": 0})
    batch = next(loader)
    assert batch["caption_feat"].dtype == torch.float32 and batch["caption_feat"].shape == (5, TEXT_LEN, TEXT_DIM)
    assert batch["caption_mask"].dtype == torch.bool
    for caption, feat, mask in zip(batch["caption"], batch["caption_feat"], batch["caption_mask"]):
        f, m = by_caption[caption]
        assert torch.equal(mask, m) and torch.equal(feat, f.half().float())


def test_build_shards_encodes_captions_in_batches_on_the_worker_device(tmp_path, encoder, monkeypatch):
    """The text encoder runs once per --batch-size chunk of a shard, on the worker's device (here the CPU; the GPU
    case is tests/gpu/test_gpu_text.py), and never one caption at a time."""
    calls = []
    real = TextEncoder.__call__

    def recording(self, captions, batch_size=None):
        calls.append((len(captions), str(next(self.model.parameters()).device)))
        return real(self, captions, batch_size)

    monkeypatch.setattr(TextEncoder, "__call__", recording)
    paths = write_images(str(tmp_path / "img"), len(CAPTIONS))
    (tmp_path / "list.tsv").write_text("".join("%s\t%s\n" % (p, c) for p, c in zip(paths, CAPTIONS)))
    bs.build_shards(str(tmp_path / "shards"), list_file=str(tmp_path / "list.tsv"), resolution=16, pixels=True,
                    text_encoder=encoder, max_length=TEXT_LEN, samples_per_shard=3, batch_size=2, device="cpu",
                    progress=False)
    assert calls == [(2, "cpu"), (1, "cpu"), (2, "cpu")]            # shard 0: 2 + 1 captions, shard 1: 2


def test_image_folders_with_sidecar_captions(tmp_path, encoder):
    folder = tmp_path / "flat"
    paths = write_images(str(folder), 3, seed=1)
    for p, c in zip(paths, CAPTIONS):
        open(os.path.splitext(p)[0] + ".txt", "w").write(c + "\n")
    items, names = bs.scan_image_folder(str(folder))
    assert names is None and [(label, c) for _, label, c in items] == [(None, c) for c in CAPTIONS[:3]]
    manifest = bs.build_shards(str(tmp_path / "out"), images=str(folder), resolution=16, pixels=True,
                               text_encoder=encoder, max_length=TEXT_LEN, progress=False)
    assert manifest["num_samples"] == 3 and manifest["label_key"] is None and manifest["text_shape"] == [12, 16]
    os.remove(os.path.splitext(paths[1])[0] + ".txt")
    with pytest.raises(ValueError, match="caption for every image"):
        bs.build_shards(str(tmp_path / "out2"), images=str(folder), resolution=16, pixels=True,
                        text_encoder=encoder, max_length=TEXT_LEN, progress=False)


def test_manifests_with_and_without_caption_features():
    old = {"format_version": 2, "kind": "pixel", "image_key": "png", "shards": [{"name": "a.tar", "num_samples": 2}]}
    m = Manifest.from_dict(old)
    assert m.text_key is None and "text_key" not in m.to_dict()        # older manifests load and write unchanged
    text = dict(old, text_key="caption_feat.npy", text_mask_key="caption_mask.npy", text_shape=[12, 16],
                text_dtype="float16", text_encoder={"path": "/x", "width": 16, "max_length": 12})
    assert Manifest.from_dict(Manifest.from_dict(text).to_dict()).text_shape == [12, 16]
    for bad, field in ((dict(text, text_mask_key=None), "text_mask_key"), (dict(text, text_key=None), "text_key"),
                       (dict(text, text_encoder={"width": 8}), "text_encoder.width"),
                       (dict(text, text_shape=[12]), "text_shape")):
        with pytest.raises(ConfigError, match=field) as err:
            Manifest.from_dict(bad)
        assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")


def test_loader_refuses_shards_that_do_not_fit_a_text_model(tmp_path, encoder, tiny_shards):
    from tiny_text import write_text_shards
    shards = write_text_shards(tmp_path / "shards", encoder, num_samples=8, samples_per_shard=4)
    data = SimpleNamespace(path=shards, batch_size=2)
    for expect, words in (({"text_dim": 24}, ("width 16", "model.text_dim=24", "set model.text_dim=16")),
                          ({"text_len": 77}, ("12 tokens", "model.text_len=77", "--max-length 77"))):
        with pytest.raises(ConfigError) as err:
            build_loader(data, expect=expect)
        message = str(err.value)
        assert all(w in message for w in words) and message.count(". ") == 0 and message.endswith("."), message
    with pytest.raises(ConfigError, match="holds no caption features .* --text-encoder PATH"):
        build_loader(SimpleNamespace(path=tiny_shards, batch_size=2), expect={"text_dim": 16})


@pytest.mark.parametrize("override, field", [(("model.text_dim=null",), "model.text_dim"),
                                             (("model.text_len=null",), "model.text_len"),
                                             (("model.caption_dropout=0", "diffusion.cfg_scale=2"),
                                              "model.caption_dropout"),
                                             (("model.conditioning=words",), "model.conditioning")])
def test_config_errors_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        text_cfg(*override)


def test_text_dim_is_read_from_the_text_encoder(encoder):
    assert text_cfg(f"model.text_encoder={encoder}", **{"model.text_dim": "null"}).model.text_dim == TEXT_DIM
