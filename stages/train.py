"""DVC stage `train`: DeepSeekLM on the tokenized corpus, with params `seed`, `model` and `train`."""
from __future__ import annotations

from pathlib import Path

import click

from deepseek.checkpoint import save_model
from deepseek.errors import UserError, report_user_errors
from deepseek.files import write_json
from deepseek.model import DeepSeekLM
from deepseek.params import load_model_config, load_section, load_seed
from deepseek.tokenizer import load_meta, load_tokenizer, load_tokens
from deepseek.trainer import Sampler, TrainOutputs, seed_everything
from deepseek.trainer import train as run_training


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(),
              help="Parameters file.")
@click.option("--tokens-dir", default="data/tokens", show_default=True, type=click.Path(path_type=Path))
@click.option("--tokenizer-dir", default="data/tokenizer", show_default=True, type=click.Path(path_type=Path))
@click.option("--model-dir", default="model", show_default=True, type=click.Path(path_type=Path),
              help="Gets final/ (weights, config, tokenizer) and checkpoints/.")
@click.option("--reports-dir", default="reports", show_default=True, type=click.Path(path_type=Path),
              help="Gets train_metrics.json and the loss logs train_log.csv, val_log.csv.")
@report_user_errors
def train(params_path: str, tokens_dir: Path, tokenizer_dir: Path, model_dir: Path, reports_dir: Path) -> None:
    """Train the model described by params.yaml `model` with the settings of `train`."""
    train_params = load_section("train", params_path)
    seed = load_seed(params_path)
    meta = load_meta(tokens_dir)
    config = load_model_config(meta["vocab_size"], params_path)
    tokenizer = load_tokenizer(tokenizer_dir)
    train_tokens, val_tokens = load_tokens(tokens_dir, "train"), load_tokens(tokens_dir, "val")

    seed_everything(seed)
    model = DeepSeekLM(config)
    counts = model.parameter_counts()
    click.echo(f"model: {counts['total'] / 1e6:.2f}M parameters, {counts['active'] / 1e6:.2f}M active per token; "
               f"{train_params.max_steps} steps of {train_params.tokens_per_step:,} tokens")
    sampler = Sampler(encode=lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
                      decode=tokenizer.decode, prompt=train_params.sample_prompt,
                      max_new_tokens=train_params.sample_tokens, seed=seed)
    try:
        metrics = run_training(model, train_params, train_tokens, val_tokens, seed,
                               TrainOutputs(model_dir / "checkpoints", reports_dir), sampler=sampler)
    except ValueError as error:  # e.g. a split too short for the sequence length, or no CUDA device
        raise UserError(str(error)) from None
    save_model(model, model_dir / "final", tokenizer_dir=tokenizer_dir)
    write_json(reports_dir / "train_metrics.json", {**metrics, "parameters": counts})
    click.echo(f"done: train loss {metrics['train_loss']:.4f}, val loss {metrics['val_loss']:.4f}; "
               f"model in {model_dir / 'final'}")


if __name__ == "__main__":
    train()
