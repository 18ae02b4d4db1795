import itertools

import pytest

from ressl.schedule import cosine_lr, ema_momentum


def test_warmup_then_cosine():
    lrs = [cosine_lr(s, 100, 1.0, warmup_steps=10) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5, abs=1e-9)
    assert lrs[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))


def test_ema_momentum_constant_and_cosine():
    assert ema_momentum(50, 100, 0.99) == 0.99
    assert ema_momentum(0, 100, 0.99, cosine=True) == pytest.approx(0.99)
    assert ema_momentum(50, 100, 0.99, cosine=True) == pytest.approx(0.995)
    assert ema_momentum(100, 100, 0.99, cosine=True) == pytest.approx(1.0)
