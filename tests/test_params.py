"""Every params value is checked before a stage starts work; a bad one gets one line naming the key."""
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from deepseek.errors import UserError
from deepseek.params import check_params, load_model_config, load_section
from pipeline_utils import ROOT


def write_params(tmp_path: Path, **changes) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in changes.items():
        params[section] = values if not isinstance(values, dict) else {**(params.get(section) or {}), **values}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_repository_params_are_valid():
    check_params(ROOT / "params.yaml")


@pytest.mark.parametrize("changes, key", [
    (dict(train={"lr": -1.0}), "train.lr"),
    (dict(train={"lr": "fast"}), "train.lr"),
    (dict(train={"max_steps": 0}), "train.max_steps"),
    (dict(train={"dtype": "float8"}), "train.dtype"),
    (dict(train={"min_lr": 1.0}), "train.min_lr"),
    (dict(train={"learning_rate": 1.0}), "train.learning_rate"),
    (dict(train={"seq_len": 4096}), "train.seq_len"),
    (dict(model={"hidden_size": 0}), "hidden_size"),
    (dict(model={"num_experts_per_tok": 99}), "num_experts_per_tok"),
    (dict(model={"preset": "huge"}), "preset"),
    (dict(model={"hiden_size": 64}), "hiden_size"),
    (dict(model={"vocab_size": 100}), "model.vocab_size"),
    (dict(tokenizer={"kind": "sentencepiece"}), "tokenizer.kind"),
    (dict(tokenizer={"vocab_size": 10}), "tokenizer.vocab_size"),
    (dict(data={"val_fraction": 1.5}), "data.val_fraction"),
    (dict(sample={"prompts": []}), "sample.prompts"),
    (dict(sample={"top_p": 0.0}), "sample.top_p"),
    (dict(sample={"temperature": -1}), "sample.temperature"),
    (dict(evaluate={"batch_size": 0}), "evaluate.batch_size"),
    (dict(seed=-3), "seed"),
    (dict(trian={"lr": 1.0}), "trian"),
])
def test_bad_params_value_names_the_key(tmp_path, changes, key):
    path = write_params(tmp_path, **changes)
    with pytest.raises(UserError, match=key.replace(".", r"\.")) as error:
        check_params(path)
    assert "\n" not in str(error.value)


def test_every_stage_checks_all_params_before_work(tmp_path, monkeypatch):
    """A bad train value stops the first stage, before it reads or writes anything."""
    from stages.prepare import prepare
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, train={"lr": -1.0})
    result = CliRunner().invoke(prepare, [])
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert result.output.startswith("Error: params train.lr")
    assert "Traceback" not in result.output
    assert not (tmp_path / "data").exists()


def test_invalid_yaml_is_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: {lr: [\n")
    with pytest.raises(UserError, match="not valid YAML"):
        check_params(path)


def test_model_overrides_apply_over_the_preset(tmp_path):
    path = write_params(tmp_path, model={"preset": "tiny", "num_layers": 3})
    config = load_model_config(vocab_size=77, path=path)
    assert (config.num_layers, config.hidden_size, config.vocab_size) == (3, 32, 77)


def test_sections_fill_in_defaults(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 0.001\n")
    assert load_section("train", path).lr == 0.001
    assert load_section("train", path).micro_batch_size == 16
