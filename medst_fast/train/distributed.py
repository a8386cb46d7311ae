"""torchrun / SLURM world info, process-group setup and the autograd-aware feature gather (style B3).

Nothing home-made on the communication side: DDP does the gradient all-reduce and
``torch.distributed.nn.functional.all_gather`` carries gradients back through the gathered features.
"""
from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.distributed as dist


@dataclass
class WorldInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def world_info_from_env() -> WorldInfo:
    """torchrun's RANK/LOCAL_RANK/WORLD_SIZE, else SLURM's (so that ``srun`` works), else one process."""
    env = os.environ
    for r, lr, ws in (("RANK", "LOCAL_RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS")):
        if r in env and ws in env:
            return WorldInfo(int(env[r]), int(env.get(lr, 0)), int(env[ws]))
    return WorldInfo()


def init_distributed(device_type: str, timeout_min: float = 30.0) -> Tuple[WorldInfo, torch.device]:
    """Join the process group if launched by torchrun/srun; returns (world, this rank's device)."""
    w = world_info_from_env()
    if device_type == "cuda":
        device = torch.device("cuda", w.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    if w.distributed and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # SLURM without torchrun: a single-node default
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=w.rank, world_size=w.world_size,
                                timeout=datetime.timedelta(minutes=timeout_min))
        global _HOST_GROUP
        # Host-side agreements (e.g. "a rank has a bad batch") go over gloo between CPUs: an NCCL collective
        # would queue behind the GPU's work and make the host wait for it.
        _HOST_GROUP = dist.new_group(backend="gloo") if backend == "nccl" else None
    return w, device


_HOST_GROUP = None


def all_reduce_host(t: torch.Tensor) -> torch.Tensor:
    """Sum a small CPU tensor over ranks without touching the GPU stream (gloo); in place, returned."""
    if is_dist():
        dist.all_reduce(t, group=_HOST_GROUP)
    return t


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_dist():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> List[Any]:
    if not is_dist():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_with_grad(x: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Concatenate ``x`` (N_r, ...) over ranks with autograd; returns (all rows, this rank's first row).

    Ranks may hold different numbers of rows (series have 1..4 studies), so the sizes are exchanged first
    (a small collective and a host sync) and every rank pads to the largest; the padding is sliced off
    again, so it receives no gradient. The backward of the functional all_gather sums each rank's
    gradient contributions back onto the owner of the rows, which together with DDP's gradient averaging
    gives the gradient of the mean per-rank loss.
    """
    import torch.distributed.nn.functional as dfn

    world, rank = dist.get_world_size(), dist.get_rank()
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes_t = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes_t, n)
    sizes = [int(s.item()) for s in sizes_t]  # host sync: shapes must be known to pad and slice
    m = max(sizes)
    xp = x if x.shape[0] == m else torch.cat([x, x.new_zeros((m - x.shape[0],) + tuple(x.shape[1:]))])
    with warnings.catch_warnings():
        # torch 2.9+ marks this API deprecated in favour of _functional_collectives, whose autograd gather
        # needs reduce_scatter in backward, which gloo (CPU runs and tests) lacks; this one works everywhere.
        warnings.simplefilter("ignore", FutureWarning)
        parts = dfn.all_gather(xp)
    out = torch.cat([p[:s] for p, s in zip(parts, sizes)])
    return out, sum(sizes[:rank])


def make_gather(enabled: bool) -> Optional[Callable[[torch.Tensor], Tuple[torch.Tensor, int]]]:
    """The ``gather`` callable for MedSTLoss: None (contrast within the rank's batch) unless asked."""
    return gather_with_grad if enabled and is_dist() else None


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()
