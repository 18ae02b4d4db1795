import pytest
import torch
import torchvision

from ressl import build_backbone, build_model
from ressl.loss import relational_loss


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def perturb_student(model):
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))


def test_ema_momentum_one_changes_nothing_and_zero_copies():
    model = build_model("resnet18", 16, width=8, hidden_dim=16, out_dim=8, queue_size=32)
    perturb_student(model)
    before = params(model.teacher)
    model.update_teacher(1.0)
    for a, b in zip(before, model.teacher.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.update_teacher(0.0)
    for s, t in zip(model.student.parameters(), model.teacher.parameters()):
        torch.testing.assert_close(s, t, rtol=0, atol=0)


def test_ema_formula():
    model = build_model("resnet18", 16, width=8, hidden_dim=16, out_dim=8, queue_size=32)
    perturb_student(model)
    teacher, student = params(model.teacher), params(model.student)
    model.update_teacher(0.9)
    for t, s, new in zip(teacher, student, model.teacher.parameters()):
        torch.testing.assert_close(new, 0.9 * t + 0.1 * s)


def test_no_gradient_reaches_the_teacher():
    model = build_model("resnet18", 16, width=8, hidden_dim=16, out_dim=8, queue_size=32)
    x = torch.randn(4, 3, 16, 16)
    student = model.student(x)
    teacher = model.teacher(x)  # even without no_grad: the teacher's parameters do not require grad
    relational_loss(student, teacher, model.queue.queue).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.parameters())


def test_embeddings_are_unit_norm():
    model = build_model("resnet18", 32, width=8, hidden_dim=16, out_dim=8, queue_size=32)
    z = model.student(torch.randn(3, 3, 32, 32))
    assert z.shape == (3, 8)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))


@pytest.mark.parametrize("name,dim", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_backbone_feature_dims_and_small_stem(name, dim):
    net, feature_dim = build_backbone(name, small_stem=True)
    assert feature_dim == dim
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, dim)


def test_small_stem_chosen_for_small_images():
    assert build_model("resnet18", 64, width=8).student.backbone.conv1.stride == (1, 1)
    assert build_model("resnet18", 96, width=8).student.backbone.conv1.stride == (2, 2)


def test_width_scales_every_stage():
    net, feature_dim = build_backbone("resnet18", small_stem=True, width=16)
    assert feature_dim == 128
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 128)
    assert net.layer4[1].conv2.out_channels == 128


def test_full_width_backbone_loads_into_torchvision_strict():
    net, _ = build_backbone("resnet18", small_stem=False)
    reference = torchvision.models.resnet18()
    reference.fc = torch.nn.Identity()
    reference.load_state_dict(net.state_dict(), strict=True)
