"""Both views of every training batch: their random parameters drawn many steps at a time, then applied batched.

Step ``s`` of a run always gets the same parameters, whether the run went straight there or resumed from a
checkpoint: the steps come in draws of ``steps_per_draw``, and draw ``d`` comes from a generator seeded by
(the run's seed, the process's rank, ``d``). A checkpoint needs no generator state for them.

Why many steps at once: inside the training loop, where the network has just left the caches cold, the few dozen
small numpy operations that work out a batch's parameters cost a millisecond or more per call on a CPU, however
few numbers they touch; one call for a hundred steps costs about as much.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ressl.augment import BatchAugment

__all__ = ["ViewAugment", "draw_seed"]

IMAGES_PER_DRAW = 16_384  # images' parameters per draw (128 steps at batch 128): 12 MB of uniforms while drawing


def draw_seed(seed: Sequence[int], draw: int) -> int:
    """The 64-bit seed of draw number ``draw`` for a run's ``seed`` (e.g. ``(cfg.seed, rank)``): mixed by numpy's
    ``SeedSequence``, so that nearby seeds and draws give unrelated streams."""
    return int(np.random.SeedSequence([*seed, draw]).generate_state(1, np.uint64)[0])


class ViewAugment:
    """The teacher's weak view and the student's strong view of batch number ``step`` (uint8 sources, see
    ``ressl.data.pretrain_batches``), each image with its own parameters.

    ``seed``: integers that identify the run and the process, e.g. ``(cfg.seed, rank)``. Parameters are drawn for
    ``max(1, images_per_draw // B)`` steps at a time, on the CPU, for the batch shape of the step asked for.
    """

    def __init__(self, weak: BatchAugment, strong: BatchAugment, seed: Sequence[int],
                 images_per_draw: int = IMAGES_PER_DRAW) -> None:
        self.weak, self.strong = weak, strong
        self.seed = tuple(int(s) for s in seed)
        self.images_per_draw = int(images_per_draw)
        self._key: tuple[int, int, int, int] | None = None  # (draw, B, H, W) of the parameters held
        self._steps: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []

    def __repr__(self) -> str:
        return f"ViewAugment(weak={self.weak}, strong={self.strong}, seed={self.seed})"

    def steps_per_draw(self, batch: int) -> int:
        """How many steps of ``batch`` images one draw covers (128 at batch 128)."""
        return max(1, self.images_per_draw // batch)

    def params(self, step: int, batch: int, height: int, width: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The (weak, strong) parameters of step ``step`` for ``batch`` images of ``height x width``
        (see ``BatchAugment.sample_params``)."""
        n = self.steps_per_draw(batch)
        key = (step // n, batch, height, width)
        if key != self._key:
            generator = torch.Generator().manual_seed(draw_seed(self.seed, key[0]))
            weak = self.weak.sample_steps(n, batch, height, width, generator)
            strong = self.strong.sample_steps(n, batch, height, width, generator)
            self._steps = [({k: v[i] for k, v in weak.items()}, {k: v[i] for k, v in strong.items()}) for i in range(n)]
            self._key = key
        return self._steps[step % n]

    def __call__(self, weak_source: Tensor, strong_source: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """uint8 (B, C, H, W) sources -> the weak and the strong view, each float32 (B, 3, S, S), normalised,
        on the sources' device."""
        b, _, h, w = strong_source.shape
        if weak_source.shape != strong_source.shape:
            raise ValueError(f"the weak and strong sources differ in shape: {tuple(weak_source.shape)} and {tuple(strong_source.shape)}")
        weak_params, strong_params = self.params(step, b, h, w)
        return self.weak.apply(weak_source, weak_params), self.strong.apply(strong_source, strong_params)
