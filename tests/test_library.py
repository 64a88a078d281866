"""deepseek/ is a library of its own: it builds, trains, saves, loads and samples a model without the pipeline."""

from __future__ import annotations

import subprocess
import sys

from pipeline_utils import ROOT

ALONE = """
import sys
import numpy as np
import torch
from deepseek.checkpoint import load_model, save_model
from deepseek.config import ModelConfig, TrainConfig
from deepseek.generate import generate
from deepseek.model import DeepSeekLM
from deepseek.trainer import Trainer, TrainOutputs

out = sys.argv[1]
tokens = np.random.default_rng(0).integers(0, 65, 4000).astype(np.uint16)
model = DeepSeekLM(ModelConfig.from_preset("tiny"))
before = model.head.weight.detach().clone()
config = TrainConfig(max_steps=1, micro_batch_size=2, grad_accum_steps=1, seq_len=16, eval_batches=1, device="cpu")
trainer = Trainer(model, config, seed=0, outputs=TrainOutputs(f"{out}/checkpoints", f"{out}/reports"))
metrics = trainer.fit(tokens, tokens)
assert metrics["steps"] == 1 and np.isfinite(metrics["train_loss"])
assert not torch.equal(model.head.weight, before)
loaded = load_model(save_model(model, f"{out}/final"))
tokens = generate(loaded, torch.tensor([[1, 2, 3]]), max_new_tokens=5, temperature=0)
assert tokens.shape == (1, 8)
print(sorted({name.split(".")[0] for name in sys.modules}))
"""


def test_the_library_trains_saves_and_generates_without_mlflow_dvc_click_or_the_pipeline(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", ALONE, str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": "", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    imported = set(eval(result.stdout.strip().splitlines()[-1]))
    assert "deepseek" in imported and "torch" in imported
    assert not imported & {"mlflow", "dvc", "click", "stages", "yaml", "transformers"}, imported & {
        "mlflow",
        "dvc",
        "click",
        "stages",
        "yaml",
        "transformers",
    }
