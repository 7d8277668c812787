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


def worker_sentence(e: Exception) -> str:
    """The one sentence of an error. A `UserError` raised in a DataLoader worker reaches the main
    process with the worker's traceback in its message ("Caught UserError in DataLoader worker process
    0. Original Traceback ..."): its last line, less the exception name, is the sentence."""
    text = str(e).strip()
    if text.startswith("Caught ") or "Traceback (most recent call last)" in text:
        last = text.splitlines()[-1]
        kind, _, rest = last.partition(": ")  # "module.ExceptionType: sentence"
        text = rest if rest and kind.replace(".", "").replace("_", "").isalnum() else last
    return text
