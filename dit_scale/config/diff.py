"""Differences between two resolved configs, as `key: old -> new` (what a resume prints before it continues)."""
from __future__ import annotations

from typing import Any, List, Tuple

from omegaconf import DictConfig, OmegaConf

# A resume changes these by design: they never count as a change of the run.
IGNORED = ("train.resume",)


def _flatten(node: Any, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def config_changes(old: DictConfig, new: DictConfig) -> List[Tuple[str, Any, Any]]:
    """[(dotted key, old value, new value)] for every field that differs, in schema order."""
    a = _flatten(OmegaConf.to_container(old, resolve=True))
    b = _flatten(OmegaConf.to_container(new, resolve=True))
    return [(k, a.get(k), b.get(k)) for k in b if k not in IGNORED and a.get(k) != b.get(k)]


def describe(changes) -> str:
    return ", ".join(f"{k}: {old} -> {new}" for k, old, new in changes)
