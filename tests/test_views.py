"""Tests for ressl.views: both views' parameters drawn many steps at a time, the same for a step however it is reached."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from scipy.stats import ks_2samp, spearmanr

from ressl.augment import strong_augment, weak_augment
from ressl.views import ViewAugment, draw_seed

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def views(seed: tuple[int, ...] = (0, 0), images_per_draw: int = 12) -> ViewAugment:
    return ViewAugment(weak_augment(16, MEAN, STD), strong_augment(16, MEAN, STD), seed, images_per_draw)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_step_gets_the_same_parameters_straight_or_resumed() -> None:
    """Batch 4, 12 images per draw: 3 steps per draw. Walking 0..8 crosses two draw boundaries; a fresh object
    (a resumed run) asked for any step directly gets the same parameters."""
    walked = views()
    assert walked.steps_per_draw(4) == 3
    path = [walked.params(step, 4, 20, 24) for step in range(9)]
    for step in (0, 2, 3, 5, 7, 8):
        fresh = views().params(step, 4, 20, 24)
        assert same(fresh[0], path[step][0]) and same(fresh[1], path[step][1]), step
    for a, b in itertools.pairwise(path):  # every step its own draws, within a draw and across
        assert not torch.equal(a[1]["crop"], b[1]["crop"])
        assert not torch.equal(a[1]["brightness"], b[1]["brightness"])


def test_the_seed_and_the_rank_change_the_parameters() -> None:
    base = views((0, 0)).params(0, 4, 20, 24)[1]["crop"]
    assert not torch.equal(base, views((1, 0)).params(0, 4, 20, 24)[1]["crop"])
    assert not torch.equal(base, views((0, 1)).params(0, 4, 20, 24)[1]["crop"])
    assert len({draw_seed((0, 0), d) for d in range(1000)} | {draw_seed((0, 1), d) for d in range(1000)}) == 2000


def test_another_batch_shape_gets_its_own_draw() -> None:
    v = views()
    small, big = v.params(1, 4, 20, 24), v.params(1, 2, 40, 40)
    assert small[1]["crop"].shape == (4, 4) and big[1]["crop"].shape == (2, 4)
    assert int(big[0]["crop"][:, 2].max()) <= 40 and int(big[0]["crop"][:, 3].max()) <= 40
    assert same(v.params(1, 4, 20, 24)[1], small[1])  # and back


def test_views_have_the_sizes_and_the_weak_one_keeps_colours() -> None:
    images = torch.randint(0, 256, (4, 3, 20, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    gray = images[:, :1].expand(-1, 3, -1, -1).contiguous()  # a gray image stays gray in the weak view only
    weak, strong = views()(gray, gray, step=4)
    assert weak.shape == strong.shape == (4, 3, 16, 16)
    assert torch.allclose(weak[:, 0], weak[:, 1]) and torch.allclose(weak[:, 1], weak[:, 2])
    with pytest.raises(ValueError, match="differ in shape"):
        views()(images, images[:, :, :16], step=0)


def test_many_steps_in_one_draw_are_distributed_as_one_step_draws() -> None:
    """Crop areas and brightness factors over 50 steps x 40 images in one draw, against 2,000 one-step draws."""
    aug = strong_augment(32, MEAN, STD)
    many = aug.sample_steps(50, 40, 48, 40, torch.Generator().manual_seed(1))
    ones = aug.sample_params(2000, 48, 40, torch.Generator().manual_seed(2))
    area = lambda crop: (crop[..., 2] * crop[..., 3]).flatten().double()
    assert ks_2samp(area(many["crop"]).numpy(), area(ones["crop"]).numpy()).pvalue > 1e-3
    assert ks_2samp(many["brightness"].flatten().numpy(), ones["brightness"].numpy()).pvalue > 1e-3
    orders = many["order"]  # jitter_order "batch": one permutation per step, its own for each step
    assert torch.equal(orders, orders[:, :1].expand_as(orders))
    assert len({tuple(o.tolist()) for o in orders[:, 0]}) > 10


def test_each_draw_is_new_and_a_steps_two_views_are_drawn_apart() -> None:
    """The second draw's parameters are not the first's again; a step's weak and strong crops are independent (the
    Spearman correlation of their areas over 400 one-step draws, per image, within 5 / sqrt(400))."""
    v = views(images_per_draw=12)  # 3 steps of 4 images per draw
    first, second = v.params(0, 4, 20, 24), v.params(3, 4, 20, 24)
    assert not same(first[0], second[0]) and not same(first[1], second[1])
    v = views(images_per_draw=4)  # a draw per step
    area = lambda p: (p["crop"][:, 2] * p["crop"][:, 3]).double()
    weak, strong = (torch.stack(a) for a in zip(*(tuple(map(area, v.params(step, 4, 20, 24))) for step in range(400))))
    for i in range(4):  # (400 steps, 4 images) each
        assert abs(spearmanr(weak[:, i], strong[:, i]).statistic) < 5 / math.sqrt(400), i


def grouped(steps_per_call: int = 4, images_per_draw: int = 48) -> ViewAugment:
    return ViewAugment(weak_augment(16, MEAN, STD), strong_augment(16, MEAN, STD), (0, 0), images_per_draw, steps_per_call)


def test_a_steps_views_do_not_depend_on_how_the_steps_are_grouped() -> None:
    """Batch 4, 12 steps per draw, 4 steps per call. Streamed from step 0 (3 calls), resumed at step 5 (calls for
    5-7 and 8-11) and made one step per call, every step's views are the same bit for bit."""
    g = torch.Generator().manual_seed(0)
    sources = [torch.randint(0, 256, (4, 3, 20, 24), dtype=torch.uint8, generator=g) for _ in range(12)]
    calls = []

    def counted(v: ViewAugment) -> ViewAugment:
        apply = v.strong.apply
        v.strong.apply = lambda x, p: calls.append(x.shape[0]) or apply(x, p)  # type: ignore[method-assign]
        return v

    straight = list(counted(grouped()).stream(((s, s) for s in sources), 0))
    assert calls == [16, 16, 16]
    calls.clear()
    resumed = list(counted(grouped()).stream(((s, s) for s in sources[5:]), 5))
    assert calls == [12, 16]
    one_by_one = grouped()
    for step, (weak, strong) in enumerate(straight):
        assert weak.shape == strong.shape == (4, 3, 16, 16)
        alone = one_by_one(sources[step], sources[step], step)
        assert torch.equal(weak, alone[0]) and torch.equal(strong, alone[1]), step
        if step >= 5:
            assert torch.equal(weak, resumed[step - 5][0]) and torch.equal(strong, resumed[step - 5][1]), step


