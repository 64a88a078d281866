"""Smoke tests: each benchmark script runs on the tiny preset and prints its tables. Speed is never asserted."""

import importlib
import json
import shlex

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from deepseek.checkpoint import save_model
from deepseek.config import ModelConfig
from deepseek.model import DeepSeekLM
from stages.params import TokenizerParams
from stages.tokenizer import build_tokenizer

from conftest import randomized
from documented import BENCHMARK_TINY_ARGS
from pipeline_utils import ROOT, markdown_tables, tiny_corpus


@pytest.fixture
def command(monkeypatch):
    """A benchmark script's click command, by module name; torch's thread count is restored afterwards."""
    monkeypatch.syspath_prepend(str(ROOT))  # benchmarks/ sits beside the package, not inside the installed one
    threads = torch.get_num_threads()
    yield lambda script: importlib.import_module(f"benchmarks.{script}").main
    torch.set_num_threads(threads)  # --threads changed it for the whole test process


@pytest.fixture
def run(command, tmp_path):
    """Run a benchmark script's command on the CPU; returns its Markdown tables (as cells) and its JSON tables."""

    def invoke(script: str, *args: str) -> tuple[list[list[list[str]]], dict]:
        out = tmp_path / f"{script}.json"
        # One thread: a CI machine's cores may be busy, and OpenMP threads that wait on each other crawl.
        result = CliRunner().invoke(command(script), [*args, "--device", "cpu", "--threads", "1", "--json", str(out)])
        assert result.exit_code == 0, result.output
        return markdown_tables(result.stdout), json.loads(out.read_text())["tables"]

    return invoke


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_train_throughput_reports_both_implementations_in_both_precisions(run):
    from benchmarks.train_throughput import BEST_COLUMNS, COLUMNS, PEAK_COLUMNS

    tables, data = run(
        "train_throughput", "--preset", "tiny", "--batch-size", "2", "--seq-len", "16", "--steps", "1", "--warmup", "0"
    )
    [[peak_header, *peak_rows], [header, *rows], [best_header, best_row]] = tables
    assert best_row[0] == "tiny"
    assert (peak_header, header, best_header) == (PEAK_COLUMNS, COLUMNS, BEST_COLUMNS)
    assert [row[0] for row in peak_rows] == ["float32", "bfloat16"]
    assert [(row[0], row[1]) for row in rows] == [("tiny", "float32"), ("tiny", "bfloat16")]
    peaks = {row["precision"]: row["GFLOP/s"] * 1e9 for row in data["peak"]}
    for result in data["train_throughput"]:
        assert result["ours tok/s"] > 0 and result["transformers tok/s"] > 0
        assert result["max logit diff"] < 1e-4  # the two models really hold the same weights
        for name in ("ours", "transformers"):  # MFU divides the model FLOPs by the peak measured in this run
            flops = result[f"{name} tok/s"] * result["GFLOP/token"] * 1e9
            assert result[f"{name} MFU %"] == pytest.approx(100 * flops / peaks[result["precision"]])
    [best] = data["best"]
    fastest = max(data["train_throughput"], key=lambda result: result["ours tok/s"])
    assert best["ours best"] == fastest["precision"] and best["ours tok/s"] == fastest["ours tok/s"]
    fp32 = data["train_throughput"][0]["ours tok/s"]
    assert best["ours best / ours float32"] == pytest.approx(fastest["ours tok/s"] / fp32)


def test_generation_reports_every_variant_and_the_cache_sizes(run):
    from benchmarks.generation import CACHE_COLUMNS, COLUMNS, VARIANTS

    tables, data = run(
        "generation", "--preset", "tiny", "--contexts", "8,32", "--new-tokens", "4", "--no-cache-max-context", "8"
    )
    (header, *rows), (cache_header, cache_row) = tables
    assert header == COLUMNS and cache_header == CACHE_COLUMNS
    assert [(row[0], row[2]) for row in rows] == [(context, variant) for context in ("8", "32") for variant in VARIANTS]
    skipped = [row for row in rows if row[0] == "32" and row[2] == "ours, no cache"]
    assert skipped and set(skipped[0][3:]) == {"skipped"}
    for result in data["generation"]:
        if result["tok/s"] != "skipped":
            assert result["prefill s"] > 0 and result["total s"] > 0 and result["tok/s"] > 0
    [cache] = data["cache"]
    size = getattr(torch, cache["dtype"]).itemsize  # train.dtype auto's choice: bf16 on CPUs with fast bf16
    assert cache["ours (latent) B/token"] == (16 + 8) * size * 2  # (kv_lora_rank + rope) values, 2 layers
    assert cache["standard MHA B/token"] == 2 * (8 + 8 + 8) * size * 2
    assert cache["transformers B/token (measured)"] > 0
    assert number(cache_row[2]) > 0


