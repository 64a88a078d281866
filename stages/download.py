"""DVC stage `download`: the raw corpus at data.path, as a DVC output, so that DVC sees it removed or changed."""

from __future__ import annotations

import click

from stages.data import download_corpus
from stages.options import params_option, report_user_errors, run_as_program
from stages.params import load_params


@click.command()
@params_option
@report_user_errors
def download(params_path: str) -> None:
    """Put the raw corpus at data.path.

    \b
    data.source picks the corpus:
      shakespeare  the file at data.path, downloaded from data.url if missing
                   (offline: copy it there yourself); its sha256 must equal
                   data.sha256. A file already there is checked, never replaced.
      smollm       the first data.smollm_max_chars characters of
                   data.smollm_dataset (config data.smollm_subset), streamed
                   from the Hugging Face hub or read from a local directory
    """
    params = load_params(params_path).data
    path = download_corpus(params)
    click.echo(f"corpus: {path} ({path.stat().st_size:,} bytes, {params.source})")


if __name__ == "__main__":
    run_as_program(download)
