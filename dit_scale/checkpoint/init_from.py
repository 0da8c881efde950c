"""`train.init_from`: start a run from the weights of a file — weights only, step 0, a fresh optimizer.

    built.init = init_from(cfg, run_dir, built)   # the trainer, after build(cfg, "meta"), before the engine
    engine = build_engine(cfg, built.model, topology, init=built.init)   # materialises this rank's pieces of it
    load_weights_into(model, path)                # a model already on a device: fill it in place
    read_weights(path)                            # -> StartWeights(tensors, which, config, path)

PATH is any of: a run directory (its newest checkpoint), a `step_X` checkpoint folder (sharded), a `step_X.pt` file
(consolidated), or a `.safetensors` file written by `launch/export.py`, `launch/convert.py` or `launch/upcycle.py`.
From a checkpoint the EMA weights are taken (what a run samples with, and what public releases hold; the raw ones
where it has no EMA); a file with one set of weights gives that set. The engine then copies the loaded weights into
its EMA, so the model and the EMA start from the same weights, with the EMA's warm-up restarting at step 0.

The file takes the place of the init rule: the trainer builds the model on the meta device and the engine
materialises each rank's pieces from an init plan (`parallel/materialize.py`); `init_from` returns a plan whose
`draw(name, shape)` is the file's tensor, so FSDP shards, expert-parallel slices and ZeRO partitions are cut from
the file's weights and every engine and EP size starts from the same global weights. The keys and shapes are checked
against the model before any engine exists. Every rank reads the file (tensor by tensor for safetensors,
memory-mapped for .pt, only the EMA entries of a sharded folder). Persistent buffers restart from the model's own
values (the router's selection bias: zero; noted when the file's is not).

A resume wins: with train.resume=auto and checkpoints in the run directory the run continues from them and the
file is not read (a requeued fine-tune continues; it does not restart). train.resume=PATH with train.init_from is a
config error (`config/validate.py`). Every key and shape of the model must be in the file and nothing else; a
mismatch is one sentence naming the key (alignment heads and the mask token, which a run adds for training, may be
missing from the file: they keep their init). Reading never executes code: safetensors, or
`torch.load(weights_only=True)` and DCP tensor entries (the index through the restricted unpickler).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from dit_scale.checkpoint import storage
from dit_scale.checkpoint.load import resolve_path
from dit_scale.checkpoint.storage import is_run_dir, list_checkpoints
from dit_scale.errors import CheckpointError, ConfigError

# Parameters a run may add to (or drop from) the file's network: alignment heads and the mask token are training-time
# additions; the run keeps their fresh init (or ignores the file's), and says so.
OPTIONAL = ("align_heads.", "mask_token")
# Fields whose difference between the file's config and the run's changes what the same weights compute.
FUNCTION_FIELDS = ("diffusion.objective", "diffusion.time_scale", "model.learn_sigma", "moe.router",
                   "moe.score_function", "moe.normalize_topk", "moe.top_k", "moe.expert_act")


@dataclass
class StartWeights:
    tensors: Dict[str, torch.Tensor]      # name -> tensor (lazily read for safetensors: a `_LazySafetensors`)
    which: str                            # "ema" | "model"
    config: Optional[str]                 # the resolved config text stored with the weights, if any
    path: str                             # the file or folder actually read


class _LazySafetensors(dict):
    """{name: tensor} of a safetensors file that reads each tensor when it is asked for (keys known up front)."""

    def __init__(self, handle, keys):
        super().__init__((k, None) for k in keys)
        self._handle = handle

    def __getitem__(self, key):
        return self._handle.get_tensor(key)


def _not_weights(path: str, why: str, field: str = "train.init_from") -> CheckpointError:
    return CheckpointError(f"{field}='{path}' {why}; pass a run directory, a step_* checkpoint, an export or "
                           f"a file written by launch/convert.py or launch/upcycle.py (convert public DiT / DiT-MoE "
                           f"checkpoints with launch/convert.py first).")


def _read_safetensors(path: str, field: str) -> StartWeights:
    from safetensors import safe_open
    try:
        handle = safe_open(path, framework="pt")
        meta, keys = handle.metadata() or {}, list(handle.keys())
    except Exception as e:
        raise _not_weights(path, f"cannot be read as safetensors ({type(e).__name__})", field) from None
    return StartWeights(_LazySafetensors(handle, keys), meta.get("weights", "model"), meta.get("config"), path)


def _read_consolidated(path: str, field: str) -> StartWeights:
    storage.verify(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise _not_weights(path, f"cannot be read with torch.load(weights_only=True) ({type(e).__name__})",
                           field) from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise _not_weights(path, "is not a dit_scale checkpoint (it has no 'model' entry)", field)
    which = "ema" if isinstance(state.get("ema"), dict) else "model"
    config = state.get("config") if isinstance(state.get("config"), str) else None
    return StartWeights(state[which], which, config, path)


def _read_sharded(path: str, field: str) -> StartWeights:
    """Only the EMA (else the model) entries of a DCP folder, as full tensors in this process (no collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from dit_scale.checkpoint.safe_reader import SafeFileSystemReader
    from dit_scale.checkpoint.sharded import load_extra

    storage.verify(path)
    reader = SafeFileSystemReader(path)
    entries = reader.read_metadata().state_dict_metadata
    for which in ("ema", "model"):
        template = {key[len(which) + 1:]: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
                    for key, meta in entries.items()
                    if key.startswith(which + ".") and isinstance(meta, TensorStorageMetadata)}
        if template:
            dcp.load({which: template}, storage_reader=SafeFileSystemReader(path), no_dist=True)
            config = load_extra(path).get("config")
            return StartWeights(template, which, config if isinstance(config, str) else None, path)
    raise _not_weights(path, "holds no 'model' or 'ema' tensors", field)


def read_weights(path: str, field: str = "train.init_from") -> StartWeights:
    """The starting weights PATH holds (see the module docstring for what PATH may be); `field` names the setting
    in error messages."""
    if not path or not os.path.exists(path):
        raise CheckpointError(f"{field}='{path}' does not exist; pass an existing run directory, step_* "
                              f"checkpoint, export or converted / upcycled .safetensors file.")
    if is_run_dir(path) and not list_checkpoints(path):
        raise _not_weights(path, "is a directory without checkpoints", field)
    path = resolve_path(path)
    if os.path.isdir(path):
        return _read_sharded(path, field)
    if path.endswith(".safetensors"):
        return _read_safetensors(path, field)
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] != b"PK":                           # torch.save writes a zip archive
        if len(head) == 8 and 0 < int.from_bytes(head, "little") < os.path.getsize(path):
            return _read_safetensors(path, field)   # a safetensors file under another name
        raise _not_weights(path, "is neither a torch checkpoint nor a safetensors file", field)
    return _read_consolidated(path, field)


