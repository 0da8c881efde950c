"""manifest.json: the one description of a folder of shards, written by every data tool and read by the loader.

    manifest = read_manifest("/data/in1k-256/manifest.json")   # validated; format-1 files (both dialects) too
    manifest.x_shape, manifest.image_key, manifest.counts()     # [4, 32, 32], "latent.npy", {shard name: samples}
    write_manifest(manifest, "/data/in1k-256")                  # atomic: a temporary file renamed over the old one

JSON keys (format_version 2; keys the data tools wrote before are kept under the same names):

    format "webdataset", format_version 2, builder        the tool that wrote the shards
    kind                                                  pixel | latent
    image_key, flip_key, label_key, feat_key, caption_key member names (KEY.<name>), null when absent
    x_shape [C, H, W], x_dtype                            x after decoding (pixels: channels first)
    feat_shape [N, D], feat_dtype                         teacher features
    text_key, text_mask_key, text_shape [L, T], text_dtype   caption token features (text encoder) and their mask
    resolution                                            side of the (cropped) images, in pixels
    image_size, channels                                  pixel manifests only: format 1's names for x_shape
    num_samples, num_classes, class_names
    vae {path, scaling_factor, shift_factor, ...}, teacher {path, model_type, ...}   encoders (latent shards)
    text_encoder {path, name, model_type, class, width, max_length}                   the caption encoder
    shards [{name, num_samples, bytes, sha256}]           per shard, in order; bytes/sha256 may be null
    params, source                                        the builder's arguments and input

Format 1 (no format_version) had two dialects: data_tools/make_synthetic.py wrote image_size/channels and no
kind or x_shape; data_tools/build_shards.py and the data benchmark wrote kind/x_shape. Both still load; fields
they lack are left unknown (None) and the loader reads them from the first sample. The caption-feature keys
(text_*) are optional format-2 fields: manifests written before them load with text_key null.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from dit_scale.data.shards import ARRAY_SUFFIXES, PIXEL_SUFFIXES, is_url, shard_name
from dit_scale.errors import ConfigError

MANIFEST_NAME = "manifest.json"
CAPTION_FEAT_KEY = "caption_feat.npy"      # float16 [L, T] caption token features (data_tools, --text-encoder)
CAPTION_MASK_KEY = "caption_mask.npy"      # bool [L]: True for the caption's tokens, False for padding
FORMAT_VERSION = 2
KINDS = ("pixel", "latent")
_REBUILD = "fix that field or rebuild the manifest with the data tool that wrote the shards"


@dataclass
class ShardEntry:
    """One shard of a manifest: its file name, sample count and (when the writer recorded them) size and sha256."""
    name: str
    num_samples: int
    bytes: Optional[int] = None
    sha256: Optional[str] = None

    def to_dict(self) -> dict:
        return {"name": self.name, "num_samples": self.num_samples, "bytes": self.bytes, "sha256": self.sha256}


@dataclass
class Manifest:
    """What a folder of shards holds (see the module docstring for the JSON keys)."""
    shards: list[ShardEntry]
    kind: Optional[str] = None             # pixel | latent (None: unknown, format 1)
    image_key: Optional[str] = None        # member holding x, e.g. "png", "image.png", "latent.npy"
    x_shape: Optional[list[int]] = None    # [C, H, W] after decoding
    x_dtype: Optional[str] = None
    flip_key: Optional[str] = None         # stored encoding of the mirrored image, e.g. "latent_flip.npy"
    label_key: Optional[str] = None        # "cls" when samples carry a class label
    feat_key: Optional[str] = None         # teacher features, e.g. "feat.npy"
    feat_shape: Optional[list[int]] = None  # [N, D]
    feat_dtype: Optional[str] = None
    caption_key: Optional[str] = None      # e.g. "caption.txt"
    text_key: Optional[str] = None         # caption token features, e.g. "caption_feat.npy"
    text_mask_key: Optional[str] = None    # their mask, e.g. "caption_mask.npy"
    text_shape: Optional[list[int]] = None  # [L, T]: max length, text encoder width
    text_dtype: Optional[str] = None
    resolution: Optional[int] = None       # image side in pixels
    num_classes: Optional[int] = None
    class_names: Optional[list[str]] = None
    vae: Optional[dict] = None             # {path, class, scaling_factor, shift_factor, latent_channels, latent}
    teacher: Optional[dict] = None         # {path, model_type, hidden_size, patch_size, resolution, grid}
    text_encoder: Optional[dict] = None    # {path, name, model_type, class, width, max_length}
    builder: Optional[str] = None          # make_synthetic | build_shards | bench_data
    params: dict = field(default_factory=dict)
    source: Optional[str] = None
    format_version: int = FORMAT_VERSION

    @property
    def num_samples(self) -> int:
        return sum(entry.num_samples for entry in self.shards)

    def counts(self) -> dict[str, int]:
        """{shard file name: sample count}."""
        return {entry.name: entry.num_samples for entry in self.shards}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": "webdataset", "format_version": self.format_version, "builder": self.builder,
            "kind": self.kind, "image_key": self.image_key, "flip_key": self.flip_key, "label_key": self.label_key,
            "feat_key": self.feat_key, "caption_key": self.caption_key,
            "x_shape": _list(self.x_shape), "x_dtype": self.x_dtype,
            "feat_shape": _list(self.feat_shape), "feat_dtype": self.feat_dtype, "resolution": self.resolution}
        if self.text_key is not None:           # written only when present: older readers see the manifest unchanged
            out.update({"text_key": self.text_key, "text_mask_key": self.text_mask_key,
                        "text_shape": _list(self.text_shape), "text_dtype": self.text_dtype,
                        "text_encoder": self.text_encoder})
        if self.kind == "pixel" and self.x_shape is not None:
            out["image_size"], out["channels"] = self.x_shape[-1], self.x_shape[0]
        out.update({"num_samples": self.num_samples, "num_classes": self.num_classes,
                    "class_names": _list(self.class_names), "vae": self.vae, "teacher": self.teacher,
                    "shards": [entry.to_dict() for entry in self.shards], "params": self.params,
                    "source": self.source})
        return out

    @classmethod
    def from_dict(cls, data: Any, path: str = MANIFEST_NAME) -> "Manifest":
        """Validate `data` (parsed JSON of format 1 or 2); ConfigError naming `path` and the field if it is wrong."""
        if not isinstance(data, dict):
            raise ConfigError("Manifest %s holds a JSON %s, not an object; %s." % (path, type(data).__name__,
                                                                                  _REBUILD))
        check = _Checker(path, data)
        version = check.integer("format_version", 1, default=1)
        if version > FORMAT_VERSION:
            raise ConfigError("Manifest %s has format_version=%d but this dit_scale reads up to %d; update dit_scale "
                              "or rebuild the manifest." % (path, version, FORMAT_VERSION))
        if version == 1:
            data = check.data = _upgrade_format_1(data)
        manifest = cls(
            shards=check.shards(), kind=check.choice("kind", KINDS), image_key=check.member("image_key"),
            x_shape=check.shape("x_shape", 3), x_dtype=check.string("x_dtype"), flip_key=check.member("flip_key"),
            label_key=check.member("label_key"), feat_key=check.member("feat_key"),
            feat_shape=check.shape("feat_shape", 2), feat_dtype=check.string("feat_dtype"),
            caption_key=check.member("caption_key"), resolution=check.integer("resolution", 1),
            num_classes=check.integer("num_classes", 1), class_names=check.names("class_names"),
            vae=check.encoder("vae", numbers=("scaling_factor", "shift_factor")),
            teacher=check.encoder("teacher", numbers=()), text_key=check.member("text_key"),
            text_mask_key=check.member("text_mask_key"), text_shape=check.shape("text_shape", 2),
            text_dtype=check.string("text_dtype"), text_encoder=check.encoder("text_encoder", numbers=()),
            builder=check.string("builder"),
            params=check.mapping("params"), source=check.string("source"), format_version=FORMAT_VERSION)
        if data.get("num_samples") is not None and data["num_samples"] != manifest.num_samples:
            check.fail("num_samples", "=%r but its shards hold %d samples" % (data["num_samples"],
                                                                              manifest.num_samples))
        if manifest.image_key is not None:
            suffix = manifest.image_key.rsplit(".", 1)[-1].lower()
            if suffix not in PIXEL_SUFFIXES | ARRAY_SUFFIXES:
                check.fail("image_key", "=%r, which is not an image or array member (png, jpg, npy, safetensors)"
                           % manifest.image_key)
            if manifest.kind is not None and manifest.kind != ("pixel" if suffix in PIXEL_SUFFIXES else "latent"):
                check.fail("kind", "=%r but image_key=%r" % (manifest.kind, manifest.image_key))
        if manifest.feat_shape is not None and manifest.feat_key is None:
            check.fail("feat_key", "is null but feat_shape=%s" % manifest.feat_shape)
        if (manifest.text_shape is not None or manifest.text_mask_key is not None) and manifest.text_key is None:
            check.fail("text_key", "is null but text_shape / text_mask_key are set")
        if manifest.text_key is not None and manifest.text_mask_key is None:
            check.fail("text_mask_key", "is null but text_key=%r (caption features need their mask)"
                       % manifest.text_key)
        encoder = manifest.text_encoder or {}
        if manifest.text_shape is not None and encoder.get("width") not in (None, manifest.text_shape[1]):
            check.fail("text_encoder.width", "=%r but text_shape=%s" % (encoder.get("width"), manifest.text_shape))
        if (manifest.class_names is not None and manifest.num_classes is not None
                and len(manifest.class_names) != manifest.num_classes):
            check.fail("class_names", "has %d names for num_classes=%d" % (len(manifest.class_names),
                                                                          manifest.num_classes))
        return manifest


def read_manifest(path: str) -> Manifest:
    """The validated manifest at `path`; ConfigError naming the file (and the field) when it is unusable."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ConfigError("Manifest %s cannot be read (%s); fix its permissions or rebuild it with the data tool "
                          "that wrote the shards." % (path, e.strerror or e)) from None
    except ValueError as e:
        raise ConfigError("Manifest %s is not valid JSON (%s); rebuild it with the data tool that wrote the shards."
                          % (path, e)) from None
    return Manifest.from_dict(data, path)


