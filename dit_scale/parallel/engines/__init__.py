"""Engines wrap model + optimizer for one backend behind the `Engine` interface (DESIGN.md, seam 2)."""
from dit_scale.parallel.engines.base import Engine
from dit_scale.parallel.engines.fsdp import FSDPEngine
from dit_scale.parallel.engines.local import LocalEngine


def _deepspeed(cfg, model, topology):
    from dit_scale.parallel.engines.deepspeed import DeepSpeedEngineWrapper   # DeepSpeed is imported only if used
    return DeepSpeedEngineWrapper(cfg, model, topology)


ENGINES = {"local": LocalEngine, "fsdp": FSDPEngine, "deepspeed": _deepspeed}


def build_engine(cfg, model, topology) -> Engine:
    return ENGINES[cfg.parallel.engine](cfg, model, topology)


__all__ = ["Engine", "FSDPEngine", "LocalEngine", "build_engine", "ENGINES"]