def _saved_config(config_text: Optional[str], cfg, origin: str):
    """The file's stored config, when there is one, it still loads, and there is a run config to compare with.
    Stored text that is no config at all (a YAML tag, a list) is a ConfigError naming `origin`; one of another
    version is only not compared."""
    if not config_text:
        return None
    from dit_scale.config import config_from_yaml_text, parse_stored_config
    parse_stored_config(config_text, origin)
    if cfg is None:
        return None
    try:
        return config_from_yaml_text(config_text, origin)
    except ConfigError:
        return None


def _changes(saved, cfg, keep) -> str:
    from dit_scale.config.diff import config_changes, describe
    return describe([c for c in config_changes(saved, cfg) if keep(c[0])]) if saved is not None else ""


def check_fits(source: StartWeights, shapes: Dict[str, tuple], cfg=None,
               log: Callable[[str], None] = print) -> List[str]:
    """CheckpointError (one sentence naming the key) unless the file holds exactly the tensors `shapes` names
    ({name: global shape}: a model's state_dict) at those shapes, alignment heads and the mask token excepted.
    Returns the names the file lacks of those (they keep their init); logs what it tells the user."""
    path = source.path
    saved = _saved_config(source.config, cfg, f"the config stored in train.init_from='{path}'")
    hint = _changes(saved, cfg, lambda k: k.startswith(("model.", "moe.", "mask.", "align.")))
    hint = f" (the file's config differs: {hint})" if hint else ""
    fix = "train with the config the file was made with (the .yaml beside it), or convert / upcycle it to this model"
    fresh = [k for k in shapes if k not in source.tensors and k.startswith(OPTIONAL)]
    unused = [k for k in source.tensors if k not in shapes and k.startswith(OPTIONAL)]
    for key in source.tensors:
        if key not in shapes and key not in unused:
            raise CheckpointError(f"train.init_from='{path}' holds '{key}', which this model does not have{hint}; "
                                  f"{fix}.")
    for key, shape in shapes.items():
        if key in fresh:
            continue
        if key not in source.tensors:
            raise CheckpointError(f"train.init_from='{path}' has no '{key}', which this model needs{hint}; {fix}.")
        value = source.tensors[key]
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(f"train.init_from='{path}': '{key}' is {list(value.shape)} there and "
                                  f"{list(shape)} in this model{hint}; {fix}.")
    if fresh or unused:
        def some(keys):
            return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        log(f"train.init_from: {len(fresh)} tensor(s) keep their init ({some(fresh)}) and {len(unused)} of the "
            f"file's are not used ({some(unused)}): alignment heads and the mask token are not part of the network "
            f"the file holds.")
    changed = _changes(saved, cfg, lambda k: k in FUNCTION_FIELDS)
    if changed:
        log(f"warning: train.init_from='{path}' was made for another setting of what its weights compute: "
            f"{changed} (file -> this run); the outputs at step 0 differ from the file's model.")
    return fresh


