"""Reference statistics: what generated images are compared with.

    ref = load_reference("VIRTUAL_imagenet256_labeled.npz", extractor)   # ADM's reference batch
    ref = load_reference("shards:data/in1k-val", extractor)               # computed once, then cached
    ref.mu, ref.sigma, ref.mu_s, ref.sigma_s, ref.pool                    # pool: real features for precision/recall

Two sources:
- an `.npz` file: ADM's reference batches (keys `mu`, `sigma` of the pool features, optional `mu_s`, `sigma_s` of
  the spatial ones, optional `arr_0`: uint8 images [N, H, W, 3] whose pool features this computes, over all ranks,
  for precision/recall) or a file this module wrote (the same keys, plus `pool` and a description). Always read with
  `allow_pickle=False`.
- `shards:PATH`: the first `num_samples` samples of those shards (decoded through the VAE for latent shards, so
  the reference is the VAE's reconstructions) run through Inception over all ranks; the result is cached as
  `PATH/inception_ref_<weights fingerprint>_<num_samples>_<data key>.npz` (or `cache`) and read from there next
  time. The data key hashes what the statistics depend on besides the network: the shards used (names, sizes,
  modification times) and the VAE that decodes them; the cache records it, so a cache of other data (shards rebuilt
  in place, another --vae, an explicit `cache` of another reference) is recomputed, never read. The cache keeps the
  pool features of the first PR_SAMPLES images for precision/recall.

DINOv2 statistics for FD-DINOv2 (`load_dino_reference`, an extractor whose network is `dinov2.DINOv2Features`):
`shards:PATH` as above, cached as `PATH/dinov2_ref_<folder fingerprint>_<num_samples>_<data key>.npz`; an `.npz`
written for DINOv2 (`features` = "dinov2") is read as it is; any other `.npz` with images (`arr_0`, e.g. ADM's
reference batch) has their DINOv2 statistics computed over all ranks and cached next to it
(`<name>_dinov2_<fingerprint>.npz`, recomputed when that file changes).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from dit_scale.errors import ConfigError
from dit_scale.evaluation.dinov2 import KEY as DINO_KEY
from dit_scale.evaluation.inception import FEATURE_KEYS
from dit_scale.evaluation.scores import gaussian_stats
from dit_scale.evaluation.shard_samples import ShardSet
from dit_scale.generation.vae import LatentDecoder, to_uint8

PR_SAMPLES = 10000          # real images for precision/recall (ADM's reference batches hold 10k)
SHARDS_PREFIX = "shards:"


@dataclass
class Reference:
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: Optional[np.ndarray] = None
    sigma_s: Optional[np.ndarray] = None
    pool: Optional[np.ndarray] = None          # [M, 2048] real pool features (precision / recall)
    source: str = ""
    features: str = "inception"                # or "dinov2": which network's statistics these are
    key: str = ""                              # a cache's data key (see the module docstring); "" for other files

    def save(self, path: str) -> str:
        """Write an .npz (no pickled objects) atomically."""
        arrays = {"mu": self.mu, "sigma": self.sigma, "source": np.array(self.source),
                  "features": np.array(self.features), "key": np.array(self.key)}
        for key in ("mu_s", "sigma_s", "pool"):
            if getattr(self, key) is not None:
                arrays[key] = getattr(self, key)
        tmp = f"{path}.tmp-{os.getpid()}.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        return path


class FeatureExtractor:
    """What computes features of images spread over the ranks: the Inception network, the device, the topology's
    rank and world size, a batch size. `extract(batches)` runs on every rank (collective at the end)."""

    def __init__(self, inception, device, rank: int = 0, world_size: int = 1, batch_size: int = 64,
                 fingerprint: str = ""):
        self.inception, self.device = inception, torch.device(device)
        self.rank, self.world_size, self.batch_size, self.fingerprint = rank, world_size, batch_size, fingerprint

    def features(self, images_uint8: torch.Tensor) -> dict:
        with torch.autocast(self.device.type, enabled=False):       # float32 features, whatever the caller runs in
            return self.inception(images_uint8.to(self.device))

    def gather(self, batches, keys=FEATURE_KEYS) -> dict:
        """Feed (indices, uint8 images [B, 3, H, W]) pairs of this rank; return every rank's features by index."""
        # Imported here, not at the top: importing torchmetrics takes ~3 s on a 2-core CPU (it imports transformers
        # and scipy), paid by every process that imports the trainer although only an evaluation gathers features.
        from dit_scale.evaluation.features import FeatureStore
        store = FeatureStore(keys=keys).to(self.device)
        dims = None
        for indices, images in batches:
            feats = self.features(images)
            dims = {k: feats[k].shape[1] for k in keys}
            store.update(torch.as_tensor(indices), feats)
        store.add_nothing(dims or _feature_dims(self.inception, self.device, keys))
        return store.compute()


