"""Everything that knows about processes and devices: topology, dispatchers, engines."""
from dit_scale.parallel.engines import build_engine
from dit_scale.parallel.topology import Topology, init_topology

__all__ = ["Topology", "init_topology", "build_engine"]
