"""Errors a user can cause. Their message is one sentence that says what to do; the command line
prints it without a traceback."""


class UserError(Exception):
    """A bad input, path, config or checkpoint: something the user can fix."""


def worker_sentence(e: Exception) -> str:
    """The one sentence of an error. A `UserError` raised in a DataLoader worker reaches the main
    process with the worker's traceback in its message ("Caught UserError in DataLoader worker process
    0. Original Traceback ..."): its last line, less the exception name, is the sentence."""
    text = str(e).strip()
    if text.startswith("Caught ") or "Traceback (most recent call last)" in text:
        last = text.splitlines()[-1]
        name, _, rest = last.partition(": ")
        text = rest if rest and name.endswith(("Error", "Exception")) else last
    return text
