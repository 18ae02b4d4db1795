"""The relational loss of ReSSL (Zheng et al., 2021, eq. 4), as a pure function of tensors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx, once_differentiable


def relational_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    queue: torch.Tensor,
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.04,
    *,
    bf16_matmul: bool = False,
) -> torch.Tensor:
    """Cross-entropy between the teacher's and the student's relation to the queue.

    Args:
        student: (B, D) L2-normalised student embeddings of the strong view.
        teacher: (B, D) L2-normalised teacher embeddings of the weak view.
        queue: (K, D) L2-normalised past teacher embeddings.
        student_temperature: softmax temperature of the student's relation (paper: 0.1).
        teacher_temperature: softmax temperature of the teacher's relation (paper: 0.04, sharper).
        bf16_matmul: on a CPU, the matmuls against the queue read their inputs rounded to bf16 and
            accumulate and write float32 (oneDNN's bf16 math mode): 3x faster than float32 on a Xeon
            with AMX. On an AMD EPYC with AVX512-BF16 and no AMX, PyTorch 2.14 keeps them float32
            (measured). Meant for bf16-autocast runs, whose embeddings come out of the projector in
            bf16 anyway: it moves the student's gradient by ~0.3%, against ~6% for the autocast network
            itself (measured on a CIFAR-10 run). No effect on other devices.

    Returns:
        Scalar: mean over the batch of ``-sum_k p_k log q_k`` with
        ``p = softmax(teacher @ queue.T / t_teacher)`` and ``q = softmax(student @ queue.T / t_student)``.
        No gradient reaches ``teacher`` or ``queue``.

    The similarities are float32 even under bf16/fp16 autocast (accumulated and written in float32 also
    with ``bf16_matmul``), and both softmaxes go through ``log_softmax``/``softmax`` (max-subtracted),
    so temperatures down to 0.01 stay finite.
    """
    dtype = torch.promote_types(student.dtype, torch.float32)  # bf16/fp16 -> fp32; fp64 stays
    with torch.autocast(device_type=student.device.type, enabled=False):
        # dividing the (B, D) embeddings, not the (B, K) similarities, by the temperature: same logits, K/D times less work
        return _RelationCrossEntropy.apply(student.to(dtype) / student_temperature,
                                           teacher.detach().to(dtype) / teacher_temperature, queue.detach().to(dtype),
                                           bf16_matmul and student.device.type == "cpu")


@contextlib.contextmanager
def _cpu_matmul_precision(bf16: bool) -> Iterator[None]:
    """float32 matmuls on the CPU in oneDNN's bf16 math mode (bf16 inputs, float32 accumulation and output)
    inside the block when ``bf16``; the previous setting is restored on the way out. A no-op before
    PyTorch 2.9, which has no such setting: the matmuls stay float32."""
    setting = getattr(torch.backends.mkldnn, "matmul", None)
    if not bf16 or not hasattr(setting, "fp32_precision"):
        yield
        return
    previous = setting.fp32_precision
    setting.fp32_precision = "bf16"
    try:
        yield
    finally:
        setting.fp32_precision = previous


class _RelationCrossEntropy(torch.autograd.Function):
    """``-mean_b sum_k p_bk log q_bk`` for ``p = softmax(teacher @ queue.T)``, ``q = softmax(student @ queue.T)``,
    embeddings already divided by their temperatures; gradient to ``student`` only.

    Same value and gradient as autograd through ``log_softmax``, in fewer passes over the (B, K) relations:
    one matmul gives both relations (the queue is read once), and the gradient is written in closed form,
    ``d loss / d student = (q - p) @ queue / B`` (the rows of ``p`` sum to 1).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor,
                bf16_matmul: bool = False) -> torch.Tensor:
        batch = student.shape[0]
        ctx.bf16_matmul = bf16_matmul  # type: ignore[attr-defined]
        with _cpu_matmul_precision(bf16_matmul):
            logits = torch.cat([student, teacher]) @ queue.T  # (2B, K): student rows, then teacher rows
        log_q = F.log_softmax(logits[:batch], dim=1)  # (B, K)
        target = F.softmax(logits[batch:], dim=1)  # (B, K), rows sum to 1
        ctx.save_for_backward(log_q, target, queue)
        return torch.dot(log_q.flatten(), target.flatten()).neg_() / batch

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        log_q, target, queue = ctx.saved_tensors  # type: ignore[attr-defined]
        q_minus_p = log_q.exp().sub_(target)  # (B, K)
        with _cpu_matmul_precision(ctx.bf16_matmul):  # type: ignore[attr-defined]
            student_grad = q_minus_p @ queue  # (B, D)
        return student_grad.mul_(grad / log_q.shape[0]), None, None, None
