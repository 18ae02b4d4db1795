"""What the training loop reports and watches: the metric log, the progress bar, the NaN watch, and when to stop.

:class:`Meter` is the loop's one companion object. Between logging steps it keeps the loss on the device (no host
sync); at a logging step it writes ``metrics.jsonl`` (and TensorBoard events when installed), checks that no loss
was NaN or infinite, and agrees with the other processes on a stop that a signal (or, under torchrun, one
process's unreadable images) asked for.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ressl import dist, progress
from ressl.checkpoint import write_run_file, writing
from ressl.data import pool_failures
from ressl.errors import NonFiniteLoss
from ressl.monitor import health, queue_fill

if TYPE_CHECKING:
    from ressl.config import Config
    from ressl.train import Run


STOP_CHECK_SECONDS = 5.0  # torchrun: the longest a stop request waits for the processes to agree on it (a launcher
#   or scheduler kills them some 30 s after its SIGTERM: torchrun's default grace, a common SLURM KillWait)


def _evaluation_of(record: dict[str, Any] | None, step: int) -> bool:
    return record is not None and record.get("step") == step and "knn_top1" in record and "loss" not in record


class MetricsLog:
    """Append-only JSON lines, written by rank 0 only; the same scalars as TensorBoard events when
    ``tensorboard`` is installed (``pip install ressl[tensorboard]``), in ``RUN_DIR/tensorboard``. Under torchrun
    every process calls its methods at the same points and learns whether rank 0's write failed
    (:func:`ressl.dist.main_writes` on ``device``), unless told not to agree (after an error)."""

    def __init__(self, path: Path, device: torch.device) -> None:
        self.path, self.device = path, device
        self._board: Any = None

    def write(self, *, agree: bool = True, **record: Any) -> None:
        dist.main_writes(lambda: self._append(record), self.device, agree)

    def _append(self, record: dict[str, Any]) -> None:
        write_run_file(self.path, json.dumps(record) + "\n", mode="a")
        with writing(f"TensorBoard events in {self.path.parent / 'tensorboard'}"):
            board = self._tensorboard()
            if board is not None:
                for key, value in record.items():
                    if key not in ("step", "epoch") and isinstance(value, (int, float)):
                        board.add_scalar(key, value, record.get("step", 0))
                board.flush()

    def forget_evaluation(self, step: int) -> None:
        """Drop the kNN records (no loss) of ``step``: a final kNN measured again is logged once."""
        self._keep(lambda record: not _evaluation_of(record, step))

    def keep_until(self, step: int) -> None:
        """Drop the records of steps after ``step`` (logged after the checkpoint a run resumes from, and logged
        again as it retrains them), so that every step has one record, and any line a killed process left torn;
        the file is replaced atomically."""
        self._keep(lambda record: record is not None and record.get("step", 0) <= step)

    def _keep(self, wanted: Callable[[dict[str, Any] | None], bool]) -> None:
        """Rewrite the log (rank 0) with the lines whose record (None: a torn line) is ``wanted``, if any is not."""
        def rewrite() -> None:
            if not self.path.exists():
                return
            lines = self.path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if wanted(parse_record(line))]
            if len(kept) < len(lines):
                write_run_file(self.path, "".join(kept))

        dist.main_writes(rewrite, self.device)

    def _tensorboard(self) -> Any:
        if self._board is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                self._board = False
                return None
            except Exception as err:  # noqa: BLE001 - installed but broken (a protobuf it does not know, say)
                warnings.warn(f"TensorBoard is installed but could not be loaded ({type(err).__name__}: {err}); the run goes "
                              "on, its metrics in metrics.jsonl only", RuntimeWarning, stacklevel=2)
                self._board = False
                return None
            self._board = SummaryWriter(str(self.path.parent / "tensorboard"))
        return self._board or None


def parse_record(line: str) -> dict[str, Any] | None:
    """One line of ``metrics.jsonl`` as its record, or None for a torn line (a run killed mid-write) or an empty one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a torn last line (a run killed mid-write) is skipped."""
    if not path.is_file():
        return []
    return [record for line in path.read_text().splitlines() if (record := parse_record(line)) is not None]


def checkpoint_due(cfg: Config, step: int) -> bool:
    """Whether a mid-epoch checkpoint is written after step number ``step`` (counted from 1)."""
    return cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0


def _defer_logs(device: torch.device) -> bool:
    """Whether a logged step's numbers are read back one logging window later: on a GPU, reading them at once
    would make the host wait for the GPU and leave it idle while the host prepares the next step."""
    return device.type == "cuda"


def _to_host(values: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """``values`` on their way to the host, and what to wait on before reading them: on a GPU a copy into pinned
    memory and the CUDA event that follows it (and all the work queued before it); elsewhere themselves and None."""
    if not values.is_cuda:
        return values, None
    values = values.to("cpu", non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return values, event


class Meter:
    """What the loop reports: metrics every ``log_every`` steps, the progress bar, and a NaN watch.

    Losses stay on the device between logging steps; ``first_bad_step`` records the first
    non-finite loss without a host sync, and is checked before anything is logged or saved.
    On a GPU a logged step's numbers travel to the host without a wait and are written at the next
    logged step; before a checkpoint, a stop or the epoch's end they are written at once.
    """

    def __init__(self, run: Run, first_bad_step: torch.Tensor) -> None:
        self.run, self.first_bad_step = run, first_bad_step
        self.progress = _progress(run)
        self.signals: dict[str, torch.Tensor] = {}
        self.window_start, self.window_images, self.window_steps = time.perf_counter(), 0, 0
        self.defer = _defer_logs(run.device)
        self.at_log_step = False
        self.pending: tuple[dict[str, Any], list[str], torch.Tensor, torch.cuda.Event | None] | None = None

    def _due(self, step: int, index: int) -> bool:
        """Whether step number ``step``, the ``index``-th of its epoch (both counted from 1), is logged."""
        cfg = self.run.cfg
        return step % cfg.log_every == 0 or index == self.run.steps_per_epoch or checkpoint_due(cfg, step)

    def observe(self, loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor) -> None:
        """A step's loss (0-dim, kept on the device) and embeddings, student (B, D) and teacher (B, D): the health
        signals are computed from them at logging steps only."""
        step = self.run.state.step + 1
        self.loss = loss.detach()
        self.first_bad_step = mark_non_finite(self.first_bad_step, self.loss, step)
        self.window_images += teacher.shape[0] * dist.world_size()
        if self._due(step, self.run.state.index + 1):
            cfg = self.run.cfg
            self.signals = health(student.detach(), teacher, self.run.model.queue.queue, cfg.student_temperature, cfg.teacher_temperature)

    def end_step(self, lr: float, momentum: float) -> bool:
        """Log if due; return whether to stop now (a signal arrived, agreed by every process).

        Under torchrun the processes agree on a stop at logging steps, and in between every ``run.stop_check_every`` steps:
        as many as run in :data:`STOP_CHECK_SECONDS` on the slowest process (measured at each logging step), so that
        a scheduler's SIGTERM is answered with a checkpoint before its SIGKILL, whatever ``--log_every``.
        """
        run, state = self.run, self.run.state
        due = self._due(state.step, state.index)
        self.at_log_step = due  # where processes also agree on the time budget (ressl.train._late)
        self.window_steps += 1
        seconds = (time.perf_counter() - self.window_start) / self.window_steps
        stop, slowest = _stop_agreed(run, due or state.step % run.stop_check_every == 0, seconds if due else 0.0)
        if due:
            run.stop_check_every = max(1, min(run.cfg.log_every, int(STOP_CHECK_SECONDS / max(slowest, 1e-6))))
        if due or stop:
            self._log(lr, momentum, last=stop)
        if self.progress is not None:
            self.progress.update(1)
        return stop

    def log_last_step(self, lr: float, momentum: float) -> None:
        """Log the step that :meth:`end_step` just ended, if it did not: the loop stops there (its time is up), and
        the checkpoint it saves should find that step's loss in ``metrics.jsonl``, as a stop by a signal does."""
        if not self.at_log_step:
            self._log(lr, momentum, last=True)

    def _log(self, lr: float, momentum: float, last: bool) -> None:
        """Log the step just ended; ``last``: the loop stops after it, so its numbers are written now.

        The window's images/s are read after the waits for the device: on a GPU the host runs ahead of it, and a
        window timed on the host alone counted the host's launches, not the GPU's work (a wait between two windows
        belongs to neither). Waiting first, each window ends where the device has done a logged step, and the windows
        of a call add up to its time."""
        run, state = self.run, self.run.state
        self._flush()  # the previous logged step's, if it waits: when this returns, the device has done that step
        record = dict(step=state.step, epoch=state.epoch, lr=lr, ema_momentum=momentum, images_per_s=0.0,
                      queue_fill=queue_fill(state.step, run.cfg.batch_size, run.cfg.queue_size))
        self._stage(record)
        at_once = not self.defer or last or checkpoint_due(run.cfg, state.step) or state.index == run.steps_per_epoch
        if at_once:
            self._arrived()  # the device has done this step
        now = time.perf_counter()
        record["images_per_s"] = self.window_images / (now - self.window_start)
        self.window_start, self.window_images, self.window_steps = now, 0, 0
        if at_once:
            self._flush()  # before anything is saved: a bad step never reaches a checkpoint

    def _stage(self, record: dict[str, Any]) -> None:
        """Start the logged step's device numbers (loss, health signals, NaN watch) on their way to the host. The
        signals are this step's, measured when it was due (a stop between logging steps logs its loss alone)."""
        names = ["loss", *self.signals]
        values = torch.stack([v.detach().double() for v in (self.loss, *self.signals.values(), self.first_bad_step)])
        self.signals = {}
        self.pending = (record, names, *_to_host(values))

    def _arrived(self) -> None:
        """Wait until the staged step's numbers are on the host (on a GPU: until it has done that step)."""
        if self.pending is not None and self.pending[3] is not None:
            self.pending[3].synchronize()

    def _flush(self, agree: bool = True) -> None:
        """Check and write the staged step's numbers (a no-op when none wait). Under torchrun the processes agree
        on a NaN first (``agree``, when all flush at the same step): a loss that broke in one process alone stops
        them all, instead of the others going on to wait for it in the next step's collectives."""
        if self.pending is None:
            return
        self._arrived()
        record, names, values, _ = self.pending
        self.pending = None
        *numbers, first_bad = values.tolist()
        if agree and dist.is_distributed():  # the earliest bad step of any process (-1: none was)
            none = float(2**53)
            earliest = -dist.max_each([-(first_bad if first_bad >= 0 else none)], self.run.device)[0]
            first_bad = -1 if earliest >= none else earliest
        _check_finite(int(first_bad), self.run.out / "checkpoint.pt")
        logged = dict(zip(names, numbers))
        self.run.state.loss = logged_loss = logged["loss"]
        self.run.log.write(agree=agree, step=record.pop("step"), epoch=record.pop("epoch"), loss=logged.pop("loss"), **record,
                           **logged)
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{logged_loss:.3f}", lr=f"{record['lr']:.4f}", img_s=f"{record['images_per_s']:.0f}",
                                      refresh=progress.live())

    def __enter__(self) -> Meter:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, error: type[BaseException] | None, *_: object) -> None:
        """Write what waits, and close the progress bar. After an error the processes may not all be here: no
        agreement then."""
        try:
            self._flush(agree=error is None)
        finally:
            if self.progress is not None:
                self.progress.close()


