"""SGD for the student: with momentum, weight decay (on BatchNorm and biases as the config says), and over one flat
buffer where it can.

``build_optimizer`` gives :class:`FlatSGD` when the student's parameters are views of one flat buffer
(``ReSSL.flatten_parameters``, which ``ressl.train.setup`` calls), else ``torch.optim.SGD`` over the tensors.
Both make the same update; the flat one runs two kernels per step instead of one per tensor (64 for a
ResNet-18, 66 with ``head_bn``), half the time of the optimiser step on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ressl.config import Config
from ressl.model import ReSSL


def build_optimizer(model: ReSSL, cfg: Config) -> torch.optim.SGD:
    """SGD with momentum for the student; weight decay on its weights, and on BatchNorm weights and biases (1-D
    parameters) only with ``cfg.decay_bn_bias``.

    :class:`FlatSGD` when the student's parameters are views of its flat buffer, else ``torch.optim.SGD`` over
    the tensors in two groups. Both use PyTorch's fused kernel where it has one for the device (CPU, CUDA).
    """
    vector_decay = cfg.weight_decay if cfg.decay_bn_bias else 0.0
    flat = model.flat_student()
    if flat is not None:
        buffer, params = flat
        return FlatSGD(params, buffer, lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay,
                       vector_weight_decay=vector_decay)
    student = list(model.student.parameters())
    groups = [{"params": [p for p in student if p.ndim > 1], "weight_decay": cfg.weight_decay},
              {"params": [p for p in student if p.ndim <= 1], "weight_decay": vector_decay}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.sgd_momentum, fused=_fused(student[0]))


def _fused(p: torch.Tensor) -> bool | None:
    return True if p.device.type in ("cpu", "cuda") else None


class FlatSGD(torch.optim.SGD):
    """``torch.optim.SGD`` over the two slices of a flat buffer: weights (decayed), then vectors (decayed by
    ``vector_weight_decay``, none by default).

    ``params`` are the network's parameters in buffer order, each a view of ``buffer`` (weights, ``ndim > 1``,
    first). The optimiser itself holds two parameters that share memory with the buffer; :meth:`step`
    first copies the network's gradients into the matching flat gradient buffer (one ``_foreach_copy_``),
    and :meth:`zero_grad` clears the network's gradients. ``state_dict`` holds the two flat momentum
    buffers; :meth:`load_state_dict` also takes the per-tensor state of ``torch.optim.SGD`` over the same
    two groups (a checkpoint written before the buffers were flat).
    """

    def __init__(self, params: Sequence[nn.Parameter], buffer: torch.Tensor, *, lr: float, momentum: float,
                 weight_decay: float, vector_weight_decay: float = 0.0) -> None:
        self.network_params = list(params)
        kinds = [p.ndim > 1 for p in self.network_params]
        if kinds != sorted(kinds, reverse=True):
            raise ValueError("FlatSGD needs the weights (ndim > 1) before the vectors in the buffer")
        self._decayed = decayed = sum(p.numel() for p in self.network_params if p.ndim > 1)  # weights' share of the buffer
        grad = torch.zeros_like(buffer)
        self._grad_views = [grad.as_strided(p.shape, p.stride(), p.storage_offset()) for p in self.network_params]
        weights, vectors = nn.Parameter(buffer[:decayed]), nn.Parameter(buffer[decayed:])  # memory shared with the network
        weights.grad, vectors.grad = grad[:decayed], grad[decayed:]
        groups = [{"params": [weights], "weight_decay": weight_decay}, {"params": [vectors], "weight_decay": vector_weight_decay}]
        super().__init__(groups, lr=lr, momentum=momentum, fused=_fused(buffer))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the network's gradients, always to None (the next backward pass writes fresh ones without a pass of
        its own); the flat ones are overwritten by :meth:`step`."""
        for p in self.network_params:
            p.grad = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """Gather the network's gradients into the flat buffer, then one fused SGD kernel per slice.

        The kernel is called directly (``torch._fused_sgd_``, the one ``torch.optim.SGD(fused=True)`` calls): the
        functional layer of ``torch.optim`` around it took ~1 ms per step inside the training loop on a CPU, more
        than the kernel. Without a fused kernel for the device, or with a tensor that has no gradient, this is
        ``torch.optim.SGD.step``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for p in self.network_params]
        if not self._direct or any(g is None for g in grads):
            self._step_with_torch_optim(grads)
            return loss
        torch._foreach_copy_(self._grad_views, grads)
        for group in self.param_groups:
            (flat,) = group["params"]
            state = self.state[flat]
            first = state.get("momentum_buffer") is None
            if first:  # the kernel writes the first buffer (the gradient, decayed), as torch.optim.SGD does
                state["momentum_buffer"] = torch.empty_like(flat)
            torch._fused_sgd_([flat], [flat.grad], [state["momentum_buffer"]], weight_decay=group["weight_decay"],
                              momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
                              nesterov=group["nesterov"], maximize=group["maximize"], is_first_step=first)
        return loss

    @property
    def _direct(self) -> bool:
        """Whether :meth:`step` can call the fused kernel itself: fused groups with momentum, learning rates that are
        numbers or 0-dim tensors on the parameters' device (``ressl.graph``: a CUDA graph reads each step's value)."""
        device = self.network_params[0].device
        return all(g["fused"] and g["momentum"] != 0 and not g["differentiable"]
                   and (isinstance(g["lr"], float) or (isinstance(g["lr"], torch.Tensor) and g["lr"].device == device))
                   for g in self.param_groups)

    def _step_with_torch_optim(self, grads: list[torch.Tensor | None]) -> None:
        present = [(view, g) for view, g in zip(self._grad_views, grads) if g is not None]
        torch._foreach_copy_([v for v, _ in present], [g for _, g in present])
        # a tensor the loss did not reach has no gradient, and torch.optim.SGD leaves it (and its momentum) alone:
        # so do we, by putting back what the flat update changed (never the case in ReSSL, where every tensor is used)
        untouched = [(p, self._momentum_view(p)) for p, g in zip(self.network_params, grads) if g is None]
        kept = [(p.detach().clone(), None if m is None else m.clone()) for p, m in untouched]
        super().step()
        for (p, m), (p0, m0) in zip(untouched, kept):
            p.detach().copy_(p0)
            if m is not None and m0 is not None:
                m.copy_(m0)
            elif (m := self._momentum_view(p)) is not None:  # the momentum buffers were made by this very step
                m.zero_()

    def _momentum_view(self, p: nn.Parameter) -> torch.Tensor | None:
        """The slice of the flat momentum buffer that belongs to network parameter ``p`` (None before the first step)."""
        weights, vectors = (group["params"][0] for group in self.param_groups)
        flat_param, start = (weights, 0) if p.ndim > 1 else (vectors, self._decayed)
        buffer = self.state.get(flat_param, {}).get("momentum_buffer")
        if buffer is None:
            return None
        # as_strided counts from the start of the storage: a loaded buffer may be a slice of a larger tensor
        return buffer.as_strided(p.shape, p.stride(), buffer.storage_offset() + p.storage_offset() - start)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if [len(g["params"]) for g in state_dict["param_groups"]] != [1, 1]:
            state_dict = self._flat_state(state_dict)
        super().load_state_dict(state_dict)

    def _flat_state(self, per_tensor: dict[str, Any]) -> dict[str, Any]:
        """The state of ``torch.optim.SGD`` over the network's tensors (weights group, vectors group), in buffer order."""
        ids = [i for g in per_tensor["param_groups"] for i in g["params"]]
        if len(ids) != len(self.network_params):
            raise ValueError(f"optimizer state for {len(ids)} tensors, the network has {len(self.network_params)}")
        groups = [dict(g, params=[k]) for k, g in enumerate(per_tensor["param_groups"])]
        buffers = [per_tensor["state"].get(i, {}).get("momentum_buffer") for i in ids]
        if all(b is None for b in buffers):  # saved before the first step
            return {"state": {}, "param_groups": groups}
        flat = self.network_params[0].new_zeros(sum(p.numel() for p in self.network_params))
        for p, b in zip(self.network_params, buffers):
            if b is not None:
                flat.as_strided(p.shape, p.stride(), p.storage_offset()).copy_(b)
        return {"state": {0: {"momentum_buffer": flat[: self._decayed]}, 1: {"momentum_buffer": flat[self._decayed :]}},
                "param_groups": groups}
