"""User-facing errors.

A `TandemError` is a mistake the user can fix (a bad path, a broken file, a prompt that is too
long). Its message names the problem and what to do, in one line. The CLI prints it without a
traceback and exits with status 2; everything else is a bug and keeps its traceback.
"""


class TandemError(Exception):
    """A problem with the user's input, model files or settings; the message says what to do."""


class NaNLogits(RuntimeError):
    """A request's logits went NaN: the model's fault, not the request's (a server answers
    500), but one the user can fix. The request fails alone; the engine serves the others."""

    def __init__(self):
        super().__init__("the model's logits for this request are NaN: its weights are broken (check "
                         "the model file) or an activation overflowed (float16? try --dtype bfloat16)")
