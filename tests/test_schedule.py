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


def test_cosine_lr_ends_at_final_lr_and_stays_there_past_the_end():
    """Warm-up to the peak, cosine down to ``final_lr`` at the last step, flat after it (a run resumed with more steps
    than its schedule: never rising again)."""
    assert cosine_lr(10, 100, 1.0, 10, final_lr=0.1) == pytest.approx(1.0)
    assert cosine_lr(55, 100, 1.0, 10, final_lr=0.1) == pytest.approx(0.55)  # half way down the cosine
    assert cosine_lr(100, 100, 1.0, 10, final_lr=0.1) == pytest.approx(0.1)
    for step in (101, 150, 190):
        assert cosine_lr(step, 100, 1.0, 10) == pytest.approx(0.0, abs=1e-12)
        assert cosine_lr(step, 100, 1.0, 10, final_lr=0.1) == pytest.approx(0.1)


def test_cosine_ema_momentum_stays_at_one_past_the_end():
    for step in (100, 101, 150, 199):
        assert ema_momentum(step, 100, 0.99, cosine=True) == pytest.approx(1.0)
