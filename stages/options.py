"""What the pipeline's commands share: the --params option, the model option, and how they report errors (the
user's mistakes as one line, everything else as is)."""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from deepseek.errors import UserError
from stages.params import PARAMS_FILE

F = TypeVar("F", bound=Callable[..., Any])

params_option = click.option(
    "--params",
    "params_path",
    default=PARAMS_FILE,
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Parameters file; all of it is checked before any work.",
)
model_option = click.option(
    "--model",
    "model_dir",
    default=Path("model/final"),
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="A model directory written by the train stage.",
)


def report_user_errors(command: F) -> F:
    """Turn UserError, and a full disk, into click's one-line 'Error: ...' and exit status 1. Any other exception
    is a bug: it keeps its traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as error:
            raise click.ClickException(str(error)) from None
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            where = f" writing {error.filename}" if error.filename else ""
            raise click.ClickException(f"no space left on the device{where}: free some space and rerun") from None

    return wrapper  # type: ignore[return-value]
