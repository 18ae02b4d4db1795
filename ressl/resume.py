"""Continuing runs: a run's checkpoint, resuming from one, and the command line that does it.

:func:`save_checkpoint` writes what :func:`resume` reads back into a :class:`ressl.train.Run` built by
:func:`ressl.train.setup`: weights, optimiser, the loop's place, random-number states and the configuration, which a
resume checks against its own (refusing what the weights depend on, naming the training values that changed).
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ressl import checkpoint, config, dist, progress
from ressl.errors import NonFiniteLoss
from ressl.meter import checkpoint_kept

if TYPE_CHECKING:
    from ressl.train import Run


def exists_everywhere(path: Path, device: torch.device, what: str = "--out") -> bool:
    """Whether ``path`` exists. Under torchrun every process must see the same, or one would resume while another
    starts afresh: a run directory (or ``--resume``) that some machines cannot see is refused on all of them."""
    here = path.exists()
    if dist.is_distributed() and dist.any_rank(here, device) and dist.any_rank(not here, device):
        raise config.ConfigError(f"{path} exists for some processes and not for others: {what} must be on a filesystem "
                                 "that every machine of the job shares")
    return here


# a checkpoint trained with other values of these is meaningless to continue
# (batch_size: the checkpoint's place in its epoch and the step-based schedules count its batches)
# (the stem is compared as built: small_stem and stem_maxpool may be None, worked out from the image size)
RESUME_KEYS = ("dataset", "backbone", "width", "image_size", "queue_size", "out_dim", "hidden_dim", "head_bn", "batch_size")
# these may change on a resume (the run goes on with the new values), but a resume says which did: a run continued
# by a newer ressl whose defaults moved (the tenth session's blur, warm-up and decay) would otherwise change silently;
# more epochs stretch the cosine schedules, so the learning rate rises again where the run goes on
RECIPE_KEYS = ("epochs", "student_temperature", "teacher_temperature", "ema_momentum", "ema_cosine", "teacher_strong", "blur",
               "crop_min_scale", "jitter_order", "augment_backend", "flip", "teacher_bn", "bn_groups", "lr", "weight_decay",
               "decay_bn_bias", "sgd_momentum", "warmup_epochs", "precision", "student_bn_groups")
_UNSAVED = {"student_bn_groups": 1}  # what runs saved before these keys existed trained with


def _flag_value(value: object) -> str:
    """A saved configuration value as a flag takes it: ``true``/``false``, ``none``, numbers and names as they are."""
    return str(value).lower() if value is None or isinstance(value, bool) else str(value)


def resume(run: Run, path: Path) -> None:
    """Continue from ``path``; refuse when the configuration differs in what the weights depend on."""
    saved = checkpoint.load(path)  # on the CPU, where the random-number states must be; the weights are copied over
    missing = {"optimizer", "state", "shuffle_generator", "rng"} - set(saved)
    if missing:
        raise checkpoint.CheckpointError(f"{path} lacks {', '.join(sorted(missing))} (written by another version?): "
                                         "use another --out for a new run")
    old = saved["config"]
    changed = [k for k in RESUME_KEYS if old.get(k) != getattr(run.cfg, k)]
    moved = bool(old.get("data") and run.cfg.data) and Path(old["data"]).expanduser().resolve() != Path(run.cfg.data).expanduser().resolve()
    new_run = "leave out --resume" if run.cfg.resume else "pass another --out"  # the checkpoint named, or --out's own
    if changed:
        raise config.ConfigError(
            f"{path} was trained with a different {', '.join(changed)} ({', '.join(f'{k}={old.get(k)!r}' for k in changed)}): "
            f"pass {' '.join(f'--{k} {_flag_value(old.get(k))}' for k in changed)} to continue it, or {new_run} for a new run"
        )
    # a checkpoint from before stem_maxpool existed holds none (no max-pool after the 3x3 stem), as does --stem_maxpool false
    built = config.stem(old.get("small_stem"), old.get("stem_maxpool"), run.cfg.image_size)
    if built != config.stem(run.cfg.small_stem, run.cfg.stem_maxpool, run.cfg.image_size):
        small, maxpool = (_flag_value(b) for b in built)
        raise config.ConfigError(
            f"{path} was trained with another stem (small_stem {small}, stem_maxpool {maxpool}): "
            f"pass --small_stem {small} --stem_maxpool {maxpool} to continue it, or {new_run} for a new run")
    run.model.load_state_dict(saved["model"])
    asked = [(group["weight_decay"], group["momentum"]) for group in run.optimizer.param_groups]
    run.optimizer.load_state_dict(saved["optimizer"])  # which also brings back the saved decay and momentum: not those
    for group, (decay, momentum) in zip(run.optimizer.param_groups, asked):
        group["weight_decay"], group["momentum"] = decay, momentum
    run.state = type(run.state)(**saved["state"])  # a TrainState
    if run.state.epoch + (run.state.index > 0) > run.cfg.epochs:  # the schedule would end before where the run is
        raise config.ConfigError(f"{path} is at epoch {run.state.epoch} (+{run.state.index} steps), past --epochs "
                                 f"{run.cfg.epochs}: pass --epochs {run.state.epoch + (run.state.index > 0)} or more, "
                                 "or another --out for a new run")
    minutes = float(saved.get("minutes", 0.0))  # older checkpoints: the clock starts now
    run.clock = time.time() - 60 * minutes
    world = saved.get("world_size", len(saved.get("generators", ())) or None)  # older checkpoints: a generator per process
    # from the checkpoint's minutes, not each process's clock: every process must come to the same answer
    trained = run.state.epoch >= run.cfg.epochs or (run.cfg.max_minutes and minutes >= run.cfg.max_minutes)
    if world is not None and world != dist.world_size() and not trained:  # a finished run only measures its final kNN
        raise config.ConfigError(f"{path} was written by {world} processes, this run has {dist.world_size()}: "
                                 "resume with the same number of processes")
    run.shuffle_generator.set_state(saved["shuffle_generator"])
    checkpoint.set_rng_states(saved["rng"])
    images = saved.get("train_images")  # older checkpoints: unknown, unless the place in the epoch no longer exists
    resized = (images is not None and images != len(run.dataset.train)) or run.state.index >= run.steps_per_epoch
    if resized and not trained:  # a finished run keeps its steps (and its results): it has no epoch left to restart
        _restart_epoch(run, path, images)
    if path == run.out / "checkpoint.pt":
        run.log.keep_until(run.state.step)  # what was logged after this checkpoint is about to be logged again
    recipe = [f"{k} {old[k]!r} -> {getattr(run.cfg, k)!r}" if k in old else f"{k} -> {getattr(run.cfg, k)!r} (new since)"
              for k in RECIPE_KEYS if old.get(k, _UNSAVED.get(k, "unset")) != getattr(run.cfg, k)]
    if dist.is_main():
        if recipe and not trained:  # a finished run trains no further: nothing goes on with the new recipe
            progress.say(f"note: {path} was trained with another recipe; the run goes on with this one: "
                         f"{', '.join(recipe)}", flush=True)
        held = run.dataset.train.images is not None
        if saved.get("train_in_memory", held) != held and not trained:  # a folder (older checkpoints: not known)
            ways = ("held in memory, its views cut on the device", "read by loader workers, which cut its crops")
            progress.say(f"note: {path} was trained on the folder {ways[not saved['train_in_memory']]}; this run has it "
                         f"{ways[not held]} (--hold_in_memory): the views are drawn alike, not the same ones", flush=True)
        if moved and not trained:  # data copied elsewhere (a cluster job's local disk): the same images, as far as we can tell
            progress.say(f"note: {path} was trained on {old['data']}, this run reads --data {run.cfg.data}: continuing as if "
                         "they held the same images; pass another --out if they do not", flush=True)
        if not trained:  # a finished run is said to be complete, or to have its final kNN left, a moment later
            progress.say(f"resuming from {path}: epoch {run.state.epoch} (+{run.state.index} steps), step {run.state.step}",
                         flush=True)


def _restart_epoch(run: Run, path: Path, images: int | None) -> None:
    """The training set changed size since ``path`` was written (images added to or deleted from a folder): its
    place inside the epoch means nothing in the new order, so the epoch starts over, at the step the new epoch size
    puts it (the schedules follow the new size). Nothing trained is lost but the partial epoch's position."""
    state = run.state
    before = f"{images:,} training images" if images is not None else "another number of training images"
    state.step, state.index = state.epoch * run.steps_per_epoch, 0
    if dist.is_main():
        progress.say(f"{path} was written with {before}, the data now holds {len(run.dataset.train):,}: epoch "
                     f"{state.epoch + 1} starts over, at step {state.step}", flush=True)


