"""Errors that reach the user as one line and an exit code, never a traceback."""


class UserError(Exception):
    """Bad input from the user (a file, key or value); the message names it."""

    exit_code = 2