def write_manifest(manifest: Manifest, out: str) -> str:
    """Write `manifest` to `out` (a folder: out/manifest.json, or a .json path) atomically; returns the path."""
    path = out if out.endswith(".json") else os.path.join(out, MANIFEST_NAME)
    data = manifest.to_dict()
    Manifest.from_dict(data, path)              # a writer never leaves a manifest the loader would reject
    tmp = "%s.tmp-%d" % (path, os.getpid())
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def find_manifest(shards: list[str], manifest: Optional[str] = None
                  ) -> tuple[Optional[Manifest], dict[str, int], Optional[str]]:
    """(manifest, {shard spec: sample count}, its path) for `shards`: from `manifest` (data.manifest) or the
    manifest.json next to local shards (the first one describes the source; counts come from all of them).
    Shards no manifest lists have no count; (None, {}, None) when there is no manifest."""
    paths = [manifest] if manifest else sorted(set(os.path.join(os.path.dirname(p), MANIFEST_NAME)
                                                   for p in shards if not is_url(p)))
    found: Optional[Manifest] = None
    found_path = None
    by_name: dict[str, int] = {}
    for path in paths:
        if not os.path.isfile(path):
            if manifest:
                raise ConfigError("data.manifest=%r does not exist; point it to the manifest.json of the shards "
                                  "or leave it unset." % manifest)
            continue
        info = read_manifest(path)
        if found is None:
            found, found_path = info, path
        for name, count in info.counts().items():
            by_name[name if manifest else os.path.join(os.path.dirname(path), name)] = count
    counts = {}
    for spec in shards:
        key = shard_name(spec) if manifest else spec
        if key in by_name:
            counts[spec] = by_name[key]
    return found, counts, found_path


