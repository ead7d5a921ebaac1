"""The one base class of every error a user can cause through ddm_model.

Command-line front ends catch ``DDMError`` and print its message as one line; anything else
is a bug and keeps its traceback.
"""


class DDMError(Exception):
    """An error with a message that says what went wrong and what to do about it."""


class UsageError(DDMError, ValueError):
    """A bad option value: an unknown routing, sampler or time distribution, a step count < 1."""
