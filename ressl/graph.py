"""A piece of the training step captured once as a CUDA graph and replayed every step after.

Why: on a GPU, the host is slower to launch a step's kernels than the GPU is to run them. A ReSSL step of
a ResNet-18 at 32 px, batch 256, is about 660 kernel launches; on an H200 machine's host they took ~13 ms
to launch in eager mode against ~7 ms of GPU work, so the GPU sat idle half of the time. Replaying the
captured kernels is one call.

What a graph may hold: work of fixed shapes on fixed memory with no host synchronisation. Inputs are
copied into static buffers before each replay, per-step numbers (learning rate, EMA momentum) are
0-dim device tensors that the body reads and :meth:`CapturedStep.__call__` writes, and the outputs are
static tensors that each replay overwrites. Read them before the next call.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["CapturedStep"]


class CapturedStep:
    """``body(*inputs) -> outputs`` (tensors) run as a CUDA graph after ``warmup`` ordinary calls.

    ``scalars``: named 0-dim device tensors that ``body`` reads; each call sets them from its keyword
    arguments first. The first ``warmup`` calls run ``body`` eagerly on a side stream, as PyTorch asks
    before a capture (they are real calls: their effects count); the next call captures ``body`` and
    replays it, and every later call only copies the inputs in and replays. Inputs off CUDA, or a capture
    that fails (with a warning), leave every call eager: the same body on the same static inputs.
    """

    def __init__(self, body: Callable[..., tuple[Tensor, ...]], scalars: dict[str, Tensor] | None = None,
                 warmup: int = 3) -> None:
        self.body = body
        self.scalars = dict(scalars or {})
        self.warmup = warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_only = False  # set when the inputs are not on CUDA or a capture failed
        self._inputs: tuple[Tensor, ...] = ()
        self._outputs: tuple[Tensor, ...] = ()

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, *inputs: Tensor, **values: float) -> tuple[Tensor, ...]:
        if set(values) != set(self.scalars):
            raise TypeError(f"expected values for {sorted(self.scalars)}, got {sorted(values)}")
        for name, value in values.items():
            self.scalars[name].fill_(value)  # a kernel with the number as its argument: no copy, no sync
        if not self._inputs:
            self._inputs = tuple(x.detach().clone() for x in inputs)
            self.eager_only = not all(x.is_cuda for x in self._inputs)
        if len(inputs) != len(self._inputs) or any(x.shape != s.shape or x.dtype != s.dtype for x, s in zip(inputs, self._inputs)):
            raise ValueError("a captured step's inputs keep their shapes and dtypes from call to call")
        for static, x in zip(self._inputs, inputs):
            static.copy_(x)
        self.calls += 1
        if self.graph is None and self.eager_only:
            return tuple(self.body(*self._inputs))
        if self.graph is None and self.calls <= self.warmup:
            return self._warm_up()
        if self.graph is None:
            try:
                self._capture()
            except RuntimeError as err:  # an operation CUDA graphs cannot hold: run as before rather than stop
                warnings.warn(f"capturing the step as a CUDA graph failed ({err}); it runs eagerly from here "
                              "(--cuda_graph false skips the attempt)", RuntimeWarning, stacklevel=2)
                self.graph, self.eager_only = None, True
                return tuple(self.body(*self._inputs))
        assert self.graph is not None
        self.graph.replay()
        return self._outputs

    def _warm_up(self) -> tuple[Tensor, ...]:
        main = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            outputs = self.body(*self._inputs)
        main.wait_stream(side)
        torch.cuda.synchronize()  # a few calls only: memory made on the side stream is then safe to reuse anywhere
        return outputs

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        main = torch.cuda.current_stream()
        try:
            # thread_local: loader threads may pin memory (a CUDA call) while this thread captures
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._outputs = tuple(self.body(*self._inputs))
        except BaseException:
            torch.cuda.set_stream(main)  # a capture that fails to end leaves torch.cuda.graph's own stream current
            raise
        self.graph = graph
