"""Engines wrap model + optimizer for one backend behind the `Engine` interface (see base.py)."""
from dit_scale.parallel.engines.base import Engine
from dit_scale.parallel.engines.fsdp import FSDPEngine
from dit_scale.parallel.engines.local import LocalEngine


def _deepspeed(cfg, model, topology, mup=None, init=None):
    from dit_scale.parallel.engines.deepspeed import DeepSpeedEngineWrapper   # DeepSpeed is imported only if used
    return DeepSpeedEngineWrapper(cfg, model, topology, mup, init)


ENGINES = {"local": LocalEngine, "fsdp": FSDPEngine, "deepspeed": _deepspeed}


def build_engine(cfg, model, topology, mup=None, init=None) -> Engine:
    """The engine `parallel.engine` names, holding `model` in this rank's layout; `mup`: the μP table or None.
    A model on the meta device is sharded first and then materialised piece by piece with `init` (an InitPlan,
    `dit_scale.build`); a materialised model is moved to the device as it is."""
    return ENGINES[cfg.parallel.engine](cfg, model, topology, mup, init)


__all__ = ["Engine", "FSDPEngine", "LocalEngine", "build_engine", "ENGINES"]