# -- validation ------------------------------------------------------------------------------------------------------
def _list(value):
    return list(value) if value is not None else None


def _upgrade_format_1(data: dict) -> dict:
    """Format 1 (either dialect) as format-2 keys: x_shape from image_size/channels, kind from image_key, and the
    label key the loader assumed when a manifest did not name one."""
    out = dict(data)
    size, channels = data.get("image_size"), data.get("channels")
    if out.get("x_shape") is None and size and channels:
        out["x_shape"] = [channels, size, size]
    if out.get("resolution") is None and size:
        out["resolution"] = size
    out.setdefault("label_key", "cls")
    key = out.get("image_key")
    if out.get("kind") is None and isinstance(key, str):
        out["kind"] = "pixel" if key.rsplit(".", 1)[-1].lower() in PIXEL_SUFFIXES else "latent"
    return out


class _Checker:
    """Typed reads of manifest fields; each failure is one sentence naming the file and the field."""

    def __init__(self, path: str, data: dict):
        self.path, self.data = path, data

    def fail(self, name: str, problem: str):
        joint = "" if problem.startswith(("=", " ")) else " "      # "field=value ..." or "field is ..."
        raise ConfigError("Manifest %s has %s%s%s; %s." % (self.path, name, joint, problem, _REBUILD))

    def _get(self, name: str, default=None):
        value = self.data.get(name, default)
        return default if value is None else value

    def integer(self, name: str, minimum: int, default: Optional[int] = None) -> Optional[int]:
        value = self._get(name, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            self.fail(name, "=%r, not an integer >= %d" % (value, minimum))
        return value

    def string(self, name: str) -> Optional[str]:
        value = self._get(name)
        if value is not None and not isinstance(value, str):
            self.fail(name, "=%r, not a string" % (value,))
        return value

    def member(self, name: str) -> Optional[str]:
        value = self.string(name)
        if value is not None and (not value or "/" in value or value.startswith(".")):
            self.fail(name, "=%r, not a member name such as png or latent.npy" % value)
        return value

    def choice(self, name: str, allowed: tuple) -> Optional[str]:
        value = self._get(name)
        if value is not None and value not in allowed:
            self.fail(name, "=%r, not one of %s" % (value, ", ".join(allowed)))
        return value

    def shape(self, name: str, ndim: int) -> Optional[list[int]]:
        value = self._get(name)
        if value is None:
            return None
        if (not isinstance(value, list) or len(value) != ndim
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
            self.fail(name, "=%r, not a list of %d positive integers" % (value, ndim))
        return list(value)

    def names(self, name: str) -> Optional[list[str]]:
        value = self._get(name)
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            self.fail(name, "=%r, not a list of strings" % (value,))
        return value

    def mapping(self, name: str) -> dict:
        value = self._get(name, {})
        if not isinstance(value, dict):
            self.fail(name, "=%r, not an object" % (value,))
        return value

    def encoder(self, name: str, numbers: tuple) -> Optional[dict]:
        value = self._get(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.fail(name, "=%r, not an object" % (value,))
        for key in numbers:
            v = value.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                self.fail("%s.%s" % (name, key), "=%r, not a number" % (v,))
        return value

    def shards(self) -> list[ShardEntry]:
        value = self.data.get("shards")
        if not isinstance(value, list) or not value:
            self.fail("shards", "=%r, not a non-empty list of {name, num_samples}" % (value,))
        entries, names = [], set()
        for i, entry in enumerate(value):
            where = "shards[%d]" % i
            if not isinstance(entry, dict):
                self.fail(where, "=%r, not an object" % (entry,))
            name, count = entry.get("name"), entry.get("num_samples")
            if not isinstance(name, str) or not name or "/" in name:
                self.fail(where + ".name", "=%r, not a shard file name" % (name,))
            if name in names:
                self.fail(where + ".name", "=%r, listed twice" % name)
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                self.fail(where + ".num_samples", "=%r, not a count >= 0" % (count,))
            size, digest = entry.get("bytes"), entry.get("sha256")
            if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
                self.fail(where + ".bytes", "=%r, not a size in bytes" % (size,))
            if digest is not None and not isinstance(digest, str):
                self.fail(where + ".sha256", "=%r, not a hex digest" % (digest,))
            names.add(name)
            entries.append(ShardEntry(name, count, size, digest))
        return entries
