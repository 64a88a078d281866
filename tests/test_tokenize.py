"""The tokenize stage: char, byte-level BPE and pretrained tokenizers, token files, failures."""

from __future__ import annotations

import json
import random
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
from click.testing import CliRunner
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

import stages.tokenizer as tk
from deepseek.errors import UserError
from stages import data
from stages.params import TokenizerParams
from stages.tokenization import tokenize

from pipeline_utils import REAL_CORPUS

CHAR_TRAIN = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n  All:\tSpeak, speak.\n"
CHAR_VAL = "Zounds! we speak?\n"  # Z, ! and ? never occur in CHAR_TRAIN
# Trailing spaces, blank lines, indentation, tabs and non-ASCII: where naive line chunking changes BPE ids.
TRICKY = "naïve — ü  \n\n  indented line\nplain line   \n\tTab.\n\n\nend \u2028 x\r\nwindows line\r\nlast"


def words_text(n_words: int, seed: int = 0) -> str:
    """Pseudo-English with enough distinct pairs for a BPE to reach a few hundred tokens."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(400)]
    lines = [" ".join(rng.choice(vocab) for _ in range(rng.randint(3, 12))) for _ in range(n_words // 7)]
    return "\n".join(lines) + "\n"


def write_prepared(directory: Path, train: str, val: str) -> Path:
    data.write_prepared(directory, train, val, {"train_characters": len(train), "val_characters": len(val)})
    return directory


def write_params(path: Path, **tokenizer: object) -> Path:
    lines = ["tokenizer:"] + [f"  {key}: {json.dumps(value)}" for key, value in tokenizer.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_stage(tmp_path: Path, params: TokenizerParams, train: str, val: str) -> tk.TokensMeta:
    prepared = write_prepared(tmp_path / "prepared", train, val)
    return tk.tokenize_corpus(params, prepared, tmp_path / "tokenizer", tmp_path / "tokens")


def ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


@pytest.fixture(scope="module")
def bpe_text() -> str:
    return words_text(20_000) + TRICKY * 100  # whitespace runs too, so whitespace merges get learnt


@pytest.fixture(scope="module")
def bpe(bpe_text: str) -> PreTrainedTokenizerFast:
    return tk.build_tokenizer(TokenizerParams(kind="bpe", vocab_size=400), bpe_text)


def test_char_vocab_comes_from_train_only_and_round_trips():
    tokenizer = tk.build_tokenizer(TokenizerParams(kind="char"), CHAR_TRAIN)
    vocab = tokenizer.get_vocab()
    assert sorted(vocab, key=vocab.__getitem__) == [*sorted(set(CHAR_TRAIN)), tk.UNK]
    assert len(tokenizer) == len(set(CHAR_TRAIN)) + 1
    encoded = ids(tokenizer, CHAR_TRAIN)
    assert len(encoded) == len(CHAR_TRAIN)
    assert tokenizer.decode(encoded) == CHAR_TRAIN
    val_ids = ids(tokenizer, CHAR_VAL)
    unseen = [i for i, char in enumerate(CHAR_VAL) if char not in CHAR_TRAIN]
    assert [i for i, token in enumerate(val_ids) if token == tokenizer.unk_token_id] == unseen == [0, 6, 16]


def test_char_stage_writes_what_the_saved_tokenizer_gives(tmp_path):
    meta = run_stage(tmp_path, TokenizerParams(kind="char"), CHAR_TRAIN, CHAR_VAL)
    assert (
        meta
        == tk.load_meta(tmp_path / "tokens")
        == {
            "kind": "char",
            "vocab_size": len(set(CHAR_TRAIN)) + 1,
            "dtype": "uint16",
            "train_tokens": len(CHAR_TRAIN),
            "val_tokens": len(CHAR_VAL),
            "train_characters": len(CHAR_TRAIN),
            "val_characters": len(CHAR_VAL),
            "eos_token_id": None,
        }
    )
    for loader in (AutoTokenizer, PreTrainedTokenizerFast):
        saved = loader.from_pretrained(tmp_path / "tokenizer")
        for split, text in (("train", CHAR_TRAIN), ("val", CHAR_VAL)):
            tokens = tk.load_tokens(tmp_path / "tokens", split)
            assert tokens.dtype == np.uint16
            assert tokens.tolist() == ids(saved, text)
    raw = np.fromfile(tmp_path / "tokens" / "val.bin", dtype="<u2")  # the file is plain ids, nothing else
    assert raw.tolist() == tk.load_tokenizer(tmp_path / "tokenizer").encode(CHAR_VAL)


def test_bpe_trains_to_vocab_size_and_round_trips(bpe, bpe_text):
    assert len(bpe) == 400
    assert bpe.eos_token == tk.EOS and bpe.convert_tokens_to_ids(tk.EOS) == bpe.eos_token_id
    for text in ("naïve — ü", TRICKY, bpe_text[:5000], "日本語 🙂 never seen in training"):
        assert bpe.decode(ids(bpe, text)) == text
    assert len(ids(bpe, bpe_text)) < 0.8 * len(bpe_text.encode())  # merges are learnt: fewer ids than bytes


def test_bpe_stage_saved_tokenizer_gives_identical_ids(tmp_path, bpe, bpe_text):
    val = "naïve — ü\n" + TRICKY
    meta = run_stage(tmp_path, TokenizerParams(kind="bpe", vocab_size=400), bpe_text, val)
    assert (meta["kind"], meta["vocab_size"], meta["dtype"]) == ("bpe", 400, "uint16")
    assert meta["eos_token_id"] == bpe.eos_token_id
    saved = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert ids(saved, val) == ids(bpe, val) == tk.load_tokens(tmp_path / "tokens", "val").tolist()
    assert ids(saved, bpe_text) == tk.load_tokens(tmp_path / "tokens", "train").tolist()
    assert saved.decode(tk.load_tokens(tmp_path / "tokens", "val").tolist()) == val


def wordpiece_stand_in(directory: Path) -> Path:
    """A hub tokenizer whose decode transformers cleans up (WordPiece, clean_up_tokenization_spaces on, as BERT's)."""
    vocab = {token: i for i, token in enumerate(["[UNK]", "[SEP]", "fair", "moon", ".", "?", "don", "'", "t", "##s"])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[SEP]")
    tokenizer.save_pretrained(directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps(config | {"clean_up_tokenization_spaces": True}))
    return directory


@pytest.mark.parametrize("kind", ["char", "bpe", "pretrained bpe", "pretrained wordpiece"])
def test_the_pipeline_reads_a_saved_tokenizer_as_transformers_does(tmp_path, kind, bpe, bpe_text):
    """load_tokenizer reads the stage's folder with `tokenizers` alone: the same ids, text (of every prefix, as
    streaming decodes them), size and end-of-text id as transformers' AutoTokenizer of that folder."""
    if kind == "pretrained bpe":
        bpe.save_pretrained(tmp_path / "hub")
    elif kind == "pretrained wordpiece":
        assert AutoTokenizer.from_pretrained(wordpiece_stand_in(tmp_path / "hub")).decode([2, 4]) == "fair."  # cleaned
    params = TokenizerParams(kind=kind.split()[0], vocab_size=400, pretrained=str(tmp_path / "hub"))
    run_stage(tmp_path, params, CHAR_TRAIN if kind == "char" else bpe_text[:20_000], TRICKY)
    ours, theirs = tk.load_tokenizer(tmp_path / "tokenizer"), AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    text = f"fair moon . don't ? {TRICKY} 日本語 🙂 {tk.EOS}[SEP]"
    encoded = ours.encode(text)
    assert encoded == theirs(text, add_special_tokens=False)["input_ids"] and len(set(encoded)) > 5
    assert [ours.decode(encoded[:n]) for n in range(len(encoded) + 1)] == [
        theirs.decode(encoded[:n]) for n in range(len(encoded) + 1)
    ]
    assert (len(ours), ours.eos_token_id) == (len(theirs), theirs.eos_token_id)
    assert ours.eos_token_id == {"char": None, "pretrained wordpiece": 1}.get(kind, bpe.eos_token_id)


def test_a_tokenizer_saved_to_clean_up_decoded_spaces_is_refused(tmp_path):
    """transformers would decode its text otherwise than load_tokenizer does; the stage never saves one so."""
    with pytest.raises(UserError, match="saved to clean up spaces when decoding: run the tokenize stage"):
        tk.load_tokenizer(wordpiece_stand_in(tmp_path / "hub"))


def test_chunks_encode_like_the_whole_text(bpe, bpe_text):
    text = (TRICKY + "\n") * 30 + bpe_text[:3000]
    whole = bpe.backend_tokenizer.encode(text, add_special_tokens=False).ids
    # Naive line chunks do change the ids, so this text tests something.
    naive = [i for line in text.splitlines(keepends=True) for i in ids(bpe, line)]
    assert naive != whole
    chunks = tk.split_text(text, 8)
    assert "".join(chunks) == text and len(chunks) > 100
    assert [i for chunk in chunks for i in ids(bpe, chunk)] == whole
    assert tk.encode_corpus(tk.SavedTokenizer(bpe.backend_tokenizer, None), text, chunk_chars=8).tolist() == whole


def test_tokenizer_that_is_not_chunk_safe_encodes_the_whole_text():
    # Metaspace marks the start of every input: chunked ids would differ, so encode_corpus must notice.
    text = words_text(3000, seed=1)
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.train_from_iterator(
        [text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"], show_progress=False)
    )
    whole = backend.encode(text, add_special_tokens=False).ids
    chunks = tk.split_text(text, 64)
    assert [i for chunk in chunks for i in backend.encode(chunk, add_special_tokens=False).ids] != whole
    assert tk.encode_corpus(tk.SavedTokenizer(backend, None), text, chunk_chars=64).tolist() == whole


def test_pretrained_from_a_local_directory(tmp_path, bpe, bpe_text):
    bpe.save_pretrained(tmp_path / "hub_stand_in")
    params = TokenizerParams(kind="pretrained", pretrained=str(tmp_path / "hub_stand_in"))
    meta = run_stage(tmp_path, params, bpe_text[:2000], TRICKY)
    assert (meta["kind"], meta["vocab_size"], meta["eos_token_id"]) == ("pretrained", 400, bpe.eos_token_id)
    assert tk.load_tokens(tmp_path / "tokens", "val").tolist() == ids(bpe, TRICKY)
    assert ids(AutoTokenizer.from_pretrained(tmp_path / "tokenizer"), TRICKY) == ids(bpe, TRICKY)


def test_pretrained_that_cannot_load_is_a_one_line_user_error(monkeypatch):
    # The hub reads HF_HUB_OFFLINE at import; patch the constant too so nothing tries the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as caught:
        tk.build_tokenizer(TokenizerParams(kind="pretrained", pretrained="no-such-org/no-such-tokenizer"), "")
    message = str(caught.value)
    assert "\n" not in message
    assert "'no-such-org/no-such-tokenizer'" in message and "local directory" in message


def test_dtype_widens_for_vocabularies_over_65536(tmp_path):
    assert tk.token_dtype(66) == tk.token_dtype(1 << 16) == np.uint16
    assert tk.token_dtype((1 << 16) + 1) == np.uint32
    text = "".join(chr(0x10000 + i) for i in range(70_000))  # supplementary-plane characters, no surrogates
    meta = run_stage(tmp_path, TokenizerParams(kind="char"), text, text[-5:])
    assert (meta["vocab_size"], meta["dtype"]) == (70_001, "uint32")
    val = tk.load_tokens(tmp_path / "tokens", "val")
    assert val.dtype == np.uint32 and val.tolist() == list(range(69_995, 70_000))


def test_failure_leaves_previous_outputs_whole(tmp_path, monkeypatch):
    run_stage(tmp_path, TokenizerParams(kind="char"), CHAR_TRAIN, CHAR_VAL)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tk, "encode_corpus", broken)
    with pytest.raises(RuntimeError):
        tk.tokenize_corpus(
            TokenizerParams(kind="bpe"), tmp_path / "prepared", tmp_path / "tokenizer", tmp_path / "tokens"
        )
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # no staging leftovers


def test_a_folder_of_other_files_is_not_replaced(tmp_path):
    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"holds files that deepseek tokenize \(tokens\) did not write \(notes\.txt\)"):
        run_stage(tmp_path, TokenizerParams(kind="char"), CHAR_TRAIN, CHAR_VAL)
    assert (tmp_path / "tokens" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "tokenizer").exists()


def test_missing_or_damaged_outputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="run the tokenize stage"):
        tk.load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(UserError, match="run the tokenize stage"):
        tk.load_tokens(tmp_path / "nowhere", "train")
    run_stage(tmp_path, TokenizerParams(kind="char"), CHAR_TRAIN, CHAR_VAL)
    (tmp_path / "tokenizer" / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match=f"tokenizer in {tmp_path / 'tokenizer'} is unreadable"):
        tk.load_tokenizer(tmp_path / "tokenizer")
    train_bin = tmp_path / "tokens" / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:-2])
    with pytest.raises(UserError, match=r"train\.bin"):
        tk.load_tokens(tmp_path / "tokens", "train")


