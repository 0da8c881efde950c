"""Random latent shards shaped like ImageNet-256 with the SD VAE and DINOv2-B/14 features, for `launch/bench.py data`
(latent.npy + latent_flip.npy float16 [4, 32, 32], feat.npy float16 [256, 768], cls), with their manifest."""
from __future__ import annotations

import os

import numpy as np

from data_tools.writer import ShardWriter, encode_label, encode_npy
from dit_scale.data.manifest import Manifest, write_manifest


def write_random_shards(out: str, num_samples: int, per_shard: int, feat_shape) -> str:
    """Latent shards shaped like ImageNet-256 with the SD VAE (+ DINOv2-B features) and their manifest, in `out`."""
    rng = np.random.default_rng(0)
    latents = [encode_npy(a) for a in rng.standard_normal((97, 4, 32, 32)).astype(np.float16)]   # pools: drawing
    feats = [encode_npy(a) for a in rng.standard_normal((61, *feat_shape)).astype(np.float16)] if feat_shape else []
    shards = []                                                                # 100s of MB of normals is slow
    for index, start in enumerate(range(0, num_samples, per_shard)):
        with ShardWriter(os.path.join(out, "shard-%06d.tar" % index)) as shard:
            for key in range(start, min(num_samples, start + per_shard)):
                members = {"latent.npy": latents[(2 * key) % 97], "latent_flip.npy": latents[(2 * key + 1) % 97]}
                if feat_shape:
                    members["feat.npy"] = feats[key % 61]
                members["cls"] = encode_label(key % 1000)
                shard.add("%08d" % key, members)
        shards.append(shard.entry)
    write_manifest(Manifest(shards=shards, builder="bench_data", kind="latent", image_key="latent.npy",
                            flip_key="latent_flip.npy", label_key="cls", feat_key="feat.npy" if feat_shape else None,
                            x_shape=[4, 32, 32], x_dtype="float16", feat_shape=list(feat_shape) if feat_shape else None,
                            feat_dtype="float16" if feat_shape else None, resolution=256, num_classes=1000), out)
    return out
