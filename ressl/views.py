"""Both views of every training batch: their random parameters drawn many steps at a time, then applied batched.

Step ``s`` of a run always gets the same parameters, whether the run went straight there or resumed from a
checkpoint: the steps come in draws of ``steps_per_draw``, and draw ``d`` comes from a generator seeded by
(the run's seed, the process's rank, ``d``). A checkpoint needs no generator state for them.

Why many steps at once: inside the training loop, where the network has just left the caches cold, the few dozen
small numpy operations that work out a batch's parameters cost a millisecond or more per call on a CPU, however
few numbers they touch; one call for a hundred steps costs about as much.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from ressl.augment import BatchAugment

__all__ = ["ViewAugment", "draw_seed"]

IMAGES_PER_DRAW = 16_384  # images' parameters per draw (128 steps at batch 128): 12 MB of uniforms while drawing
STEPS_PER_CALL = 8  # steps whose views one call makes (in the loop, 5.9 -> 3.3 ms per step at batch 128 on a CPU) ...
VIEW_BYTES_PER_CALL = 64 * 2**20  # ... as long as their float views stay within this (24 MB at CIFAR's size)


def draw_seed(seed: Sequence[int], draw: int) -> int:
    """The 64-bit seed of draw number ``draw`` for a run's ``seed`` (e.g. ``(cfg.seed, rank)``): mixed by numpy's
    ``SeedSequence``, so that nearby seeds and draws give unrelated streams."""
    return int(np.random.SeedSequence([*seed, draw]).generate_state(1, np.uint64)[0])


class ViewAugment:
    """The teacher's weak view and the student's strong view of batch number ``step`` (uint8 sources, see
    ``ressl.batches.pretrain_batches``), each image with its own parameters.

    ``seed``: integers that identify the run and the process, e.g. ``(cfg.seed, rank)``. Parameters are drawn for
    ``max(1, images_per_draw // B)`` steps at a time, on the CPU, for the batch shape of the step asked for.

    In training, :meth:`stream` makes the views of up to ``steps_per_call`` steps in one call (:meth:`call_steps`),
    which runs each of the few dozen augmentation kernels once for them all: inside the loop, where the network has
    left the caches cold, every kernel launch costs far more than its arithmetic. The steps of one call share the
    colour-jitter order with ``jitter_order="batch"``; steps ``0..k-1``, ``k..2k-1``, ... are grouped whichever
    way the run went there, so a resumed run gets the same views.
    """

    def __init__(self, weak: BatchAugment, strong: BatchAugment, seed: Sequence[int],
                 images_per_draw: int = IMAGES_PER_DRAW, steps_per_call: int = STEPS_PER_CALL) -> None:
        self.weak, self.strong = weak, strong
        self.seed = tuple(int(s) for s in seed)
        self.images_per_draw = int(images_per_draw)
        self.steps_per_call = max(1, int(steps_per_call))
        self._key: tuple[int, int, int, int, bool] | None = None  # (draw, B, H, W, pinned) of the parameters held
        self._draw: tuple[dict[str, Tensor], dict[str, Tensor]] = ({}, {})  # (steps, B, ...) each

    def __repr__(self) -> str:
        return f"ViewAugment(weak={self.weak}, strong={self.strong}, seed={self.seed})"

    def steps_per_draw(self, batch: int) -> int:
        """How many steps of ``batch`` images one draw covers (128 at batch 128)."""
        return max(1, self.images_per_draw // batch)

    def call_steps(self, batch: int) -> int:
        """How many steps of ``batch`` images one call of :meth:`stream` augments: at most ``steps_per_call``, views
        within ``VIEW_BYTES_PER_CALL``, and a divisor of :meth:`steps_per_draw` (a call never spans two draws)."""
        view_bytes = batch * 3 * 4 * (self.weak.size**2 + self.strong.size**2)  # float32 weak + strong, one step
        wanted = max(1, min(self.steps_per_call, VIEW_BYTES_PER_CALL // view_bytes))
        return math.gcd(wanted, self.steps_per_draw(batch))

    def params(self, step: int, batch: int, height: int, width: int, steps: int = 1,
               pin: bool = False) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The (weak, strong) parameters of steps ``step .. step + steps - 1`` for ``batch`` images of ``height x
        width`` each, as one batch of ``steps * batch`` (see ``BatchAugment.sample_params``). ``pin``: in pinned
        memory, for views made on a GPU (a copy from pageable memory may wait for the GPU's queue to drain)."""
        n = self.steps_per_draw(batch)
        key = (step // n, batch, height, width, pin)
        first = step % n
        if first + steps > n:
            raise ValueError(f"steps {step}..{step + steps - 1} span two draws of {n} steps")
        if key != self._key:
            generator = torch.Generator().manual_seed(draw_seed(self.seed, key[0]))
            weak = self.weak.sample_steps(n, batch, height, width, generator)
            strong = self.strong.sample_steps(n, batch, height, width, generator, order_steps=self.call_steps(batch))
            if pin:  # once per draw (64 steps or more); the slices each call copies to the GPU are pinned too
                weak, strong = ({k: v.pin_memory() for k, v in d.items()} for d in (weak, strong))
            self._draw, self._key = (weak, strong), key
        return tuple({k: v[first : first + steps].flatten(0, 1) for k, v in d.items()} for d in self._draw)  # type: ignore[return-value]

    def __call__(self, weak_source: Tensor, strong_source: Tensor, step: int, steps: int = 1) -> tuple[Tensor, Tensor]:
        """uint8 (steps * B, C, H, W) sources of steps ``step .. step + steps - 1`` -> the weak and the strong views,
        each float32 (steps * B, 3, S, S), normalised, on the sources' device."""
        rows, _, h, w = strong_source.shape
        if weak_source.shape != strong_source.shape:
            raise ValueError(f"the weak and strong sources differ in shape: {tuple(weak_source.shape)} and {tuple(strong_source.shape)}")
        if rows % steps:
            raise ValueError(f"{rows} images do not split into {steps} steps")
        weak_params, strong_params = self.params(step, rows // steps, h, w, steps, pin=strong_source.is_cuda)
        return self.weak.apply(weak_source, weak_params), self.strong.apply(strong_source, strong_params)

    def stream(self, sources: Iterable[tuple[Tensor, Tensor]], step: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The (weak, strong) views of consecutive steps from ``step`` on, one step's pair per item, for the uint8
        (weak, strong) sources of those steps; each call augments the steps up to the next multiple of
        :meth:`call_steps`."""
        sources = iter(sources)
        while first := next(sources, None):
            k = self.call_steps(first[0].shape[0])
            group = [first, *itertools.islice(sources, k - 1 - step % k)]
            weak = _joined(group, 0)
            strong = weak if all(w is s for w, s in group) else _joined(group, 1)  # in memory, one tensor is both sources
            views = self(weak, strong, step, len(group))
            yield from zip(*(v.chunk(len(group)) for v in views))
            step += len(group)


def _joined(group: list[tuple[Tensor, Tensor]], i: int) -> Tensor:
    """The weak (``i`` 0) or strong (1) sources of a group of steps as one batch (no copy for a single step)."""
    return group[0][i] if len(group) == 1 else torch.cat([pair[i] for pair in group])
