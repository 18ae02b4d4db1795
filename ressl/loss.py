"""The relational loss of ReSSL (Zheng et al., 2021, eq. 4), as a pure function of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def relational_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    queue: torch.Tensor,
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.04,
) -> torch.Tensor:
    """Cross-entropy between the teacher's and the student's relation to the queue.

    Args:
        student: (B, D) L2-normalised student embeddings of the strong view.
        teacher: (B, D) L2-normalised teacher embeddings of the weak view.
        queue: (K, D) L2-normalised past teacher embeddings.
        student_temperature: softmax temperature of the student's relation (paper: 0.1).
        teacher_temperature: softmax temperature of the teacher's relation (paper: 0.04, sharper).

    Returns:
        Scalar: mean over the batch of ``-sum_k p_k log q_k`` with
        ``p = softmax(teacher @ queue.T / t_teacher)`` and ``q = softmax(student @ queue.T / t_student)``.
        No gradient reaches ``teacher`` or ``queue``.

    The similarities are computed in float32 even under bf16/fp16 autocast, and both softmaxes go
    through ``log_softmax`` (max-subtracted), so temperatures down to 0.01 stay finite.
    """
    dtype = torch.promote_types(student.dtype, torch.float32)  # bf16/fp16 -> fp32; fp64 stays
    queue = queue.detach().to(dtype)
    with torch.autocast(device_type=student.device.type, enabled=False):
        # dividing the (B, D) embeddings, not the (B, K) similarities, by the temperature: same logits, K/D times less work
        student_logits = (student.to(dtype) / student_temperature) @ queue.T  # (B, K)
        teacher_logits = (teacher.detach().to(dtype) / teacher_temperature) @ queue.T  # (B, K)
        target = F.softmax(teacher_logits, dim=1)  # (B, K), sums to 1
        log_q = F.log_softmax(student_logits, dim=1)  # (B, K)
        return -(target * log_q).sum(dim=1).mean()
