"""The documentation's shell commands and Python snippets, as the tests read them from its Markdown."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
GATE = "python .ci/regression.py"  # docs/ci.md's regression-gate commands start so
STUDY = "deepseek study "  # and docs/studies/README.md's study commands so
# What a documented benchmark command runs with in the tests. The scripts' default presets take minutes (or a GPU);
# the tiny preset, seconds, on one thread. An option set here replaces the documented one.
BENCHMARK_TINY_ARGS = {
    # bf16 only, where each model compiles into one graph: the documented `--compile` run is the test that both
    # models compile (tests/test_compile.py covers fp32 training); compiling fp32 too took minutes on an AVX2 CPU.
    "train_throughput": "--preset tiny --precision bfloat16 --batch-size 2 --seq-len 16 --steps 1 --warmup 0 "
    "--device cpu --threads 1",
    "generation": "--preset tiny --contexts 8,32 --new-tokens 4 --no-cache-max-context 8 --repeats 1 --device cpu "
    "--threads 1",
    "memory": "--preset tiny --batch-size 2 --seq-len 16 --context 16 --new-tokens 4 --device cpu --threads 1",
    "speculative": "--preset tiny --contexts 8,16 --new-tokens 4 --repeats 1 --device cpu --threads 1",
    "expert_shapes": "--preset tiny --tokens 256 --steps 2 --matmuls 4 --threads 1",  # CPU only: oneDNN's shapes
    "expert_balance": "--seq-len 32 --threads 1",  # the tiny model trained by the README's `dvc repro`; its window
    "gpu_check": "--dry-run --threads 1",
    "busy_machine": "--preset tiny --seq-len 32 --steps 11",  # its trainings choose their threads themselves
    "system_metrics": "--seconds 1 --rounds 1",
}


def tiny_benchmark(code: str) -> str:
    """A documented `python -m benchmarks.NAME ...` command with BENCHMARK_TINY_ARGS[NAME] in place of the options
    they set (`--preset cpu --compile` keeps `--compile`; `--repeats 2` becomes the tiny `--repeats 1`)."""
    script = re.match(r"python -m benchmarks\.(\w+)", code)
    assert script, code
    tiny_args = BENCHMARK_TINY_ARGS[script.group(1)]
    for option in re.findall(r"(--[\w-]+) (?!--)\S+", tiny_args):  # the options that take a value
        code = re.sub(rf" {option} \S+", "", code)
    return f"{code} {tiny_args}"


# The documented measurements that tests/test_benchmarks.py makes itself, with the same tiny arguments, and whose
# tables it checks in detail: the documentation test leaves them to it.
MEASURED_BY_TEST_BENCHMARKS = {
    tiny_benchmark(f"python -m benchmarks.{name}") for name in ("memory", "gpu_check", "expert_shapes", "busy_machine")
}


@dataclasses.dataclass
class Command:
    doc: Path
    text: str  # as written, comments included

    @property
    def code(self) -> str:
        """The command without its trailing comment."""
        return re.sub(r"\s+#\s.*$", "", self.text).strip()


def fenced_blocks(path: Path) -> list[tuple[str, str]]:
    """(language, body) of each fenced code block of a Markdown file."""
    return re.findall(r"^```(\w*)\n(.*?)^```", path.read_text(), flags=re.MULTILINE | re.DOTALL)


def shell_commands(path: Path) -> list[Command]:
    commands = []
    for language, body in fenced_blocks(path):
        if language in SHELL_LANGUAGES:
            for line in body.replace("\\\n", " ").splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    commands.append(Command(path, line.strip()))
    return commands


def python_snippets(path: Path) -> list[str]:
    return [body for language, body in fenced_blocks(path) if language == "python"]


def gate_commands(ci_page: Path) -> list[str]:
    """The regression-gate commands of docs/ci.md, as written (comments left out)."""
    return [command.code for command in shell_commands(ci_page) if command.code.startswith(GATE)]


def study_commands(studies_page: Path) -> list[str]:
    """The `deepseek study` commands of docs/studies/README.md, as written (comments left out)."""
    return [command.code for command in shell_commands(studies_page) if command.code.startswith(STUDY)]
