"""What the evaluation tests build locally: an FID Inception-v3 with random weights saved to a file (the only
difference from a real run is the weights), a tiny random diffusers AutoencoderKL saved to a folder, and latent
shards encoded with it (data_tools/build_shards.py, as a real latent dataset is built)."""
import os

import numpy as np
import torch
from PIL import Image


def write_random_inception(path: str, seed: int = 0) -> str:
    """The FID Inception architecture with He-normal conv weights (so activations keep their scale through the 94
    convolutions) and random batch-norm statistics, as a .pth state dict (or .safetensors by the suffix)."""
    from dit_scale.evaluation.inception import InceptionV3
    torch.manual_seed(seed)
    net = InceptionV3()
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight)
        elif isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.8, 1.2)
    torch.nn.init.normal_(net.fc.weight, std=0.05)
    state = net.state_dict()
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return path


def write_tiny_vae(path: str, seed: int = 0, size: int = 16, shift_factor=None) -> str:
    """A 2-level AutoencoderKL (factor 2, 4 latent channels) with random weights, saved with save_pretrained."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=size, shift_factor=shift_factor)
    vae.save_pretrained(path)
    return path


def write_image_folder(root: str, classes=("ant", "bee", "cow"), per_class: int = 8, seed: int = 0) -> str:
    """Random RGB images in one sub-folder per class (sizes 18-40 px, png)."""
    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            h, w = rng.integers(18, 40, 2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(root, c, f"{i}.png"))
    return root


def write_latent_shards(out: str, images: str, vae: str, resolution: int = 16, samples_per_shard: int = 5) -> str:
    """Latent shards of `images` encoded by the VAE folder `vae` (manifest records the VAE and its factors)."""
    from data_tools.build_shards import build_shards
    build_shards(out, images=images, resolution=resolution, vae=vae, samples_per_shard=samples_per_shard,
                 batch_size=4, progress=False)
    return out


DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_tiny_dinov2(path: str, seed: int = 0) -> str:
    """A 1-layer transformers DINOv2 with random weights (patch 56 at 224×224: 16 patches), saved with
    save_pretrained (the folder evaluate.py --dinov2 and REPA's online teacher load)."""
    import transformers
    torch.manual_seed(seed)
    config = transformers.Dinov2Config(image_size=224, patch_size=56, hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32)
    transformers.Dinov2Model(config).save_pretrained(path)
    return path


def direct_dino_features(path: str, images_uint8: np.ndarray) -> np.ndarray:
    """[N, D] DINOv2 CLS features by hand (FD-DINOv2's second code path): EDM2's preprocessing written out (bicubic
    antialiased resize of 0..255 to 224², / 255, ImageNet mean / std), transformers' last_hidden_state[:, 0]."""
    import torch.nn.functional as F
    import transformers
    model = transformers.Dinov2Model.from_pretrained(path).eval()
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).double()
    x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False, antialias=True) / 255.0
    mean, std = (torch.tensor(v, dtype=x.dtype).view(1, 3, 1, 1) for v in (DINO_MEAN, DINO_STD))
    x = (x - mean) / std
    with torch.no_grad():
        return model(pixel_values=x.float()).last_hidden_state[:, 0].numpy()
