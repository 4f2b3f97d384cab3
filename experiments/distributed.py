"""torch.distributed helpers: process info, device choice, barriers and rank-0 decisions."""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> DistInfo:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def select_device(name: str, dist_info: DistInfo) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` is this process's local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda was asked for, but CUDA is not available")
        return torch.device("cuda", dist_info.local_rank)
    return torch.device(name)


def barrier(dist_info: DistInfo) -> None:
    """Wait for every process (no-op in a single process)."""
    if dist_info.world_size > 1:
        dist.barrier()


def as_on_rank_zero(value: str, dist_info: DistInfo) -> str:
    """``value`` as rank 0 of this torchrun job has it (``value`` itself in a single process)."""
    if dist_info.world_size == 1:
        return value
    box = [value]
    device = torch.device("cuda", dist_info.local_rank) if dist.get_backend() == "nccl" else None
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


__all__ = ["DistInfo", "as_on_rank_zero", "barrier", "select_device", "setup_distributed"]
