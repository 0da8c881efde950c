"""Write a class-labelled synthetic image dataset as WebDataset tar shards.

    python -m data_tools.make_synthetic --out data/synthetic --num-samples 20000 --num-classes 10 \
        --size 32 --samples-per-shard 2000 --seed 0
    # captioned ("a small red circle in the top left"), with caption features from a local text encoder:
    python -m data_tools.make_text_encoder --out data/tiny_t5
    python -m data_tools.make_synthetic --out data/synthetic_text --captions --text-encoder data/tiny_t5
    # the same: dit-make-synthetic ... (console script) or python data_tools/make_synthetic.py ...

or from Python:

    from data_tools.make_synthetic import make_synthetic
    shard_paths = make_synthetic("data/synthetic", num_samples=20000, num_classes=10, size=32,
                                 samples_per_shard=2000, seed=0)

Class c is a (shape, colour) pair: shape SHAPES[c % 10] in colour COLOURS[(c + 3 * (c // 10)) % 10], so every
class up to 100 is a distinct pair and the first 10 differ in both shape and colour. Each image is the shape,
filled, on a light background whose tint varies mildly per sample, with small random jitter in position, size
and colour; shapes always stay inside the image. Drawing happens at 4x resolution and is box-downsampled, so
edges are anti-aliased.

With --captions the shape also has a size (small or large) and a place on a 3×3 grid (top left ... bottom right),
and each sample gets a caption that says all four: "a large teal ring in the middle right" (KEY.caption.txt; the
class label stays). With --text-encoder PATH (a local T5 encoder / CLIP text model, e.g. the tiny one
data_tools/make_text_encoder.py writes) the captions' token features are stored too (KEY.caption_feat.npy float16
[L, T], KEY.caption_mask.npy bool [L], L = --max-length), as data_tools/build_shards.py --text-encoder does.

Output in --out: shard-000000.tar, shard-000001.tar, ... (sample KEY = "%08d" global index, members KEY.png and
KEY.cls with the ASCII class id), manifest.json (dit_scale.data.manifest: shards with sample counts, sizes and
sha256, x_shape, num_classes, class names, generation parameters) and preview.png (one row per class, 8 examples,
2x upscaled).

Everything is deterministic from --seed: shard i draws from numpy.random.default_rng([seed, i]) and tar headers
carry fixed metadata, so a shard rebuilt later is byte-identical. Each shard is written to a temporary name and
renamed, and a re-run with the same arguments skips shards that already exist complete. Do not run two
generators on the same --out at once.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time

import numpy as np
from PIL import Image, ImageDraw

from data_tools.writer import (ShardWriter, caption_members, describe_shard, encode_label, encode_png,
                               text_manifest_fields)
from dit_scale.cli import check_output_dir
from dit_scale.data.manifest import MANIFEST_NAME, Manifest, ShardEntry, read_manifest, write_manifest
from dit_scale.data.shards import decode_image, iter_tar_samples
from dit_scale.errors import ConfigError

SHAPES = ["circle", "square", "triangle", "ring", "plus", "hbars", "vbars", "diamond", "xcross", "checker"]
COLOURS = {
    "red": (220, 30, 30),
    "green": (20, 150, 40),
    "blue": (30, 60, 220),
    "orange": (245, 130, 0),
    "purple": (120, 40, 170),
    "teal": (0, 140, 140),
    "magenta": (225, 30, 170),
    "brown": (120, 65, 20),
    "black": (15, 15, 15),
    "olive": (130, 130, 0),
}
COLOUR_NAMES = list(COLOURS)
MAX_CLASSES = len(SHAPES) * len(COLOURS)
SHAPE_WORDS = {"circle": "circle", "square": "square", "triangle": "triangle", "ring": "ring", "plus": "plus sign",
               "hbars": "block of horizontal stripes", "vbars": "block of vertical stripes", "diamond": "diamond",
               "xcross": "cross", "checker": "checkerboard"}
SIZES = {"small": 0.13, "large": 0.22}          # half-side of the shape / image side (captioned samples)
ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "center", "right")
GRID_CENTRES = (0.27, 0.5, 0.73)                 # ± 0.03 jitter: a large shape stays inside the image
SUPERSAMPLE = 4
FORMAT_VERSION = 1



PARAMS_NAME = "make_synthetic.json"          # the arguments of the set being written (the manifest comes last)
def class_spec(c: int) -> tuple[str, str]:
    """(shape, colour name) of class c; distinct for every c < MAX_CLASSES."""
    return SHAPES[c % len(SHAPES)], COLOUR_NAMES[(c + 3 * (c // len(SHAPES))) % len(COLOUR_NAMES)]


def class_names(num_classes: int) -> list[str]:
    return ["%s_%s" % (colour, shape) for shape, colour in map(class_spec, range(num_classes))]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """Draw `shape` centred at (cx, cy) inside the square of half-side r."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = 0.85 * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(1, round(0.4 * r)))
    elif shape == "plus":
        t = 0.3 * r
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    elif shape in ("hbars", "vbars"):
        step = 2 * r / 5                      # three bars and two gaps of equal width
        for k in (0, 2, 4):
            lo, hi = -r + k * step, -r + (k + 1) * step
            if shape == "hbars":
                draw.rectangle([cx - r, cy + lo, cx + r, cy + hi], fill=fill)
            else:
                draw.rectangle([cx + lo, cy - r, cx + hi, cy + r], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "xcross":
        a, w = 0.75 * r, max(1, round(0.5 * r))
        draw.line([(cx - a, cy - a), (cx + a, cy + a)], fill=fill, width=w)
        draw.line([(cx - a, cy + a), (cx + a, cy - a)], fill=fill, width=w)
    elif shape == "checker":
        h = 0.85 * r
        draw.rectangle([cx - h, cy - h, cx, cy], fill=fill)
        draw.rectangle([cx, cy, cx + h, cy + h], fill=fill)
    else:
        raise ValueError("unknown shape %r" % shape)


def render_sample(label: int, size: int, rng: np.random.Generator) -> Image.Image:
    """One size x size RGB image of class `label` with random jitter drawn from rng."""
    shape, colour = class_spec(label)
    big = size * SUPERSAMPLE
    grey = rng.uniform(200, 240)
    background = tuple(int(v) for v in np.clip(grey + rng.uniform(-12, 12, 3), 0, 255))
    foreground = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + rng.uniform(-15, 15, 3), 0, 255))
    cx, cy = big * (0.5 + rng.uniform(-0.1, 0.1, 2))
    r = big * rng.uniform(0.26, 0.34)         # centre offset + r <= 0.44 * big: always inside
    image = Image.new("RGB", (big, big), background)
    _draw_shape(ImageDraw.Draw(image), shape, float(cx), float(cy), float(r), foreground)
    return image.resize((size, size), Image.BOX)


