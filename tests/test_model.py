import pytest
import torch
import torchvision

from ressl import build_backbone, build_model
from ressl.loss import relational_loss
from ressl.model import SplitBatchNorm, split_batchnorm


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def perturb_student(model):
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))


def small_model(layout: str = "tensors"):
    """``tensors``: parameters as built; ``flat``: views of one buffer per network (as training sets them up);
    ``channels_last flat``: converted, then flattened; ``flat channels_last``: flattened, then converted (a
    ``.to()`` copies the parameters out of the buffers, which the EMA must notice)."""
    model = build_model("resnet18", 16, width=8, hidden_dim=16, out_dim=8, queue_size=32)
    for step in layout.split():
        if step == "channels_last":
            model = model.to(memory_format=torch.channels_last)
        elif step == "flat":
            assert model.flatten_parameters()
    return model


LAYOUTS = ["tensors", "flat", "channels_last flat", "flat channels_last"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ema_momentum_one_changes_nothing_and_zero_copies(layout):
    model = small_model(layout)
    perturb_student(model)
    before = params(model.teacher)
    model.update_teacher(1.0)
    for a, b in zip(before, model.teacher.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.update_teacher(0.0)
    for s, t in zip(model.student.parameters(), model.teacher.parameters()):
        torch.testing.assert_close(s, t, rtol=0, atol=0)


@pytest.mark.parametrize("momentum", [0.9, torch.tensor(0.9)], ids=["float", "tensor"])  # tensor: the CUDA graph's
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ema_formula(layout, momentum):
    model = small_model(layout)
    perturb_student(model)
    teacher, student = params(model.teacher), params(model.student)
    model.update_teacher(momentum)
    for t, s, new in zip(teacher, student, model.teacher.parameters()):
        torch.testing.assert_close(new, 0.9 * t + 0.1 * s)


def test_flat_parameters_keep_values_layout_and_objects_and_share_one_buffer():
    reference = small_model("tensors").to(memory_format=torch.channels_last)
    model = small_model("tensors").to(memory_format=torch.channels_last)
    model.load_state_dict(reference.state_dict())
    objects = [id(p) for p in model.parameters()]
    assert model.flatten_parameters()
    assert [id(p) for p in model.parameters()] == objects  # optimisers built before still hold them
    for a, b in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert a.stride() == b.stride()
    for net in (model.student, model.teacher):
        assert len({p.untyped_storage().data_ptr() for p in net.parameters()}) == 1
    student_storage = next(model.student.parameters()).untyped_storage().data_ptr()
    assert next(model.teacher.parameters()).untyped_storage().data_ptr() != student_storage


def test_flat_parameters_train_and_reload():
    """SGD on flat parameters moves them like on separate tensors, and a state_dict round trip restores them."""
    runs = []
    for layout in ("tensors", "flat"):
        torch.manual_seed(0)
        model = small_model(layout)
        opt = torch.optim.SGD(model.student.parameters(), lr=0.1, momentum=0.9)
        x = torch.randn(4, 3, 16, 16)
        for _ in range(2):
            opt.zero_grad()
            relational_loss(model.student(x), model.teacher(x), model.queue.queue).backward()
            opt.step()
            model.update_teacher(0.9)
        runs.append(model)
    for a, b in zip(runs[0].state_dict().values(), runs[1].state_dict().values()):
        torch.testing.assert_close(a, b)
    fresh = small_model("flat")
    fresh.load_state_dict(runs[1].state_dict())
    for a, b in zip(fresh.parameters(), runs[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert fresh.flat_student() is not None  # loading copies into the views: the buffers stay live


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


@pytest.mark.parametrize("small_stem,maxpool,reduction", [(True, None, 1), (True, True, 2), (False, None, 4), (False, False, 2)])
def test_stem_and_max_pool_set_the_resolution_of_the_first_stage(small_stem, maxpool, reduction):
    """The 3x3/1 stem drops the max-pool unless it is asked for (the official code keeps it for STL-10 and
    Tiny-ImageNet); the 7x7/2 stem keeps it unless asked not to."""
    net, _ = build_backbone("resnet18", small_stem, width=8, maxpool=maxpool)
    stem = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    assert stem(torch.randn(1, 3, 64, 64)).shape[-2:] == (64 // reduction, 64 // reduction)


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


# ----------------------------------------------------------------------------- split BatchNorm


def _naive_split(bn: torch.nn.BatchNorm2d, x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The split BatchNorm written out: each group (samples j, j + groups, ...) normalised by its own batch
    statistics, put back in place; each group moves a copy of the running statistics, which end as their mean."""
    out = torch.empty_like(x)
    means, variances = [], []
    for j in range(groups):
        mean, var = bn.running_mean.clone(), bn.running_var.clone()
        out[j::groups] = torch.nn.functional.batch_norm(x[j::groups], mean, var, bn.weight, bn.bias, True, bn.momentum, bn.eps)
        means.append(mean)
        variances.append(var)
    return out, torch.stack(means).mean(0), torch.stack(variances).mean(0)


@pytest.mark.parametrize("shape,channels_last", [((12, 5, 3, 4), False), ((12, 5, 3, 4), True), ((12, 5), False)])
def test_split_batchnorm_normalises_each_group_apart(shape, channels_last):
    torch.manual_seed(0)
    plain = torch.nn.BatchNorm2d(shape[1])
    with torch.no_grad():
        plain.weight.uniform_(0.5, 2.0)
        plain.bias.uniform_(-1.0, 1.0)
        plain.running_mean.uniform_(-1.0, 1.0)
        plain.running_var.uniform_(0.5, 2.0)
    split = split_batchnorm(torch.nn.Sequential(plain), 3)[0]
    assert isinstance(split, SplitBatchNorm) and split.groups == 3
    reference = torch.nn.BatchNorm2d(shape[1])
    reference.load_state_dict(split.state_dict())  # the same keys: a state dict moves between them
    x = torch.randn(shape) * 3 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x_ref = x.detach().clone().requires_grad_(True)
    x.requires_grad_(True)
    y = split(x)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    y_ref, running_mean, running_var = _naive_split(reference, x_ref, 3)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(split.running_mean, running_mean)
    torch.testing.assert_close(split.running_var, running_var)
    assert int(split.num_batches_tracked) == 1
    weights = torch.randn(shape)
    (y * weights).sum().backward()
    (y_ref * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(split.weight.grad, reference.weight.grad)
    torch.testing.assert_close(split.bias.grad, reference.bias.grad)
    whole = torch.nn.functional.batch_norm(x.detach(), None, None, split.weight.detach(), split.bias.detach(), True)
    assert not torch.allclose(y.detach(), whole, atol=1e-3)  # the groups' statistics, not the batch's


def test_split_batchnorm_in_eval_mode_uses_the_running_statistics():
    torch.manual_seed(0)
    split = SplitBatchNorm(4, groups=2)
    plain = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        split.running_mean.uniform_(-1.0, 1.0)
        split.running_var.uniform_(0.5, 2.0)
    plain.load_state_dict(split.state_dict())
    x = torch.randn(6, 4, 2, 2)  # 6 images, which 4 groups would not split: eval mode has no groups
    torch.testing.assert_close(split.eval()(x), plain.eval()(x))
    with pytest.raises(ValueError, match="a batch of 6 does not split into 4 BatchNorm groups"):
        SplitBatchNorm(4, groups=4).train()(x)
    with pytest.raises(ValueError, match=r"expected a \(B, C\) or \(B, C, H, W\) input"):
        SplitBatchNorm(4, groups=2).train()(torch.randn(6, 4, 3))
    with pytest.raises(ValueError, match="needs affine=True"):
        split_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(4, affine=False)), 2)


def test_bn_groups_split_each_network_apart_and_keep_the_state_dict():
    plain = build_model("resnet18", 16, width=8, hidden_dim=16, out_dim=8, queue_size=32, head_bn=True)
    split = build_model("resnet18", 16, width=8, hidden_dim=16, out_dim=8, queue_size=32, head_bn=True, student_bn_groups=4)
    norms = lambda net: [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms(split.student)) == len(norms(plain.student)) > 20  # the backbone's and the projector's
    assert all(isinstance(m, SplitBatchNorm) and m.groups == 4 for m in norms(split.student))
    assert not any(isinstance(m, SplitBatchNorm) for m in norms(split.teacher))  # the teacher's groups are its own
    both = build_model("resnet18", 16, width=8, hidden_dim=16, out_dim=8, queue_size=32, student_bn_groups=4, teacher_bn_groups=2)
    assert {m.groups for m in norms(both.student)} == {4} and {m.groups for m in norms(both.teacher)} == {2}
    assert split.state_dict().keys() == plain.state_dict().keys()
    split.load_state_dict(plain.state_dict())
    assert split.flatten_parameters()  # the EMA's flat buffers still pair student and teacher
    assert split_batchnorm(plain.student, 1) is plain.student and not any(isinstance(m, SplitBatchNorm) for m in norms(plain.student))


@pytest.mark.parametrize("head_bn", [False, True])
def test_projector_is_linear_relu_linear_with_batchnorm_before_the_relu_when_asked(head_bn):
    model = build_model("resnet18", 16, width=8, hidden_dim=16, out_dim=8, queue_size=32, head_bn=head_bn)
    kinds = [type(m) for m in model.student.projector]
    assert kinds == ([torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU, torch.nn.Linear] if head_bn
                     else [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear])


def test_split_batchnorm_keeps_the_momentum_of_the_batchnorm_it_replaces():
    """Built from BatchNorm2d(momentum 0.3), 3 groups: the running mean moves 0.3 of the way to the groups' mean."""
    split = split_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(5, momentum=0.3)), 3)[0]
    x = torch.randn(12, 5, 3, 4, generator=torch.Generator().manual_seed(0)) * 3 + 1
    split(x)
    means = torch.stack([x[j::3].mean(dim=(0, 2, 3)) for j in range(3)])  # the strided groups
    torch.testing.assert_close(split.running_mean, 0.3 * means.mean(dim=0))


@pytest.mark.parametrize("flat", [False, True])
def test_the_ema_leaves_the_teachers_batchnorm_statistics_to_the_teacher(flat):
    """The EMA averages parameters only, as MoCo's momentum update does: the teacher's running statistics are its
    own, moved by its own forward passes."""
    model = build_model("resnet18", 16, width=8, hidden_dim=16, out_dim=8, queue_size=32, head_bn=True)
    if flat:
        assert model.flatten_parameters()
    with torch.no_grad():
        for b in model.student.buffers():
            b.add_(1)
    before = {k: v.clone() for k, v in model.teacher.state_dict().items() if "running" in k or "num_batches" in k}
    model.update_teacher(0.5)
    after = model.teacher.state_dict()
    assert before and all(torch.equal(after[k], v) for k, v in before.items())