def save_checkpoint(run: Run) -> None:
    """Write ``out/checkpoint.pt`` atomically (rank 0, and every process learns whether it could); refuse to
    overwrite the last good one with non-finite weights."""
    norms = torch._foreach_norm([p.detach() for p in run.model.student.parameters()])
    if not bool(torch.isfinite(torch.stack(norms)).all()):  # the same weights, so the same answer, on every rank
        raise NonFiniteLoss(f"the student's weights became NaN or infinite by step {run.state.step}: lower --lr "
                            f"or try --precision fp32; {checkpoint_kept(run.out / 'checkpoint.pt')}")
    dist.main_writes(lambda: checkpoint.save_atomic(_checkpoint_state(run), run.out / "checkpoint.pt"), run.device)


def _checkpoint_state(run: Run) -> dict[str, Any]:
    """What ``checkpoint.pt`` holds: everything a run needs to continue where it stopped."""
    return {
        "model": run.model.state_dict(),
        "optimizer": plain_learning_rates(run.optimizer.state_dict()),
        "state": dataclasses.asdict(run.state),
        "minutes": run.minutes(),  # --max_minutes counts the run's time over every invocation
        "world_size": dist.world_size(),  # the augmentation's parameters depend on the rank (ressl.views)
        "shuffle_generator": run.shuffle_generator.get_state(),
        "rng": checkpoint.rng_states(),
        "config": run.cfg.to_dict(),
        # the training images' per-channel mean and std: evaluations and exports normalise other images as these were
        "normalisation": {"mean": list(run.dataset.mean), "std": list(run.dataset.std)},
        "train_images": len(run.dataset.train),  # a resume onto a folder that changed since restarts the epoch
        "train_in_memory": run.dataset.train.images is not None,  # a folder held in memory, or read by loader workers
    }


