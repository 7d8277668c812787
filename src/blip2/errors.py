"""Errors a user can cause. Their message is one sentence that says what to do; the command line
prints it without a traceback."""

# the command line's exit statuses: all done; the command ran but some inputs failed; a usage error
# (one sentence on stderr); interrupted
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UserError(Exception):
    """A bad input, path, config or checkpoint: something the user can fix."""


class InputFailed(UserError):
    """A run stopped at one of its inputs (e.g. an image `blip2 eval` cannot read): the command line
    exits with 1 (some inputs failed), not with 2 (a usage error)."""
