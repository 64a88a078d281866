"""What the pipeline's commands share: the --params option, the model option, how they report errors (the
user's mistakes as one line, everything else as is) and a model of other library versions (one line), and how
their processes run."""

from __future__ import annotations

import atexit
import errno
import functools
import gc
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from deepseek.errors import UserError
from deepseek.versions import EnvironmentWarning
from stages.params import PARAMS_FILE

F = TypeVar("F", bound=Callable[..., Any])


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange, which lets nan and inf through (no comparison with nan fails), refusing them too."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


params_option = click.option(
    "--params",
    "params_path",
    default=PARAMS_FILE,
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Parameters file; all of it is checked before any work.",
)
TRAINED_MODEL = Path("model/final")
TRAIN_LOG, VAL_LOG = "train_log.csv", "val_log.csv"  # in the reports directory: the loss curves DVC plots


def _existing_unless_trained_model(ctx: click.Context, param: click.Parameter, model_dir: Path) -> Path:
    """A --model folder that is not there is a mistyped path, unless it is the one training writes (then loading
    says to train first)."""
    if model_dir != TRAINED_MODEL and not model_dir.exists():
        raise click.BadParameter(f"{model_dir} does not exist (the train stage writes {TRAINED_MODEL})")
    return model_dir


def trained_model_option(name: str) -> Callable[[F], F]:
    """The option (--model, or the stages' --model-dir) naming the model directory a command reads."""
    return click.option(
        name,
        "model_dir",
        default=TRAINED_MODEL,
        show_default=True,
        type=click.Path(file_okay=False, path_type=Path),
        callback=_existing_unless_trained_model,
        help="A model directory written by the train stage.",
    )


model_option = trained_model_option("--model")


def report_user_errors(command: F) -> F:
    """Turn UserError, and a full disk, into click's one-line 'Error: ...' and exit status 1. Any other exception
    is a bug: it keeps its traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():  # restores showwarning after the command
                warnings.showwarning = _one_line_for_environment(warnings.showwarning)
                return command(*args, **kwargs)
        except UserError as error:
            raise click.ClickException(str(error)) from None
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            where = f" writing {error.filename}" if error.filename else ""
            raise click.ClickException(f"no space left on the device{where}: free some space and rerun") from None

    return wrapper  # type: ignore[return-value]


def _one_line_for_environment(show: Callable[..., None]) -> Callable[..., None]:
    """warnings.showwarning that prints an EnvironmentWarning as one 'Warning: ...' line, without the file and
    line of code, and every other warning as `show` does."""

    def show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, EnvironmentWarning):
            click.echo(f"Warning: {message}", err=True)
        else:
            show(message, category, *args, **kwargs)

    return show_warning


def run_as_program(command: click.Command) -> None:
    """command as a process's whole work (a stage's `python -m`, the deepseek CLI).

    Before it exits, the process moves every object to the collector's permanent generation (gc.freeze, as the last
    exit handler): its final collection then skips the millions of objects that torch, MLflow and transformers
    leave, which took 1.4 s of a tiny evaluate's 7.6 (docs/results.md, "CI time, round 2"). Nothing is written
    then: every output is closed."""
    atexit.register(gc.freeze)  # exit handlers run last-registered first: this one after MLflow's
    command()