def plain_learning_rates(state: dict[str, Any]) -> dict[str, Any]:
    """An optimiser's ``state_dict`` with each group's learning rate a number: a CUDA graph's run holds it in a 0-dim
    device tensor (:func:`ressl.train.capture_network_step`), which a machine without that device could not load."""
    groups = [dict(g, lr=float(g["lr"])) for g in state["param_groups"]]
    return dict(state, param_groups=groups)


def resume_command(out: Path) -> str:
    """How to continue a run stopped in ``out``: this process's own ``ressl`` command line again, with ``--out``
    added where it had none (the default run directory is new at every start)."""
    program = Path(sys.argv[0])
    if program.name != "ressl" and program.parent.name != "ressl":  # not the command line (python -m ressl): the API
        return f"call ressl.train.pretrain again with the same configuration and out={str(out)!r}"
    args = sys.argv[1:]
    if not any(a == "--out" or a.startswith("--out=") for a in args):
        args = [*args, "--out", str(out)]
    if dist.is_distributed():  # torchrun ... -m ressl ...: the launcher's own flags are not ours to repeat
        return f"run the same command again (with the same launcher): {shlex.join(['ressl', *args])}"
    # as it was typed (.venv/bin/ressl when no environment is active), or the interpreter that ran python -m ressl
    program_words = [sys.argv[0]] if program.name == "ressl" else [sys.executable, "-m", "ressl"]
    return f"run the same command again: {shlex.join([*program_words, *args])}"
