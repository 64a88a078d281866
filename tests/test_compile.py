"""train.compile: a torch.compile'd training forward follows the eager one."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from deepseek.config import ModelConfig
from deepseek.model import DeepSeekLM
from deepseek.train_config import TrainConfig
from deepseek.trainer import Trainer, TrainOutputs


@pytest.mark.slow  # compiling takes about half a minute on two cores
# bf16 also compiles a multi-token prediction module (one compile per precision keeps the test short).
@pytest.mark.parametrize("dtype, tolerance, mtp_depth", [("float32", 1e-4, 0), ("bfloat16", 2e-2, 1)])
def test_compiled_training_matches_eager_training(tmp_path, dtype, tolerance, mtp_depth):
    tokens = np.random.default_rng(0).integers(0, 65, 5000).astype(np.uint16)
    params = TrainConfig(
        max_steps=4,
        micro_batch_size=4,
        grad_accum_steps=2,
        seq_len=32,
        log_interval=1,
        eval_interval=4,
        eval_batches=1,
        checkpoint_interval=100,
        sample_interval=100,
        dtype=dtype,
    )
    trained = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = DeepSeekLM(ModelConfig.from_preset("tiny", mtp_depth=mtp_depth))
        outputs = TrainOutputs(tmp_path / f"ck{compiled}")
        metrics = Trainer(model, replace(params, compile=compiled), 0, outputs).fit(tokens, tokens)
        trained[compiled] = metrics, model.state_dict()
    (eager_metrics, eager_state), (compiled_metrics, compiled_state) = trained[False], trained[True]
    for key in ("train_loss", "val_loss_sampled"):
        assert getattr(compiled_metrics, key) == pytest.approx(getattr(eager_metrics, key), abs=tolerance), key
    for name, value in eager_state.items():  # weights and the balancing biases
        torch.testing.assert_close(compiled_state[name], value, atol=tolerance / 10, rtol=tolerance, msg=name)
