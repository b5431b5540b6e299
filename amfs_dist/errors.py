"""Errors that reach the user as one line and an exit code, never a traceback."""


class UserError(Exception):
    """Bad input from the user (a file, key or value); the message names it."""

    exit_code = 2


class RunStopped(Exception):
    """The run was asked to stop (SIGINT, SIGTERM, SIGUSR1) and checkpointed at a step boundary."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention for "ended by signal N"
