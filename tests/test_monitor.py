"""ReSSL's health signals against naive references and their collapse / uniform edge cases."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ressl.monitor import embedding_std, health, queue_fill, relation_entropy
from ressl.queue import EmbeddingQueue


def naive_entropy(embeddings, queue, t):
    """Row by row from the definition, in float64 Python."""
    total = 0.0
    for e in embeddings.double().tolist():
        logits = [sum(a * b for a, b in zip(e, q)) / t for q in queue.double().tolist()]
        top = max(logits)
        weights = [math.exp(v - top) for v in logits]
        z = sum(weights)
        total += -sum(w / z * math.log(w / z) for w in weights if w > 0)
    return total / len(embeddings)


def unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


@pytest.mark.parametrize("t", [0.04, 0.1, 1.0])
def test_relation_entropy_matches_naive_reference(t):
    e, q = unit(7, 5), unit(23, 5)
    assert relation_entropy(e, q, t).item() == pytest.approx(naive_entropy(e, q, t), rel=1e-4, abs=1e-5)


def test_relation_entropy_edge_cases_uniform_and_one_hot():
    k = 32
    # a collapsed queue (every entry the same): the relation is uniform, entropy log K, whatever the embedding
    same = unit(1, 8).expand(k, 8)
    assert relation_entropy(unit(4, 8), same, 0.04).item() == pytest.approx(math.log(k), abs=1e-4)
    # each embedding equal to one entry of an orthonormal queue, sharp temperature: one-hot, entropy ~ 0
    q = torch.eye(k)
    assert relation_entropy(q[:5], q, 0.01).item() < 1e-10
    # softer temperatures spread the relation: entropy grows with t
    e, q = unit(16, 8), unit(k, 8)
    values = [relation_entropy(e, q, t).item() for t in (0.02, 0.1, 0.5, 5.0)]
    assert values == sorted(values) and 0 <= values[0] and values[-1] <= math.log(k) + 1e-5


def test_relation_entropy_low_temperature_and_bf16_stay_finite():
    e, q = unit(8, 16), unit(64, 16)
    fp32 = relation_entropy(e, q, 0.01)
    bf16 = relation_entropy(e.bfloat16(), q.bfloat16(), 0.01)
    assert fp32.dtype == bf16.dtype == torch.float32 and torch.isfinite(bf16)
    assert bf16.item() == pytest.approx(fp32.item(), abs=0.1)
    with pytest.raises(ValueError, match="expected embeddings"):
        relation_entropy(unit(4, 8), unit(10, 9), 0.1)


def test_embedding_std_matches_numpy_and_normalises_first():
    x = torch.randn(10, 6) * torch.rand(10, 1) * 5  # rows of very different norms
    unit_rows = x.double().numpy() / np.linalg.norm(x.double().numpy(), axis=1, keepdims=True)
    assert embedding_std(x).item() == pytest.approx(unit_rows.std(axis=0, ddof=1).mean(), rel=1e-5)


def test_embedding_std_collapse_is_zero_and_uniform_is_one_over_sqrt_d():
    direction = torch.randn(1, 32)
    collapsed = direction * torch.linspace(0.5, 3.0, 64)[:, None]  # same direction, any length
    assert embedding_std(collapsed).item() < 1e-6
    for d in (16, 128):
        uniform = torch.randn(20000, d)  # normalised Gaussians are uniform on the sphere
        assert embedding_std(uniform).item() == pytest.approx(1 / math.sqrt(d), rel=0.02)
    assert embedding_std(unit(20000, 128)).item() > 10 * embedding_std(unit(1, 128) + 0.001 * torch.randn(20000, 128)).item()


def test_queue_fill_counts_rows_that_left_the_random_initialisation():
    k, b = 64, 16
    queue = EmbeddingQueue(k, 8)
    init = queue.queue.clone()
    for steps in range(7):
        real = int((queue.queue != init).any(dim=1).sum())
        assert queue_fill(steps, b, k) == pytest.approx(real / k), steps
        queue.push(unit(b, 8), gather=False)
    assert queue_fill(4, b, k) == 1.0 and queue_fill(1000, b, k) == 1.0 and queue_fill(0, b, k) == 0.0
    with pytest.raises(ValueError):
        queue_fill(-1, b, k)
    with pytest.raises(ValueError):
        queue_fill(3, 0, k)


def test_health_keys_values_and_no_graph():
    student = unit(12, 8).requires_grad_()
    teacher, queue = unit(12, 8), unit(48, 8)
    out = health(student, teacher, queue, 0.1, 0.04)
    assert set(out) == {"teacher_entropy", "student_entropy", "student_std", "teacher_std"}
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 and not v.requires_grad for v in out.values())
    assert out["teacher_entropy"].item() == pytest.approx(naive_entropy(teacher, queue, 0.04), rel=1e-4)
    assert out["student_entropy"].item() == pytest.approx(naive_entropy(student.detach(), queue, 0.1), rel=1e-4)
    assert out["student_std"].item() == pytest.approx(embedding_std(student.detach()).item())
    assert out["teacher_std"].item() == pytest.approx(embedding_std(teacher).item())
    # the same embeddings under the teacher's sharper temperature give a lower entropy
    same = health(teacher, teacher, queue, 0.1, 0.04)
    assert same["teacher_entropy"] < same["student_entropy"]