class FileInit:
    """An init plan (`build.InitPlan`'s `draw`) that gives each parameter its tensor from the file, so an engine
    materialising a meta model (`parallel/materialize.py`) cuts this rank's pieces of the file's weights; parameters
    the file lacks (alignment heads, mask token) come from `fallback`, the run's own plan."""

    def __init__(self, source: StartWeights, fallback, fresh: List[str]):
        self.source, self.fallback, self.fresh = source, fallback, set(fresh)

    def draw(self, name: str, shape) -> torch.Tensor:
        if name in self.fresh:
            return self.fallback.draw(name, shape)
        value = self.source.tensors[name]
        if tuple(value.shape) != tuple(shape):       # checked up front; a layout's global shape must agree
            raise CheckpointError(f"train.init_from='{self.source.path}': '{name}' is {list(value.shape)} there and "
                                  f"{list(shape)} in this model.")
        return value.to(torch.float32)


def _note_buffers(source: StartWeights, shapes, log) -> None:
    """Persistent buffers restart from the model's own values when an engine materialises it (only the router's
    aux-loss-free selection bias is one): say so when the file's is not zero."""
    moved = [k for k in shapes if k.endswith("expert_bias") and k in source.tensors and source.tensors[k].any()]
    if moved:
        log(f"note: train.init_from: the routers' selection biases ({moved[0]}, ...) restart at zero; aux-loss-free "
            f"balancing learns them again within a few hundred steps.")


@torch.no_grad()
def load_weights_into(model: torch.nn.Module, path: str, cfg=None, log: Callable[[str], None] = print) -> str:
    """Copy the starting weights of `path` into the materialised, whole `model` (parameters and persistent buffers),
    after `check_fits`. `cfg` (the run's config) words the errors and warnings. Returns a description."""
    source = read_weights(path)
    targets = model.state_dict()
    fresh = check_fits(source, {k: tuple(v.shape) for k, v in targets.items()}, cfg, log)
    for key, target in targets.items():
        if key not in fresh:
            target.copy_(source.tensors[key].to(target.dtype))
    return f"{source.path} ({source.which} weights, {len(targets) - len(fresh)} tensors)"


def init_from(cfg, run_dir, built, is_main: bool = True):
    """train.init_from for the trainer, right after `build(cfg, ...)` and before the engine: returns the init plan
    the engine materialises the model with — `built.init` itself when there is nothing to load, or when
    train.resume=auto finds checkpoints in the run directory (the resume restores them; the file is not read),
    else a `FileInit` drawing every parameter from the file (checked against the model first). A model built on a
    device (not meta) is filled in place instead. Returns the plan for `build_engine(..., init=...)`."""
    path = cfg.train.init_from
    if not path:
        return built.init
    log = print if is_main else (lambda _: None)
    run_path = getattr(run_dir, "path", run_dir)
    if cfg.train.resume == "auto" and list_checkpoints(run_path, check=False):
        log(f"train.init_from='{path}' is not read: this run resumes from its own checkpoints in {run_path}.")
        return built.init
    model = built.model
    if not any(p.is_meta for p in model.parameters()):
        log(f"initialised the weights from {load_weights_into(model, path, cfg, log)} (train.init_from)")
        return built.init
    source = read_weights(path)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    fresh = check_fits(source, shapes, cfg, log)
    _note_buffers(source, shapes, log)
    log(f"initialising the weights from {source.path} ({source.which} weights; train.init_from: step 0, fresh "
        f"optimizer, the EMA starts equal to them)")
    return FileInit(source, built.init, fresh)
