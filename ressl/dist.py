"""Distributed helpers read from ``torchrun``'s environment; each is a no-op in a single process."""

from __future__ import annotations

import os

import torch
import torch.distributed as torch_dist


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def world_size() -> int:
    return torch_dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return torch_dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(device_type: str) -> bool:
    """Join the process group described by ``torchrun`` (``WORLD_SIZE`` > 1); return whether we did."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    backend = "nccl" if device_type == "cuda" else "gloo"
    torch_dist.init_process_group(backend=backend)
    return True


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (B, ...) from every rank in rank order -> (world * B, ...); no gradient."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    torch_dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)
