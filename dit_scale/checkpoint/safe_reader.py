"""Reading DCP checkpoints without executing code: the `.metadata` index is unpickled by a restricted unpickler.

torch.distributed.checkpoint stores its index (`.metadata`) with plain pickle, and `FileSystemReader.read_metadata`
reads it with `pickle.load`: a crafted `.metadata` (its manifest recomputed to match) would run arbitrary code on
resume, export or sampling. `SafeFileSystemReader` reads the same file with an unpickler that admits only what a DCP
index holds — DCP's own metadata classes, torch dtypes, sizes and layouts, and a path — and refuses anything else
with one sentence naming the file and the reference. Tensor data is read by DCP with `torch.load(weights_only=True)`.

An index can also declare an entry as pickled bytes (`BytesStorageMetadata`), which DCP's planner reads back with an
unrestricted `torch.load`: the index itself unpickles cleanly, but loading that entry runs the payload. dit_scale never
writes such entries (every value it saves is a tensor or goes through `extra.pt`), so the reader refuses an index that
declares one, and refuses to read a bytes item should a planner ask for one.
"""
from __future__ import annotations

import math
import os
import pickle

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType

from dit_scale.errors import CheckpointError

_METADATA = "torch.distributed.checkpoint.metadata"
ALLOWED = {
    (_METADATA, "Metadata"), (_METADATA, "TensorStorageMetadata"), (_METADATA, "BytesStorageMetadata"),
    (_METADATA, "ChunkStorageMetadata"), (_METADATA, "TensorProperties"), (_METADATA, "MetadataIndex"),
    (_METADATA, "StorageMeta"), (_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in ALLOWED or dtype:
            return super().find_class(module, name)
        raise CheckpointError(f"Checkpoint index '{self.path}' references {module}.{name}, which a DCP index never "
                              f"holds (the file was crafted or is not a checkpoint); refusing to load it.")


def read_metadata_safely(path: str) -> Metadata:
    """Unpickle the DCP index file `path` with the restricted unpickler (CheckpointError if it is not one)."""
    try:
        with open(path, "rb") as f:
            metadata = _RestrictedUnpickler(f, path).load()
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"Checkpoint index '{path}' cannot be read ({type(e).__name__}); use an earlier "
                              f"checkpoint.") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"Checkpoint index '{path}' holds a {type(metadata).__name__}, not DCP metadata; "
                              f"refusing to load it.")
    pickled = [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
    if pickled:                                 # DCP would unpickle them without restriction: never for our files
        raise CheckpointError(f"Checkpoint index '{path}' declares pickled objects ({pickled[0]}, ...), which "
                              f"dit_scale never writes (the file was crafted or is not ours); refusing to load it.")
    return metadata


def check_declared_sizes(metadata: Metadata, folder: str) -> None:
    """The index's tensors must fit in the folder's data files (DCP stores each tensor's bytes once, uncompressed):
    a crafted index that declares more (a [2**40] tensor) would have every reader allocate it before reading a
    byte — an out-of-memory crash instead of one sentence."""
    declared = sum(math.prod(meta.size) * meta.properties.dtype.itemsize
                   for meta in metadata.state_dict_metadata.values() if isinstance(meta, TensorStorageMetadata))
    stored = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(".distcp"))
    if declared > stored + 2 ** 20:                 # torch.save's per-tensor framing is the only slack needed
        raise CheckpointError(f"Checkpoint '{folder}' declares {declared / 2 ** 30:.3g} GiB of tensors but its data "
                              f"files hold {stored / 2 ** 30:.3g} GiB (the index was crafted or the data files are "
                              f"truncated); use an earlier checkpoint.")


class SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader with `read_metadata` through the restricted unpickler, refusing pickled entries."""

    def read_data(self, plan, planner):
        bytes_items = [item for item in plan.items if item.type == LoadItemType.BYTE_IO]
        if bytes_items:                         # a second line of defence: read_metadata refuses them first
            raise CheckpointError(f"Checkpoint '{self.path}' would load {bytes_items[0].dest_index.fqn} as pickled "
                                  f"bytes, which dit_scale never writes; refusing to load it.")
        return super().read_data(plan, planner)

    def read_metadata(self, *args, **kwargs) -> Metadata:
        rank = kwargs.get("rank")
        name = ".metadata" if rank is None else f"__{rank}.metadata"       # as DCP's FileSystemWriter names it
        metadata = read_metadata_safely(os.path.join(str(self.path), name))
        check_declared_sizes(metadata, str(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
