"""Where shards live and how their bytes are read: listing, manifests, safe tar members, decoding.

A shard is a WebDataset tar: consecutive members KEY.EXT form one sample (KEY = member path up to the first dot
of the file name, EXT = the rest, e.g. `latent.npy`). A shard is named by

    /data/in1k/shard-000123.tar                        a local file
    /data/in1k  |  /data/in1k/*.tar                    a directory (its *.tar) or a glob
    /data/in1k/shard-{000000..001023}.tar              a brace list (every name must exist)
    pipe:aws s3 cp s3://bucket/in1k/shard-{000000..001023}.tar -     any command writing the tar to stdout
    s3://bucket/in1k/shard-{000000..001023}.tar        = pipe:aws s3 cp URL -
    https://host/in1k/shard-{000000..001023}.tar       = pipe:curl -sfL URL

Only members whose last suffix is in SAFE_SUFFIXES are read (npy, safetensors, json, cls, txt, png, jpg, jpeg);
anything else (.pickle, .pth, .pyd, ...) is skipped without its bytes being read, and .npy is loaded with
allow_pickle=False. A tar that breaks mid-way yields one `{"__error__": ...}` marker and stops, so the caller can
count it as a corrupt sample.
"""
from __future__ import annotations

import glob
import io
import json
import os
import re
import subprocess
import tarfile
from typing import Any, Iterator, Optional

import numpy as np
from braceexpand import braceexpand
from PIL import Image

from dit_scale.config import ConfigError

SAFE_SUFFIXES = {"png", "jpg", "jpeg", "npy", "safetensors", "cls", "txt", "json"}
PIXEL_SUFFIXES = {"png", "jpg", "jpeg"}
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")   # KEY.EXT, KEY up to the first dot of the name
_TAR_NAME = re.compile(r"([^/\s]+\.tar)(?:\s|$)")


# -- listing ---------------------------------------------------------------------------------------------------------
def is_url(spec: str) -> bool:
    return spec.startswith(("pipe:", "s3://", "http://", "https://"))


def shard_name(spec: str) -> str:
    """The file name of a shard (`shard-000001.tar`) for local paths and URLs, to match manifest entries."""
    if not is_url(spec):
        return os.path.basename(spec)
    names = _TAR_NAME.findall(spec)
    return names[0] if names else spec


def list_shards(path: str, field: str = "data.path") -> list[str]:
    """Sorted shard specs named by `path` (see the module docstring); ConfigError naming `field` if one is missing."""
    pattern = os.path.expanduser(os.path.expandvars(str(path)))
    if is_url(pattern):
        return sorted(set(braceexpand(pattern)))
    if os.path.isdir(pattern):
        shards = glob.glob(os.path.join(pattern, "*.tar"))
    else:
        shards = []
        for expanded in braceexpand(pattern):
            if glob.has_magic(expanded):
                shards += glob.glob(expanded)
            elif not os.path.isfile(expanded) and "{" in pattern:
                raise ConfigError("%s=%r names shard %s, which does not exist; rebuild it (data_tools/build_shards.py "
                                  "completes missing shards) or fix the brace range." % (field, path, expanded))
            else:
                shards.append(expanded)
    shards = sorted(set(p for p in shards if os.path.isfile(p)))
    if not shards:
        raise ConfigError("No .tar shards match %s=%r; create them with `python data_tools/make_synthetic.py --out DIR` "
                          "or `python data_tools/build_shards.py --images DIR --out DIR`, or set %s to a directory, "
                          "glob, brace pattern or pipe: URL of existing shards." % (field, path, field))
    unreadable = [p for p in shards if not os.access(p, os.R_OK)]
    if unreadable:
        raise ConfigError("Shard %s (from %s=%r) is not readable by this user; fix its permissions."
                          % (unreadable[0], field, path))
    return shards


