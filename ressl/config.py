"""One typed configuration with the paper's defaults, YAML presets, overrides and validation.

Precedence: the dataclass defaults < the preset's YAML < command-line flags. The resolved
configuration is saved beside every run (``config.yaml``) and inside every checkpoint, as plain data.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user mistake in the configuration; the message is one line that names the fix."""


DATASETS = ("digits", "cifar10", "cifar100", "stl10", "tinyimagenet", "imagenet", "npz", "folder")
DOWNLOADABLE = ("cifar10", "cifar100", "stl10")  # the sets torchvision fetches (--download)


@dataclass
class Config:
    # --- data --------------------------------------------------------------------------------
    dataset: str = "digits"  # digits (bundled with scikit-learn), cifar10, cifar100, stl10, tinyimagenet, imagenet, npz, folder
    data: str | None = None  # a directory: npz arrays (train.npz/test.npz), an image folder, or a torchvision root
    download: bool = False  # let torchvision download CIFAR/STL-10 into `data` (never done unless asked)
    image_size: int = 32  # training resolution; the paper: 32 for CIFAR, 64 for STL-10/Tiny-ImageNet, 224 for ImageNet
    max_bad_fraction: float = 0.01  # image folders: share of unreadable files skipped (with a warning) before stopping
    workers: int = 4  # loader processes for image folders and augment_backend torchvision (in-memory sets are sliced on the device)
    hold_in_memory: bool = True  # an image folder's training images, when all of one size and within 4 GiB (a quarter
    #   of the machine's memory over its processes, an eighth of a GPU's), are decoded once and cut on the device as
    #   CIFAR's are (Tiny-ImageNet: 1.2 GB); false: decoded and cropped by loader workers every epoch

    # --- model -------------------------------------------------------------------------------
    backbone: str = "resnet18"  # resnet18 | resnet34 | resnet50 (torchvision)
    width: int = 64  # channels of the first stage; 64 is torchvision's network, smaller ones suit a CPU
    small_stem: bool | None = None  # 3x3/1 stem convolution instead of 7x7/2; None: on for images of 64 px or less (the paper)
    stem_maxpool: bool | None = None  # the max-pool after the stem; None: kept after the 7x7 stem, dropped after the 3x3
    #   one (the paper, CIFAR). The official code keeps it after the 3x3 stem for STL-10 and Tiny-ImageNet (their presets)
    hidden_dim: int = 512  # projector hidden width: 4096 for ImageNet (official code); 512 for small datasets as a port
    #   crediting the official code has it (others read 2048; on cifar10-cpu both measured alike: docs/runs.md)
    out_dim: int = 128  # embedding size compared with the queue: 128 small datasets, 512 ImageNet (official code)
    head_bn: bool = False  # BatchNorm in the projector; off in the official code

    # --- method ------------------------------------------------------------------------------
    queue_size: int = 4096  # K, past teacher embeddings: 4096 CIFAR, 16384 STL-10 and Tiny-ImageNet, 131072 ImageNet (paper)
    student_temperature: float = 0.1  # softer student relation (paper, Sec. 4)
    teacher_temperature: float = 0.04  # sharper teacher relation (paper, Sec. 4)
    ema_momentum: float = 0.99  # teacher EMA: 0.99 CIFAR, 0.996 STL-10 and Tiny-ImageNet, 0.999 ImageNet (paper)
    ema_cosine: bool = False  # raise the momentum to 1 along a cosine (BYOL); the paper keeps it constant
    teacher_strong: bool = False  # give the teacher the strong recipe too (the paper's ablation, Table 5)
    blur: bool | None = True  # Gaussian blur in the strong view (p 0.5, sigma 0.1-2 px) at every size, as the official
    #   small-dataset code and solo-learn's ReSSL do on CIFAR; None: only above 32 px (the default before the tenth session)
    crop_min_scale: float = 0.2  # RandomResizedCrop scale range lower end, both views (official code)
    jitter_order: str = "batch"  # colour-jitter order: one random permutation per batch (fast) or per sample
    augment_backend: str = "batched"  # batched (per-sample parameters, whole-batch ops on the device) or torchvision
    #   (per-image transforms.v2 in loader workers, the official code's design: for comparison, much slower)
    augment_steps: int = 8  # batched, sets in memory: the views of up to this many steps made in one call (within 64 MB;
    #   1 = each step apart). Fewer kernel launches per step; those steps share the jitter order (jitter_order batch)
    flip: bool = True  # horizontal flips in both views (paper); off where mirroring changes the class (digits, text)

    teacher_bn: str = "shuffle"  # BatchNorm across processes: shuffle (MoCo's shuffle-BN for the teacher), sync (SyncBN), local
    bn_groups: int = 1  # on one device: the teacher's BatchNorms normalise this many groups of its shuffled batch apart
    #   (emulated shuffle-BN, the MoCo CIFAR demo's split BatchNorm)
    student_bn_groups: int = 1  # every BatchNorm of the student normalises this many groups of its batch apart (the
    #   MoCo CIFAR demo's split BatchNorm: with it and bn_groups 8, the authors' one-GPU runs on the small sets)

    # --- optimisation ------------------------------------------------------------------------
    epochs: int = 200  # the paper's schedule for its headline tables
    batch_size: int = 256  # global batch, split across processes
    lr: float = 0.06  # SGD learning rate for `batch_size` (official small-dataset code; ImageNet 0.05)
    weight_decay: float = 5e-4  # 5e-4 small datasets, 1e-4 ImageNet (official code)
    decay_bn_bias: bool = True  # weight decay on BatchNorm and bias parameters too: the official small-dataset code
    #   decays every parameter; its ImageNet code exempts them (the imagenet preset: false)
    sgd_momentum: float = 0.9  # SGD momentum (official code)
    warmup_epochs: float = 5.0  # linear warm-up before the cosine decay (official code: 5, small datasets and ImageNet)

    # --- runtime -----------------------------------------------------------------------------
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:1, ...
    precision: str = "auto"  # auto: bf16 autocast on CUDA and on CPUs with AMX/AVX512-BF16, else fp32 | bf16 | fp32
    #   (bf16 on a CPU with AMX also runs the loss's matmuls against the queue in bf16 math mode, float32 accumulation)
    channels_last: bool = True  # NHWC memory layout, faster convolutions with bf16 on CPU and GPU
    compile: bool = False  # torch.compile the student and teacher
    cuda_graph: bool | None = None  # replay the network's part of each step as one CUDA graph; None: where it can run (CUDA, one process, no compile)
    seed: int = 0  # initialisation, epoch order and augmentation draws (with the process's rank)
    out: str | None = None  # run directory; None: runs/<dataset>-<timestamp>
    log_every: int = 20  # steps between progress/metric updates (the only host syncs in the loop)
    max_minutes: float | None = None  # the run's time budget, over every resume, its periodic kNN checks included, the
    #   final kNN after it (the schedule still spans `epochs`; 0 or none: no limit)
    checkpoint_every: int = 500  # steps between mid-epoch checkpoints (0: only at epoch ends)
    resume: str | None = None  # a checkpoint to continue from (default: OUT/checkpoint.pt when it exists)

    # --- evaluation --------------------------------------------------------------------------
    knn_k: int = 200  # neighbours in the weighted kNN (InstDisc protocol, as the paper's code)
    knn_temperature: float = 0.1  # temperature of the kNN's exp(similarity / T) votes (InstDisc protocol)
    knn_every: int = 10  # epochs between online kNN checks on labelled data (0: only before and after training)
    knn_subset: int = 10000  # the online check uses a fixed sample of this many bank and test images (the final one: all)
    eval_batch_size: int = 512  # images per forward pass when embedding for kNN

    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes, a preset file's `extra:` mapping (no flag),
    #   carried into the run's config.yaml and checkpoints

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(Config)}
PRESET_DIR = "presets"


