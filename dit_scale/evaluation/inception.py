"""The FID Inception-v3 network (TensorFlow's 2015-12-05 graph, the one FID, sFID, IS and ADM's evaluator use), with
its weights read from a local file; nothing is downloaded.

    net = load_inception("/models/weights-inception-2015-12-05-6726825d.pth", device)
    feats = net(images_uint8)       # {"pool": [N, 2048], "spatial": [N, 2023], "logits": [N, 1008]}

Weights: torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` or pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth` (both convert the TensorFlow graph; same parameter names as this module), or
the same state dict as `.safetensors`. A `.pth` is read with `torch.load(weights_only=True)`: tensors only, never
code. Download either file once on a machine with internet (docs/evaluation.md).

Why not torch-fidelity's `FeatureExtractorInceptionV3` itself: importing `torch_fidelity` imports torchvision (its
CLIP and VGG extractors), which cannot be installed beside this CPU torch, and once torch-fidelity is installed
without torchvision `import torchmetrics` fails too (torchmetrics imports it when present); it also reads the
weights with `torch.load(weights_only=False)`, which would run code from the file. So the architecture below is
torch-fidelity's (itself from pytorch-fid, Apache License 2.0: github.com/toshas/torch-fidelity,
github.com/mseitzer/pytorch-fid), module for module, and `tf1_bilinear_resize` is its TensorFlow-1.x-exact resize.

Features, as ADM's evaluator (github.com/openai/guided-diffusion, evaluations/evaluator.py) takes them:
- `pool`: the 2048-d average pool ("pool_3"), for FID and precision/recall;
- `spatial`: the first 7 channels of Mixed_6d's 1×1 branch ("mixed_6/conv", 17×17), flattened in TensorFlow's
  channels-last order: 7 · 17 · 17 = 2023 values, for sFID;
- `logits`: pool features times the 1008-way classifier's weights without its bias, for the Inception Score.
The input is uint8 RGB [N, 3, H, W] of any size: resized to 299×299 as TensorFlow 1.x does (bilinear, corners not
aligned), then scaled to [-1, 1].
"""
from __future__ import annotations

import hashlib
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_SIZE = 299
FEATURE_KEYS = ("pool", "spatial", "logits")     # what the network returns, as above
SPATIAL_CHANNELS = 7        # ADM keeps the first 7 of mixed_6/conv's 192 channels: 7 * 17 * 17 = 2023 features


class BasicConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):
    """TensorFlow's 3×3 average pool does not count the zero padding."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = layer(b7d)
        return torch.cat([self.branch1x1(x), b7, b7d, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b (average pool branch) and Mixed_7c (max pool branch: so in TensorFlow's graph)."""

    def __init__(self, in_channels, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, b3d, self.branch_pool(pooled)], 1)


def tf1_bilinear_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of float [N, C, H, W] to size × size exactly as TensorFlow 1.x's ResizeBilinear
    (align_corners=False: source coordinate = destination coordinate × in / out, no half-pixel shift)."""
    def grid(n_in):
        pos = torch.arange(size, dtype=x.dtype, device=x.device) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = pos.long()
        return lo, (lo + 1).clamp_max(n_in - 1), pos - lo.to(x.dtype)

    y_lo, y_hi, dy = grid(x.shape[2])
    x_lo, x_hi, dx = grid(x.shape[3])
    rows_lo, rows_hi = x[:, :, y_lo], x[:, :, y_hi]
    top = rows_lo[:, :, :, x_lo] + (rows_lo[:, :, :, x_hi] - rows_lo[:, :, :, x_lo]) * dx
    bottom = rows_hi[:, :, :, x_lo] + (rows_hi[:, :, :, x_hi] - rows_hi[:, :, :, x_lo]) * dx
    return top + (bottom - top) * dy.view(1, 1, size, 1)


class InceptionV3(nn.Module):
    """FID Inception-v3: uint8 images → {"pool", "spatial", "logits"} (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)          # batch norm always uses the stored statistics

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"InceptionV3 expects uint8 RGB images [N, 3, H, W], got {images.dtype} "
                             f"{list(images.shape)}.")
        x = tf1_bilinear_resize(images.float(), INPUT_SIZE)
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
        x = self.Mixed_6c(self.Mixed_6b(x))
        # sFID: mixed_6/conv, channels-last as TensorFlow stores it, first 7 channels
        spatial = self.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        x = self.Mixed_6e(self.Mixed_6d(x))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return {"pool": pool, "spatial": spatial, "logits": pool @ self.fc.weight.T}


def weights_fingerprint(path: str) -> str:
    """The first 16 hex digits of the weights file's sha256 (names cached reference statistics)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def load_inception(path: str, device="cpu", field: str = "--inception") -> InceptionV3:
    """InceptionV3 with the weights in `path` (.pth/.pt state dict, read weights-only, or .safetensors) on
    `device`; ValueError naming `field` and the file when it is missing or is not this network's weights."""
    if not path or not os.path.isfile(path):
        raise ValueError(f"{field}={path!r} is not a file; download the FID Inception weights once "
                         f"(docs/evaluation.md) and pass their local path.")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:     # a truncated file, a pickle with code, ...: one sentence either way
        raise ValueError(f"{field}={path!r} cannot be read as a state dict of tensors ({type(e).__name__}); pass "
                         f"the FID Inception weights (.pth or .safetensors).") from None
    net = InceptionV3()
    if not isinstance(state, dict):
        raise ValueError(f"{field}={path!r} holds a {type(state).__name__}, not a state dict; pass the FID "
                         f"Inception weights.")
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{field}={path!r} is not the FID Inception-v3 state dict ({len(missing)} missing keys, "
                         f"e.g. {missing[:1]}, {len(unexpected)} unexpected, e.g. {unexpected[:1]}); pass "
                         f"weights-inception-2015-12-05-6726825d.pth or pt_inception-2015-12-05-6726825d.pth.")
    return net.to(device)
