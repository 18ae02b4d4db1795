"""Backbones, the projection head, and the student/teacher pair with its EMA update."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv_resnet

from ressl.config import Config, keeps_maxpool, stem
from ressl.queue import EmbeddingQueue

# name -> (block, blocks per stage, feature dim at width 64)
BACKBONES: dict[str, tuple[type[nn.Module], list[int], int]] = {
    "resnet18": (tv_resnet.BasicBlock, [2, 2, 2, 2], 512),
    "resnet34": (tv_resnet.BasicBlock, [3, 4, 6, 3], 512),
    "resnet50": (tv_resnet.Bottleneck, [3, 4, 6, 3], 2048),
}

def build_backbone(name: str, small_stem: bool, width: int = 64, maxpool: bool | None = None) -> tuple[nn.Module, int]:
    """A torchvision ResNet without its classifier (``fc`` is the identity).

    Args:
        name: ``resnet18``, ``resnet34`` or ``resnet50``.
        small_stem: the paper's stem for images of 64 px or less: a 3x3 stride-1 conv instead of 7x7 stride-2.
        width: channels of the first stage (torchvision: 64); other stages scale with it. Only 64
            gives a network that ``torchvision.models.<name>()`` loads key for key *and* shape for shape.
        maxpool: keep the max-pool after the stem; None: only after the 7x7 stem (the paper drops it for CIFAR;
            the official code keeps it after the 3x3 stem for STL-10 and Tiny-ImageNet).

    Returns:
        The backbone, mapping (B, 3, H, W) -> (B, F), and F.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    block, layers, feature_dim = BACKBONES[name]
    net = tv_resnet.ResNet(block, layers)  # type: ignore[arg-type]
    if width != 64:
        net.inplanes = width
        net.bn1 = nn.BatchNorm2d(width)
        for i, blocks in enumerate(layers):
            stride = 1 if i == 0 else 2
            setattr(net, f"layer{i + 1}", net._make_layer(block, width * 2**i, blocks, stride=stride))  # type: ignore[arg-type]
        feature_dim = feature_dim * width // 64
    if small_stem:
        net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
    elif width != 64:
        net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    if not keeps_maxpool(small_stem, maxpool):
        net.maxpool = nn.Identity()  # type: ignore[assignment]
    net.fc = nn.Identity()  # type: ignore[assignment]
    for m in net.modules():  # torchvision's initialisation, applied again to every convolution and BatchNorm (ours too)
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net, feature_dim


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm that, in training, normalises ``groups`` groups of the batch apart: the MoCo CIFAR demo's split
    BatchNorm, with which the ReSSL authors ran the small and medium sets on one GPU (8 groups of 32 images, as
    8 GPUs would). Sample ``i`` is in group ``i % groups``. The running statistics move by the groups' mean. In
    eval mode, or with one group, an ordinary BatchNorm; the parameters and buffers are BatchNorm's (the same
    state-dict keys). Handles (B, C) and (B, C, H, W) inputs; B must be a multiple of ``groups``.
    """

    def __init__(self, num_features: int, groups: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__(num_features, eps, momentum)
        self.groups = groups

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 4):
            raise ValueError(f"expected a (B, C) or (B, C, H, W) input, got {tuple(input.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.groups
        if not self.training or g == 1:
            return super().forward(x)
        self._check_input_dim(x)
        n, c = x.shape[:2]
        if n % g:
            raise ValueError(f"a batch of {n} does not split into {g} BatchNorm groups")
        assert self.running_mean is not None and self.running_var is not None and self.momentum is not None
        # (B, C, ...) -> (B / g, g * C, ...): channel j * C + k holds channel k of samples j, j + g, j + 2g, ...
        mean, var = self.running_mean.repeat(g), self.running_var.repeat(g)
        y = F.batch_norm(x.reshape(n // g, g * c, *x.shape[2:]), mean, var, self.weight.repeat(g), self.bias.repeat(g),
                         True, self.momentum, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(mean.view(g, c).mean(0))
            self.running_var.copy_(var.view(g, c).mean(0))
            self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
        y = y.reshape(x.shape)  # the reshapes copy a channels-last input: give it back in the layout it came in
        return y.contiguous(memory_format=torch.channels_last) if x.dim() == 4 and _channels_last(x) else y


def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def split_batchnorm(module: nn.Module, groups: int) -> nn.Module:
    """Replace every BatchNorm1d/2d in ``module`` by a :class:`SplitBatchNorm` of ``groups`` groups, keeping its
    parameters, statistics and momentum; ``module`` itself with one group. Every BatchNorm must be affine, track
    running statistics and have a momentum (ours do)."""
    if groups == 1:
        return module
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if not (child.affine and child.track_running_stats and child.momentum is not None):
                raise ValueError(f"{name}: split BatchNorm needs affine=True, track_running_stats=True and a momentum")
            split = SplitBatchNorm(child.num_features, groups, child.eps, child.momentum)
            split.to(device=child.weight.device, dtype=child.weight.dtype)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            split_batchnorm(child, groups)
    return module


class Encoder(nn.Module):
    """Backbone + projection head (Linear-ReLU-Linear, as in the official code; Linear-BN-ReLU-Linear with ``head_bn``).

    ``forward`` maps images (B, 3, H, W) to L2-normalised embeddings (B, out_dim);
    ``backbone`` alone gives the features (B, F) used for evaluation.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, hidden_dim: int, out_dim: int, head_bn: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        layers: list[nn.Module] = [nn.Linear(feature_dim, hidden_dim)]
        if head_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)]
        self.projector = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        z = self.projector(self.backbone(images))
        return F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=1)  # (B, out_dim), fp32 under autocast


