import copy

import pytest
import torch

from ressl import build_model
from ressl.config import Config
from ressl.loss import relational_loss
from ressl.optim import FlatSGD, build_optimizer

CFG = Config(lr=0.1, sgd_momentum=0.9, weight_decay=0.01)


def model_pair(channels_last: bool):
    """The same small model twice: parameters as built, and flattened (as training sets them up)."""
    torch.manual_seed(0)
    tensors = build_model("resnet18", 16, width=8, hidden_dim=16, out_dim=8, queue_size=32, head_bn=True)
    if channels_last:
        tensors = tensors.to(memory_format=torch.channels_last)
    flat = copy.deepcopy(tensors)
    assert flat.flatten_parameters()
    return tensors, flat


def train(model, optimizer, steps, skip_head=False):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(6, 3, 16, 16, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        student = model.student.backbone(x) if skip_head else model.student(x)
        loss = student.square().mean() if skip_head else relational_loss(student, model.teacher(x), model.queue.queue)
        loss.backward()
        optimizer.step()


def assert_same(a, b):
    for (name, p), q in zip(a.student.named_parameters(), b.student.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("channels_last", [False, True])
def test_flat_sgd_moves_the_parameters_as_sgd_over_the_tensors(channels_last):
    tensors, flat = model_pair(channels_last)
    reference = build_optimizer(tensors, CFG)
    ours = build_optimizer(flat, CFG)
    assert isinstance(ours, FlatSGD) and not isinstance(reference, FlatSGD)
    initial = [p.detach().clone() for p in tensors.student.parameters()]
    train(tensors, reference, 3)
    train(flat, ours, 3)
    assert_same(tensors, flat)
    assert all(not torch.equal(a, p) for a, p in zip(initial, flat.student.parameters()))  # every tensor moved
    # a step where the projection head gets no gradient: both leave its tensors and their momentum alone
    train(tensors, reference, 1, skip_head=True)
    train(flat, ours, 1, skip_head=True)
    assert_same(tensors, flat)


@pytest.mark.parametrize("flat_buffer", [True, False], ids=["flat", "per-tensor"])
@pytest.mark.parametrize("decay_bn_bias", [False, True])
def test_weight_decay_reaches_bn_and_biases_only_when_asked(decay_bn_bias, flat_buffer):
    """The official ImageNet code exempts BatchNorm weights and biases from weight decay; its small-dataset code
    decays every parameter (``decay_bn_bias``)."""
    tensors, flat = model_pair(False)
    model = flat if flat_buffer else tensors
    optimizer = build_optimizer(model, Config(lr=0.5, sgd_momentum=0.0, weight_decay=0.1, decay_bn_bias=decay_bn_bias))
    assert isinstance(optimizer, FlatSGD) == flat_buffer
    before = {n: p.detach().clone() for n, p in model.student.named_parameters()}
    optimizer.zero_grad()
    for p in model.student.parameters():
        p.grad = torch.zeros_like(p)  # no loss: only the decay moves anything
    optimizer.step()
    for n, p in model.student.named_parameters():
        expected = before[n] * (1 - 0.5 * 0.1) if p.ndim > 1 or decay_bn_bias else before[n]
        torch.testing.assert_close(p.detach(), expected, msg=n)


def test_flat_sgd_resumes_from_its_own_state_and_from_the_per_tensor_state():
    tensors, flat = model_pair(False)
    reference, ours = build_optimizer(tensors, CFG), build_optimizer(flat, CFG)
    train(tensors, reference, 2)
    train(flat, ours, 2)
    # resumed copies: one from FlatSGD's own state, one from torch.optim.SGD's per-tensor state
    for saved in (ours.state_dict(), reference.state_dict()):
        _, resumed = model_pair(False)
        resumed.load_state_dict(flat.state_dict())  # as resume() does: copied into the flat views
        optimizer = build_optimizer(resumed, CFG)
        assert isinstance(optimizer, FlatSGD)
        optimizer.load_state_dict(copy.deepcopy(saved))
        train(resumed, optimizer, 2)
        expected = copy.deepcopy(tensors)
        continued = build_optimizer(expected, CFG)
        continued.load_state_dict(reference.state_dict())
        train(expected, continued, 2)
        assert_same(expected, resumed)


def test_per_tensor_sgd_when_the_parameters_are_not_flat():
    model = build_model("resnet18", 16, width=8, hidden_dim=16, out_dim=8, queue_size=32)
    assert not isinstance(build_optimizer(model, CFG), FlatSGD)
    assert model.flatten_parameters()
    model = model.to(memory_format=torch.channels_last)  # copies them out of the buffer
    assert model.flat_student() is None and not isinstance(build_optimizer(model, CFG), FlatSGD)


def test_flat_sgd_follows_a_state_loaded_after_it_has_stepped():
    """load_state_dict replaces the momentum buffers: the views the steps write through must follow them."""
    tensors, flat = model_pair(False)
    reference, ours = build_optimizer(tensors, CFG), build_optimizer(flat, CFG)
    train(tensors, reference, 2)
    train(flat, ours, 1)  # ours has stepped (its views are made) but is one step behind
    flat.load_state_dict(tensors.state_dict())
    ours.load_state_dict(copy.deepcopy(reference.state_dict()))  # the per-tensor state, as a slice of one tensor
    train(tensors, reference, 2)
    train(flat, ours, 2)
    assert_same(tensors, flat)


def test_flat_sgd_leaves_a_tensor_without_gradient_alone_after_loading_per_tensor_state():
    """The per-tensor state arrives as slices of one tensor: a tensor the loss does not reach keeps its momentum
    (and the others theirs), as in torch.optim.SGD."""
    tensors, flat = model_pair(False)
    reference, ours = build_optimizer(tensors, CFG), build_optimizer(flat, CFG)
    train(tensors, reference, 2)
    flat.load_state_dict(tensors.state_dict())
    ours.load_state_dict(copy.deepcopy(reference.state_dict()))
    train(tensors, reference, 1, skip_head=True)
    train(flat, ours, 1, skip_head=True)
    train(tensors, reference, 1)
    train(flat, ours, 1)
    assert_same(tensors, flat)


def test_flat_sgd_step_with_a_closure_returns_its_loss_and_steps_as_sgd():
    tensors, flat = model_pair(False)
    reference, ours = build_optimizer(tensors, CFG), build_optimizer(flat, CFG)
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(2))

    def closure_for(model, optimizer):
        def closure():
            optimizer.zero_grad(set_to_none=True)
            loss = relational_loss(model.student(x), model.teacher(x), model.queue.queue)
            loss.backward()
            return loss
        return closure

    for _ in range(2):
        expected = reference.step(closure_for(tensors, reference))
        got = ours.step(closure_for(flat, ours))
        torch.testing.assert_close(got, expected)
    assert_same(tensors, flat)


@pytest.mark.parametrize("flat", [True, False])
def test_sgd_momentum_comes_from_the_config(flat):
    """--sgd_momentum 0.5: after gradients of ones twice, each weight moved lr * 1, then lr * (0.5 * 1 + 1)."""
    model = build_model("resnet18", 16, width=8, hidden_dim=16, out_dim=8, queue_size=32)
    if flat:
        assert model.flatten_parameters()
    optimizer = build_optimizer(model, Config(lr=0.1, sgd_momentum=0.5, weight_decay=0.0))
    before = [p.detach().clone() for p in model.student.parameters()]
    for _ in range(2):
        for p in model.student.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
    for b, p in zip(before, model.student.parameters()):
        torch.testing.assert_close(p.detach(), b - 0.1 * (1 + 1.5))
