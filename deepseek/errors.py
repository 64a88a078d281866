"""Errors the user can fix, reported as one line without a traceback."""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

import click

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """Bad input or environment: the message names the problem and the fix."""


def report_user_errors(command: F) -> F:
    """Turn UserError into click's one-line 'Error: ...' and exit status 1."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as error:
            raise click.ClickException(str(error)) from None
    return wrapper  # type: ignore[return-value]


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
