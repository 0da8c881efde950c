"""Writing one shard: a WebDataset tar written to a temporary name and renamed when complete, with fixed member
metadata so a rebuilt shard is byte-identical, and the member encoders the data tools share.

    with ShardWriter("/out/shard-000000.tar") as shard:
        shard.add("00000000", {"png": encode_png(image), "cls": encode_label(3)})
    shard.entry                  # ShardEntry(name, num_samples, bytes, sha256): its line in manifest.json

Members must have a suffix the loader reads (dit_scale.data.shards.SAFE_SUFFIXES); anything else is refused.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from typing import Optional, Union

import numpy as np
from PIL import Image

from dit_scale.data.manifest import ShardEntry
from dit_scale.data.shards import is_safe_member


class ShardWriter:
    """Context manager writing the shard at `path`; an exception inside leaves no file (and no temporary one)."""

    def __init__(self, path: str):
        self.path = path
        self.tmp = "%s.tmp-%d" % (path, os.getpid())
        self.num_samples = 0
        self.entry: Optional[ShardEntry] = None
        self._tar: Optional[tarfile.TarFile] = None

    def __enter__(self) -> "ShardWriter":
        self._tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        return self

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """Write one sample: members KEY.EXT in the given order."""
        for ext, data in members.items():
            name = "%s.%s" % (key, ext)
            if not is_safe_member(name):
                raise ValueError("member %s has a suffix the loader does not read (npy, safetensors, png, jpg, "
                                 "cls, txt, json)" % name)
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.num_samples += 1

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._tar.close()
        if exc_type is not None:
            os.remove(self.tmp)
            return False
        os.replace(self.tmp, self.path)
        self.entry = describe_shard(self.path, self.num_samples)
        return False


def describe_shard(path: str, num_samples: int) -> ShardEntry:
    """The manifest entry of a finished shard file."""
    return ShardEntry(os.path.basename(path), num_samples, os.path.getsize(path), sha256_file(path))


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_png(image: Union[Image.Image, np.ndarray]) -> bytes:
    """PNG bytes of a PIL image or a uint8 [H, W, 3] array."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def encode_label(label: int) -> bytes:
    return str(int(label)).encode("ascii")


def caption_members(caption: str, features: np.ndarray, mask: np.ndarray) -> dict[str, bytes]:
    """The members of a captioned sample: the caption text and, with a text encoder, its token features (float16
    [L, T], zero at padding) and mask (bool [L]) under the manifest's default keys."""
    from dit_scale.data.manifest import CAPTION_FEAT_KEY, CAPTION_MASK_KEY
    members = {"caption.txt": caption.encode("utf-8")}
    if features is not None:
        members[CAPTION_FEAT_KEY] = encode_npy(np.asarray(features, dtype=np.float16))
        members[CAPTION_MASK_KEY] = encode_npy(np.asarray(mask, dtype=bool))
    return members


def text_manifest_fields(info: dict) -> dict:
    """Manifest fields of caption features written with the text encoder described by `info` (TextEncoder.info())."""
    from dit_scale.data.manifest import CAPTION_FEAT_KEY, CAPTION_MASK_KEY
    return {"text_key": CAPTION_FEAT_KEY, "text_mask_key": CAPTION_MASK_KEY,
            "text_shape": [int(info["max_length"]), int(info["width"])], "text_dtype": "float16", "text_encoder": info}
