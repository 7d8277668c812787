"""Errors a user can cause. Their message is one sentence that says what to do; the command line
prints it without a traceback."""


class UserError(Exception):
    """A bad input, path, config or checkpoint: something the user can fix."""
