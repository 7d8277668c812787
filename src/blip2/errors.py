"""Errors a user can cause. Their message is one sentence that says what to do; the command line
prints it without a traceback."""


class UserError(Exception):
    """A bad input, path, config or checkpoint: something the user can fix."""


class InputFailed(UserError):
    """A run stopped at one of its inputs (e.g. an image `blip2 eval` cannot read): the command line
    exits with 1 (some inputs failed), not with 2 (a usage error)."""
