"""User-facing errors.

A `TandemError` is a mistake the user can fix (a bad path, a broken file, a prompt that is too
long). Its message names the problem and what to do, in one line. The CLI prints it without a
traceback and exits with status 2; everything else is a bug and keeps its traceback.
"""


class TandemError(Exception):
    """A problem with the user's input, model files or settings; the message says what to do."""
