"""On a GPU (`-m gpu`; skipped without CUDA): data_tools/build_shards.py --text-encoder runs the encoder on the GPU
(bfloat16) in batches of --batch-size captions, and the stored caption features agree with the CPU build (float32)
within bfloat16 rounding; the masks are equal."""
import io
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools import build_shards as bs
from dit_scale.generation.text_encoder import TextEncoder
from tiny_text import TEXT_LEN, write_tiny_encoder

CAPTIONS = ["a small red circle in the top left", "a large blue square in the center", "a ring",
            "a small green triangle in the bottom right", "a large orange ring in the middle left"]


def features_of(out):
    found = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(out, name)) as tar:
                for m in tar.getmembers():
                    if m.name.endswith((".caption_feat.npy", ".caption_mask.npy")):
                        found[m.name] = np.load(io.BytesIO(tar.extractfile(m).read()), allow_pickle=False)
    return found


@pytest.mark.gpu
def test_build_shards_encodes_captions_on_the_gpu_in_batches(tmp_path, monkeypatch):
    for package in ("transformers", "tokenizers"):      # the `data` extra: a GPU node's wheelhouse may not carry it
        pytest.importorskip(package, reason=f"{package} (dit_scale's `data` extra) is not installed")
    encoder = write_tiny_encoder(tmp_path / "t5")
    rng = np.random.default_rng(0)
    lines = []
    for i, caption in enumerate(CAPTIONS):
        path = str(tmp_path / ("img%d.png" % i))
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)
        lines.append("%s\t%s\n" % (path, caption))
    (tmp_path / "list.tsv").write_text("".join(lines))
    calls = []
    real = TextEncoder.__call__

    def recording(self, captions, batch_size=None):
        p = next(self.model.parameters())
        calls.append((len(captions), p.device.type, p.dtype))
        return real(self, captions, batch_size)

    monkeypatch.setattr(TextEncoder, "__call__", recording)
    common = dict(list_file=str(tmp_path / "list.tsv"), resolution=16, pixels=True, text_encoder=encoder,
                  max_length=TEXT_LEN, samples_per_shard=5, batch_size=4, progress=False)
    bs.build_shards(str(tmp_path / "gpu"), device="cuda", **common)
    assert calls == [(4, "cuda", torch.bfloat16), (1, "cuda", torch.bfloat16)]
    bs.build_shards(str(tmp_path / "cpu"), device="cpu", **common)
    gpu, cpu = features_of(str(tmp_path / "gpu")), features_of(str(tmp_path / "cpu"))
    assert set(gpu) == set(cpu) and len(gpu) == 2 * len(CAPTIONS)
    for name, value in cpu.items():
        if name.endswith("mask.npy"):
            np.testing.assert_array_equal(gpu[name], value)
        else:
            np.testing.assert_allclose(gpu[name].astype(np.float32), value.astype(np.float32), rtol=0.05, atol=0.05)
