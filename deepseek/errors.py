"""Errors the user can fix. Commands print them as one line; any other exception is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or environment (a file, a value, a missing device): the message names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A configuration value that cannot work; the message starts with the field's name."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def require(ok: bool, field: str, problem: str) -> None:
    """The one way configurations check their values: ConfigError(field, problem) unless ok."""
    if not ok:
        raise ConfigError(field, problem)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
