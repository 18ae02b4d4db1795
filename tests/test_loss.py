import math

import pytest
import torch
import torch.nn.functional as F

import ressl.loss
from ressl import relational_loss


def naive_loss(student, teacher, queue, ts=0.1, tt=0.04):
    """The paper's formula, one sample and one queue entry at a time, in float64."""
    total = 0.0
    for s, t in zip(student.double(), teacher.double()):
        p = [math.exp(float(t @ q) / tt) for q in queue.double()]
        z_p = sum(p)
        q_logits = [float(s @ q) / ts for q in queue.double()]
        m = max(q_logits)
        log_z_q = m + math.log(sum(math.exp(v - m) for v in q_logits))
        total += -sum(pk / z_p * (lk - log_z_q) for pk, lk in zip(p, q_logits))
    return total / len(student)


def unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


@pytest.mark.parametrize("ts,tt", [(0.1, 0.04), (0.2, 0.1), (0.05, 0.05)])
def test_matches_naive_reference(ts, tt):
    s, t, q = unit(6, 8), unit(6, 8), unit(20, 8)
    assert relational_loss(s, t, q, ts, tt).item() == pytest.approx(naive_loss(s, t, q, ts, tt), rel=1e-5)


def test_equals_entropy_when_student_matches_teacher():
    t, q = unit(4, 8), unit(16, 8)
    loss = relational_loss(t, t, q, 0.1, 0.1)
    p = F.softmax(t @ q.T / 0.1, dim=1)
    entropy = -(p * p.log()).sum(1).mean()
    assert loss.item() == pytest.approx(entropy.item(), rel=1e-5)


def test_collapse_gives_log_k():
    v = unit(1, 8)
    loss = relational_loss(v.expand(4, 8), v.expand(4, 8), v.expand(32, 8))
    assert loss.item() == pytest.approx(math.log(32), rel=1e-6)


def test_no_gradient_reaches_teacher_or_queue():
    s = unit(4, 8).requires_grad_()
    t = unit(4, 8).requires_grad_()
    q = unit(16, 8).requires_grad_()
    relational_loss(s, t, q).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None and q.grad is None


def test_stable_at_low_temperature_and_bf16():
    s, t, q = unit(8, 16), unit(8, 16), unit(64, 16)
    loss = relational_loss(s, t, q, 0.01, 0.01)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(naive_loss(s, t, q, 0.01, 0.01), rel=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_bf16 = relational_loss(s.bfloat16(), t.bfloat16(), q, 0.01, 0.01)
    assert loss_bf16.dtype == torch.float32 and torch.isfinite(loss_bf16)
    assert loss_bf16.item() == pytest.approx(loss.item(), rel=0.1)


def autograd_reference(student, teacher, queue, ts, tt):
    """The formula written with autograd-differentiable ops: the closed-form gradient must agree with it."""
    target = F.softmax(teacher.detach() @ queue.T / tt, dim=1)
    return -(target * F.log_softmax(student @ queue.T / ts, dim=1)).sum(dim=1).mean()


@pytest.mark.parametrize("ts,tt", [(0.1, 0.04), (0.2, 0.1)])
def test_gradient_matches_autograd_through_the_formula(ts, tt):
    s, t, q = unit(6, 8).double(), unit(6, 8).double(), unit(20, 8).double()
    ours = s.clone().requires_grad_()
    ref = s.clone().requires_grad_()
    (3.0 * relational_loss(ours, t, q, ts, tt)).backward()  # an upstream gradient other than 1
    (3.0 * autograd_reference(ref, t, q, ts, tt)).backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-10, atol=1e-12)
    assert ours.grad.abs().max() > 1e-3  # a gradient that is there


def test_gradcheck_in_float64():
    s = unit(4, 6).double().requires_grad_()
    t, q = unit(4, 6).double(), unit(12, 6).double()
    assert torch.autograd.gradcheck(lambda x: relational_loss(x, t, q, 0.1, 0.04), (s,))


def test_gradient_through_normalisation_and_bf16_autocast():
    """As in training: the student's raw output is normalised (and bf16 under autocast); the gradient reaches it."""
    raw = torch.randn(4, 8, requires_grad=True)
    t, q = unit(4, 8), unit(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = relational_loss(F.normalize(raw.bfloat16(), dim=1), t, q)
    loss.backward()
    ref = raw.detach().clone().requires_grad_()
    autograd_reference(F.normalize(ref, dim=1), t, q, 0.1, 0.04).backward()
    torch.testing.assert_close(raw.grad, ref.grad, rtol=0.1, atol=2e-3)


def matmul_precision() -> str | None:
    """oneDNN's float32 matmul setting (None before PyTorch 2.9, which has none)."""
    return getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None)


def bf16_math_rounds() -> bool:
    """Whether this CPU's float32 matmuls round their inputs to bf16 in oneDNN's bf16 math mode. Not wherever oneDNN
    reports bf16 support: on an AMD EPYC with AVX512-BF16 and no AMX, PyTorch 2.14 keeps them float32."""
    setting = getattr(torch.backends.mkldnn, "matmul", None)
    if matmul_precision() is None or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    a, b = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)), torch.eye(64)
    previous, setting.fp32_precision = setting.fp32_precision, "bf16"
    try:
        return not torch.equal(a @ b, a)  # a bf16 input keeps 8 of a float's 24 significant bits
    finally:
        setting.fp32_precision = previous


BF16_CPU = bf16_math_rounds()


def test_bf16_matmul_stays_close_to_float32_and_restores_the_setting():
    s, t, q = unit(16, 32), unit(16, 32), unit(256, 32)
    before = matmul_precision()
    exact, fast = s.clone().requires_grad_(), s.clone().requires_grad_()
    loss = relational_loss(exact, t, q, 0.1, 0.04)
    loss_fast = relational_loss(fast, t, q, 0.1, 0.04, bf16_matmul=True)
    assert matmul_precision() == before  # the forward pass put the setting back
    loss.backward()
    loss_fast.backward()
    assert matmul_precision() == before  # and so did the backward pass
    assert loss_fast.dtype == torch.float32
    assert loss_fast.item() == pytest.approx(loss.item(), rel=2e-3)
    torch.testing.assert_close(fast.grad, exact.grad, rtol=0.05, atol=0.05 * exact.grad.abs().max().item())
    if BF16_CPU:  # where this CPU has bf16 math, the inputs really were rounded
        assert loss_fast.item() != loss.item()
        assert not torch.equal(fast.grad, exact.grad)


def test_bf16_matmul_restores_the_setting_after_an_error():
    before = matmul_precision()
    with pytest.raises(RuntimeError):
        relational_loss(unit(4, 8), unit(4, 8), unit(16, 6), bf16_matmul=True)  # D mismatch: the matmul fails
    assert matmul_precision() == before


@pytest.mark.parametrize("asked", [True, False])
def test_the_bf16_matmul_request_reaches_the_forward_and_the_backward_matmul(monkeypatch, asked):
    """``bf16_matmul`` sets the CPU matmul precision of both passes (observed, the real setting still applied)."""
    seen, real = [], ressl.loss._cpu_matmul_precision
    monkeypatch.setattr(ressl.loss, "_cpu_matmul_precision", lambda bf16: seen.append(bf16) or real(bf16))
    student = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    teacher, queue = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(16, 8), dim=1)
    relational_loss(student, teacher, queue, bf16_matmul=asked).backward()
    assert seen == [asked, asked]