def position_name(row: int, column: int) -> str:
    """top left, top center, ..., middle left, center, middle right, ..., bottom right."""
    if row == 1 and column == 1:
        return "center"
    return "%s %s" % (ROWS[row], COLUMNS[column])


def caption_words() -> list[str]:
    """Every word a caption of this generator uses (the tiny text encoder's vocabulary)."""
    words = {"a", "in", "the", *SIZES, *COLOURS, *ROWS, *COLUMNS}
    for phrase in SHAPE_WORDS.values():
        words.update(phrase.split())
    return sorted(words)


def render_captioned(label: int, size: int, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """One image of class `label` at a random size and grid place, and its caption."""
    shape, colour = class_spec(label)
    big = size * SUPERSAMPLE
    grey = rng.uniform(200, 240)
    background = tuple(int(v) for v in np.clip(grey + rng.uniform(-12, 12, 3), 0, 255))
    foreground = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + rng.uniform(-15, 15, 3), 0, 255))
    size_name = ("small", "large")[int(rng.integers(2))]
    row, column = (int(v) for v in rng.integers(3, size=2))
    cx, cy = big * (np.array([GRID_CENTRES[column], GRID_CENTRES[row]]) + rng.uniform(-0.03, 0.03, 2))
    r = big * SIZES[size_name] * rng.uniform(0.9, 1.0)
    image = Image.new("RGB", (big, big), background)
    _draw_shape(ImageDraw.Draw(image), shape, float(cx), float(cy), float(r), foreground)
    caption = "a %s %s %s in the %s" % (size_name, colour, SHAPE_WORDS[shape], position_name(row, column))
    return image.resize((size, size), Image.BOX), caption