def field_notes() -> dict[str, str]:
    """Each field's comment in :class:`Config` (its meaning, and the paper's reason for the default), continuation
    lines joined: the text of ``ressl pretrain --help``. Empty when the source cannot be read (a frozen install)."""
    try:
        lines = inspect.getsource(Config).splitlines()
    except (OSError, TypeError):
        return {}
    notes: dict[str, str] = {}
    name = None
    for line in lines:
        field_line = re.match(r"\s+(\w+): [^#]*?(?:#\s*(.*))?$", line)
        more = re.match(r"\s+#\s+(.*)$", line)
        if more and name is not None and not line.lstrip().startswith("# ---"):
            notes[name] = f"{notes.get(name, '')} {more.group(1)}".strip()
        elif field_line and field_line.group(1) in FIELDS:
            name = field_line.group(1)
            if field_line.group(2):
                notes[name] = field_line.group(2)
        else:
            name = None
    return notes


def preset_names() -> list[str]:
    files = resources.files("ressl").joinpath(PRESET_DIR).iterdir()
    return sorted(p.name[: -len(".yaml")] for p in files if p.name.endswith(".yaml"))


PER_RUN = ("out", "resume")  # where a run lives and what it continues: never taken from a preset file


def load_preset(name: str) -> dict[str, Any]:
    """A bundled preset by name, or a YAML file of fields by path (``.yaml``/``.yml``): one's own preset, or a run's
    ``config.yaml`` to repeat it (:func:`resolve` leaves its ``out`` and ``resume`` out: the repeat is a new run)."""
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        return _preset_file(Path(name).expanduser())
    names = preset_names()
    if name not in names:
        hint = difflib.get_close_matches(name, names, n=1)
        raise ConfigError(
            f"unknown preset {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") + f"; presets: {', '.join(names)}"
        )
    text = resources.files("ressl").joinpath(PRESET_DIR, f"{name}.yaml").read_text()
    values = yaml.safe_load(text) or {}
    check_fields(values, f"preset {name}")
    return values


