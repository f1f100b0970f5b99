"""Errors a user can fix, and the one finiteness check: a leaf module every other may import.

Every kind derives from `UserError`; the CLI prints its message as one line and exits 2, and
the library raises them for the same causes. Each kind also derives from the builtin a caller
would already catch for it (ValueError, ImportError, RuntimeError), so code that caught those
keeps working. Messages name the file, field, key or value and what to do.

This module imports nothing of the package.
"""

from __future__ import annotations

import math


class UserError(Exception):
    """Something the user can fix (a key, a file, an option, a folder); the message says what."""


class ConfigError(UserError, ValueError):
    """A configuration key, an option or a value is wrong; the message names it."""


class DataError(UserError, ValueError):
    """Bad input data; the message names the file, the row and the value."""


class BudgetError(UserError, ValueError):
    """The configuration trains more parameters than the budget allows."""


class RunDamaged(UserError, ValueError):
    """A run or exported folder is not one, or one of its files is damaged; the message says which."""


class RunLocked(UserError, RuntimeError):
    """Another live process is writing the run folder."""


class OutputRefused(UserError, ValueError):
    """A command may not write where it was asked to: the path is an input, lies in a run or model
    folder, is a checkpoint, holds files the tool did not write, or cannot be written."""


class Diverged(UserError, RuntimeError):
    """Training produced a non-finite loss or gradient; the message names the step and the cause."""


class MissingExtra(UserError, ImportError):
    """An optional feature was used without the extra that installs it; the message names it."""


class HubUnreachable(UserError):
    """The Hub is needed for a download but cannot be reached.

    Not a RuntimeError: callers that retry failed work on RuntimeError (a sweep's trials) must
    stop here, since every further attempt would fail the same way.
    """


class ParityError(UserError, RuntimeError):
    """An exported model does not reproduce the PyTorch model within the stated tolerances."""


def finite(value, what: str, error: type[UserError] = ConfigError) -> float:
    """`value` as a float, refused unless it is a finite number: the one check every float from a
    config, an option or a request goes through (NaN, inf and overflowing literals like 1e309).

    Args:
        value: an int, float or numeric string.
        what: the key, option or field, for the message.
        error: the kind to raise.

    Returns:
        The float.

    Raises:
        error: not a number, or not finite.
    """
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise error(f"{what}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise error(f"{what}: {value!r} is not a finite number; give a finite value") from None
    return number
