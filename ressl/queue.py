"""The queue of past teacher embeddings: a (K, D) buffer filled first in, first out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ressl import dist


class EmbeddingQueue(nn.Module):
    """K past teacher embeddings and a write pointer, both saved in the ``state_dict``.

    Starts with random unit vectors, as the official code does, so the relation is defined from the
    first step. ``push`` overwrites the oldest rows; the batch pushed (gathered from all processes
    when distributed) must divide K so that a push never wraps mid-batch.
    """

    queue: torch.Tensor
    pointer: torch.Tensor

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"queue size and dim must be positive, got K={size}, D={dim}")
        init = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
        self.register_buffer("queue", init)  # (K, D)
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.queue.shape[0]

    @torch.no_grad()
    def push(self, embeddings: torch.Tensor, gather: bool = True) -> None:
        """Write ``embeddings`` (B, D) over the oldest rows; B (times the world size) must divide K.

        With ``gather`` (the default) the batches of all processes are concatenated in rank order
        first, so every rank pushes the same rows and holds the same queue. Pass ``gather=False`` with rows
        already gathered (the training step pushes the teacher's ``everyone``, gathered for shuffle-BN).
        """
        if gather:
            embeddings = dist.all_gather_cat(embeddings.detach())
        batch = embeddings.shape[0]
        if self.size % batch != 0:
            raise ValueError(
                f"queue size {self.size} is not a multiple of the pushed batch {batch}: "
                "choose a queue size that the global batch size divides"
            )
        rows = (self.pointer + torch.arange(batch, device=self.pointer.device)) % self.size  # no host sync
        self.queue.index_copy_(0, rows.to(self.queue.device), embeddings.to(self.queue.dtype))
        self.pointer.add_(batch).remainder_(self.size)
