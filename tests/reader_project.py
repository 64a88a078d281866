"""The project as a reader clones it: the tiny pipeline run once and committed, shared by the documentation test
and the end-to-end pipeline test, and the clones they work in."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from pipeline_utils import make_pipeline_repo, run, tiny_corpus


@dataclasses.dataclass(frozen=True)
class ReaderProject:
    """The project as a reader clones it, and what the tiny settings of its commands need, in directory."""

    directory: Path

    @property
    def origin(self) -> Path:  # the pipeline run and committed (dvc.lock, reports), on tiny params
        return self.directory / "origin"

    @property
    def first_repro(self) -> Path:  # what the origin's `dvc repro`, the project's first, printed
        return self.directory / "first-repro.txt"

    @property
    def tokenizer_dir(self) -> Path:  # a local stand-in for the hub tokenizer of the original configuration
        return self.directory / "pretrained-tokenizer"

    def build(self) -> None:
        from stages.params import TokenizerParams
        from stages.tokenizer import build_tokenizer

        make_pipeline_repo(self.origin)
        # The regression gate's profile: a few seconds of the tiny model, not two minutes of the cpu one.
        (self.origin / ".ci" / "profile.yaml").write_text("seed: 7\nmlflow:\n  register_model: false\n")
        self.first_repro.write_text(run(["dvc", "repro"], self.origin).stdout)
        run(["git", "add", "-A"], self.origin)
        run(["git", "commit", "-qm", "the default run"], self.origin)
        tokenizer = build_tokenizer(TokenizerParams(kind="bpe", vocab_size=300), tiny_corpus())
        tokenizer.save_pretrained(self.tokenizer_dir)


def workspace(project: ReaderProject, path: Path, after_quickstart: bool, with_store: bool = True) -> Path:
    """A clone of the project, with the corpus where the README puts it offline; after_quickstart, also with what
    the README's `dvc repro` leaves: the outputs, DVC's cache and (with_store) the MLflow store, copied from the
    origin's run. Without the store, the clone's first run makes its own, as a project's first run does."""
    run(["git", "clone", "-q", str(project.origin), str(path)], path.parent)
    shutil.copy(project.origin / "data" / "input-1.txt", path / "data" / "input-1.txt")
    if after_quickstart:
        shutil.copytree(project.origin / ".dvc" / "cache", path / ".dvc" / "cache")
        if with_store:
            shutil.copy(project.origin / "mlflow.db", path / "mlflow.db")
        run(["dvc", "checkout", "-q"], path)
    return path
