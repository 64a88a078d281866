"""Tokenizers (char, byte-level BPE, pretrained) and the flat token files that training reads.

Every kind is saved with `save_pretrained`, so `transformers.AutoTokenizer.from_pretrained(dir)` loads it; the
pipeline itself reads the saved folder with `tokenizers` alone (SavedTokenizer), which gives the same ids and text.
Token ids of each split are raw little-endian binaries (`train.bin`, `val.bin`) that `np.memmap` opens
without reading them, described by `meta.json`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from deepseek.errors import UserError, first_line
from deepseek.files import DirectoryKind, check_replaceable, replacing_dir
from stages.data import OUTPUT_FILES as PREPARED_FILES
from stages.data import PREPARED_DIR
from stages.params import TokenizerParams

if TYPE_CHECKING:  # transformers loads torch: imported where a tokenizer is made, not for `deepseek --help`
    from transformers import PreTrainedTokenizerFast

UNK = "<unk>"  # char kind: stands for characters the train split never shows
EOS = "<|endoftext|>"  # bpe kind: end of text, as in GPT-2
SPLITS = ("train", "val")
TOKENIZER_DIR = "data/tokenizer"
TOKENS_DIR = "data/tokens"
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"  # written by save_pretrained for every kind
_CONFIG_FILE = "tokenizer_config.json"  # and this, with the special tokens
TOKENIZER_KIND = DirectoryKind(
    "deepseek tokenize (tokenizer)",
    frozenset({TOKENIZER_FILE, _CONFIG_FILE, "special_tokens_map.json", "chat_template.jinja"}),
    TOKENIZER_FILE,
)
TOKENS_KIND = DirectoryKind("deepseek tokenize (tokens)", frozenset({"train.bin", "val.bin", META_FILE}), META_FILE)
RERUN = "run the tokenize stage first (python -m stages.tokenization)"


class TokensMeta(TypedDict):
    """meta.json of a tokens directory."""

    kind: str  # the tokenizer's: char, bpe or pretrained
    vocab_size: int
    dtype: str  # the ids' NumPy dtype in train.bin and val.bin, stored little-endian
    train_tokens: int
    val_tokens: int
    train_characters: int
    val_characters: int
    eos_token_id: int | None


# A chunk boundary goes right after a newline that has non-whitespace on both sides. There the GPT-2
# pre-tokenizer regex always ends a pre-token before the newline (no pattern takes a letter, digit or symbol
# together with "\n"), the lone newline is its own pre-token whether or not the text goes on, and the next
# pre-token starts fresh. Elsewhere chunking would change the result: "a  \nb" splits its whitespace as
# ["  ", "\n"] but "a  \n" alone as ["  \n"], and blank lines ("\n\n") or indented lines behave alike.
# Python's \s covers every character that the Rust regex's \s does, so \S here is never whitespace there.
_SAFE_BREAK = re.compile(r"(?<=\S\n)(?=\S)")
_CHUNK_CHARS = 1 << 16  # large enough that per-chunk overhead vanishes, small enough to spread over cores
_PROBE_CHARS = 100_000  # text used to check that a pretrained tokenizer gives the same ids when chunked


def tokenize_corpus(
    params: TokenizerParams,
    prepared_dir: str | Path = PREPARED_DIR,
    tokenizer_dir: str | Path = TOKENIZER_DIR,
    tokens_dir: str | Path = TOKENS_DIR,
) -> TokensMeta:
    """The tokenize stage: build the tokenizer, save it, encode both splits with the saved copy; returns the meta.

    Both outputs are replaced only once everything has succeeded; a failure leaves them as they were.
    """
    # Refuse bad inputs and output folders before training a tokenizer, not after. Neither output may be the
    # input or the other output.
    tokenizer_inputs, tokens_inputs = (prepared_dir, tokens_dir), (prepared_dir, tokenizer_dir)
    check_replaceable(tokenizer_dir, TOKENIZER_KIND, inputs=tokenizer_inputs)
    check_replaceable(tokens_dir, TOKENS_KIND, inputs=tokens_inputs)
    train_text, val_text, stats = read_prepared(prepared_dir)
    built = build_tokenizer(params, train_text)
    with replacing_dir(tokenizer_dir, TOKENIZER_KIND, inputs=tokenizer_inputs) as staging:
        built.save_pretrained(staging)
        # Encode with the tokenizer as saved, so the ids are what AutoTokenizer.from_pretrained(dir) gives.
        tokenizer = load_tokenizer(staging)
        train_ids, val_ids = encode_corpus(tokenizer, train_text), encode_corpus(tokenizer, val_text)
        return write_tokens(tokens_dir, tokenizer, train_ids, val_ids, stats, kind=params.kind, inputs=tokens_inputs)


def read_prepared(prepared_dir: str | Path = PREPARED_DIR) -> tuple[str, str, dict[str, Any]]:
    """train.txt, val.txt and stats.json of the prepare stage's output folder."""
    prepared_dir = Path(prepared_dir)
    rerun = "run the prepare stage first (python -m stages.prepare)"
    missing = [name for name in PREPARED_FILES if not (prepared_dir / name).is_file()]
    if missing:
        raise UserError(f"no prepared data in {prepared_dir} (missing {', '.join(missing)}): {rerun}")
    texts = []
    for split in SPLITS:
        path = prepared_dir / f"{split}.txt"
        try:
            # Bytes, then decode: text mode would turn "\r\n" into "\n" and change the characters.
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as error:
            raise UserError(f"{path} is not UTF-8 ({first_line(error)}): {rerun}") from None
        if not text:
            raise UserError(f"{path} is empty: give the prepare stage more text (or a larger data.val_fraction)")
        texts.append(text)
    path = prepared_dir / "stats.json"
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({first_line(error)}): {rerun}") from None
    if not isinstance(stats, dict) or not all(isinstance(stats.get(f"{s}_characters"), int) for s in SPLITS):
        raise UserError(f"{path} lacks train_characters and val_characters: {rerun}")
    return texts[0], texts[1], stats


