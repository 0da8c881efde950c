"""Where shards live and how their bytes are read: listing, streaming samples out of a tar, decoding members.

A shard is a WebDataset tar: consecutive members KEY.EXT form one sample (KEY = member path up to the first dot
of the file name, EXT = the rest, e.g. `latent.npy`). A shard is named by

    /data/in1k/shard-000123.tar                        a local file
    /data/in1k  |  /data/in1k/*.tar                    a directory (its *.tar) or a glob
    /data/in1k/shard-{000000..001023}.tar              a brace list (every name must exist)
    pipe:aws s3 cp s3://bucket/in1k/shard-{000000..001023}.tar -     any command writing the tar to stdout
    s3://bucket/in1k/shard-{000000..001023}.tar        = pipe:aws s3 cp URL -
    https://host/in1k/shard-{000000..001023}.tar       read with curl (webdataset.gopen: retries, fails on HTTP errors)

Only members whose last suffix is in SAFE_SUFFIXES are read (npy, safetensors, json, cls, txt, png, jpg, jpeg);
anything else (.pickle, .pth, .pyd, ...) is skipped without its bytes being read, and .npy is loaded with
allow_pickle=False. A shard that breaks mid-way, or holds another number of samples than its manifest lists,
yields one `{"__error__": ...}` marker at its end, so the caller can count it as corrupt.
"""
from __future__ import annotations

import glob
import io
import os
import re
import subprocess
import tarfile
from typing import Any, Iterator, Optional

import numpy as np
from braceexpand import braceexpand
from PIL import Image
from webdataset import tariterators
from webdataset.gopen import Pipe, gopen, set_options

from dit_scale.errors import ConfigError

SAFE_SUFFIXES = {"png", "jpg", "jpeg", "npy", "safetensors", "cls", "txt", "json"}
PIXEL_SUFFIXES = {"png", "jpg", "jpeg"}
ARRAY_SUFFIXES = {"npy", "safetensors"}
_TAR_NAME = re.compile(r"([^/\s?#]+\.tar)(?:[\s?#]|$)")     # a URL's query (signed URLs) is not part of the name


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
        raise ConfigError("No .tar shards match %s=%r; create them with `python data_tools/make_synthetic.py "
                          "--out DIR` or `python data_tools/build_shards.py --images DIR --out DIR`, or set %s to a "
                          "directory, glob, brace pattern or pipe: URL of existing shards." % (field, path, field))
    unreadable = [p for p in shards if not os.access(p, os.R_OK)]
    if unreadable:
        raise ConfigError("Shard %s (from %s=%r) is not readable by this user; fix its permissions."
                          % (unreadable[0], field, path))
    return shards


# -- reading ---------------------------------------------------------------------------------------------------------
def _gopen_url(spec: str) -> str:
    """What webdataset.gopen opens for a shard spec: pipe: and http(s):// as given (curl, with retries), s3:// as
    an `aws s3 cp` pipe (gopen has no s3 scheme), local files by absolute path (a relative name with a colon
    would read as a URL scheme)."""
    if spec.startswith("s3://"):
        return "pipe:aws s3 cp %s -" % spec
    if is_url(spec):
        return spec
    return os.path.abspath(spec)


def is_safe_member(name: str) -> bool:
    """True for tar members whose last suffix is in SAFE_SUFFIXES (the only ones whose bytes are read)."""
    base = name.rsplit("/", 1)[-1]
    return "." in base and base.rsplit(".", 1)[-1].lower() in SAFE_SUFFIXES


def _open(spec: str):
    """A binary stream of the shard: a file, or webdataset's Pipe around the command that writes it."""
    stream = gopen(_gopen_url(spec), "rb")
    set_options(stream, ignore_errors=True)     # Pipes: iter_tar_samples reports a failed exit status itself
    return stream


