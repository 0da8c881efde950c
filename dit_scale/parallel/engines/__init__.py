"""Engines wrap model + optimizer for one backend behind the `Engine` interface (DESIGN.md, seam 2)."""
from dit_scale.parallel.engines.base import Engine
from dit_scale.parallel.engines.fsdp import FSDPEngine
from dit_scale.parallel.engines.local import LocalEngine

ENGINES = {"local": LocalEngine, "fsdp": FSDPEngine}


def build_engine(cfg, model, topology) -> Engine:
    return ENGINES[cfg.parallel.engine](cfg, model, topology)


__all__ = ["Engine", "FSDPEngine", "LocalEngine", "build_engine", "ENGINES"]