def _feature_dims(inception, device, keys) -> dict:
    probe = inception(torch.zeros(1, 3, 8, 8, dtype=torch.uint8, device=device))
    return {k: probe[k].shape[1] for k in keys}


def read_npz(path: str) -> dict:
    """The arrays of an .npz (never unpickled); ConfigError naming the file when it is not one."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):      # an .npy: one array, not named ones
            raise ValueError("it holds one array (an .npy file), not named arrays")
        with data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise ConfigError(f"Reference file {path!r} cannot be read as an .npz of arrays ({e}); pass an ADM reference "
                          f"batch or a file written by launch/evaluate.py.") from None


def _from_npz(path: str, extractor: FeatureExtractor) -> Reference:
    data = read_npz(path)
    if "mu" not in data or "sigma" not in data:
        raise ConfigError(f"Reference file {path!r} has no 'mu' and 'sigma' (it holds {sorted(data)}); pass an ADM "
                          f"reference batch or a file written by launch/evaluate.py.")
    pool = data.get("pool")
    if pool is None and "arr_0" in data:          # ADM: the reference images themselves
        images = data["arr_0"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ConfigError(f"Reference file {path!r} has arr_0 of {images.dtype} {images.shape}; ADM's reference "
                              f"images are uint8 [N, H, W, 3].")
        pool = extractor.gather(_image_batches(images[:PR_SAMPLES], extractor), keys=("pool",))["pool"]
    return Reference(mu=data["mu"], sigma=data["sigma"], mu_s=data.get("mu_s"), sigma_s=data.get("sigma_s"),
                     pool=pool, source=str(data.get("source", path)))


def _image_batches(images: np.ndarray, extractor: FeatureExtractor):
    """This rank's share of an in-memory image array, in fixed index batches (batch b to rank b mod W)."""
    b = extractor.batch_size
    for start in range(extractor.rank * b, len(images), extractor.world_size * b):
        chunk = torch.from_numpy(np.ascontiguousarray(images[start:start + b])).permute(0, 3, 1, 2)
        yield list(range(start, start + len(chunk))), chunk


def cache_path(shards_path: str, fingerprint: str, num_samples: int, features: str = "inception",
               key: str = "") -> str:
    folder = shards_path if os.path.isdir(shards_path) else os.path.dirname(shards_path)
    return os.path.join(folder, f"{features}_ref_{fingerprint}_{num_samples}{'_' + key if key else ''}.npz")


