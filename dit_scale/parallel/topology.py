"""Process layout of a run: global rank, data-parallel rank, expert-, tensor- and context-parallel ranks, device, and
every DeviceMesh.

    topo = init_topology(cfg)      # reads the torchrun / SLURM environment, creates the process group and meshes
    topo = init_processes("auto")  # every process holds the whole model (evaluation): the process group, no meshes

The ranks form a mesh ("edp", "ep", "cp", "tp") (`mesh`), tp fastest: `parallel.tp` consecutive ranks split each
layer's heads and FFN widths (tensor parallelism), `parallel.cp` groups of them split each image's tokens (context
parallelism), and the remaining WORLD_SIZE / (tp·cp) = dp data-parallel ranks see different images. Experts are
split over `parallel.ep` of the data-parallel ranks ("ep") and held alike by the others ("edp", and every cp and tp
rank). FSDP shards replicated parameters over every rank (`dp_mesh`, 1-D "dp"), tensor-parallel ones over the dp·cp
ranks holding the same tensor-parallel piece (`dense_mesh`), experts over the ranks holding the same experts
(`expert_mesh["edp"]`); `expert_mesh` is every rank ep-major ("ep", "edp"): the layout in which a global expert
tensor [E, ...] is split, for sharded checkpoints. `image_mesh` (cp·tp ranks) is every rank that shares an image.
The data loader and everything that must differ per model replica use `dp_rank` / `dp_size`, never the global rank.
Backend: NCCL on GPU, gloo on CPU. Layout errors are raised on every rank before the process group exists. All
meshes are created here, once (creating one is collective).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
from datetime import timedelta
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from dit_scale.compat import flatten_mesh
from dit_scale.config import to_yaml
from dit_scale.errors import ConfigError
from dit_scale.parallel.layout import check_layout


@dataclass(frozen=True)
class Topology:
    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    device: torch.device = torch.device("cpu")
    mesh: Optional[object] = None          # DeviceMesh ("edp", "ep", "cp", "tp") when a process group exists
    dp_mesh: Optional[object] = None       # DeviceMesh ("dp",): every rank (replicated parameters)
    expert_mesh: Optional[object] = None   # DeviceMesh ("ep", "edp"): global expert tensors split ep-major
    tp_rank: int = 0
    tp_size: int = 1
    cp_rank: int = 0
    cp_size: int = 1
    sp: bool = False                       # sequence parallelism (tp > 1 and parallel.sp)
    dense_mesh: Optional[object] = None    # 1-D ("dp_cp"): ranks holding the same tensor-parallel piece (tp > 1)
    image_mesh: Optional[object] = None    # 1-D ("cp_tp"): ranks sharing each image (cp·tp > 1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def group(self, dim: str):
        """Process group of a mesh dimension: "ep" (ranks splitting the experts), "edp" (data-parallel ranks holding
        the same ones), "tp" (splitting layers), "cp" (splitting tokens), or "image" (every rank sharing an image)."""
        if dim == "image":
            return self.image_mesh.get_group()
        return self.mesh.get_group(dim)

    @property
    def image_size(self) -> int:
        """Ranks sharing each image: cp · tp (they split its tokens or its layers; 1 without either)."""
        return self.cp_size * self.tp_size


def env_rank() -> tuple:
    """(rank, world_size, local_rank) from torchrun's or SLURM's environment (1 process when neither is set)."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ.get("RANK", 0)), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), int(os.environ["SLURM_LOCALID"])
    return 0, 1, 0


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto.")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def cpu_threads(cores: int, local_processes: int, loader_workers: int) -> int:
    """Intra-op threads per training process on a CPU-only node: the cores left after the loader's worker processes,
    shared by the node's training processes (at least 1). Oversubscribed cores cost far more than they give (on a
    loaded 2-core machine 2 threads ran 5× slower than 1). OMP_NUM_THREADS, when set, wins."""
    return max(1, (cores - local_processes * loader_workers) // max(1, local_processes))


def retain_freed_host_memory() -> bool:
    """Make the C allocator reuse freed host memory instead of returning it to the system; True where it could
    (glibc). A CPU training step allocates and frees the same large blocks every step (weight gradients, expert
    activations); glibc serves blocks above its mmap threshold (at most 32 MiB) by fresh mappings, so every step
    page-faults and zeroes them again: about 20% of a DiT-B/2-8E2A step on 2 cores, and a cost that does not shrink
    with the tokens a masked step keeps. With mmap off and no trimming, freed blocks stay in the heap and are
    reused, as CUDA's caching allocator does; resident memory stays at the step's peak. Trimming is off for any
    size (-1, mallopt(3)): a finite threshold fits in an int, at most 2 GiB, and a step that frees more than that
    at once (DiT-B/2-8E2A's weight gradients alone are 2.7 GB) gave it back and faulted it in again next step."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):                 # not glibc (macOS, musl): its allocator as it is
        return False
    m_trim_threshold, m_mmap_max = -1, -4             # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, -1))


def _local_processes(world: int) -> int:
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "").split("(")[0]
        if value.isdigit():
            return int(value)
    return world


def config_hash(cfg) -> str:
    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16]


def check_same_config(cfg, rank: int, world: int) -> None:
    """Every rank must run the same resolved config; a mismatch is an error on every rank (no hang)."""
    hashes = [None] * world
    dist.all_gather_object(hashes, config_hash(cfg))
    if len(set(hashes)) > 1:
        differing = [r for r, h in enumerate(hashes) if h != hashes[0]]
        raise ConfigError(f"The resolved config differs between ranks (ranks {differing} differ from rank 0); "
                          f"launch every rank with the same --config file and overrides.")


def agree(topology: "Topology", error: Optional[str]) -> Optional[str]:
    """The first rank's error of those that had one (e.g. only rank 0 takes the run directory's lock), so every rank
    can raise the same ConfigError instead of waiting in the next collective."""
    if topology.world_size == 1 or not dist.is_initialized():
        return error
    errors = [None] * topology.world_size
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def _init_device(name: str, local_rank: int, world: int, loader_workers: int) -> torch.device:
    """This process's device (`pick_device`); on the CPU also its thread count (`cpu_threads`, unless
    OMP_NUM_THREADS is set) and the host allocator (`retain_freed_host_memory`)."""
    device = pick_device(name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(cpu_threads(cores, _local_processes(world), loader_workers))
    if device.type == "cpu":
        retain_freed_host_memory()
    return device


def _init_process_group(device: torch.device, rank: int, world: int, timeout_minutes: float) -> None:
    """The default process group (NCCL on GPU, gloo on CPU), unless one exists."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # one process started without torchrun (`python launch/train.py parallel.engine=fsdp`): no rendezvous
        # address is set, and none is needed; an in-process store stands in for it
        store = dist.HashStore() if world == 1 and "MASTER_ADDR" not in os.environ else None
        dist.init_process_group(backend, rank=rank, world_size=world, store=store,
                                device_id=device if device.type == "cuda" else None,
                                timeout=timedelta(minutes=timeout_minutes))


