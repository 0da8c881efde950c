"""Decoding samples: a tiny random diffusers AutoencoderKL saved locally, decoded by dit_scale.generation.vae against a
direct vae.decode(z / scaling + shift); the decoder a run's config finds through its shards' manifest; decoded, titled
class grids.

    .venv/bin/python -m pytest -q tests/unit/test_vae_decode.py
"""
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from eval_utils import write_tiny_vae
from tiny import tiny_cfg
from dit_scale.config import ConfigError
from dit_scale.data import Manifest, ShardEntry, write_manifest
from dit_scale.generation.vae import LatentDecoder, PixelDecoder, image_decoder, to_uint8


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return write_tiny_vae(str(tmp_path_factory.mktemp("vae") / "vae"), shift_factor=0.1)


def test_latent_decoder_matches_a_direct_decode(vae_dir):
    from diffusers import AutoencoderKL
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    decoder = LatentDecoder.from_folder(vae_dir)
    assert decoder.scaling_factor == 0.18215 and decoder.shift_factor == pytest.approx(0.1)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    with torch.no_grad():
        direct = vae.decode(z / 0.18215 + 0.1).sample
    torch.testing.assert_close(decoder(z), direct)
    assert decoder(z).shape == (3, 3, 16, 16)
    x = torch.tensor([[-1.0, -0.999, 0.0, 0.5, 1.0, 2.0]]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert to_uint8(x)[0, 0, 0].tolist() == [0, 0, 128, 191, 255, 255]     # round((x + 1) · 127.5), clamped


def fake_latent_shards(folder, vae):
    """A manifest naming the VAE next to one (empty) shard: what image_decoder reads."""
    os.makedirs(folder, exist_ok=True)
    with tarfile.open(os.path.join(folder, "shard-000000.tar"), "w"):
        pass
    write_manifest(Manifest(shards=[ShardEntry("shard-000000.tar", 0)], kind="latent", image_key="latent.npy",
                            x_shape=[4, 8, 8], num_classes=4, class_names=["a", "b", "c", "d"],
                            vae={"path": vae, "scaling_factor": 0.5, "shift_factor": 0.2}), folder)
    return folder


def test_image_decoder_follows_the_shards_manifest(vae_dir, tmp_path):
    shards = fake_latent_shards(str(tmp_path / "latents"), vae_dir)
    latent_cfg = tiny_cfg(f"data.path={shards}", **{"model.in_channels": 4, "model.input_size": 8})
    decoder = image_decoder(latent_cfg)
    assert isinstance(decoder, LatentDecoder) and decoder.path == vae_dir
    assert (decoder.scaling_factor, decoder.shift_factor) == (0.5, 0.2)          # the manifest's, not the folder's
    explicit = image_decoder(latent_cfg, vae=vae_dir)
    assert (explicit.scaling_factor, explicit.shift_factor) == (0.18215, pytest.approx(0.1))
    assert isinstance(image_decoder(tiny_cfg()), PixelDecoder)                   # 3 channels, no manifest here
    lost = tiny_cfg(f"data.path={tmp_path / 'nowhere'}", **{"model.in_channels": 4, "model.input_size": 8})
    assert image_decoder(lost) is None
    with pytest.raises(ConfigError, match="no VAE is known .* pass --vae"):
        image_decoder(lost, required=True)
    with pytest.raises(ConfigError, match="has no readable config.json; pass a local diffusers AutoencoderKL"):
        image_decoder(lost, vae=str(tmp_path))


def test_save_class_grid_decodes_and_titles(vae_dir, tmp_path):
    from dit_scale.generation.sampling import save_class_grid, save_grid
    shards = fake_latent_shards(str(tmp_path / "latents"), vae_dir)
    cfg = tiny_cfg(f"data.path={shards}", "logging.samples_per_class=2",
                   **{"model.in_channels": 4, "model.input_size": 8})
    from dit_scale.generation.vae import data_manifest
    manifest, _ = data_manifest(cfg.data)
    samples = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    decoder = image_decoder(cfg)
    path = save_class_grid(samples, cfg, str(tmp_path / "grid.png"), decoder=decoder, manifest=manifest,
                           classes=[1, 3], per_class=2, title="t")
    plain = np.asarray(Image.open(save_grid(decoder(samples), 2, str(tmp_path / "plain.png"), upscale=2)))
    titled = np.asarray(Image.open(path))
    assert plain.shape == (2 * (2 * 18 + 2), 2 * (2 * 18 + 2), 3)                # 16×16 decoded images
    np.testing.assert_array_equal(titled[-plain.shape[0]:, -plain.shape[1]:], plain)