def _close(stream, complete: bool) -> None:
    """Close a shard stream. A command read to the end is left to finish (and waited for: _failed_status then
    tells how it ended); one abandoned early is killed."""
    if isinstance(stream, Pipe):
        if complete:
            while stream.read(1 << 16):         # the tar's end padding
                pass
        elif stream.proc.poll() is None:
            stream.proc.kill()
    stream.close()


def _failed_status(stream) -> Optional[int]:
    """The failed exit status of a shard's command once it has ended (waiting up to a second), else None: when
    the tar breaks because the command failed (a 404, a missing file), that status is the cause to report."""
    if not isinstance(stream, Pipe):
        return None
    try:
        status = stream.proc.wait(timeout=1)
    except subprocess.TimeoutExpired:
        return None
    return status if status not in stream.ignore_status else None


def iter_tar_samples(spec: str, expected: Optional[int] = None) -> Iterator[dict[str, Any]]:
    """Yield {"__key__", "__shard__", EXT: bytes, ...} per sample of one shard (safe members only). A shard that
    cannot be read to its end, or (with `expected`, its manifest count) holds another number of samples, then
    yields one marker {"__key__", "__shard__", "__error__": message, "__samples__": samples it stands for}.

    webdataset opens the stream (gopen) and reads members (tar_file_iterator, which skips members its
    select_files rejects without reading their bytes) and groups them into samples (group_by_keys). A tar that
    breaks mid-way raises out of them; the partial sample is dropped with it. (Its higher-level
    url_opener/tar_file_expander are not used: their handlers either re-raise with the stream's repr appended to
    the error's arguments or skip the rest silently, where a broken shard must end in exactly one marker.) A tar
    cut at a header boundary (or whose next header is garbage) reads as a shorter, valid tar in tarfile and so in
    webdataset: only the manifest's count shows it, hence `expected`."""
    count, key, stream, error = 0, "?", None, None
    try:
        stream = _open(spec)
        members = tariterators.tar_file_iterator(stream, select_files=is_safe_member)
        members = ({**member, "__url__": spec} for member in members)   # group_by_keys names samples' shard
        for sample in tariterators.group_by_keys(members, lcase=False):
            sample["__shard__"] = sample.pop("__url__")
            key = sample["__key__"]
            count += 1
            yield sample
        _close(stream, complete=True)
        status, stream = _failed_status(stream), None
        if status is not None:                  # a download that broke off, even where the tar looked complete
            error = "the command reading it exited with status %d" % status
    except (OSError, tarfile.TarError, EOFError, ValueError) as e:
        # tar_file_iterator appends " @ <stream repr>" to the messages of errors it re-raises
        error = "%s: %s" % (type(e).__name__, str(e).split(" @ ")[0])
        status = _failed_status(stream)
        if status is not None:
            error += " (the command reading it exited with status %d)" % status
    finally:
        if stream is not None:                  # an error, or the consumer stopped early
            try:
                _close(stream, complete=False)
            except Exception:                   # noqa: BLE001 -- already failing or abandoned
                pass
    problems = [error] if error else []
    if expected is not None and count != expected:
        problems.append("%d samples where its manifest lists %d" % (count, expected))
    if problems:
        missing = expected - count if expected is not None else 0
        yield {"__key__": key, "__shard__": spec, "__error__": "; ".join(problems), "__samples__": max(missing, 1)}


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
    array = decode_array(data, ext)
    if array.dtype.kind not in "biuf":          # a structured or string array would cast to float32 silently
        raise ValueError(".%s holds %s values, not numbers" % (ext, array.dtype))
    return array.astype(np.float32, copy=False)


def first_sample(spec: str) -> Optional[dict[str, Any]]:
    """The first complete sample of a shard, or None (used at start-up when there is no manifest)."""
    for sample in iter_tar_samples(spec):
        if "__error__" in sample:
            raise ConfigError("Shard %s cannot be read (%s); rebuild or remove it." % (spec, sample["__error__"]))
        return sample
    return None
