"""Every params value is checked before a stage starts work; a bad one gets one line naming the key."""

import dataclasses
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from deepseek.config import ModelConfig
from deepseek.errors import UserError
from stages.params import load_params, load_yaml

from pipeline_utils import ROOT


def write_params(tmp_path: Path, **changes) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in changes.items():
        params[section] = values if not isinstance(values, dict) else {**(params.get(section) or {}), **values}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_repository_params_are_valid():
    load_params(ROOT / "params.yaml")


@pytest.mark.parametrize(
    "changes, key",
    [
        (dict(train={"lr": -1.0}), "train.lr"),
        (dict(train={"lr": "fast"}), "train.lr"),
        (dict(train={"max_steps": 0}), "train.max_steps"),
        (dict(train={"dtype": "float8"}), "train.dtype"),
        (dict(train={"parallel": "zero3"}), "train.parallel"),
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
        (dict(seed=2**32), "seed"),
        (dict(train={"max_steps": 10.5}), "train.max_steps"),
        (dict(model={"num_layers": 2.5}), "model.num_layers"),
        (dict(model={"score_func": "relu"}), "model.score_func"),
        (dict(trian={"lr": 1.0}), "trian"),
        (dict(train={"lr": float("nan")}), "train.lr"),
        (dict(train={"lr": float("inf")}), "train.lr"),
        (dict(train={"grad_clip": float("-inf")}), "train.grad_clip"),
        (dict(sample={"temperature": float("nan")}), "sample.temperature"),
        (dict(sample={"top_p": float("nan")}), "sample.top_p"),
        (dict(model={"rms_norm_eps": 1e-300}), "model.rms_norm_eps"),
        (dict(model={"rope_theta": 1e300}), "model.rope_theta"),
        (dict(model={"bias_update_rate": float("inf")}), "model.bias_update_rate"),
    ],
)
def test_bad_params_value_names_the_key(tmp_path, changes, key):
    path = write_params(tmp_path, **changes)
    with pytest.raises(UserError, match=key.replace(".", r"\.")) as error:
        load_params(path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "changes, answer",
    [
        (dict(train={"learnig_rate": 1e-3}), "params train.learnig_rate is not a known key; did you mean train.lr?"),
        (dict(train={"max_iters": 5}), "params train.max_iters is not a known key; did you mean train.max_steps?"),
        (dict(model={"hiden_size": 64}), "params model.hiden_size is not a known key; did you mean model.hidden_size?"),
        (
            dict(sample={"temprature": 1}),
            "params sample.temprature is not a known key; did you mean sample.temperature",
        ),
        (dict(trian={"lr": 1.0}), "params trian is not a known section; did you mean train?"),
        (
            dict(train={"zzz": 1}),
            "params train.zzz is not a known key; known: max_steps, optimizer, micro_batch_size, ",
        ),
    ],
)
def test_a_misspelt_key_gets_the_closest_known_one(tmp_path, changes, answer):
    """The closest key, or the key another trainer's name stands for (learning_rate: lr); else the known ones."""
    with pytest.raises(UserError) as error:
        load_params(write_params(tmp_path, **changes))
    assert str(error.value).startswith(answer)


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
        load_params(path)


def test_model_overrides_apply_over_the_preset_and_null_keeps_it(tmp_path):
    path = write_params(tmp_path, model={"preset": "tiny", "num_layers": 3, "hidden_size": None}, train={"seq_len": 32})
    config = load_params(path).model.config(vocab_size=77)
    assert (config.num_layers, config.hidden_size, config.vocab_size) == (3, 32, 77)


def test_params_file_lists_every_model_field_so_dvc_set_reaches_it():
    """`dvc exp run -S model.X=...` only sets keys that exist in params.yaml (DVC asks for +model.X otherwise).
    Most are null (the preset's value); the few the defaults set on purpose must make a valid config."""
    model = load_yaml((ROOT / "params.yaml").read_text())["model"]
    fields = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "vocab_size"]
    assert list(model) == ["preset", *fields]
    chosen = {name: model[name] for name in fields if model[name] is not None}
    ModelConfig.from_preset(model["preset"], **chosen)


@pytest.mark.parametrize(
    "text, value",
    [
        ("3e-05", 3e-05),
        ("3E-5", 3e-5),
        ("1e3", 1000.0),
        ("2.0e-3", 2e-3),
        (".5e1", 5.0),
        ("-1e-4", -1e-4),
        ("1_000", 1000),
        ("0.001", 0.001),
    ],
)
def test_numbers_read_as_yaml_1_2_numbers_as_dvc_writes_them(text, value):
    loaded = load_yaml(f"x: {text}\n")["x"]
    assert loaded == value and type(loaded) is type(value)


def test_exponent_learning_rates_and_whole_float_counts_are_accepted(tmp_path):
    """What `dvc exp run -S train.lr=3e-5 -S train.min_lr=3e-6 -S train.max_steps=1e3` writes."""
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 3e-05\n  min_lr: 3e-06\n  max_steps: 1e3\nmodel:\n  num_layers: 2.0\n")
    params = load_params(path)
    assert (params.train.lr, params.train.min_lr) == (3e-05, 3e-06)
    assert params.train.max_steps == 1000 and type(params.train.max_steps) is int
    assert params.model.config(vocab_size=100).num_layers == 2


def test_sections_fill_in_defaults(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 0.001\n")
    params = load_params(path)
    assert params.train.lr == 0.001
    assert params.train.micro_batch_size == 16
    assert (params.seed, params.model.preset) == (1337, "cpu")