def _shard_ranges(num_samples: int, samples_per_shard: int) -> list[tuple[int, int]]:
    return [(s, min(num_samples, s + samples_per_shard)) for s in range(0, num_samples, samples_per_shard)]


def _write_shard(path: str, index: int, start: int, end: int, num_classes: int, size: int,
                 seed: int, captions: bool = False, encoder=None) -> ShardEntry:
    rng = np.random.default_rng([seed, index])
    labels = rng.permutation(np.arange(start, end) % num_classes)   # balanced classes, shuffled
    if not captions:
        with ShardWriter(path) as shard:
            for key, label in zip(range(start, end), labels):
                shard.add("%08d" % key, {"png": encode_png(render_sample(int(label), size, rng)),
                                         "cls": encode_label(label)})
        return shard.entry
    samples = [render_captioned(int(label), size, rng) for label in labels]
    features = mask = None
    if encoder is not None:
        features, mask = encoder([caption for _, caption in samples], batch_size=256)
        features, mask = features.numpy(), mask.numpy()
    with ShardWriter(path) as shard:
        for i, (key, label, (image, caption)) in enumerate(zip(range(start, end), labels, samples)):
            members = {"png": encode_png(image), "cls": encode_label(label)}
            members.update(caption_members(caption, None if features is None else features[i],
                                           None if mask is None else mask[i]))
            shard.add("%08d" % key, members)
    return shard.entry


def _count_samples(path: str) -> int:
    """Number of .cls members in a tar, or -1 when it cannot be read."""
    try:
        with tarfile.open(path, "r") as tar:
            return sum(1 for m in tar.getmembers() if m.name.endswith(".cls"))
    except (OSError, tarfile.TarError):
        return -1


