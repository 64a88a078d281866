"""DVC stage `check`: every value of params.yaml checked before any other stage runs.

Every later stage depends on its output, so DVC runs it first whenever params.yaml changes: a bad value fails
here, before DVC removes the outputs of the stages the change would rerun (a failed `dvc exp run -S train.lr=x`
leaves the trained model in place). Its output never changes, so it reruns no other stage by itself.
"""

from __future__ import annotations

from pathlib import Path

import click

from deepseek.files import write_text
from stages.options import params_option, report_user_errors, run_as_program
from stages.params import load_params

CHECKED = Path("reports/params_check.txt")


@click.command()
@params_option
@report_user_errors
def check(params_path: str) -> None:
    """Check every value of the params file, and say so in reports/params_check.txt."""
    load_params(params_path)
    write_text(CHECKED, f"{Path(params_path).name}: every value passed the checks of stages/params.py\n")
    click.echo(f"{params_path}: every value is valid")


if __name__ == "__main__":
    run_as_program(check)
