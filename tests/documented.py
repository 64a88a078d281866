"""The documentation's shell commands and Python snippets, as the tests read them from its Markdown."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
GATE = "python .ci/regression.py"  # docs/ci.md's regression-gate commands start so


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