def _stop_agreed(run: Run, check: bool, step_seconds: float) -> tuple[bool, float]:
    """Whether to stop now, and the slowest process's ``step_seconds``. Distributed, the processes agree where
    ``check`` says (the same steps on all) so that all stop together; a process whose images failed to load
    (``run.data_error``) asks for a stop too, and every process then holds the messages of all that did. Their
    records of broken image files are pooled there too: too many broken in all stops every process with one message."""
    if not dist.is_distributed():
        return run.stop_requested, step_seconds
    if not check:
        return False, step_seconds
    asked, slowest = dist.max_each([2 if run.data_error else 1 if run.stop_requested else 0, step_seconds], run.device)
    too_many = pool_failures(run.dataset.train, run.device)  # the files every process found broken, in each
    if asked == 2:
        run.data_error = "\n".join(dist.messages_of_all(run.data_error))
    elif too_many:
        run.data_error = too_many
    return asked > 0 or too_many is not None, slowest


def mark_non_finite(first_bad_step: torch.Tensor, loss: torch.Tensor, step: int) -> torch.Tensor:
    """``step`` if ``loss`` is NaN/inf and no earlier step was, else ``first_bad_step`` (-1: none yet); on the device, no sync."""
    return torch.where((first_bad_step < 0) & ~torch.isfinite(loss.detach()), step, first_bad_step)


def checkpoint_kept(path: Path) -> str:
    """What a failed run leaves: the checkpoint at ``path`` as it was, or none."""
    return f"the last good checkpoint, {path}, is kept" if path.exists() else "no checkpoint had been written yet"


def _check_finite(bad: int, path: Path) -> None:
    """Raise if ``bad``, the first non-finite step (-1: none), is one."""
    if bad >= 0:
        raise NonFiniteLoss(
            f"the loss became NaN or infinite at step {bad}: lower --lr, raise --teacher_temperature/--student_temperature, "
            f"or try --precision fp32; {checkpoint_kept(path)}"
        )


def _progress(run: Run) -> Any:
    """The epoch's progress bar on rank 0: live on a terminal, a state a minute in a log, so that a long run's log
    stays small (with a state per step, the digits demo's 2,100 steps wrote 195 KB of them to a log file)."""
    if not dist.is_main():
        return None
    return progress.bar(total=run.steps_per_epoch, initial=run.state.index, desc=f"epoch {run.state.epoch + 1}/{run.cfg.epochs}",
                        unit="step")
