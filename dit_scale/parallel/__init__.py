"""Everything that knows about processes and devices: topology, dispatchers, engines.

The names below load on first use, so that importing `dit_scale.parallel.shutdown` (which the entry points do before
torch) imports no torch."""

__all__ = ["Topology", "init_topology", "build_engine"]


def __getattr__(name: str):
    if name == "build_engine":
        from dit_scale.parallel.engines import build_engine
        return build_engine
    if name in ("Topology", "init_topology"):
        from dit_scale.parallel import topology
        return getattr(topology, name)
    raise AttributeError(f"module 'dit_scale.parallel' has no attribute {name!r}")