def write_preview(out: str, shard_paths: list[str], num_classes: int, size: int, per_class: int = 8) -> str:
    """preview.png: one row per class (name on the left), `per_class` examples read back from the shards."""
    examples: dict[int, list[Image.Image]] = {c: [] for c in range(num_classes)}
    for path in shard_paths:
        for sample in iter_tar_samples(path):
            label = int(sample["cls"])
            if len(examples[label]) < per_class:
                examples[label].append(Image.fromarray(decode_image(sample["png"], "png")))
        if all(len(v) >= per_class for v in examples.values()):
            break
    scale, pad, text_w = max(1, 64 // size), 2, 110
    cell = size * scale + pad
    grid = Image.new("RGB", (text_w + per_class * cell, num_classes * cell), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(class_names(num_classes)):
        draw.text((4, c * cell + cell // 2 - 6), "%d %s" % (c, name), fill=(0, 0, 0))
        for j, image in enumerate(examples[c]):
            grid.paste(image.resize((size * scale, size * scale), Image.NEAREST), (text_w + j * cell, c * cell))
    path = os.path.join(out, "preview.png")
    tmp = "%s.tmp-%d" % (path, os.getpid())
    grid.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def make_synthetic(out: str, num_samples: int = 20000, num_classes: int = 10, size: int = 32,
                   samples_per_shard: int = 2000, seed: int = 0, verbose: bool = False, captions: bool = False,
                   text_encoder: str | None = None, max_length: int = 16) -> list[str]:
    """Write (or complete) the dataset in `out`; returns the shard paths in order. `captions`: captioned samples
    (sizes, places, KEY.caption.txt); `text_encoder`: also their token features (`max_length` tokens)."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError("num_classes must be in 1..%d, got %d" % (MAX_CLASSES, num_classes))
    if num_samples < 1 or samples_per_shard < 1 or size < 8 or seed < 0:
        raise ValueError("need num_samples >= 1, samples_per_shard >= 1, size >= 8 and seed >= 0")
    if text_encoder is not None and not captions:
        raise ValueError("--text-encoder encodes the captions: add --captions")
    params = dict(num_samples=num_samples, num_classes=num_classes, size=size,
                  samples_per_shard=samples_per_shard, seed=seed, version=FORMAT_VERSION)
    encoder = None
    if captions:                             # (only then: the params of an uncaptioned set stay as they were)
        params["captions"] = True
    if text_encoder is not None:
        from dit_scale.generation.text_encoder import TextEncoder
        import torch
        encoder = TextEncoder(text_encoder, max_length, "cuda" if torch.cuda.is_available() else "cpu")
        params.update(text_encoder=encoder.path, max_length=int(max_length))
    os.makedirs(out, exist_ok=True)
    manifest_path = os.path.join(out, MANIFEST_NAME)
    params_path = os.path.join(out, PARAMS_NAME)   # written before the first shard: an interrupted run's arguments
    old = read_manifest(manifest_path).params if os.path.exists(manifest_path) else None
    if old is None and os.path.exists(params_path):
        with open(params_path, encoding="utf-8") as f:
            old = json.load(f)
    if old is not None and old != params:
        raise ValueError("%s was generated with %s, not %s; use another --out or delete it first"
                         % (out, old, params))
    reuse = old is not None                   # shards of unknown arguments are written anew, never kept
    tmp = "%s.tmp-%d" % (params_path, os.getpid())
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(params, f)
    os.replace(tmp, params_path)
    for name in os.listdir(out):              # leftovers of an interrupted run
        if (name.startswith("shard-") and ".tar.tmp-" in name) or name.startswith(PARAMS_NAME + ".tmp-"):
            os.remove(os.path.join(out, name))

    shards, paths = [], []
    for index, (start, end) in enumerate(_shard_ranges(num_samples, samples_per_shard)):
        path = os.path.join(out, "shard-%06d.tar" % index)
        if reuse and _count_samples(path) == end - start:
            entry, status = describe_shard(path, end - start), "exists"
        else:
            t0 = time.time()
            entry = _write_shard(path, index, start, end, num_classes, size, seed, captions, encoder)
            status = "wrote in %.1fs" % (time.time() - t0)
        if verbose:
            print("%s: %d samples, %s" % (path, end - start, status), flush=True)
        shards.append(entry)
        paths.append(path)

    manifest = Manifest(shards=shards, builder="make_synthetic", kind="pixel", image_key="png", label_key="cls",
                        x_shape=[3, size, size], x_dtype="uint8", resolution=size, num_classes=num_classes,
                        class_names=class_names(num_classes), params=params,
                        caption_key="caption.txt" if captions else None,
                        **(text_manifest_fields(encoder.info()) if encoder is not None else {}))
    write_manifest(manifest, manifest_path)
    preview = write_preview(out, paths, num_classes, size)
    if verbose:
        print("wrote %s and %s" % (manifest_path, preview), flush=True)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/synthetic")
    parser.add_argument("--num-samples", type=int, default=20000)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--samples-per-shard", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--captions", action="store_true",
                        help="random sizes and places, and a caption per sample "
                             "(\"a small red circle in the top left\")")
    parser.add_argument("--text-encoder", default=None,
                        help="local T5 encoder / CLIP text model folder: also store the captions' token features")
    parser.add_argument("--max-length", type=int, default=16, help="caption tokens stored per sample")
    args = parser.parse_args(argv)
    t0 = time.time()
    try:
        check_output_dir(args.out, "--out")
        paths = make_synthetic(args.out, num_samples=args.num_samples, num_classes=args.num_classes,
                               size=args.size, samples_per_shard=args.samples_per_shard, seed=args.seed,
                               verbose=True, captions=args.captions, text_encoder=args.text_encoder,
                               max_length=args.max_length)
    except (ConfigError, ValueError) as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    print("%d shards in %s (%.1fs)" % (len(paths), args.out, time.time() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
