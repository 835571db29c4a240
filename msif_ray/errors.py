"""The one base class of the errors a user can act on, and how the command line recognises them.

Every module raises its own subclass (``ConfigError``, ``DataError``, ``ModelError`` ...), which
also derives from the built-in class it used to be (``ValueError``, ``OSError``, ``MemoryError``),
so ``except ValueError`` keeps working. ``msif`` prints a ``UserError`` as one line and exits 2
(3 for a held lock); anything else is a bug or an outage and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, or a refusal the user can act on; the message names the file, row, column or key."""


def user_error(err: BaseException) -> UserError | None:
    """The user error behind ``err`` (unwrapping Ray's task errors), or None for a bug."""
    from ray.exceptions import RayTaskError

    while isinstance(err, RayTaskError) and err.cause is not None:
        err = err.cause
    return err if isinstance(err, UserError) else None
