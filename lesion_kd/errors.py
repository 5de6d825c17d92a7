"""The suite's user-facing errors: bad input data or a bad option, as opposed to a bug.

``lesion-kd`` prints such an error as one message (it names the file or the option) and exits with status 2;
``LESION_KD_DEBUG=1`` shows the traceback as well. Two kinds count as the user's:

- :class:`UserInputError` and its subclasses (``lesion_kd.data.DataError``: a bad file, folder or listing);
- a ``ValueError`` from an option check. By convention (``docs/contributing.md``) an option check's message
  starts with the option it refuses, ``data.image_size=100: must be a positive multiple of 32``, or names an
  unknown registry entry, ``unknown network 'x'; registered networks: ...``. Any other exception is a bug and
  keeps its traceback.
"""

from __future__ import annotations

import re

DEBUG_ENV = "LESION_KD_DEBUG"
_OPTION_MESSAGE = re.compile(r"^(--)?(data|model|trainer|checkpoint|seed_everything)\b[\w.]*\s*[=:( ]|^unknown (network|teacher) ")


class UserInputError(ValueError):
    """Something the user gave is wrong; the message says what and where."""


def is_user_error(e: BaseException) -> bool:
    """Whether ``e`` itself is the user's (bad data or option: one message, exit 2) rather than a bug."""
    return isinstance(e, UserInputError) or (isinstance(e, ValueError) and bool(_OPTION_MESSAGE.match(str(e))))


def find_user_error(e: BaseException) -> BaseException | None:
    """The user error ``e`` is or was raised from (jsonargparse re-raises a class's option check as "Does not
    validate against any of the Union subtypes" from it), else None."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if is_user_error(e):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


class RunDiverged(UserInputError):
    """The training loss exploded (``callbacks.DivergenceGuard``): the options (learning rate, loss weights)
    make this run diverge, and it stops before it writes a result."""