def _preset_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"preset file {path} {'is a directory' if path.is_dir() else 'does not exist'}: give a .yaml file "
                          f"of configuration fields, or a preset name ({', '.join(preset_names())})")
    try:
        values = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as err:
        raise ConfigError(f"cannot read preset file {path}: {str(err).splitlines()[0]}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"preset file {path} must hold 'field: value' lines, found a {type(values).__name__}")
    check_fields(values, f"preset file {path}")
    return values


def check_fields(values: dict[str, Any], where: str) -> None:
    for key in values:
        if key not in FIELDS:
            hint = difflib.get_close_matches(key, list(FIELDS), n=1)
            raise ConfigError(f"unknown field {key!r} in {where}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))


def field_types(name: str) -> tuple[list[type], bool]:
    """The concrete types a field accepts and whether it is optional (``X | None``)."""
    hint = typing.get_type_hints(Config)[name]
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    optional = type(None) in args
    return [a for a in args if a is not type(None)], optional


def coerce(name: str, value: Any) -> Any:
    """Check ``value`` against the field's type, converting strings from the command line."""
    kinds, optional = field_types(name)
    if value is None or (isinstance(value, str) and value.lower() in {"none", "null"} and optional):
        if optional:
            return None
        raise ConfigError(f"{name} cannot be empty; give a {kinds[0].__name__}")
    kind = typing.get_origin(kinds[0]) or kinds[0]
    if kind is str and isinstance(value, str) and not value.strip():  # --data "$DATA" with DATA unset
        raise ConfigError(f"{name} is empty (an unset shell variable?): give a value")
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in {"true", "yes", "1", "on"}:
                return True
            if str(value).lower() in {"false", "no", "0", "off"}:
                return False
            raise ValueError
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError
        if kind is dict:
            if not isinstance(value, dict):
                raise ValueError
            return value
        converted = kind(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        words = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}.get(kind.__name__, f"a {kind.__name__}")
        raise ConfigError(f"{name} must be {words}{' or none' if optional else ''}, got {value!r}") from None
    if kind is float and not math.isfinite(converted):
        raise ConfigError(f"{name} must be a finite number{' or none' if optional else ''}, got {value!r}")
    return converted


def resolve(preset: str | None, overrides: dict[str, Any]) -> Config:
    """Defaults < preset < overrides, typed and validated."""
    values = {k: v for k, v in (load_preset(preset) if preset else {}).items() if k not in PER_RUN}
    check_fields(overrides, "the command line")
    values.update(overrides)
    cfg = Config(**{k: coerce(k, v) for k, v in values.items()})
    validate(cfg)
    # absolute paths: the run's config.yaml and checkpoints must still find them from another working directory
    cfg.data = absolute(cfg.data)
    cfg.resume = absolute(cfg.resume)
    cfg.out = str(Path(cfg.out).expanduser()) if cfg.out else cfg.out  # --out '~/runs/x' as a shell would expand it
    return cfg


def absolute(path: str | None) -> str | None:
    """``path`` made absolute (``~`` expanded, symlinks resolved); none and empty strings stay as they are."""
    return str(Path(path).expanduser().resolve()) if path else path


def from_dict(values: dict[str, Any]) -> Config:
    """A configuration saved in a run directory or checkpoint (unknown keys are refused)."""
    check_fields(values, "the saved configuration")
    return Config(**{k: coerce(k, v) for k, v in values.items()})


SMALL_IMAGE_MAX = 64  # up to this size the paper's 3x3/1 stem convolution replaces ImageNet's 7x7/2 one


def stem(small_stem: bool | None, stem_maxpool: bool | None, image_size: int) -> tuple[bool, bool]:
    """The network's stem as built: (3x3/1 convolution, max-pool after it), with each ``None`` worked out: the small
    stem for images of ``SMALL_IMAGE_MAX`` px or less, the max-pool only after the 7x7 stem."""
    small = small_stem if small_stem is not None else image_size <= SMALL_IMAGE_MAX
    return small, keeps_maxpool(small, stem_maxpool)


def keeps_maxpool(small_stem: bool, stem_maxpool: bool | None) -> bool:
    """Whether the max-pool follows the stem: ``stem_maxpool``, or if None only after the 7x7 stem (the paper)."""
    return stem_maxpool if stem_maxpool is not None else not small_stem


def min_image_size(cfg: Config) -> int:
    """The smallest images the network takes: its stem, max-pool and three stride-2 stages must leave the last
    stage at least 1x1 pixels."""
    small, maxpool = stem(cfg.small_stem, cfg.stem_maxpool, cfg.image_size)
    return (1 if small else 2) * (2 if maxpool else 1) * 8


POSITIVE = ("epochs", "batch_size", "queue_size", "image_size", "width", "hidden_dim", "out_dim", "knn_k", "log_every",
            "eval_batch_size", "lr", "student_temperature", "teacher_temperature", "knn_temperature", "knn_subset")
NON_NEGATIVE = ("weight_decay", "warmup_epochs", "workers", "checkpoint_every", "knn_every", "seed")
CHOICES = {"backbone": ("resnet18", "resnet34", "resnet50"),  # ressl.model.BACKBONES builds them
           "teacher_bn": ("shuffle", "sync", "local"), "jitter_order": ("batch", "sample"),
           "augment_backend": ("batched", "torchvision"), "precision": ("auto", "bf16", "fp32")}


def validate(cfg: Config, world_size: int = 1) -> None:
    """Refuse, with one line that names the fix, a configuration that cannot run, or that would fail mid-run
    (``world_size``: the processes the batch is split over)."""
    check_dataset(cfg.dataset)
    if cfg.dataset == "digits" and cfg.data is not None:  # it would read the directory as images, with the demo's recipe
        raise ConfigError(f"dataset digits is scikit-learn's embedded set and reads no --data: for {cfg.data}, pass "
                          "--dataset folder (images) or --dataset npz (train.npz/test.npz), or leave out --dataset")
    if cfg.download and cfg.dataset not in DOWNLOADABLE:  # it would be ignored: a folder or npz arrays are read as they are
        raise ConfigError(f"--download fetches {', '.join(DOWNLOADABLE)} only (pass --dataset or --preset with one of them), "
                          f"not {cfg.dataset}: otherwise leave out --download")
    for name in POSITIVE:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(cfg, name)}")
    for name in NON_NEGATIVE:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be 0 or more, got {getattr(cfg, name)}")
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise ConfigError(f"{name} must be {', '.join(choices[:-1])} or {choices[-1]}, got {getattr(cfg, name)!r}")
    if cfg.seed >= 2**32:  # generators are seeded with seed * 1_000_003 + epoch (batches.epoch_seed), within 64 bits
        raise ConfigError(f"seed must be below 2**32 = {2**32}, got {cfg.seed}")
    if cfg.max_minutes is not None and cfg.max_minutes < 0:
        raise ConfigError(f"max_minutes must be 0 or more (0 or none: no limit), got {cfg.max_minutes}")
    if not 0.0 <= cfg.sgd_momentum < 1.0:
        raise ConfigError(f"sgd_momentum must be in [0, 1), got {cfg.sgd_momentum}")
    if not 0.0 <= cfg.max_bad_fraction <= 1.0:
        raise ConfigError(f"max_bad_fraction must be in [0, 1], got {cfg.max_bad_fraction}")
    check_device(cfg.device)
    if not 0.0 <= cfg.ema_momentum <= 1.0:
        raise ConfigError(f"ema_momentum must be in [0, 1], got {cfg.ema_momentum}")
    if not 0.0 < cfg.crop_min_scale <= 1.0:
        raise ConfigError(f"crop_min_scale must be in (0, 1], got {cfg.crop_min_scale}")
    if cfg.batch_size % world_size != 0:
        raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by the {world_size} processes")
    if cfg.queue_size % cfg.batch_size != 0:
        raise ConfigError(
            f"queue_size {cfg.queue_size} is not a multiple of the global batch {cfg.batch_size}: "
            f"use e.g. --queue_size {max(1, round(cfg.queue_size / cfg.batch_size)) * cfg.batch_size}"
        )
    smallest = min_image_size(cfg)
    if cfg.image_size < smallest:
        small, maxpool = stem(cfg.small_stem, cfg.stem_maxpool, cfg.image_size)
        shrink = " or use --small_stem true" if not small else " or use --stem_maxpool false" if maxpool else ""
        raise ConfigError(f"image_size {cfg.image_size} is too small for {cfg.backbone} with this stem (at least "
                          f"{smallest}): raise --image_size{shrink}")
    for name in ("bn_groups", "student_bn_groups"):
        _check_groups(cfg.batch_size, world_size, name, getattr(cfg, name))
        if getattr(cfg, name) > 1 and world_size > 1 and cfg.teacher_bn == "sync":  # SyncBatchNorm would replace them
            raise ConfigError(f"{name} {getattr(cfg, name)} normalises groups of each process's batch apart; "
                              "--teacher_bn sync normalises over every process's: drop one")
    if cfg.bn_groups > 1 and world_size > 1 and cfg.teacher_bn == "shuffle":
        raise ConfigError(f"bn_groups {cfg.bn_groups} emulates shuffle-BN on one device; with {world_size} processes "
                          "--teacher_bn shuffle shuffles across them instead: drop --bn_groups")
    if cfg.augment_steps < 1:
        raise ConfigError(f"augment_steps must be at least 1, got {cfg.augment_steps}")


def _check_groups(batch_size: int, world_size: int, name: str, groups: int) -> None:
    """Refuse BatchNorm groups (``bn_groups``, ``student_bn_groups``) that do not split the per-process batch into
    groups of at least 2 images."""
    per_process = batch_size // world_size
    if groups < 1 or per_process % groups != 0:
        raise ConfigError(f"{name} {groups} must be at least 1 and divide the per-process batch {per_process}")
    if per_process // groups < 2:  # a BatchNorm over one image has nothing to normalise by
        where = f" per process ({world_size} processes)" if world_size > 1 else ""
        raise ConfigError(f"batch_size {batch_size} gives {per_process // groups} image{where} to each "
                          f"BatchNorm{f' group ({name} {groups})' if groups > 1 else ''}: it needs at least 2; "
                          "raise --batch_size" + (f" or lower --{name}" if groups > 1 else ""))


def check_dataset(name: str) -> None:
    """Refuse a dataset name we cannot read, suggesting the nearest known one."""
    if name not in DATASETS:
        hint = difflib.get_close_matches(name, DATASETS, n=1)
        raise ConfigError(f"unknown dataset {name!r}{f' (did you mean {hint[0]}?)' if hint else ''}; choose one of "
                          f"{', '.join(DATASETS)} (npz: a directory of train.npz/test.npz; folder: a directory of images)")


def check_device(name: str, flag: str = "device") -> None:
    """Refuse a device other than ``auto`` (ours: CUDA when there is one), ``cpu``, ``cuda`` or ``cuda:N``: the code
    runs and is tested on those two types (a ``cpu:1`` run would write checkpoints that cannot be resumed)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ConfigError(f"{flag} must be auto, cpu, cuda or cuda:N, got {name!r}")


def default_out(cfg: Config) -> Path:
    """Where a run without ``--out`` writes: ``runs/DATASET-YYYYMMDD-HHMMSS``."""
    return Path("runs") / f"{cfg.dataset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def check_output(path: str | Path, flag: str, file_example: str | None = None) -> Path:
    """Refuse an output path that cannot be made: a file where a run directory goes (``file_example`` None) or a
    directory where a file goes (``file_example``, e.g. ``features.npy``), an existing file without
    ``file_example``'s suffix (a run's ``checkpoint.pt`` named by mistake), an existing file on the way, or a
    location without write permission. Returns the path, ``~`` expanded."""
    out = Path(path).expanduser()
    if file_example is None and out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {path} is an existing file, not a directory: choose another {flag}")
    if file_example is not None and out.is_dir():
        raise ConfigError(f"{flag} {path} is a directory: give a file name, e.g. {out / file_example}")
    if out.exists():
        suffix = Path(file_example).suffix if file_example else ""
        if suffix and out.suffix != suffix:  # e.g. the run's checkpoint.pt or config.yaml: never overwritten
            raise ConfigError(f"{flag} {path} exists and is not a {suffix} file: it would be overwritten; "
                              f"give a new name, e.g. {out.with_suffix(suffix).name}")
        if not os.access(out, os.W_OK):
            raise ConfigError(f"{flag} {path} cannot be written: no write permission; choose another {flag}")
        return out
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path} cannot be created: {parent} is a file, not a directory; choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path} cannot be written: no write permission in {parent}; choose another {flag}")
    return out


def save(cfg: Config, path: Path) -> None:
    """``cfg`` as YAML in ``path`` (a run's ``config.yaml``); a failed write is a one-line ``WriteError``."""
    from ressl.checkpoint import write_run_file

    write_run_file(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
