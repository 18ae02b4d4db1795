"""What the launcher (``torchrun`` or ``srun``) told this process, read from the environment alone: known before
any process group exists, and without importing torch, so that the command line parses and reports its mistakes
at once. ``ressl.dist`` offers the same functions next to the ones that need the process group."""

from __future__ import annotations

import os


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched_world_size() -> int:
    """How many processes the launcher started (torchrun's ``WORLD_SIZE``, an srun step's tasks), read from the
    environment: known before any process group exists, and by commands that never join one."""
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_STEP_NUM_TASKS", "1")))


def launched_rank() -> int:
    """This process's rank as the launcher set it (``RANK``, or ``SLURM_PROCID`` in an srun step); 0 alone."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    return int(os.environ.get("SLURM_PROCID", "0")) if "SLURM_STEP_NUM_TASKS" in os.environ else 0


def speaks_for_machine() -> bool:
    """Whether this process reports what every process of its machine would report alike (a mistake in the
    command or in the files it names): the first process of each machine under torchrun (``LOCAL_RANK``) or
    ``srun`` (``SLURM_LOCALID``), read from the environment, so before the process group exists; a single
    process always. A machine's terminal shows such an error once, not once per GPU."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))) == 0