class ReSSL(nn.Module):
    """The student, its EMA teacher and the queue: state only, no training logic in ``forward``.

    The training loop calls, in the official order: ``student(strong)``, ``update_teacher(m)``,
    ``teacher(weak)`` under ``no_grad``, the loss against ``queue.queue``, the optimiser step, and
    ``queue.push(teacher_embeddings)``.
    """

    def __init__(self, student: Encoder, queue_size: int, embed_dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.student = student
        self.teacher = copy.deepcopy(student)
        self.teacher.requires_grad_(False)
        self.queue = EmbeddingQueue(queue_size, embed_dim, generator=generator)
        # set by flatten_parameters: (student buffer, teacher buffer, student parameters in buffer order,
        # the parameters' addresses then: a later .to() that moves them out of the buffers changes these)
        self._flat: tuple[torch.Tensor, torch.Tensor, list[nn.Parameter], tuple[int, ...]] | None = None

    @torch.no_grad()
    def flatten_parameters(self) -> bool:
        """Make the student's parameters views of one flat buffer, and the teacher's of another laid out alike,
        so that :meth:`update_teacher` is one ``lerp_`` over the buffers: on a CPU a quarter of the time of the
        update tensor by tensor (64 tensors for a ResNet-18, 66 with ``head_bn``). Values, layouts and ``Parameter`` objects are
        unchanged (optimisers and DDP keep working). Call it once the parameters have their final device, dtype
        and memory format; a later ``.to()`` copies them out of the buffers, which :meth:`update_teacher`
        notices (it falls back to the update tensor by tensor). Returns whether the parameters were flattened.
        """
        # weights (ndim > 1) first, then the vectors (biases, BatchNorm affine): the optimiser decays only the first
        # kind, and takes them as two slices of the buffer (ressl.optim.FlatSGD)
        student_all, teacher_all = list(self.student.parameters()), list(self.teacher.parameters())
        order = sorted(range(len(student_all)), key=lambda i: student_all[i].ndim <= 1)  # stable: module order within each kind
        student, teacher = [student_all[i] for i in order], [teacher_all[i] for i in order]
        dense = all(p.numel() == p.untyped_storage().nbytes() // p.element_size() and p.storage_offset() == 0
                    and (p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last)) for p in student + teacher)
        alike = all(s.shape == t.shape and s.stride() == t.stride() and s.dtype == t.dtype and s.device == t.device
                    for s, t in zip(student, teacher))
        if not (dense and alike and len({(p.dtype, p.device) for p in student}) == 1):
            return False
        flats = []
        for params in (student, teacher):
            flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
            offset = 0
            for p in params:  # each parameter becomes a view with its own shape and strides (channels_last included)
                view = flat.as_strided(p.shape, p.stride(), offset)
                view.copy_(p)
                p.data = view
                offset += p.numel()
            flats.append(flat)
        self._flat = (flats[0], flats[1], student, self._parameter_addresses())
        return True

    def flat_student(self) -> tuple[torch.Tensor, list[nn.Parameter]] | None:
        """The student's flat buffer and its parameters in buffer order (weights, then vectors), or None when the
        parameters are not (or no longer) views of it."""
        flat = self._live_flat()
        return None if flat is None else (flat[0], list(flat[2]))

    def _live_flat(self) -> tuple[torch.Tensor, torch.Tensor, list[nn.Parameter], tuple[int, ...]] | None:
        """``_flat`` while the parameters still live in its buffers, else None (and forgotten)."""
        if self._flat is not None and self._flat[3] != self._parameter_addresses():
            self._flat = None  # the parameters left the buffers (a .to() or a reassignment): tensor by tensor from now on
        return self._flat

    def _parameter_addresses(self) -> tuple[int, ...]:
        return tuple(p.data_ptr() for p in (*self.student.parameters(), *self.teacher.parameters()))

    @torch.no_grad()
    def update_teacher(self, momentum: float | torch.Tensor) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, for every parameter, fused: one ``lerp_``
        over the flat buffers after :meth:`flatten_parameters`, else one ``_foreach_lerp_`` over the tensors.

        ``momentum``: a number, or a 0-dim tensor on the parameters' device (read by a kernel, as a CUDA graph needs).
        Buffers (BatchNorm statistics) are not averaged: the teacher keeps its own, as in MoCo.
        """
        flat = self._live_flat()
        if flat is not None:
            student_flat, teacher_flat = flat[0], flat[1]
            teacher_flat.lerp_(student_flat, 1.0 - momentum)
            return
        teacher = [p for p in self.teacher.parameters()]
        student = [p.detach() for p in self.student.parameters()]
        if isinstance(momentum, torch.Tensor):
            for t, s in zip(teacher, student):
                t.lerp_(s, 1.0 - momentum)
            return
        torch._foreach_lerp_(teacher, student, 1.0 - momentum)


def build_model(
    backbone: str,
    image_size: int,
    width: int = 64,
    hidden_dim: int = 512,
    out_dim: int = 128,
    queue_size: int = 4096,
    head_bn: bool = False,
    small_stem: bool | None = None,
    stem_maxpool: bool | None = None,
    student_bn_groups: int = 1,
    teacher_bn_groups: int = 1,
) -> ReSSL:
    """The ReSSL pair for ``image_size`` images; ``None`` stem choices follow :func:`ressl.config.stem` (the small
    stem for images of 64 px or less, the max-pool only after the 7x7 one). The student's BatchNorms normalise
    ``student_bn_groups`` groups of its batch apart, the teacher's ``teacher_bn_groups`` (:class:`SplitBatchNorm`)."""
    small, maxpool = stem(small_stem, stem_maxpool, image_size)
    net, feature_dim = build_backbone(backbone, small, width, maxpool)
    model = ReSSL(Encoder(net, feature_dim, hidden_dim, out_dim, head_bn), queue_size, out_dim)
    split_batchnorm(model.student, student_bn_groups)  # after the teacher's copy, each its own
    split_batchnorm(model.teacher, teacher_bn_groups)
    return model


def model_from_config(cfg: Config) -> ReSSL:
    """The ReSSL pair that a run's configuration describes (training, resuming and evaluating build the same one)."""
    return build_model(cfg.backbone, cfg.image_size, cfg.width, cfg.hidden_dim, cfg.out_dim, cfg.queue_size, cfg.head_bn,
                       cfg.small_stem, cfg.stem_maxpool, cfg.student_bn_groups, cfg.bn_groups)
