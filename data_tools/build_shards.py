"""Turn an image folder or a list file into WebDataset shards of VAE latents (+ teacher features) for dit_scale.

    # ImageNet layout (one sub-folder per class), SD VAE latents of 256x256 crops, DINOv2 features for REPA:
    python -m data_tools.build_shards --images /data/imagenet/train --out /data/in1k-256 --resolution 256 \
        --vae /models/sd-vae-ft-ema --teacher /models/dinov2-vitb14 --workers 8
    # a list file (TSV: image path, optional integer label, optional caption), pixels only (small images):
    python -m data_tools.build_shards --list images.tsv --out data/pix64 --resolution 64 --pixels
    # text-to-image: captions (`path<TAB>caption` lines, or IMAGE.txt next to each image) encoded by a local T5:
    python -m data_tools.build_shards --list captions.tsv --out /data/t2i-256 --resolution 256 \
        --vae /models/sd-vae-ft-ema --text-encoder /models/t5-v1_1-xxl --max-length 120
    # the same: dit-build-shards ... (console script) or python data_tools/build_shards.py ...

--vae is a local diffusers AutoencoderKL folder, --teacher a local transformers DINOv2 folder (AutoModel),
--text-encoder a local T5 encoder or CLIP text model folder with its tokenizer (dit_scale/generation/text_encoder.py);
no weights are downloaded. Each image is center-cropped and resized as in ADM (box-halve while >= 2x the target, bicubic
to the short side, center crop). Sample KEY (8-digit index into the shuffled item list) holds

    KEY.latent.npy       float16 [C, H/f, W/f]  (mean of the VAE posterior - shift_factor) * scaling_factor
    KEY.latent_flip.npy  the same for the horizontally flipped image (omit with --no-flip)
    KEY.image.png        --pixels instead of latents: the uint8 RGB crop
    KEY.feat.npy         float16 [N, D] teacher patch tokens (after the final norm) at --teacher-resolution,
                         bilinearly resized to the DiT token grid (--feat-grid, default latent side / --patch-size)
    KEY.cls / KEY.caption.txt   label (ASCII integer) and caption, when given
    KEY.caption_feat.npy float16 [L, T] the caption's token features (--text-encoder; L = --max-length, 0 at padding)
    KEY.caption_mask.npy bool [L]        True for the caption's tokens

Captions come from the list's caption column (`path<TAB>caption`, or `path<TAB>label<TAB>caption`) or, for an
image folder, from a sidecar text file next to each image (IMAGE.txt for IMAGE.jpg). An image folder without class
sub-folders is read flat (no labels).

The item list is shuffled with --seed so every shard holds a mix of classes. Shard i (shard-%06d.tar) holds
items [i*S, (i+1)*S) and is written by one worker to a temporary name, renamed, then described by a
shard-%06d.tar.json sidecar (sample count, bytes, sha256). A re-run with the same arguments keeps finished shards
and writes the rest; manifest.json (dit_scale.data.manifest: shards, counts, shapes, dtypes, encoders, checksums)
is written at the end.
Workers (--workers) are separate processes; with GPUs each worker takes one (round-robin), and the VAE, the teacher
and the text encoder run there on batches of --batch-size images / captions.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import re
import sys
import time
from typing import Optional

import numpy as np
from PIL import Image

from data_tools.writer import (ShardWriter, caption_members, encode_label, encode_npy, encode_png,  # noqa: F401
                               sha256_file, text_manifest_fields)
from dit_scale.cli import check_output_dir
from dit_scale.data.manifest import MANIFEST_NAME, Manifest, ShardEntry, read_manifest, write_manifest
from dit_scale.errors import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".jpe", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FORMAT_VERSION = 1


# -- inputs ----------------------------------------------------------------------------------------------------------

# what an interrupted run of this tool leaves in --out: shards and their sidecars, and the manifest, half written
LEFTOVER = re.compile(r"shard-\d{6}\.tar(\.json)?\.tmp(-\d+)?|manifest\.json\.tmp-\d+")


def scan_image_folder(root: str) -> tuple[list[tuple[str, Optional[int], Optional[str]]], Optional[list[str]]]:
    """(items, class names) of an ImageNet-style folder: label = index of the sorted class sub-folder. A folder with
    no sub-folders but images is read flat (no labels, class names None). Each image's caption is its sidecar text
    file (IMAGE.txt next to IMAGE.jpg), when there is one."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    flat = sorted(f for f in os.listdir(root) if f.lower().endswith(IMAGE_SUFFIXES)) if not classes else []
    if not classes and not flat:
        raise ValueError("%s has no class sub-folders (expected ROOT/CLASS/IMAGE.jpg) and no images; use --list for a "
                         "list file" % root)
    if flat:
        return [(os.path.join(root, f), None, sidecar_caption(os.path.join(root, f))) for f in flat], None
    items = []
    for label, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, name))):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_SUFFIXES):
                    path = os.path.join(dirpath, f)
                    items.append((path, label, sidecar_caption(path)))
    return items, classes


