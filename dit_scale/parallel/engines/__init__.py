"""Engines wrap model + optimizer for one backend behind the `Engine` interface (see base.py)."""
from dit_scale.parallel.engines.base import Engine
from dit_scale.parallel.engines.fsdp import FSDPEngine
from dit_scale.parallel.engines.local import LocalEngine


def _deepspeed(cfg, model, topology, mup=None):
    from dit_scale.parallel.engines.deepspeed import DeepSpeedEngineWrapper   # DeepSpeed is imported only if used
    return DeepSpeedEngineWrapper(cfg, model, topology, mup)


ENGINES = {"local": LocalEngine, "fsdp": FSDPEngine, "deepspeed": _deepspeed}


def build_engine(cfg, model, topology, mup=None) -> Engine:
    """The engine `parallel.engine` names, holding `model` in this rank's layout; `mup`: the μP table or None."""
    return ENGINES[cfg.parallel.engine](cfg, model, topology, mup)


__all__ = ["Engine", "FSDPEngine", "LocalEngine", "build_engine", "ENGINES"]
