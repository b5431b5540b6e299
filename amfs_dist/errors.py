"""Errors that reach the user as one line and an exit code, never a traceback."""


class UserError(Exception):
    """Bad input from the user (a file, key or value); the message names it."""

    exit_code = 2


class TrainingError(UserError):
    """The run cannot go on (e.g. too many steps without a finite gradient); a checkpoint is kept."""

    exit_code = 1
