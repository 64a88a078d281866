"""dvc.yaml's code dependencies are right by construction: every module a stage imports is among them, DVC sees
all code, and the train stage's resume fingerprint hashes exactly the code DVC reruns it for."""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path

import yaml

from stages.stage_code import code_version, stage_code

from pipeline_utils import ROOT

PACKAGES = ("deepseek", "stages")


def module_file(module: str) -> Path | None:
    """The source file of one of our modules (a package means its __init__.py), or None for anything else."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.relative_to(ROOT)
    return None


def imports_of(path: Path) -> set[Path]:
    """Our modules that the file imports, at any depth of its code (lazy imports inside functions included)."""
    found = set()
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from deepseek import distributed` imports deepseek/__init__.py and, if it is one, the submodule.
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
                if (file := module_file(".".join(parts[:depth]))) is not None:
                    found.add(file)
    return found


def import_closure(path: Path) -> set[Path]:
    closure, todo = set(), [path]
    while todo:
        current = todo.pop()
        if current not in closure:
            closure.add(current)
            todo.extend(imports_of(current))
    return closure


def stage_module(command: str) -> Path:
    (module,) = re.findall(r"python -m ([\w.]+)", command)
    file = module_file(module)
    assert file is not None, command
    return file


def missing_code_deps(dvc: dict) -> dict[str, list[str]]:
    """For each stage, the files its command imports that none of its dependencies covers."""
    missing = {}
    for name, stage in dvc["stages"].items():
        deps = [Path(dep) for dep in stage.get("deps", [])]
        needed = import_closure(stage_module(stage["cmd"]))
        uncovered = sorted(str(f) for f in needed if not any(f == dep or dep in f.parents for dep in deps))
        if uncovered:
            missing[name] = uncovered
    return missing


def dvc_file() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def test_every_stage_depends_on_all_the_code_it_imports():
    assert missing_code_deps(dvc_file()) == {}


def test_the_check_fails_when_a_needed_dependency_is_removed():
    dvc = dvc_file()
    for stage in dvc["stages"].values():
        broken = copy.deepcopy(dvc)
        name = next(n for n, s in dvc["stages"].items() if s is stage)
        code = [dep for dep in stage["deps"] if dep.endswith(".py") or dep in PACKAGES]
        assert code, name
        broken["stages"][name]["deps"].remove(code[-1])
        assert name in missing_code_deps(broken), f"removing {code[-1]} from {name} went unnoticed"


def test_the_closure_follows_imports_into_the_model():
    sample = import_closure(Path("stages/sample.py"))
    assert {
        Path("deepseek/attention.py"),
        Path("deepseek/model.py"),
        Path("deepseek/moe.py"),
        Path("stages/tokenizer.py"),
    } <= sample


def test_dvc_sees_all_code():
    ignored = (ROOT / ".dvcignore").read_text().splitlines()
    patterns = [line.strip() for line in ignored if line.strip() and not line.startswith("#")]
    assert all(not pattern.endswith(".py") and pattern not in PACKAGES for pattern in patterns), patterns


def test_resume_fingerprint_hashes_exactly_the_train_stage_code():
    files = set(stage_code("train"))
    assert import_closure(Path("stages/train.py")) <= files
    deps = [Path(dep) for dep in dvc_file()["stages"]["train"]["deps"]]
    python = {
        p.relative_to(ROOT)
        for dep in deps
        for p in ([ROOT / dep] if dep.suffix else (ROOT / dep).rglob("*.py"))
        if p.suffix == ".py" and "__pycache__" not in p.parts
    }
    assert files == python


def test_code_version_changes_with_any_file_the_train_stage_runs(tmp_path):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        for source in (ROOT / package).glob("*.py"):
            (tmp_path / package / source.name).write_text(source.read_text())
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    before = code_version(root=tmp_path)
    with open(tmp_path / "stages" / "train.py", "a") as f:
        f.write("# an edit\n")
    assert code_version(root=tmp_path) != before