def sidecar_caption(image_path: str) -> Optional[str]:
    """The caption in IMAGE.txt next to IMAGE.jpg (whitespace stripped), or None."""
    path = os.path.splitext(image_path)[0] + ".txt"
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def read_list_file(path: str) -> list[tuple[str, Optional[int], Optional[str]]]:
    """Items of a TSV list: `image path [TAB label [TAB caption]]` or `image path TAB caption` (a second column that
    is not an integer is a caption); relative paths are relative to the list file."""
    items = []
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split("\t")
            label = parts[1].strip() if len(parts) > 1 else ""
            caption = parts[2] if len(parts) > 2 else None
            if len(parts) == 2 and label and not label.lstrip("-").isdigit():     # path<TAB>caption
                label, caption = "", parts[1]
            try:
                label_value = int(label) if label else None
            except ValueError:
                raise ValueError("%s line %d: label %r is not an integer" % (path, n, label)) from None
            if label_value is not None and label_value < 0:
                raise ValueError("%s line %d: label %d is negative; labels are class ids 0, 1, 2, ..."
                                 % (path, n, label_value))
            items.append((os.path.join(base, parts[0]), label_value, caption))
    return items


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM / DiT center crop: uint8 [size, size, 3]."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y:y + size, x:x + size].copy()


def load_image(path: str, size: int) -> np.ndarray:
    with Image.open(path) as image:
        return center_crop_arr(image.convert("RGB"), size)


