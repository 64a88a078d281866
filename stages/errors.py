"""How the pipeline's commands report errors: the user's mistakes as one line, everything else as is."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click

from deepseek.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])


def report_user_errors(command: F) -> F:
    """Turn UserError into click's one-line 'Error: ...' and exit status 1. Any other exception is a bug:
    it keeps its traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as error:
            raise click.ClickException(str(error)) from None

    return wrapper  # type: ignore[return-value]
