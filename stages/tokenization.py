"""DVC stage `tokenize`: prepared text in; a saved tokenizer and flat token-id files out."""

from __future__ import annotations

import click

from stages.data import PREPARED_DIR
from stages.options import params_option, report_user_errors, run_as_program
from stages.params import load_params
from stages.tokenizer import TOKENIZER_DIR, TOKENS_DIR, tokenize_corpus


@click.command()
@params_option
@click.option(
    "--prepared",
    "prepared_dir",
    default=PREPARED_DIR,
    show_default=True,
    type=click.Path(file_okay=False),
    help="The prepare stage's output: train.txt, val.txt, stats.json.",
)
@click.option(
    "--tokenizer-dir",
    default=TOKENIZER_DIR,
    show_default=True,
    type=click.Path(file_okay=False),
    help="Output: the tokenizer, loadable with transformers.AutoTokenizer.from_pretrained. Replaced whole.",
)
@click.option(
    "--tokens-dir",
    default=TOKENS_DIR,
    show_default=True,
    type=click.Path(file_okay=False),
    help="Output: train.bin, val.bin (raw token ids) and meta.json. Replaced whole.",
)
@report_user_errors
def tokenize(params_path: str, prepared_dir: str, tokenizer_dir: str, tokens_dir: str) -> None:
    """Build a tokenizer from the train split and encode both splits.

    \b
    tokenizer.kind picks the tokenizer:
      char        one token per character of the train split, plus <unk>
                  for characters it never shows
      bpe         byte-level BPE trained on the train split to
                  tokenizer.vocab_size tokens, plus <|endoftext|>
      pretrained  tokenizer.pretrained: a Hugging Face hub id or a
                  local directory

    The ids go to train.bin and val.bin as flat little-endian uint16 (uint32 for vocabularies over 65,536),
    readable with numpy.memmap; meta.json records the kind, vocab size, dtype, token and character counts and
    the end-of-text id. Both output folders are replaced only when everything has succeeded.
    """
    params = load_params(params_path).tokenizer
    meta = tokenize_corpus(params, prepared_dir, tokenizer_dir, tokens_dir)
    click.echo(f"tokenizer {meta['kind']}: vocab {meta['vocab_size']:,} -> {tokenizer_dir}")
    for split, tokens, characters in (
        ("train", meta["train_tokens"], meta["train_characters"]),
        ("val", meta["val_tokens"], meta["val_characters"]),
    ):
        click.echo(f"{split}: {tokens:,} tokens, {characters / tokens:.2f} characters per token")
    click.echo(f"tokens ({meta['dtype']}) -> {tokens_dir}")


if __name__ == "__main__":
    run_as_program(tokenize)
