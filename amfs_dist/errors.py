"""Errors that reach the user as one line and an exit code, never a traceback.

They live here, not in the modules that raise them, so that the trainer and every backend
(in-process or distributed) can import them without importing each other.
"""


class UserError(Exception):
    """Bad input from the user (a file, key or value); the message names it."""

    exit_code = 2


class TrainingError(UserError):
    """The run cannot go on (e.g. too many steps without a finite gradient); a checkpoint is kept."""

    exit_code = 1


class WorkerFailedError(TrainingError):
    """A shard worker failed more often than dist.max_worker_restarts, or its code raised."""


class RunStopped(Exception):
    """The run was asked to stop (SIGINT, SIGTERM, SIGUSR1) and checkpointed at a step boundary."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention for "ended by signal N"