def data_key(shards: ShardSet, num_samples: int, fingerprint: str, features: str, decoder: dict) -> str:
    """What reference statistics of the first `num_samples` samples of `shards` depend on, hashed: the network
    (its fingerprint, which features), the count, each shard read (name, size, modification time: shards rebuilt in
    place change it) and the decoder of latent shards (VAE folder and factors)."""
    used, total = [], 0
    for shard, count in zip(shards.shards, shards.counts):
        if total >= num_samples:
            break
        st = os.stat(shard)
        used.append([os.path.basename(shard), st.st_size, st.st_mtime_ns])
        total += count
    text = json.dumps({"features": features, "network": fingerprint, "samples": num_samples, "shards": used,
                       "decoder": decoder}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _save_cache(ref: Reference, cache: str, extractor: FeatureExtractor) -> None:
    if extractor.rank != 0:
        return
    try:
        ref.save(cache)
        print(f"reference statistics cached in {cache}", flush=True)
    except OSError as e:
        print(f"note: could not cache the reference statistics in {cache} ({e.strerror}); pass --ref-cache "
              f"FILE to keep them.", flush=True)


def _from_shards(path: str, extractor: FeatureExtractor, num_samples: int, vae: Optional[str],
                 cache: Optional[str], field: str, features: str = "inception") -> Reference:
    shards = ShardSet.open(path, field=field)
    n = min(num_samples, shards.num_samples)
    info = (shards.manifest.vae or {}) if not shards.pixels else {}
    described = {} if shards.pixels else {"vae": os.path.abspath(vae) if vae else info.get("path"),
                                          "scaling": None if vae else info.get("scaling_factor"),
                                          "shift": None if vae else info.get("shift_factor")}
    key = data_key(shards, n, extractor.fingerprint, features, described)
    cache = cache or cache_path(path, extractor.fingerprint, n, features, key)
    if os.path.isfile(cache):
        saved = str(read_npz(cache).get("key", ""))
        if saved == key:
            ref = _from_npz(cache, extractor) if features == "inception" else _dino_from_npz(cache, extractor)
            ref.key = key
            return ref
        if extractor.rank == 0:
            print(f"note: {cache} holds statistics of other data (shards, sample count, network or VAE differ); "
                  f"computing them anew", flush=True)
    decoder = None
    if not shards.pixels:
        if vae:
            decoder = LatentDecoder.from_folder(vae, extractor.device)
        elif info.get("path"):
            decoder = LatentDecoder(info["path"], info.get("scaling_factor") or 1.0, info.get("shift_factor") or 0.0,
                                    extractor.device, field=f"the vae.path of {path}/manifest.json")
        else:
            raise ConfigError(f"{field}={path!r} holds latents but its manifest names no VAE; pass --vae with the "
                              f"local VAE folder they were encoded with.")

    def batches():
        for batch in shards.batches(n, extractor.batch_size, extractor.rank, extractor.world_size):
            if decoder is None:                                    # uint8 [B, H, W, 3]
                images = torch.from_numpy(batch.x).permute(0, 3, 1, 2)
            else:
                images = to_uint8(decoder(torch.from_numpy(batch.x)))
            yield batch.indices, images

    source = f"{path} ({n} samples{', decoded by ' + decoder.describe() if decoder else ''})"
    if features == "dinov2":
        mu, sigma = gaussian_stats(extractor.gather(batches(), keys=(DINO_KEY,))[DINO_KEY])
        ref = Reference(mu, sigma, source=source, features="dinov2", key=key)
    else:
        feats = extractor.gather(batches())
        mu, sigma = gaussian_stats(feats["pool"])
        mu_s, sigma_s = gaussian_stats(feats["spatial"])
        ref = Reference(mu, sigma, mu_s, sigma_s, pool=feats["pool"][:PR_SAMPLES], source=source, key=key)
    _save_cache(ref, cache, extractor)
    return ref


def _dino_from_npz(path: str, extractor: FeatureExtractor, cache: Optional[str] = None) -> Reference:
    data = read_npz(path)
    if str(data.get("features", "")) == "dinov2":
        return Reference(mu=data["mu"], sigma=data["sigma"], source=str(data.get("source", path)),
                         features="dinov2")
    images = data.get("arr_0")
    if images is None or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ConfigError(f"Reference file {path!r} has neither DINOv2 statistics nor images (uint8 arr_0 "
                          f"[N, H, W, 3]) to compute them from; pass shards:PATH of real images or ADM's reference "
                          f"batch.")
    cache = cache or f"{os.path.splitext(path)[0]}_dinov2_{extractor.fingerprint}.npz"
    st = os.stat(path)                              # the images' file: a replaced one is another reference
    key = hashlib.sha256(json.dumps([extractor.fingerprint, st.st_size, st.st_mtime_ns]).encode()).hexdigest()[:16]
    if os.path.isfile(cache) and str(read_npz(cache).get("key", "")) == key:
        return _dino_from_npz(cache, extractor)
    mu, sigma = gaussian_stats(extractor.gather(_image_batches(images, extractor), keys=(DINO_KEY,))[DINO_KEY])
    ref = Reference(mu, sigma, source=f"{path} ({len(images)} images)", features="dinov2", key=key)
    _save_cache(ref, cache, extractor)
    return ref


def load_dino_reference(spec: str, extractor: FeatureExtractor, *, num_samples: int = 50000,
                        vae: Optional[str] = None, cache: Optional[str] = None, field: str = "--ref") -> Reference:
    """DINOv2 statistics of the reference `spec` names (module docstring); every rank calls it."""
    if spec.startswith(SHARDS_PREFIX):
        return _from_shards(spec[len(SHARDS_PREFIX):], extractor, num_samples, vae, cache, field, "dinov2")
    if not os.path.isfile(spec):
        raise ConfigError(f"{field}={spec!r} is neither an .npz file nor shards:PATH; pass ADM's reference batch "
                          f"(its images give the DINOv2 statistics) or shards:DIR of real images.")
    return _dino_from_npz(spec, extractor, cache)


def load_reference(spec: str, extractor: FeatureExtractor, *, num_samples: int = 50000, vae: Optional[str] = None,
                   cache: Optional[str] = None, field: str = "--ref") -> Reference:
    """The reference `spec` names (see the module docstring); every rank calls it (features are collective)."""
    if spec.startswith(SHARDS_PREFIX):
        return _from_shards(spec[len(SHARDS_PREFIX):], extractor, num_samples, vae, cache, field)
    if not os.path.isfile(spec):
        raise ConfigError(f"{field}={spec!r} is neither an .npz file nor shards:PATH; pass ADM's reference batch "
                          f"(e.g. VIRTUAL_imagenet256_labeled.npz) or shards:DIR of real images.")
    return _from_npz(spec, extractor)