# -- encoders --------------------------------------------------------------------------------------------------------
class Encoders:
    """The VAE and the teacher of one worker, on one device."""

    def __init__(self, params: dict, device: str):
        import torch
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never reach for the hub
        self.torch, self.params, self.device = torch, params, torch.device(device)
        self.vae = self.teacher = None
        if params["vae"]:
            import diffusers
            from diffusers import AutoencoderKL
            diffusers.utils.logging.set_verbosity_error()
            diffusers.utils.logging.disable_progress_bar()
            self.vae = AutoencoderKL.from_pretrained(params["vae"]).to(self.device).eval()
            self.scale = float(self.vae.config.scaling_factor or 1.0)
            self.shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        if params["teacher"]:
            import transformers
            from transformers import AutoModel
            transformers.utils.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
            self.teacher = AutoModel.from_pretrained(params["teacher"]).to(self.device).eval()
            self.skip_tokens = 1 + int(getattr(self.teacher.config, "num_register_tokens", 0) or 0)
        self.text = None
        if params.get("text_encoder"):
            from dit_scale.generation.text_encoder import TextEncoder
            self.text = TextEncoder(params["text_encoder"], params["max_length"], self.device)

    def captions(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """float16 [B, L, T] caption token features (0 at padding) and bool [B, L] masks, one batch on the device."""
        features, mask = self.text(captions)
        return features.numpy().astype(np.float16), mask.numpy()

    def latents(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] -> float32 [2B, C, h, w]: the images, then their horizontal flips."""
        torch = self.torch
        x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if self.params["flip"]:
            x = torch.cat([x, x.flip(-1)])
        with torch.no_grad():
            mean = self.vae.encode(x).latent_dist.mean
        return ((mean - self.shift) * self.scale).float().cpu().numpy()

    def features(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] -> float32 [B, grid*grid, D] teacher patch tokens on the DiT token grid."""
        torch, F = self.torch, self.torch.nn.functional
        res, grid = self.params["teacher_resolution"], self.params["feat_grid"]
        x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        x = F.interpolate(x, size=(res, res), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        with torch.no_grad():
            tokens = self.teacher(pixel_values=(x - mean) / std).last_hidden_state[:, self.skip_tokens:]
        b, n, d = tokens.shape
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError("teacher returned %d patch tokens, not a square grid" % n)
        if side != grid:
            t = tokens.transpose(1, 2).reshape(b, d, side, side)
            tokens = F.interpolate(t, size=(grid, grid), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
        return tokens.float().cpu().numpy()


# -- writing ---------------------------------------------------------------------------------------------------------
def shard_done(out: str, index: int, params_hash: str) -> Optional[dict]:
    """The sidecar of a finished shard written with these parameters, else None."""
    path = os.path.join(out, "shard-%06d.tar" % index)
    try:
        with open(path + ".json") as f:
            entry = json.load(f)
        if entry.get("params_hash") == params_hash and os.path.getsize(path) == entry["bytes"]:
            return entry
    except (OSError, ValueError, KeyError):
        pass
    return None


_WORKER: dict = {}


def _init_worker(params: dict, devices: list[str], threads: int) -> None:
    import torch
    torch.set_num_threads(max(1, threads))
    identity = mp.current_process()._identity
    device = devices[(identity[0] - 1) % len(devices)] if identity else devices[0]
    _WORKER["encoders"] = Encoders(params, device) if (params["vae"] or params["teacher"]
                                                       or params.get("text_encoder")) else None
    _WORKER["params"] = params


def write_shard(job: tuple[int, list]) -> dict:
    """Encode and write one shard (in a worker); returns its sidecar entry."""
    index, items = job
    params, enc = _WORKER["params"], _WORKER["encoders"]
    out, size, batch = params["out"], params["resolution"], params["batch_size"]
    path = os.path.join(out, "shard-%06d.tar" % index)
    with ShardWriter(path) as shard:
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            images = np.stack([load_image(p, size) for _, p, _, _ in chunk])
            latents = enc.latents(images) if params["vae"] else None
            feats = enc.features(images) if params["teacher"] else None
            text, text_mask = enc.captions([c for _, _, _, c in chunk]) if params.get("text_encoder") else (None, None)
            for i, (key, _, label, caption) in enumerate(chunk):
                members = {}
                if latents is not None:
                    members["latent.npy"] = encode_npy(latents[i].astype(params["latent_dtype"]))
                    if params["flip"]:
                        flipped = latents[len(chunk) + i]
                        members["latent_flip.npy"] = encode_npy(flipped.astype(params["latent_dtype"]))
                else:
                    members["image.png"] = encode_png(images[i])
                if feats is not None:
                    members["feat.npy"] = encode_npy(feats[i].astype(np.float16))
                if label is not None:
                    members["cls"] = encode_label(label)
                if caption is not None:
                    members.update(caption_members(caption, None if text is None else text[i],
                                                   None if text is None else text_mask[i]))
                shard.add("%08d" % key, members)
    entry = {**shard.entry.to_dict(), "params_hash": params["hash"]}
    with open(path + ".json.tmp", "w") as f:
        json.dump(entry, f)
    os.replace(path + ".json.tmp", path + ".json")
    return entry


# -- driver ----------------------------------------------------------------------------------------------------------
def _encoder_info(params: dict) -> dict:
    info = {}
    if params["vae"]:
        with open(os.path.join(params["vae"], "config.json")) as f:
            cfg = json.load(f)
        info["vae"] = {"path": params["vae"], "class": cfg.get("_class_name", "AutoencoderKL"),
                       "scaling_factor": cfg.get("scaling_factor", 1.0), "shift_factor": cfg.get("shift_factor"),
                       "latent_channels": cfg.get("latent_channels"), "latent": "posterior mean"}
    if params["teacher"]:
        with open(os.path.join(params["teacher"], "config.json")) as f:
            cfg = json.load(f)
        info["teacher"] = {"path": params["teacher"], "model_type": cfg.get("model_type"),
                           "hidden_size": cfg.get("hidden_size"), "patch_size": cfg.get("patch_size"),
                           "resolution": params["teacher_resolution"], "grid": params["feat_grid"]}
    return info


def _text_encoder_info(params: dict) -> dict:
    """The manifest's record of the caption encoder (what TextEncoder.info() says), from its config.json."""
    from dit_scale.generation.text_encoder import read_text_encoder_config
    path = params["text_encoder"]
    config = read_text_encoder_config(path)
    return {"path": path, "name": os.path.basename(path.rstrip("/")), "model_type": config["model_type"],
            "class": config["class"], "width": config["width"], "max_length": params["max_length"]}


def _probe_shapes(params: dict) -> tuple[list[int], Optional[list[int]]]:
    """x shape ([C, H, W]) and feature shape ([N, D]) from the encoders' configs."""
    size = params["resolution"]
    if not params["vae"]:
        x_shape = [3, size, size]
    else:
        with open(os.path.join(params["vae"], "config.json")) as f:
            cfg = json.load(f)
        factor = 2 ** (len(cfg.get("block_out_channels", [0] * 4)) - 1)
        x_shape = [int(cfg.get("latent_channels", 4)), size // factor, size // factor]
    feat_shape = None
    if params["teacher"]:
        with open(os.path.join(params["teacher"], "config.json")) as f:
            feat_shape = [params["feat_grid"] ** 2, int(json.load(f)["hidden_size"])]
    return x_shape, feat_shape


def build_shards(out: str, *, images: Optional[str] = None, list_file: Optional[str] = None, resolution: int = 256,
                 vae: Optional[str] = None, teacher: Optional[str] = None, pixels: bool = False,
                 patch_size: int = 2, feat_grid: Optional[int] = None, teacher_resolution: int = 224,
                 samples_per_shard: int = 1000, workers: int = 1, batch_size: int = 32, seed: int = 0,
                 flip: bool = True, latent_dtype: str = "float16", device: str = "auto",
                 progress: bool = True, text_encoder: Optional[str] = None, max_length: int = 120) -> dict:
    """Write (or complete) the shards in `out`; returns the manifest."""
    if (images is None) == (list_file is None):
        raise ValueError("give exactly one of --images DIR and --list FILE")
    if list_file is not None and not os.path.isfile(list_file):
        raise ValueError("--list %s is not a file; give a text file with one image path (and label) per line" % list_file)
    if pixels == (vae is not None):
        raise ValueError("give --vae PATH for latent shards or --pixels for pixel shards (not both, not neither)")
    for name, path in (("--vae", vae), ("--teacher", teacher), ("--text-encoder", text_encoder)):
        if path is not None and not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError("%s %s is not a local model folder with a config.json (weights are never downloaded)"
                             % (name, path))
    if resolution < 8 or samples_per_shard < 1 or workers < 1 or batch_size < 1 or latent_dtype not in (
            "float16", "float32"):
        raise ValueError("need --resolution >= 8, --samples-per-shard/--workers/--batch-size >= 1 and "
                         "--latent-dtype float16 or float32")
    if images is not None:
        items, class_names = scan_image_folder(images)
    else:
        items, class_names = read_list_file(list_file), None
    if not items:
        raise ValueError("no images found in %s" % (images or list_file))
    missing = [p for p, _, _ in items if not os.path.isfile(p)]
    if missing:
        raise ValueError("%d listed images do not exist, e.g. %s" % (len(missing), missing[0]))
    if text_encoder is not None:
        uncaptioned = [p for p, _, c in items if c is None]
        if uncaptioned:
            raise ValueError("--text-encoder needs a caption for every image, but %d have none, e.g. %s; give the "
                             "list a caption column or put IMAGE.txt next to each image" % (len(uncaptioned),
                                                                                          uncaptioned[0]))
        if max_length < 1:
            raise ValueError("--max-length must be >= 1 caption tokens")
        from dit_scale.generation.text_encoder import read_text_encoder_config
        try:
            read_text_encoder_config(text_encoder)
        except (OSError, ValueError) as e:
            raise ValueError("--text-encoder %s is not a T5 encoder or CLIP text model folder: %s" % (text_encoder, e))
    has_labels = [label is not None for _, label, _ in items]
    if any(has_labels) and not all(has_labels):
        raise ValueError("some items have a label and some do not; label all of them or none")
    order = np.random.default_rng(seed).permutation(len(items))
    jobs_items = [(int(k), items[i][0], items[i][1], items[i][2]) for k, i in enumerate(order)]

    params = dict(version=FORMAT_VERSION, resolution=resolution, vae=os.path.abspath(vae) if vae else None,
                  teacher=os.path.abspath(teacher) if teacher else None, flip=bool(flip and vae),
                  latent_dtype=latent_dtype, patch_size=patch_size, teacher_resolution=teacher_resolution,
                  samples_per_shard=samples_per_shard, seed=seed)
    if text_encoder is not None:             # (only then: the hash of a build without captions stays as it was)
        params.update(text_encoder=os.path.abspath(text_encoder), max_length=int(max_length))
    x_shape, _ = _probe_shapes(dict(params, feat_grid=0))
    params["feat_grid"] = feat_grid or x_shape[-1] // patch_size
    item_digest = hashlib.sha256(json.dumps([it[1:] for it in jobs_items]).encode()).hexdigest()
    params["hash"] = hashlib.sha256(json.dumps([params, item_digest], sort_keys=True).encode()).hexdigest()[:16]
    x_shape, feat_shape = _probe_shapes(params)

    os.makedirs(out, exist_ok=True)
    manifest_path = os.path.join(out, MANIFEST_NAME)
    if os.path.exists(manifest_path):
        if read_manifest(manifest_path).params.get("hash") != params["hash"]:
            raise ValueError("%s was built from other inputs or arguments; use another --out or delete it first" % out)
    for name in os.listdir(out):                   # leftovers of an interrupted run: our own names only
        if LEFTOVER.fullmatch(name) and os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))

    jobs = [(i, jobs_items[s:s + samples_per_shard]) for i, s in enumerate(range(0, len(jobs_items),
                                                                               samples_per_shard))]
    entries = {i: shard_done(out, i, params["hash"]) for i, _ in jobs}
    todo = [job for job in jobs if entries[job[0]] is None]
    params["out"], params["batch_size"] = out, batch_size
    import torch
    gpus = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    devices = ["cuda:%d" % g for g in range(gpus)] if gpus else ["cpu"]
    threads = max(1, (os.cpu_count() or 1) // workers) if not gpus else 1
    t0 = time.time()
    if progress:
        print("%s: %d images -> %d shards (%d done, %d to write) with %d worker(s) on %s"
              % (out, len(items), len(jobs), len(jobs) - len(todo), len(todo), workers, ",".join(devices)),
              file=sys.stderr, flush=True)
    if todo:
        from tqdm import tqdm
        bar = tqdm(total=sum(len(j[1]) for j in todo), unit="img", disable=not progress, file=sys.stderr)
        if workers == 1:
            _init_worker(params, devices, threads)
            results = map(write_shard, todo)
        else:
            pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker,
                                                initargs=(params, devices, threads))
            results = pool.imap_unordered(write_shard, todo)
        try:
            for entry in results:
                entries[int(entry["name"][6:12])] = entry
                bar.update(entry["num_samples"])
        finally:
            bar.close()
            if workers > 1:
                pool.terminate()
                pool.join()

    encoders = _encoder_info(params)
    text = text_manifest_fields(_text_encoder_info(params)) if text_encoder is not None else {}
    manifest = Manifest(
        shards=[ShardEntry(**{k: entries[i][k] for k in ("name", "num_samples", "bytes", "sha256")}) for i, _ in jobs],
        builder="build_shards", kind="latent" if vae else "pixel", image_key="latent.npy" if vae else "image.png",
        flip_key="latent_flip.npy" if params["flip"] else None, feat_key="feat.npy" if teacher else None,
        label_key="cls" if has_labels[0] else None,
        caption_key="caption.txt" if any(c is not None for _, _, c in items) else None,
        x_shape=x_shape, x_dtype=latent_dtype if vae else "uint8",
        feat_shape=feat_shape, feat_dtype="float16" if teacher else None, resolution=resolution,
        num_classes=(len(class_names) if class_names else max(lb for _, lb, _ in items) + 1) if has_labels[0]
        else None, class_names=class_names,              # a class folder without images is still a class
        vae=encoders.get("vae"), teacher=encoders.get("teacher"), **text,
        params={k: v for k, v in params.items() if k not in ("out", "batch_size")},
        source=os.path.abspath(images or list_file))
    write_manifest(manifest, manifest_path)
    if progress:
        print("wrote %s (%.1fs)" % (manifest_path, time.time() - t0), file=sys.stderr, flush=True)
    return manifest.to_dict()


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="image folder with one sub-folder per class (ImageNet layout)")
    src.add_argument("--list", dest="list_file", help="TSV: image path [TAB label [TAB caption]] or image path TAB "
                                                      "caption per line")
    parser.add_argument("--out", required=True)
    parser.add_argument("--resolution", type=int, default=256)
    enc = parser.add_mutually_exclusive_group(required=True)
    enc.add_argument("--vae", help="local diffusers AutoencoderKL folder (latent shards)")
    enc.add_argument("--pixels", action="store_true", help="store the RGB crops as PNG (no VAE)")
    parser.add_argument("--teacher", help="local transformers DINOv2 folder (feat.npy for alignment)")
    parser.add_argument("--text-encoder", help="local T5 encoder / CLIP text model folder with its tokenizer: store "
                                               "caption token features (caption_feat.npy, caption_mask.npy)")
    parser.add_argument("--max-length", type=int, default=120, help="caption tokens stored per image (padding / "
                                                                     "truncation; PixArt-α: 120)")
    parser.add_argument("--patch-size", type=int, default=2, help="DiT patch size (sets the default --feat-grid)")
    parser.add_argument("--feat-grid", type=int, default=None, help="token grid side (default: x side / patch)")
    parser.add_argument("--teacher-resolution", type=int, default=224)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="shuffles the item order across shards")
    parser.add_argument("--no-flip", dest="flip", action="store_false", help="do not store flipped latents")
    parser.add_argument("--latent-dtype", default="float16", choices=("float16", "float32"))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    try:
        check_output_dir(args.out, "--out")
        manifest = build_shards(args.out, images=args.images, list_file=args.list_file, resolution=args.resolution,
                                vae=args.vae, teacher=args.teacher, pixels=args.pixels, patch_size=args.patch_size,
                                feat_grid=args.feat_grid, teacher_resolution=args.teacher_resolution,
                                samples_per_shard=args.samples_per_shard, workers=args.workers,
                                batch_size=args.batch_size, seed=args.seed, flip=args.flip,
                                latent_dtype=args.latent_dtype, device=args.device, text_encoder=args.text_encoder,
                                max_length=args.max_length)
    except (ConfigError, ValueError) as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    print(json.dumps({k: manifest.get(k) for k in ("num_samples", "x_shape", "feat_shape", "image_key")}
                     | ({"text_shape": manifest["text_shape"]} if "text_shape" in manifest else {})
                     | {"shards": len(manifest["shards"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
