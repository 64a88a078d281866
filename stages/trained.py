"""A trained model and its tokenizer, as the train stage saved them together in model/final."""

from __future__ import annotations

from pathlib import Path

from deepseek.checkpoint import TOKENIZER, load_model
from deepseek.model import DeepSeekLM
from stages.tokenizer import SavedTokenizer, check_vocabulary, load_tokenizer


def load_trained(model_dir: str | Path) -> tuple[DeepSeekLM, SavedTokenizer]:
    """The model and its tokenizer, refusing a tokenizer with more ids than the model has embeddings for."""
    model_dir = Path(model_dir)
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir / TOKENIZER)
    check_vocabulary(len(tokenizer), model.config.vocab_size, f"the tokenizer in {model_dir / TOKENIZER}")
    return model, tokenizer
