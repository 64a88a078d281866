"""deepseek/ is a library of its own: it builds, trains, saves, loads and samples a model without the pipeline."""

from __future__ import annotations

import subprocess
import sys

from pipeline_utils import ROOT

ALONE = """
import sys
from pathlib import Path
import numpy as np
import torch
from deepseek.checkpoint import load_model, save_model
from deepseek.config import ModelConfig
from deepseek.train_config import TrainConfig
from deepseek.generate import generate
from deepseek.model import DeepSeekLM
from deepseek.trainer import Trainer, TrainOutputs

out = sys.argv[1]
tokens = np.random.default_rng(0).integers(0, 65, 4000).astype(np.uint16)
model = DeepSeekLM(ModelConfig.from_preset("tiny"))
before = model.head.weight.detach().clone()
config = TrainConfig(max_steps=1, micro_batch_size=2, grad_accum_steps=1, seq_len=16, eval_batches=1, device="cpu")
trainer = Trainer(model, config, seed=0, outputs=TrainOutputs(Path(out, "checkpoints")))
metrics = trainer.fit(tokens, tokens)
assert metrics.steps == 1 and np.isfinite(metrics.train_loss)
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


# Every process-wide setting a training could touch, as a printable snapshot. glibc's malloc settings have no
# getter, so deepseek.cpu.keep_freed_memory (the one function that sets them) is watched instead, as is CoreShare
# (which registers the training in a machine-wide directory).
SETTINGS_UNTOUCHED = """
import os, signal, sys
from pathlib import Path
import numpy as np
import torch
import deepseek.cpu

calls = []
deepseek.cpu.keep_freed_memory = lambda: calls.append("keep_freed_memory")
real_core_share = deepseek.cpu.CoreShare
deepseek.cpu.CoreShare = lambda *args, **kwargs: calls.append("CoreShare") or real_core_share(*args, **kwargs)


def snapshot():
    return {
        "threads": torch.get_num_threads(),
        "tf32": (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32),
        "matmul precision": torch.get_float32_matmul_precision(),
        "default dtype": torch.get_default_dtype(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "signals": [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)],
        # torch itself sets TORCHINDUCTOR_CACHE_DIR when it first loads inductor (the fused optimizer does)
        "environment": {k: v for k, v in os.environ.items() if not k.startswith("TORCHINDUCTOR_")},
        "cwd": os.getcwd(),
    }


before = snapshot()
import deepseek.trainer
from deepseek.config import ModelConfig
from deepseek.model import DeepSeekLM
from deepseek.train_config import TrainConfig

assert snapshot() == before, "importing deepseek.trainer"
tokens = np.random.default_rng(0).integers(0, 65, 4000).astype(np.uint16)
config = TrainConfig(max_steps=2, micro_batch_size=2, grad_accum_steps=1, seq_len=16, eval_batches=1, threads=1)
model = DeepSeekLM(ModelConfig.from_preset("tiny"))
trainer = deepseek.trainer.Trainer(model, config, 0, deepseek.trainer.TrainOutputs(Path(sys.argv[1])))
assert snapshot() == before, "making a Trainer"
trainer.fit(tokens, tokens)  # threads 1: it sizes the pool while it trains, then restores it
assert snapshot() == before, "training"
assert not calls, calls
print("untouched")
"""


def test_importing_or_running_the_trainer_changes_no_process_wide_setting(tmp_path):
    """Host policy (threads shared with other trainings, glibc's malloc, TF32) is the entry point's to apply
    (deepseek.device.configure_host), not the library's."""
    result = subprocess.run(
        [sys.executable, "-c", SETTINGS_UNTOUCHED, str(tmp_path)],
        capture_output=True,
        text=True,
        env={"PATH": "", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"},  # not train.threads' 1: a change shows
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "untouched"