def test_the_steps_of_one_call_share_their_jitter_order() -> None:
    """jitter_order batch: steps 0-3, 4-7, ... take their first step's permutation; the groups draw their own."""
    v = grouped(images_per_draw=4 * 48)  # batch 4: 48 steps per draw, 12 groups
    orders = [v.params(step, 4, 20, 24)[1]["order"] for step in range(48)]
    for step, order in enumerate(orders):
        assert torch.equal(order, orders[step // 4 * 4].expand_as(order)), step
        assert torch.equal(order, order[:1].expand_as(order))
    assert len({tuple(o[0].tolist()) for o in orders}) > 4


def test_steps_per_call_stay_within_a_draw_and_the_memory_budget() -> None:
    assert grouped(8, 16_384).call_steps(128) == 8  # 128 steps per draw
    assert grouped(8, 16_384).call_steps(96) == 2  # 170 steps per draw: a call never spans two
    big = ViewAugment(weak_augment(224, MEAN, STD), strong_augment(224, MEAN, STD), (0, 0), 16_384, 8)
    assert big.call_steps(256) == 1  # 308 MB of views per step
    assert grouped(1).call_steps(4) == 1
    with pytest.raises(ValueError, match="span two draws"):
        grouped().params(10, 4, 20, 24, steps=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_views_made_on_a_gpu_read_their_parameters_from_pinned_memory() -> None:
    """Sources on a GPU: each draw is pinned once, so that the slices each call copies to the GPU never wait for its
    queue (a copy from pageable memory may); the views are those the same parameters give on a CPU."""
    from torch.profiler import ProfilerActivity, profile

    source = torch.randint(0, 256, (8, 3, 20, 24), dtype=torch.uint8)
    on_cpu = views()(source, source, step=0, steps=2)
    on_gpu, there = views(), source.cuda()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as watched:  # crops larger than 16 px: the roi_align path too
        made = on_gpu(there, there, step=0, steps=2)
        torch.cuda.synchronize()
    assert all(v.is_pinned() for draw in on_gpu._draw for v in draw.values())
    copies = [event.name for event in watched.events() if "HtoD" in event.name]
    assert copies and not [name for name in copies if "Pageable" in name], copies  # every copy from pinned memory
    for cpu, gpu in zip(on_cpu, made):
        assert gpu.is_cuda
        torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-3, rtol=0)