@pytest.mark.parametrize(
    "params, prepared, expected",
    [
        (dict(kind="sentencepiece"), True, "tokenizer.kind"),
        (dict(kind="char"), False, "prepare stage"),
    ],
)
def test_cli_user_errors_are_one_line_and_write_nothing(tmp_path, params, prepared, expected):
    if prepared:
        write_prepared(tmp_path / "prepared", CHAR_TRAIN, CHAR_VAL)
    params_path = write_params(tmp_path / "params.yaml", **params)
    before = sorted(tmp_path.rglob("*"))
    result = CliRunner().invoke(
        tokenize,
        [
            "--params",
            str(params_path),
            "--prepared",
            str(tmp_path / "prepared"),
            "--tokenizer-dir",
            str(tmp_path / "out" / "tokenizer"),
            "--tokens-dir",
            str(tmp_path / "out" / "tokens"),
        ],
    )
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and expected in lines[0]
    assert "Traceback" not in result.output
    assert sorted(tmp_path.rglob("*")) == before


def test_cli_tokenizes_and_summarises(tmp_path):
    write_prepared(tmp_path / "prepared", CHAR_TRAIN, CHAR_VAL)
    params_path = write_params(tmp_path / "params.yaml", kind="char")
    result = CliRunner().invoke(
        tokenize,
        [
            "--params",
            str(params_path),
            "--prepared",
            str(tmp_path / "prepared"),
            "--tokenizer-dir",
            str(tmp_path / "tokenizer"),
            "--tokens-dir",
            str(tmp_path / "tokens"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"vocab {len(set(CHAR_TRAIN)) + 1}" in result.output
    assert f"val: {len(CHAR_VAL)} tokens, 1.00 characters per token" in result.output
    assert tk.load_meta(tmp_path / "tokens")["kind"] == "char"
    assert "tokenizer.kind" in CliRunner().invoke(tokenize, ["--help"]).output


@pytest.mark.skipif(
    not REAL_CORPUS.is_file(), reason="the tiny Shakespeare corpus is in neither data/ nor ../shared/data/"
)
@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_real_corpus_round_trips(kind):
    text = REAL_CORPUS.read_bytes().decode("utf-8")
    tokenizer = tk.build_tokenizer(TokenizerParams(kind=kind, vocab_size=1024), text)
    encoded = tk.encode_corpus(tk.SavedTokenizer(tokenizer.backend_tokenizer, None), text)
    assert encoded.tolist() == tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(encoded.tolist()) == text
    assert len(tokenizer) == {"char": 66, "bpe": 1024}[kind]