def build_tokenizer(params: TokenizerParams, train_text: str) -> PreTrainedTokenizerFast:
    """The tokenizer that params ask for; char and bpe are built from the train split only."""
    if params.kind == "char":
        return _char_tokenizer(train_text)
    if params.kind == "bpe":
        return _bpe_tokenizer(train_text, params.vocab_size)
    return _pretrained_tokenizer(params.pretrained)


def _char_tokenizer(train_text: str) -> PreTrainedTokenizerFast:
    # A BPE model without merges and without a pre-tokenizer maps each character to its own id and keeps
    # spaces and newlines as they are; Fuse joins the pieces back without separators.
    vocab = {char: i for i, char in enumerate(sorted(set(train_text)))}
    vocab[UNK] = len(vocab)  # last, so character ids are the plain sorted order
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tokenizer.decoder = decoders.Fuse()
    return _wrap(tokenizer, unk_token=UNK)


def _bpe_tokenizer(train_text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes, no <unk>
        show_progress=False,
    )
    # Chunks pre-tokenize exactly like the whole text, so the trainer counts the same words.
    tokenizer.train_from_iterator(split_text(train_text), trainer=trainer)
    return _wrap(tokenizer, eos_token=EOS)


def _wrap(tokenizer: Tokenizer, **special_tokens: str) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    # Without clean_up_tokenization_spaces=False, decode would turn " ." into "." and break the round trip. The
    # ignore: transformers leaves this constructor (TokenizersBackend.__init__) unhinted.
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, clean_up_tokenization_spaces=False, **special_tokens)  # type: ignore[no-untyped-call]


def _pretrained_tokenizer(name: str) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        # Decoding is lossless, as for the other kinds: see _wrap. (transformers 5 leaves a BPE's spaces alone anyway.)
        tokenizer = AutoTokenizer.from_pretrained(name, clean_up_tokenization_spaces=False)
    except Exception as error:  # offline, unknown id, gated repo, bad files: all the user's to fix
        raise UserError(
            f"could not load tokenizer {name!r} ({first_line(error)}): check the name and your "
            "connection, or set tokenizer.pretrained to a local directory"
        ) from None
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise UserError(f"tokenizer {name!r} has no fast (tokenizers) version: choose another tokenizer.pretrained")
    return tokenizer


def check_vocabulary(token_ids: int, model_vocab: int, source: str) -> None:
    """A model reads ids below its vocabulary size only: refuse tokens from a larger tokenizer before the forward
    would fail deep in the embedding."""
    if token_ids > model_vocab:
        raise UserError(
            f"{source} has {token_ids:,} token ids but the model's vocabulary has {model_vocab:,}: use "
            "the tokenizer and tokens the model was trained with (rerun the pipeline from tokenize)"
        )


@dataclass(frozen=True)
class SavedTokenizer:
    """A tokenizer folder as the tokenize stage saved it, read with `tokenizers` alone: importing transformers
    costs every training, sampling and generating process about a second (1.1 s on a two-core AMD EPYC). Text
    becomes ids without added special tokens and ids become text, as transformers' AutoTokenizer of the same
    folder does it (tests/test_tokenize.py compares them for every kind)."""

    backend: Tokenizer
    eos_token_id: int | None

    def __len__(self) -> int:  # the ids it can give, added tokens included, as len() of transformers' tokenizer
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)