def init_processes(device: str = "auto", timeout_minutes: float = 30.0, loader_workers: int = 0) -> Topology:
    """The processes of a job in which every process holds the whole model (no engine; no expert, tensor or context
    split): this process's device and, with several processes, the default process group; no meshes. Every rank is
    its own data-parallel rank. What evaluation runs on; training uses `init_topology`."""
    rank, world, local_rank = env_rank()
    torch_device = _init_device(device, local_rank, world, loader_workers)
    if world > 1:
        _init_process_group(torch_device, rank, world, timeout_minutes)
    return Topology(rank=rank, world_size=world, dp_rank=rank, dp_size=world, device=torch_device)


def init_topology(cfg) -> Topology:
    """The training layout of `cfg` (parallel.*): device, process group, ranks and every mesh (module docstring)."""
    rank, world, local_rank = env_rank()
    check_layout(cfg.parallel, world)
    device = _init_device(cfg.train.device, local_rank, world, cfg.data.num_workers)
    if cfg.parallel.engine == "local":
        return Topology(device=device)

    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    _init_process_group(device, rank, world, cfg.parallel.timeout_minutes)
    check_same_config(cfg, rank, world)
    ep, tp, cp = cfg.parallel.ep, cfg.parallel.tp, cfg.parallel.cp
    dp = world // (tp * cp)
    mesh = init_device_mesh(device.type, (dp // ep, ep, cp, tp), mesh_dim_names=("edp", "ep", "cp", "tp"))
    dp_mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    ranks = torch.arange(world).view(dp // ep, ep, cp * tp).transpose(0, 1).reshape(ep, -1)
    expert_mesh = DeviceMesh(device.type, ranks, mesh_dim_names=("ep", "edp"))
    dense_mesh = flatten_mesh(mesh["edp", "ep", "cp"], "dp_cp") if tp > 1 else None
    image_mesh = flatten_mesh(mesh["cp", "tp"], "cp_tp") if tp * cp > 1 else None
    dp_rank = rank // (tp * cp)
    return Topology(rank=rank, world_size=world, dp_rank=dp_rank, dp_size=dp, ep_rank=dp_rank % ep, ep_size=ep,
                    device=device, mesh=mesh, dp_mesh=dp_mesh, expert_mesh=expert_mesh, tp_rank=rank % tp,
                    tp_size=tp, cp_rank=(rank // tp) % cp, cp_size=cp, sp=bool(cfg.parallel.sp and tp > 1),
                    dense_mesh=dense_mesh, image_mesh=image_mesh)