def test_memory_reports_training_and_generation(run):
    from benchmarks.memory import COLUMNS

    tables, data = run("memory", *shlex.split(BENCHMARK_TINY_ARGS["memory"]))  # test_docs leaves it to this test
    [[header, *rows]] = tables
    assert header == COLUMNS
    assert [row[0] for row in rows] == ["training step", "generate"]
    for result in data["memory"]:
        for implementation in ("ours", "transformers"):
            assert result[f"{implementation} at rest MiB"] > 0 and result[f"{implementation} peak MiB"] > 0
            # the allocator may serve a tiny model's call from memory it already holds: no increase is possible
            assert result[f"{implementation} increase MiB"] >= 0


def test_speculative_reports_verify_costs_on_a_preset(run):
    from benchmarks.speculative import COST_COLUMNS

    tables, data = run("speculative", "--preset", "tiny", "--mtp-depth", "2", "--contexts", "8,16", "--repeats", "1")
    [[header, *rows]] = tables
    assert header == COST_COLUMNS and [row[0] for row in rows] == ["8", "16"]
    for result in data["step costs"]:
        assert result["D"] == 2 and result["plain step ms"] > 0 and result["ratio"] > 0


def test_speculative_decodes_a_trained_model_three_ways(run, tmp_path):
    from benchmarks.common import THEIRS
    from benchmarks.speculative import COLUMNS, PLAIN, SPECULATIVE

    build_tokenizer(TokenizerParams(kind="bpe", vocab_size=300), tiny_corpus()).save_pretrained(tmp_path / "tok")
    model = randomized(DeepSeekLM(ModelConfig.from_preset("tiny", vocab_size=300, mtp_depth=1)))
    save_model(model, tmp_path / "model", tmp_path / "tok")
    tables, data = run("speculative", "--model-dir", str(tmp_path / "model"), "--new-tokens", "6", "--repeats", "1")
    [[header, *rows]] = tables
    assert header == COLUMNS and [row[0] for row in rows] == [PLAIN, SPECULATIVE, THEIRS]
    speculative = data["decoding"][1]
    assert speculative["same tokens as plain"] == "yes" and speculative["tok/s"] > 0


def test_gpu_check_dry_run_passes_every_check(command, tmp_path):
    """The GPU check's seven checks, on the CPU with the tiny preset (a few seconds): each has a row, all pass."""
    from benchmarks.gpu_check import CHECKS, COLUMNS

    out = tmp_path / "gpu_check.json"
    args = [*shlex.split(BENCHMARK_TINY_ARGS["gpu_check"]), "--json", str(out)]  # test_docs leaves it to this test
    result = CliRunner().invoke(command("gpu_check"), args)
    assert result.exit_code == 0, result.output
    [[header, *rows]] = markdown_tables(result.stdout)
    assert header == COLUMNS
    assert {row[0].split(".")[0] for row in rows} == {str(number) for number in range(1, len(CHECKS) + 1)}
    assert {row[-1] for row in rows} == {"PASS"}, rows
    assert json.loads(out.read_text())["tables"]["checks"] == [dict(zip(COLUMNS, row, strict=True)) for row in rows]


def test_gpu_check_without_cuda_says_so_in_one_line(command):
    from benchmarks.gpu_check import NO_CUDA

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the check would run")
    result = CliRunner().invoke(command("gpu_check"), [])
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == [f"Error: {NO_CUDA}"]


