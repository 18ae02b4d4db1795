"""ReSSL's health signals, as pure functions of tensors.

ReSSL has no negatives to keep embeddings apart; what shows a run going wrong is the *relation*
of an embedding to the queue (a distribution over K past teacher embeddings) and the spread of the
embeddings themselves:

* relation entropy, in nats, between 0 (each embedding matches one queue entry) and ``log K``
  (all entries look alike: the relation carries no information). A teacher entropy that climbs to
  ``log K`` and stays means collapse; the teacher's (sharper, ``t = 0.04``) entropy should sit well
  below the student's (``t = 0.1``).
* embedding spread: the per-dimension standard deviation across the batch of the unit-norm
  embeddings, averaged over dimensions. 0 when every image maps to the same point (collapse),
  about ``1 / sqrt(D)`` when the embeddings are spread uniformly over the sphere.
* queue fill: how much of the queue holds real teacher embeddings rather than its random
  initialisation; the relation means little until the queue has been filled once.

Every function returns tensors on the input's device (no host sync), so the training loop decides
when to call ``.item()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def relation_entropy(embeddings: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the batch of the entropy (nats) of ``softmax(embeddings @ queue.T / temperature)``.

    Args:
        embeddings: (B, D) L2-normalised embeddings.
        queue: (K, D) L2-normalised queue.
        temperature: the softmax temperature of the relation (student 0.1, teacher 0.04 in the paper).

    Returns:
        A scalar float32 tensor in ``[0, log K]``. Computed in float32 through ``log_softmax``, so
        low temperatures and bf16 inputs stay finite.
    """
    if embeddings.ndim != 2 or queue.ndim != 2 or embeddings.shape[1] != queue.shape[1]:
        raise ValueError(f"expected embeddings (B, D) and queue (K, D), got {tuple(embeddings.shape)} and {tuple(queue.shape)}")
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        logits = embeddings.detach().float() @ queue.detach().float().T / temperature  # (B, K)
        log_p = F.log_softmax(logits, dim=1)  # (B, K)
        return -(log_p.exp() * log_p).sum(dim=1).mean()


@torch.no_grad()
def embedding_std(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the standard deviation across the batch of the L2-normalised embeddings.

    Args:
        embeddings: (B, D) embeddings, B >= 2 (normalised here; a batch of one gives NaN).

    Returns:
        A scalar float32 tensor: 0 for a collapsed batch (all rows point the same way), about
        ``1 / sqrt(D)`` for rows drawn uniformly on the unit sphere (each coordinate then has
        variance ``1 / D``). The unbiased (B - 1) estimator is used.
    """
    if embeddings.ndim != 2:
        raise ValueError(f"expected embeddings (B, D), got {tuple(embeddings.shape)}")
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        unit = F.normalize(embeddings.detach().float(), dim=1)  # (B, D)
        return unit.std(dim=0).mean()


def queue_fill(steps_done: int, batch: int, queue_size: int) -> float:
    """Fraction of the queue holding real embeddings after ``steps_done`` pushes of ``batch`` rows.

    ``batch`` is the global batch pushed per step (all processes together); the queue of
    ``queue_size`` rows starts with random unit vectors and is full after ``queue_size / batch`` steps.
    """
    if steps_done < 0 or batch <= 0 or queue_size <= 0:
        raise ValueError(f"need steps_done >= 0, batch > 0 and queue_size > 0, got {steps_done}, {batch}, {queue_size}")
    return min(1.0, steps_done * batch / queue_size)


@torch.no_grad()
def health(
    student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor,
    student_temperature: float, teacher_temperature: float,
) -> dict[str, torch.Tensor]:
    """The health signals of one training step, as scalar tensors (no host sync).

    Args:
        student: (B, D) unit-norm student embeddings of the strong view.
        teacher: (B, D) unit-norm teacher embeddings of the weak view.
        queue: (K, D) the queue the loss used (before this batch was pushed).
        student_temperature, teacher_temperature: the loss's temperatures.

    Returns:
        ``teacher_entropy`` and ``student_entropy`` (nats, in ``[0, log K]``), ``student_std`` and
        ``teacher_std`` (see :func:`embedding_std`).
    """
    return {
        "teacher_entropy": relation_entropy(teacher, queue, teacher_temperature),
        "student_entropy": relation_entropy(student, queue, student_temperature),
        "student_std": embedding_std(student),
        "teacher_std": embedding_std(teacher),
    }


__all__ = ["embedding_std", "health", "queue_fill", "relation_entropy"]
