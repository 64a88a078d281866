"""DVC stage `prepare`: raw text in; train.txt, val.txt and stats.json out."""

from __future__ import annotations

import click

from stages.data import PREPARED_DIR, prepare_corpus
from stages.options import params_option, report_user_errors, run_as_program
from stages.params import load_params


@click.command()
@params_option
@click.option(
    "--out",
    "out_dir",
    default=PREPARED_DIR,
    show_default=True,
    type=click.Path(file_okay=False),
    help="Output directory, replaced whole (it may hold only a previous run's outputs).",
)
@report_user_errors
def prepare(params_path: str, out_dir: str) -> None:
    """Split the raw corpus into train and validation text and record its stats.

    \b
    data.source picks the corpus:
      shakespeare  data.path, downloaded from data.url if missing;
                   its sha256 must equal data.sha256
      smollm       the first data.smollm_max_chars characters of
                   data.smollm_dataset (config data.smollm_subset), streamed
                   from the Hugging Face hub or read from a local directory

    The first 1 - data.val_fraction of the characters become train.txt and the rest val.txt (a contiguous split).
    stats.json records the source, the sha256 of the raw text, and its characters, lines, unique characters
    and split sizes. The three files appear together or not at all.
    """
    params = load_params(params_path).data
    stats = prepare_corpus(params, out_dir)
    click.echo(
        f"prepared {stats['source']}: {stats['characters']:,} characters, {stats['lines']:,} lines, "
        f"{stats['unique_characters']:,} unique; train {stats['train_characters']:,}, "
        f"val {stats['val_characters']:,} -> {out_dir}"
    )


if __name__ == "__main__":
    run_as_program(prepare)
