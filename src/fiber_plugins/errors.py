"""The package's exceptions: user mistakes apart from bugs.

Every mistake a user can make at the package's boundary (a bad setting, name, path, shape, file,
device or missing extra) raises a subclass of :class:`UserError`. Each also derives from the
built-in exception a Python caller expects (``ValueError``, ``TypeError``, ``KeyError``, ...), so
``except ValueError`` keeps working. The command line prints a ``UserError`` as one line and exits
with code 2; any other exception is a bug in the package (or a library below it) and is shown with
its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of every user mistake. The message quotes the bad value and says the fix."""

    def __str__(self) -> str:  # KeyError would quote its message; a message is a message
        return str(self.args[0]) if self.args else ""


class UserValueError(UserError, ValueError):
    """A value out of range, an unknown name, a malformed spec or file, a shape mismatch."""


class UserTypeError(UserError, TypeError):
    """An argument of the wrong type (a numpy array where a tensor is needed, ...)."""


class UserKeyError(UserError, KeyError):
    """An unknown layer, hook, model or method name."""


class UserIndexError(UserError, IndexError):
    """A unit, channel or feature index out of range."""


class UserStateError(UserError, RuntimeError):
    """The model is in a state the call cannot use (a zennit composite still registered, a layer
    that the forward pass never reaches)."""


class MissingFileError(UserError, FileNotFoundError):
    """A path the user gave does not exist."""


class MissingExtraError(UserError, ImportError):
    """An optional toolkit is not installed; the message names the pip extra."""


class RunInterrupted(KeyboardInterrupt):
    """A run was stopped by SIGINT or SIGTERM after its finished rows were written.

    ``run_dir`` is the run folder, ``done`` / ``total`` count its rows; the message says how to
    continue (``resume=True`` / ``--resume``).
    """

    def __init__(self, message: str, run_dir=None, done: int = 0, total: int = 0):
        super().__init__(message)
        self.run_dir, self.done, self.total = run_dir, done, total

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


__all__ = [
    "MissingExtraError",
    "MissingFileError",
    "RunInterrupted",
    "UserError",
    "UserIndexError",
    "UserKeyError",
    "UserStateError",
    "UserTypeError",
    "UserValueError",
]