def test_expert_shapes_times_both_precisions_padded_and_unpadded(command, tmp_path):
    from benchmarks.expert_shapes import LAYER_COLUMNS, MATMUL_COLUMNS

    out = tmp_path / "expert_shapes.json"
    args = shlex.split(BENCHMARK_TINY_ARGS["expert_shapes"])  # test_docs leaves this measurement to this test
    result = CliRunner().invoke(command("expert_shapes"), [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    [matmuls, layers] = markdown_tables(result.stdout)
    assert matmuls[0] == MATMUL_COLUMNS and [row[0] for row in matmuls[1:]] == ["float32", "bfloat16"]
    assert layers[0] == LAYER_COLUMNS
    # 256 tokens, top-2 of the tiny preset's 4 experts: 512 rows, padded to multiples of 8 in bf16 only
    assert [(row[0], row[2]) for row in layers[1:]] == [
        ("float32", "1 (unpadded, the model's)"),
        ("bfloat16", "8 (the model's)"),
        ("bfloat16", "1 (unpadded)"),
    ]
    data = json.loads(out.read_text())["tables"]
    assert all(row["ms per step"] > 0 and row["distinct group sizes"] >= 1 for row in data["moe_layer"])


def test_expert_balance_measures_the_evaluate_stages_maxvio_and_sees_dropout(command, tmp_path):
    """The validation row in eval mode is the evaluate stage's MaxVio_global, computed here by evaluate() itself; a
    bias that favours one expert shows in every row; dropout changes the routing of the same text."""
    from benchmarks.expert_balance import main
    from deepseek.evaluation import evaluate
    from stages.tokenizer import load_tokenizer, write_tokens

    assert command("expert_balance") is main
    tokenizer = build_tokenizer(TokenizerParams(kind="bpe", vocab_size=300), tiny_corpus())
    tokenizer.save_pretrained(tmp_path / "tok")
    model = randomized(DeepSeekLM(ModelConfig.from_preset("tiny", vocab_size=300, mtp_depth=1, dropout=0.5)))
    model.moe_layers()[0].gate.expert_bias[0] = 10.0  # every token of the first MoE layer picks expert 0
    save_model(model, tmp_path / "model", tmp_path / "tok")
    ids = np.random.default_rng(0).integers(0, 300, size=3000)
    stats = {"train_characters": 6000, "val_characters": 2000}
    write_tokens(tmp_path / "tokens", load_tokenizer(tmp_path / "tok"), ids[:2000], ids[2000:], stats, "bpe")

    out = tmp_path / "expert_balance.json"
    args = ["--model-dir", str(tmp_path / "model"), "--tokens-dir", str(tmp_path / "tokens"), "--seq-len", "32"]
    result = CliRunner().invoke(main, [*args, "--batch-size", "4", "--threads", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["tables"]["expert_balance"]
    assert [(row["text"], row["mode"]) for row in rows[:2]] == [
        ("validation split", "eval"),
        ("validation split", "training (dropout on)"),
    ]
    reference = evaluate(model.eval(), ids[2000:], 32, 4)["balance"]["max_vio_global"]
    assert rows[0]["MaxVio global"] == pytest.approx(reference, abs=1e-6)
    # Expert 0 of the tiny preset's 4 holds one of each token's two choices: load 1/2 against a mean of 1/4.
    # Columns named as the expert-load figure's rows: the tiny preset's MoE block is layer 1, then the MTP module.
    assert list(rows[0])[3:] == model.config.moe_layer_names() == ["layer 1", "MTP 1"]
    assert all(row["layer 1"] == pytest.approx(1.0) for row in rows)
    assert rows[0]["MTP 1"] != rows[1]["MTP 1"]
    assert len(rows) == 6 and markdown_tables(result.stdout)[0][0] == list(rows[0])


def test_busy_machine_trains_alone_and_beside_a_busy_loop_with_each_thread_setting(command, tmp_path):
    """Four trainings in fresh processes, three beside a one-core busy loop: train.threads 0 (the default), then every
    core, then all but one, fixed; a fixed setting is the pool each of its steps used. (Nothing asserted depends on
    what else runs: the pools that train.threads 0 picks, and the speeds, are the measurement, not checked.)"""
    from benchmarks.busy_machine import COLUMNS
    from deepseek.cpu import machine_cores

    out = tmp_path / "busy_machine.json"
    args = shlex.split(BENCHMARK_TINY_ARGS["busy_machine"])  # test_docs leaves this measurement to this test
    result = CliRunner().invoke(command("busy_machine"), [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    [[header, *rows]] = markdown_tables(result.stdout)
    cores = machine_cores()
    assert header == COLUMNS
    assert [(row[0], row[1]) for row in rows] == [
        ("alone", "0 (the default)"),
        ("beside a one-core busy loop", "0 (the default)"),
        ("beside a one-core busy loop", str(cores)),
        ("beside a one-core busy loop", str(max(1, cores - 1))),
    ]
    assert [row[2] for row in rows[2:]] == [str(cores), str(max(1, cores - 1))]
    assert rows[0][4] == "100%"
    data = json.loads(out.read_text())["tables"]["busy_machine"]
    assert [row["case"] for row in data] == [row[0] for row in rows]
    assert all(row["tok/s"] > 0 for row in data)
