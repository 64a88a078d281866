"""The prepare stage: sources (with local stand-ins for the network), checks, split, stats and atomic outputs."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from deepseek.errors import UserError
from deepseek.files import OWNER_FILE
from stages.data import (
    OUTPUT_FILES,
    download,
    download_corpus,
    join_capped,
    read_shakespeare,
    split_text,
    stream_smollm,
    text_stats,
    write_prepared,
)
from stages.download import download as download_stage
from stages.params import DataParams
from stages.prepare import prepare

from pipeline_utils import REAL_CORPUS, free_port

DEFAULT_SHA256 = DataParams().sha256
SMALL_TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"


def sha256_of(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def served(tmp_path):
    """A local HTTP server over a folder: returns (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def real_text() -> str:
    if not REAL_CORPUS.exists():
        pytest.skip("the tiny Shakespeare corpus is in neither data/ nor ../shared/data/")
    return REAL_CORPUS.read_text(encoding="utf-8")


def write_standin(root: Path, configs: dict[str, list[str]]) -> Path:
    """A local directory laid out like a hub dataset repo: a parquet folder per config, declared in README.md."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    declared = []
    for name, texts in configs.items():
        (root / name).mkdir(parents=True)
        pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), root / name / "train-00000.parquet")
        declared.append({"config_name": name, "data_files": [{"split": "train", "path": f"{name}/train-*"}]})
    (root / "README.md").write_text(f"---\n{yaml.safe_dump({'configs': declared})}---\n# stand-in\n")
    return root


DOCS = [f"document {i}: " + "abcdefghij" * (i + 1) for i in range(6)]


@pytest.fixture
def standin(tmp_path) -> Path:
    return write_standin(tmp_path / "smollm", {"cosmopedia-v2": DOCS, "other": ["a different config"]})


def run_cli(tmp_path: Path, data: dict, out: Path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": data}))
    return CliRunner().invoke(prepare, ["--params", str(params), "--out", str(out)])


# --- shakespeare: download and checks ---------------------------------------------------------------------------


def test_download_puts_the_verified_file_in_place(served, tmp_path):
    root, url = served
    (root / "input.txt").write_text(SMALL_TEXT)
    dest = tmp_path / "data" / "input-1.txt"
    download(f"{url}/input.txt", dest, sha256_of(SMALL_TEXT))
    assert dest.read_text() == SMALL_TEXT
    assert [p.name for p in dest.parent.iterdir()] == ["input-1.txt"]


def test_download_with_wrong_sha256_leaves_nothing(served, tmp_path):
    root, url = served
    (root / "input.txt").write_text(SMALL_TEXT)
    dest = tmp_path / "data" / "input-1.txt"
    with pytest.raises(UserError) as caught:
        download(f"{url}/input.txt", dest, "0" * 64)
    assert sha256_of(SMALL_TEXT) in str(caught.value) and "0" * 64 in str(caught.value)
    assert list(dest.parent.iterdir()) == []


@pytest.mark.parametrize("path", ["missing.txt", None])
def test_failed_download_is_one_line_and_leaves_nothing(served, tmp_path, path):
    _, url = served
    url = f"{url}/{path}" if path else f"http://127.0.0.1:{free_port()}/x"
    dest = tmp_path / "data" / "input-1.txt"
    with pytest.raises(UserError) as caught:
        download(url, dest, "0" * 64)
    message = str(caught.value)
    assert message.startswith(f"could not download {url} (") and "\n" not in message
    assert ("HTTP 404" if path else "Connection refused") in message
    assert list(dest.parent.iterdir()) == []


def test_missing_file_is_downloaded_then_prepared(served, tmp_path):
    root, url = served
    (root / "input.txt").write_text(SMALL_TEXT)
    local = tmp_path / "data" / "input-1.txt"
    result = run_cli(
        tmp_path,
        {"path": str(local), "url": f"{url}/input.txt", "sha256": sha256_of(SMALL_TEXT)},
        tmp_path / "prepared",
    )
    assert result.exit_code == 0, result.output
    assert local.read_text() == SMALL_TEXT
    prepared = tmp_path / "prepared"
    assert (prepared / "train.txt").read_text() + (prepared / "val.txt").read_text() == SMALL_TEXT


def test_local_file_with_another_sha256_is_refused(tmp_path):
    local = tmp_path / "input.txt"
    local.write_text(SMALL_TEXT)
    with pytest.raises(UserError, match=rf"set data.sha256 to {sha256_of(SMALL_TEXT)}"):
        read_shakespeare(local, "http://127.0.0.1:1/never-fetched", "0" * 64)


@pytest.mark.parametrize("project_text", [SMALL_TEXT, "another text"])
def test_a_queued_experiment_takes_the_projects_own_corpus_if_it_matches(tmp_path, monkeypatch, project_text):
    """DVC runs a queued experiment in a copy under .dvc/tmp/exps/ without the git-ignored corpus."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "input-1.txt").write_text(project_text)
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmp1a2b3c"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    unreachable = f"http://127.0.0.1:{free_port()}/input.txt"
    if project_text == SMALL_TEXT:
        assert read_shakespeare("data/input-1.txt", unreachable, sha256_of(SMALL_TEXT)) == SMALL_TEXT
        assert (copy / "data" / "input-1.txt").read_text() == SMALL_TEXT
    else:  # another sha256: not taken, so the download is tried (and fails here)
        with pytest.raises(UserError, match="could not download"):
            read_shakespeare("data/input-1.txt", unreachable, sha256_of(SMALL_TEXT))
        assert not (copy / "data" / "input-1.txt").exists()
    assert (tmp_path / "data" / "input-1.txt").read_text() == project_text  # the project's copy untouched


# --- smollm: a local stand-in for the hub -----------------------------------------------------------------------


def test_smollm_is_capped_at_max_chars(standin):
    joined = "\n\n".join(DOCS)
    cap = len("\n\n".join(DOCS[:3])) + 5  # lands inside the fourth document
    assert stream_smollm(str(standin), "cosmopedia-v2", cap) == joined[:cap]
    assert stream_smollm(str(standin), "cosmopedia-v2", 10 * len(joined)) == joined
    assert stream_smollm(str(standin), "other", 100) == "a different config"


def test_join_capped_stops_reading_at_the_cap():
    def documents():
        yield "abc"
        yield ""
        yield "defg"
        raise AssertionError("read past the cap")

    assert join_capped(documents(), 7) == "abc\n\nde"
    assert join_capped(iter(["abc", "de"]), 7) == "abc\n\nde"


def test_smollm_errors_are_one_line(standin, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    # A made-up hub id must fail fast and must not touch the network.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for dataset, subset in [
        (str(tmp_path / "nowhere"), "cosmopedia-v2"),
        ("no-such-owner/no-such-dataset", "x"),
        (str(standin), "missing-config"),
    ]:
        with pytest.raises(UserError) as caught:
            stream_smollm(dataset, subset, 100)
        message = str(caught.value)
        assert message.startswith(f"could not stream {dataset} ({subset}): ") and "\n" not in message
        assert "local directory" in message


def test_smollm_rows_without_text_are_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = write_standin(tmp_path / "smollm", {"cosmopedia-v2": ["x"]})
    pq.write_table(pa.table({"content": ["no text field"]}), root / "cosmopedia-v2" / "train-00000.parquet")
    with pytest.raises(UserError, match="string field 'text'; they have content"):
        stream_smollm(str(root), "cosmopedia-v2", 100)


def test_smollm_through_the_cli(standin, tmp_path):
    """The download stage streams the subset into data.path; prepare splits what it finds there."""
    out, corpus = tmp_path / "prepared", tmp_path / "smollm.txt"
    data = {"source": "smollm", "smollm_dataset": str(standin), "smollm_max_chars": 100, "val_fraction": 0.25}
    data["path"] = str(corpus)
    result = run_cli(tmp_path, data, out)
    assert result.exit_code == 1 and "run the download stage first" in result.output  # nothing streamed yet
    result = CliRunner().invoke(download_stage, ["--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert corpus.read_text() == "\n\n".join(DOCS)[:100]
    result = run_cli(tmp_path, data, out)
    assert result.exit_code == 0, result.output
    stats = json.loads((out / "stats.json").read_text())
    assert stats["source"] == "smollm"
    assert (stats["characters"], stats["train_characters"], stats["val_characters"]) == (100, 75, 25)
    assert (out / "train.txt").read_text() + (out / "val.txt").read_text() == "\n\n".join(DOCS)[:100]


# --- split and stats --------------------------------------------------------------------------------------------


def test_real_corpus_stats_and_split(real_text, tmp_path):
    local = tmp_path / "input-1.txt"
    local.write_bytes(REAL_CORPUS.read_bytes())
    text = read_shakespeare(local, "http://127.0.0.1:1/never-fetched", DEFAULT_SHA256)
    assert text == real_text
    stats = text_stats(text)
    assert stats == {"characters": 1_115_394, "lines": 40_000, "unique_characters": 65, "sha256": DEFAULT_SHA256}
    train, val = split_text(text, 0.1)
    assert train + val == text
    assert (len(train), len(val)) == (1_003_854, 111_540)
    assert split_text(text, 0.1) == (train, val)


def test_lines_are_newline_separated():
    assert [text_stats(t)["lines"] for t in ["a", "a\n", "a\nb", "a\n\n", "a\r\nb\rc\u2028d\n"]] == [1, 1, 2, 2, 2]


def test_too_short_text_is_refused():
    with pytest.raises(UserError, match="too short to split"):
        split_text("abcdefghij", 0.1)
    assert split_text("abcdefghij", 0.2) == ("abcdefgh", "ij")


# --- outputs ----------------------------------------------------------------------------------------------------


def test_rerun_replaces_outputs_whole(tmp_path):
    out = tmp_path / "prepared"
    write_prepared(out, "old train", "old val", {"characters": 1})
    write_prepared(out, "train", "val", {"characters": 2})
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUT_FILES, OWNER_FILE])
    assert (out / "train.txt").read_text() == "train" and json.loads((out / "stats.json").read_text()) == {
        "characters": 2
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_failed_write_leaves_no_partial_outputs(tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    monkeypatch.setattr("stages.data.json.dumps", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        write_prepared(out, "train", "val", {})
    assert list(tmp_path.iterdir()) == []


def test_foreign_output_folder_is_not_replaced(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "input-1.txt").write_text("precious")
    with pytest.raises(UserError, match=r"holds files that deepseek prepare did not write \(input-1\.txt\)"):
        write_prepared(out, "train", "val", {})
    assert [p.name for p in out.iterdir()] == ["input-1.txt"]


# --- the command ------------------------------------------------------------------------------------------------


def test_cli_writes_outputs_and_a_summary(tmp_path):
    local = tmp_path / "input.txt"
    local.write_text(SMALL_TEXT)
    out = tmp_path / "prepared"
    result = run_cli(tmp_path, {"path": str(local), "sha256": sha256_of(SMALL_TEXT), "val_fraction": 0.2}, out)
    assert result.exit_code == 0, result.output
    stats = json.loads((out / "stats.json").read_text())
    assert stats == {"source": "shakespeare", **text_stats(SMALL_TEXT), "train_characters": 64, "val_characters": 17}
    assert f"{len(SMALL_TEXT)} characters, 5 lines" in result.output


@pytest.mark.parametrize(
    "content, data, expected",
    [
        (None, {"url": "http://127.0.0.1:{port}/x"}, "could not download http://127.0.0.1:{port}/x"),
        (b"", {}, "is empty"),
        (b"hello\nw\xffrld\n", {}, "byte 0xff at offset 7"),
        (b"abc", {"sha256": sha256_of(b"abc")}, "too short to split"),
        (SMALL_TEXT.encode(), {"source": "wikipedia"}, "data.source = 'wikipedia' must be one of"),
    ],
    ids=["unreachable", "empty", "not-utf8", "too-short", "unknown-source"],
)
def test_cli_bad_inputs_fail_in_one_line_without_outputs(tmp_path, content, data, expected):
    port = free_port()
    local = tmp_path / "data" / "input-1.txt"
    local.parent.mkdir()
    if content is not None:
        local.write_bytes(content)
    data = {"path": str(local), **{k: v.format(port=port) if isinstance(v, str) else v for k, v in data.items()}}
    out = tmp_path / "data" / "prepared"
    result = run_cli(tmp_path, data, out)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output
    assert expected.format(port=port) in lines[0]
    assert not out.exists()
    assert sorted(p.name for p in local.parent.iterdir()) == (["input-1.txt"] if content is not None else [])


def test_the_smollm_stream_never_replaces_the_corpus_of_data_sha256(standin, tmp_path):
    corpus = tmp_path / "input-1.txt"
    corpus.write_text("the shakespeare corpus")
    sha256 = hashlib.sha256(b"the shakespeare corpus").hexdigest()
    params = DataParams(source="smollm", smollm_dataset=str(standin), path=str(corpus), sha256=sha256)
    with pytest.raises(UserError, match=r"holds the corpus of data\.sha256, which the smollm stream would replace"):
        download_corpus(params)
    assert corpus.read_text() == "the shakespeare corpus"
