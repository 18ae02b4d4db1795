"""The errors and warnings users see, each a message of one line that names the fix (the CLI prints it as such).
Torch-free, so that the command line can name them before torch loads."""

from __future__ import annotations


class DataError(Exception):
    """A user-facing data problem; the message is one line that names the fix."""


class LateDataError(DataError):
    """A data problem met after the scan, while training or evaluating (files that became unreadable since). Under
    torchrun it may hit one process alone: the processes agree to stop together, and the message, the same on every
    process, is one line per process that met it, ``[rank R] MESSAGE``."""


def own_message(err: Exception) -> str:
    """``err``'s own message. An error that a loader worker raised comes back with the worker's traceback in its
    message (``Caught DataError in DataLoader worker process 1. Original Traceback ...``): its last line is the
    error as raised, ``ressl.errors.DataError: MESSAGE``."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


WORKER_DIED = " (if the host ran out of memory: lower --workers)"  # what a message of a loader worker's death ends with


def load_failure(err: Exception) -> str | None:
    """The message of ``err`` when it is a failure to load images (a :class:`DataError`, or any error in a loader
    worker, one that died included: the host's out-of-memory killer, a crash in an image decoder), else None."""
    if isinstance(err, DataError):
        return own_message(err)
    if "DataLoader worker" not in str(err):
        return None
    message = own_message(err)
    died = "exited unexpectedly" in message or "killed by signal" in message
    return message + WORKER_DIED if died else message


def how_to_continue(failure: str) -> str:
    """What a run stopped by ``failure`` (:func:`load_failure`'s messages, one line per process that met one) asks
    of the user before the same command continues it: to fix the files, unless only loader workers died."""
    files = any(not line.endswith(WORKER_DIED) for line in failure.splitlines())
    return ("fix or delete the files and " if files else "") + "run the same command to continue"


class DataWarning(UserWarning):
    """Warning about skipped or replaced image files (filterable category); shown as one line, without source."""


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or unsafe; the message is one line that names the fix."""


class WriteError(Exception):
    """A file a command writes (a checkpoint, config.yaml, metrics.jsonl, final.json, an export, embeddings, a
    report) could not be written: a full disk, no permission. The message is one line that names the fix; what the
    file held before is intact."""


class StoppedWithRankZero(Exception):
    """Under torchrun: rank 0 failed to write a file of the run (its own error says why, once); every other process
    stops with it at the same point, silently, with exit code 1."""


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived; a checkpoint was saved at the step boundary."""