def load_tokenizer(directory: str | Path) -> SavedTokenizer:
    """The tokenizer that the tokenize stage saved in directory."""
    directory = Path(directory)
    if not (directory / TOKENIZER_FILE).is_file():
        raise UserError(f"no tokenizer in {directory}: {RERUN}")
    try:
        backend = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        config = json.loads((directory / _CONFIG_FILE).read_text(encoding="utf-8"))
    except Exception as error:  # truncated, hand-edited or missing files
        raise UserError(f"tokenizer in {directory} is unreadable ({first_line(error)}): {RERUN}") from None
    if config.get("clean_up_tokenization_spaces"):
        # transformers would then drop spaces before punctuation when decoding; this stage saves none so.
        raise UserError(f"tokenizer in {directory} was saved to clean up spaces when decoding: {RERUN}")
    eos = config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos  # older transformers saved an AddedToken's fields
    return SavedTokenizer(backend, None if eos is None else backend.token_to_id(eos))


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32: half the disk and memory for vocabularies up to 65,536."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def split_text(text: str, chunk_chars: int = _CHUNK_CHARS) -> list[str]:
    """text cut into pieces of about chunk_chars (or more) at boundaries that byte-level BPE never crosses.

    The pieces join back to text, and encoding them one by one gives the ids of the whole text; see _SAFE_BREAK.
    """
    chunks, start = [], 0
    while start < len(text):
        found = _SAFE_BREAK.search(text, start + chunk_chars)
        end = found.start() if found else len(text)
        chunks.append(text[start:end])
        start = end
    return chunks


def encode_corpus(tokenizer: SavedTokenizer, text: str, chunk_chars: int = _CHUNK_CHARS) -> np.ndarray:
    """Ids of text without added special tokens, as token_dtype(len(tokenizer)).

    Chunks are batch-encoded in parallel by the Rust tokenizer. Tokenizers whose ids change at a chunk boundary
    (SentencePiece-style ones that mark the start of each input, regexes that glue punctuation to "\n") are
    caught on a probe of the text and encode it in one piece instead: slower, never different.
    """
    backend = tokenizer.backend
    chunks = split_text(text, chunk_chars)
    if len(chunks) > 1 and not _chunking_is_exact(backend, text[:_PROBE_CHARS]):
        chunks = [text]
    dtype = token_dtype(len(tokenizer))
    encodings = backend.encode_batch_fast(chunks, add_special_tokens=False)
    pieces = [np.asarray(encoding.ids, dtype=dtype) for encoding in encodings]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def _chunking_is_exact(backend: Tokenizer, probe: str) -> bool:
    # Small chunks put hundreds of boundaries in the probe.
    encodings = backend.encode_batch_fast(split_text(probe, 256), add_special_tokens=False)
    chunked = [i for encoding in encodings for i in encoding.ids]
    return chunked == backend.encode(probe, add_special_tokens=False).ids


def write_tokens(
    out_dir: str | Path,
    tokenizer: SavedTokenizer,
    train_ids: np.ndarray,
    val_ids: np.ndarray,
    stats: Mapping[str, Any],
    kind: str,
    inputs: Sequence[str | Path] = (),
) -> TokensMeta:
    """Write train.bin, val.bin and meta.json to out_dir (replacing it whole) and return the meta.

    stats is the prepared folder's stats.json; its character counts go into the meta.
    """
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    for ids in (train_ids, val_ids):
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):  # would wrap around silently in dtype
            raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{ids.min()}, {ids.max()}]")
    meta: TokensMeta = {
        "kind": kind,
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "train_tokens": int(train_ids.size),
        "val_tokens": int(val_ids.size),
        "train_characters": int(stats["train_characters"]),
        "val_characters": int(stats["val_characters"]),
        "eos_token_id": tokenizer.eos_token_id,
    }
    with replacing_dir(out_dir, TOKENS_KIND, inputs=inputs) as staging:
        for split, ids in zip(SPLITS, (train_ids, val_ids), strict=True):
            np.ascontiguousarray(ids, dtype=dtype.newbyteorder("<")).tofile(staging / f"{split}.bin")
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def load_meta(tokens_dir: str | Path) -> TokensMeta:
    """meta.json of a tokens directory."""
    path = Path(tokens_dir) / META_FILE
    if not path.is_file():
        raise UserError(f"no tokens in {tokens_dir} ({path} is missing): {RERUN}")
    try:
        meta: TokensMeta = json.loads(path.read_text(encoding="utf-8"))  # as write_tokens wrote it
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({first_line(error)}): {RERUN}") from None
    return meta


def load_tokens(tokens_dir: str | Path, split: str) -> np.memmap:
    """The ids of one split ("train" or "val"), memory-mapped read-only."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    meta = load_meta(tokens_dir)
    path = Path(tokens_dir) / f"{split}.bin"
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    count = meta["train_tokens"] if split == "train" else meta["val_tokens"]
    if not path.is_file() or path.stat().st_size != count * dtype.itemsize:
        raise UserError(f"{path} is missing or does not hold the {count} {meta['dtype']} ids of {META_FILE}: {RERUN}")
    if count == 0:  # np.memmap cannot map an empty file
        raise UserError(f"{path} holds no tokens: prepare more text, then {RERUN}")
    return np.memmap(path, dtype=dtype, mode="r")
