"""The project's exception types for mistakes in what the user gave: a config key or value, an
input file, a prepared store, a checkpoint.

The console scripts (:mod:`braindecode_fw.cli`) report a :class:`UserError` as one line
``bdf-<cmd>: error: <message>`` with exit code 2. Any other exception is a bug in the framework
(or in a library it calls): its traceback is printed with a line asking to report it, exit code 1.
So raise one of these only where the message tells the user what they gave, where, and what was
expected; an internal invariant that cannot be broken from the outside stays a plain
``RuntimeError``/``AssertionError``.

Each type also derives from the built-in exception it replaces (``ValueError``, ``KeyError``,
``FileNotFoundError``, ``FileExistsError``), so ``except ValueError`` in callers keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of every error caused by the user's input; the message names the key, file or field."""


class ConfigError(UserError, ValueError):
    """A config key or value is wrong (wrong type, out of range, inconsistent with another key)."""


class DataError(UserError, ValueError):
    """An input file, a prepared store or a checkpoint does not hold what was expected."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user pointed to (or that a previous step should have written) is absent."""


class UnknownNameError(UserError, KeyError):
    """A name (subject, target, metric, registry entry, ...) that is not among the known ones.

    ``str()`` gives the message itself rather than ``KeyError``'s quoted repr.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class OutputExistsError(UserError, FileExistsError):
    """An output would replace something the user did not ask to replace."""


#: What Python says when a call's keywords do not fit the signature; from a configured constructor
#: (a Hydra node's keys, ``+model.hiden=32``) it is a config mistake.
SIGNATURE_MISMATCH = ("unexpected keyword argument", "required positional argument",
                      "required keyword-only argument", "got multiple values for argument")


def is_signature_mismatch(exc: BaseException) -> bool:
    """Whether ``exc`` is the ``TypeError`` of keywords that do not fit a callable's signature."""
    return isinstance(exc, TypeError) and any(s in str(exc) for s in SIGNATURE_MISMATCH)


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` or any exception it was explicitly raised from (``raise ... from``) is a
    :class:`UserError`.

    A wrapper (e.g. Hydra's ``InstantiationException`` around a constructor's ``ConfigError``)
    counts as the user error it wraps. The implicit context (an exception raised while handling
    another) does not: a bug in an ``except`` block stays a bug.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, UserError):
            return True
        seen.add(id(e))
        e = e.__cause__
    return False