# -- manifests -------------------------------------------------------------------------------------------------------
def read_manifest(shards: list[str], manifest: Optional[str] = None) -> tuple[dict, dict[str, int], Optional[str]]:
    """(manifest dict, {shard spec: sample count}, manifest path) from `manifest` or the manifest.json files next
    to local shards. Counts are left out for shards the manifests do not list; ({}, {}, None) if there is none."""
    paths = [manifest] if manifest else sorted(set(os.path.join(os.path.dirname(p), "manifest.json")
                                                   for p in shards if not is_url(p)))
    info: dict = {}
    by_name: dict[str, int] = {}
    found = None
    for path in paths:
        if not os.path.isfile(path):
            if manifest:
                raise ConfigError("data.manifest=%r does not exist; point it to the manifest.json of the shards "
                                  "or leave it unset." % manifest)
            continue
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError("Manifest %s cannot be read (%s); rebuild it with the shard builder." % (path, e))
        info = info or data
        found = found or path
        for entry in data.get("shards", []):
            key = os.path.join(os.path.dirname(path), entry["name"]) if not manifest else entry["name"]
            by_name[key] = int(entry["num_samples"])
    counts = {}
    for p in shards:
        key = shard_name(p) if manifest else p
        if key in by_name:
            counts[p] = by_name[key]
    return info, counts, found


# -- reading ---------------------------------------------------------------------------------------------------------
def _command(spec: str) -> Optional[str]:
    if spec.startswith("pipe:"):
        return spec[len("pipe:"):]
    if spec.startswith("s3://"):
        return "aws s3 cp %s -" % spec
    if spec.startswith(("http://", "https://")):
        return "curl -sfL %s" % spec
    return None


def iter_tar_samples(spec: str) -> Iterator[dict[str, Any]]:
    """Yield {"__key__", "__shard__", EXT: bytes, ...} per sample of one shard (safe members only); a read error
    yields one {"__key__", "__shard__", "__error__": message} and ends the shard."""
    command = _command(spec)
    proc = None
    sample: dict[str, Any] = {}
    key = None
    try:
        if command is None:
            stream = open(spec, "rb")
        else:
            proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            stream = proc.stdout
        with stream, tarfile.open(fileobj=stream, mode="r|") as tar:   # streaming: skipped members stay unread
            for member in tar:
                match = _MEMBER_NAME.match(member.name)
                if not member.isfile() or match is None:
                    continue
                key, ext = match.group(1), match.group(2)
                if sample and sample["__key__"] != key:
                    yield sample
                    sample = {}
                if not sample:
                    sample = {"__key__": key, "__shard__": spec}
                if ext.rsplit(".", 1)[-1].lower() in SAFE_SUFFIXES:
                    sample[ext] = tar.extractfile(member).read()
        if proc is not None and proc.wait() != 0:
            raise OSError("command %r exited with status %d" % (command, proc.returncode))
    except (OSError, tarfile.TarError, EOFError) as e:
        # the partial sample is dropped with the error: its members may be incomplete
        yield {"__key__": key or "?", "__shard__": spec, "__error__": "%s: %s" % (type(e).__name__, e)}
        return
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    if sample:
        yield sample


# -- decoding --------------------------------------------------------------------------------------------------------
def decode_array(data: bytes, ext: str) -> np.ndarray:
    """npy (never unpickled) or safetensors (its only tensor, or the one named "data") as a numpy array."""
    suffix = ext.rsplit(".", 1)[-1].lower()
    if suffix == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    if suffix == "safetensors":
        from safetensors.numpy import load
        tensors = load(data)
        if len(tensors) != 1 and "data" not in tensors:
            raise ValueError("safetensors member holds %d tensors and none named 'data'" % len(tensors))
        return tensors["data"] if "data" in tensors else next(iter(tensors.values()))
    raise ValueError("cannot decode .%s as an array" % ext)


def decode_image(data: bytes, ext: str) -> np.ndarray:
    """png/jpg -> uint8 [H, W, 3] RGB; npy/safetensors -> float32 array as stored."""
    if ext.rsplit(".", 1)[-1].lower() in PIXEL_SUFFIXES:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    return decode_array(data, ext).astype(np.float32, copy=False)


def first_sample(spec: str) -> Optional[dict[str, Any]]:
    """The first complete sample of a shard, or None (used at start-up when there is no manifest)."""
    for sample in iter_tar_samples(spec):
        if "__error__" in sample:
            raise ConfigError("Shard %s cannot be read (%s); rebuild or remove it." % (spec, sample["__error__"]))
        return sample
    return None


def add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Write one sample member with fixed metadata, so rebuilding a shard gives identical bytes (data tools)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
