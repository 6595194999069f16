"""Errors a user caused: shown as one line, never as a traceback."""


class UserError(Exception):
    """Bad input or an impossible request; the message says what to do."""

    exit_code = 1
