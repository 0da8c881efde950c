"""Shard builder (data_tools/build_shards.py) with a tiny random VAE and DINOv2 saved to a temp folder; its shards
read back through the loader and match a direct computation.

    .venv/bin/python -m pytest tests/test_data_tools.py -q          # add -m slow for the multi-worker CLI run
"""
import io
import json
import os
import subprocess
import sys
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tiny import ROOT
from data_tools import build_shards as bs
from dit_scale.data import build_loader

RES = 16


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from diffusers import AutoencoderKL
    from transformers import Dinov2Config, Dinov2Model
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=RES)
    vae.save_pretrained(root / "vae")
    teacher = Dinov2Model(Dinov2Config(image_size=28, patch_size=14, hidden_size=24, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32))
    teacher.save_pretrained(root / "teacher")
    return str(root / "vae"), str(root / "teacher")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """3 classes x 4 random images of different sizes and aspect ratios, png and jpg."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in ("ant", "bee", "cow"):
        os.makedirs(root / c)
        for i in range(4):
            h, w = rng.integers(18, 60, 2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / c / ("%d.%s" % (
                i, "png" if i % 2 else "jpg")))
    return str(root)


@pytest.fixture(scope="module")
def built(models, images, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shards"))
    manifest = bs.build_shards(out, images=images, resolution=RES, vae=models[0], teacher=models[1],
                               teacher_resolution=28, samples_per_shard=5, batch_size=3, progress=False)
    return out, manifest


def read_tar(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def load_npy(data):
    return np.load(io.BytesIO(data), allow_pickle=False)


def test_manifest_and_checksums(built, images):
    out, manifest = built
    assert manifest["num_samples"] == 12 and [s["num_samples"] for s in manifest["shards"]] == [5, 5, 2]
    assert manifest["x_shape"] == [4, 8, 8] and manifest["feat_shape"] == [16, 24]     # 8x8 latents, 4x4 tokens
    assert manifest["image_key"] == "latent.npy" and manifest["feat_key"] == "feat.npy"
    assert manifest["class_names"] == ["ant", "bee", "cow"] and manifest["num_classes"] == 3
    assert manifest["vae"]["scaling_factor"] == 0.18215 and manifest["teacher"]["model_type"] == "dinov2"
    assert json.load(open(os.path.join(out, "manifest.json"))) == manifest
    for entry in manifest["shards"]:
        path = os.path.join(out, entry["name"])
        assert bs.sha256_file(path) == entry["sha256"] and os.path.getsize(path) == entry["bytes"]
        members = read_tar(path)
        assert len(members) == 4 * entry["num_samples"]                 # latent, latent_flip, feat, cls
        for name, data in members.items():
            if name.endswith("latent.npy"):
                assert load_npy(data).dtype == np.float16 and load_npy(data).shape == (4, 8, 8)


def test_shards_match_a_direct_computation(built, images, models):
    """Every stored latent/feature equals the VAE/teacher applied here to the same ADM crop."""
    from diffusers import AutoencoderKL
    from transformers import Dinov2Model
    out, manifest = built
    items, _ = bs.scan_image_folder(images)
    order = np.random.default_rng(0).permutation(len(items))
    vae, teacher = AutoencoderKL.from_pretrained(models[0]).eval(), Dinov2Model.from_pretrained(models[1]).eval()
    members = {}
    for entry in manifest["shards"]:
        members.update(read_tar(os.path.join(out, entry["name"])))
    for key in range(12):
        path, label, _ = items[order[key]]
        crop = bs.center_crop_arr(Image.open(path).convert("RGB"), RES)
        x = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            lat = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist.mean * 0.18215
            pix = torch.nn.functional.interpolate((x + 1) / 2, size=(28, 28), mode="bicubic", antialias=True)
            pix = (pix.clamp(0, 1) - torch.tensor(bs.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
                bs.IMAGENET_STD).view(1, 3, 1, 1)
            tokens = teacher(pixel_values=pix).last_hidden_state[:, 1:]          # [1, 4, 24]: a 2x2 grid
            grid = torch.nn.functional.interpolate(tokens.transpose(1, 2).reshape(1, 24, 2, 2), size=(4, 4),
                                                   mode="bilinear").flatten(2).transpose(1, 2)[0]
        name = "%08d" % key
        np.testing.assert_allclose(load_npy(members[name + ".latent.npy"]), lat[0].numpy(), atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(load_npy(members[name + ".latent_flip.npy"]), lat[1].numpy(), atol=2e-3,
                                   rtol=2e-3)
        np.testing.assert_allclose(load_npy(members[name + ".feat.npy"]), grid.numpy(), atol=5e-3, rtol=5e-3)
        assert int(members[name + ".cls"]) == label


def test_loader_reads_builder_shards(built):
    out, manifest = built
    c = SimpleNamespace(path=out, batch_size=4, shuffle_buffer=0, hflip=True, image_key="auto", num_workers=0)
    loader = build_loader(c, expect={"x": (4, 8, 8), "feat_dim": 24, "feat_tokens": 16})
    batches = [next(loader) for _ in range(3)]
    assert all(b["x"].shape == (4, 4, 8, 8) and b["feat"].shape == (4, 16, 24) for b in batches)
    members = {}
    for entry in manifest["shards"]:
        members.update(read_tar(os.path.join(out, entry["name"])))
    flips = 0
    for b in batches:
        for key, x, feat, y in zip(b["key"], b["x"], b["feat"], b["y"]):
            plain = torch.from_numpy(load_npy(members[key + ".latent.npy"]).astype(np.float32))
            flipped = torch.from_numpy(load_npy(members[key + ".latent_flip.npy"]).astype(np.float32))
            f = torch.from_numpy(load_npy(members[key + ".feat.npy"]).astype(np.float32))
            if torch.equal(x, flipped):                              # the stored flip, features mirrored with it
                flips += 1
                assert torch.equal(feat, f.reshape(4, 4, 24).flip(1).reshape(16, 24))
            else:
                assert torch.equal(x, plain) and torch.equal(feat, f)
            assert y.item() == int(members[key + ".cls"])
    assert 0 < flips < 12
    assert sorted(k for b in batches for k in b["key"]) == ["%08d" % i for i in range(12)]


def test_rerun_completes_an_interrupted_build(built, images, models, tmp_path):
    out, manifest = built
    work = tmp_path / "again"
    os.makedirs(work)
    for name in os.listdir(out):
        with open(os.path.join(out, name), "rb") as src, open(work / name, "wb") as dst:
            dst.write(src.read())
    os.remove(work / "shard-000001.tar")                              # as if killed while writing shard 1
    (work / "shard-000001.tar.tmp-999").write_bytes(b"partial")
    (work / "notes.tmpl").write_text("mine")                         # a user's files beside the shards stay
    (work / "budget.tmp.xlsx").write_text("mine")
    (work / "cache.tmp").mkdir()
    os.remove(work / "manifest.json")
    kept = os.stat(work / "shard-000000.tar").st_mtime_ns
    again = bs.build_shards(str(work), images=images, resolution=RES, vae=models[0], teacher=models[1],
                            teacher_resolution=28, samples_per_shard=5, batch_size=3, progress=False)
    assert again == manifest | {"shards": again["shards"]} and again["shards"] == manifest["shards"]  # same bytes
    assert os.stat(work / "shard-000000.tar").st_mtime_ns == kept
    assert sorted(n for n in os.listdir(work) if ".tmp" in n) == ["budget.tmp.xlsx", "cache.tmp", "notes.tmpl"]
    with pytest.raises(ValueError, match="another --out"):
        bs.build_shards(str(work), images=images, resolution=RES, vae=models[0], samples_per_shard=5,
                        progress=False)


def test_pixel_mode_from_list_file(tmp_path, images):
    lines = []
    for c, cls in enumerate(("ant", "bee")):
        for i in range(3):
            lines.append("%s/%s/%d.%s\t%d\tcaption %s %d" % (images, cls, i, "png" if i % 2 else "jpg", c, cls, i))
    (tmp_path / "list.tsv").write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "pix")
    manifest = bs.build_shards(out, list_file=str(tmp_path / "list.tsv"), resolution=RES, pixels=True,
                               samples_per_shard=4, seed=1, progress=False)
    assert manifest["image_key"] == "image.png" and manifest["x_shape"] == [3, RES, RES]
    loader = build_loader(SimpleNamespace(path=out, batch_size=6, shuffle_buffer=0), expect={"x": (3, RES, RES)})
    batch = next(loader)
    order = np.random.default_rng(1).permutation(6)
    for key, x, y, caption in zip(batch["key"], batch["x"], batch["y"], batch["caption"]):
        path, label, text = lines[order[int(key)]].split("\t")
        crop = bs.center_crop_arr(Image.open(path).convert("RGB"), RES)
        assert torch.equal(((x + 1) * 127.5).round().to(torch.uint8), torch.from_numpy(crop).permute(2, 0, 1))
        assert y.item() == int(label) and caption == text


@pytest.mark.slow
def test_cli_with_two_workers(tmp_path, images, models):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "data_tools", "build_shards.py"), "--images", images,
                           "--out", str(out), "--resolution", str(RES), "--vae", models[0], "--samples-per-shard",
                           "3", "--workers", "2"], capture_output=True, text=True, check=True)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary == {"num_samples": 12, "x_shape": [4, 8, 8], "feat_shape": None, "image_key": "latent.npy",
                       "shards": 4}
    loader = build_loader(SimpleNamespace(path=str(out), batch_size=12, shuffle_buffer=0))
    assert sorted(next(loader)["key"]) == ["%08d" % i for i in range(12)]


def test_an_empty_class_folder_is_still_a_class_and_a_negative_label_is_refused(tmp_path):
    """Folder input: a last class folder without images keeps its class id (num_classes counts the folders, as
    class_names does; the manifest was refused after every shard was encoded). List input: a negative label is one
    sentence before any encoding (it made every such sample corrupt at training time)."""
    rng = np.random.default_rng(0)
    for name in ("ant", "bee", "cat"):
        os.makedirs(tmp_path / "img" / name)
    for name in ("ant", "bee"):
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "img" / name / f"{i}.png")
    manifest = bs.build_shards(str(tmp_path / "out"), images=str(tmp_path / "img"), resolution=8, pixels=True,
                               progress=False)
    assert manifest["num_classes"] == 3 and manifest["class_names"] == ["ant", "bee", "cat"]
    (tmp_path / "list.txt").write_text("img/ant/0.png\t1\nimg/bee/0.png\t-1\n")
    with pytest.raises(ValueError, match="line 2: label -1 is negative"):
        bs.build_shards(str(tmp_path / "out2"), list_file=str(tmp_path / "list.txt"), resolution=8, pixels=True,
                        progress=False)
    assert not os.path.exists(tmp_path / "out2" / "shard-000000.tar")
