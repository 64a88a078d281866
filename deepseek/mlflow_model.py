"""The MLflow pyfunc model, logged as code (MLflow's "models from code"), so loading it unpickles nothing.

`mlflow.pyfunc.load_model(uri).predict(token_ids)` returns next-token logits, [batch][seq][vocab].
"""
from __future__ import annotations

import numpy as np
import torch
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class DeepSeekPyfunc(PythonModel):
    def load_context(self, context) -> None:
        from deepseek.checkpoint import load_model

        self.model = load_model(context.artifacts["model"]).eval()

    def predict(self, model_input: list[list[int]], params=None) -> list[list[list[float]]]:
        """Token ids, one list per sequence (all of one length) -> logits."""
        ids = torch.as_tensor(np.asarray(model_input), dtype=torch.long)
        with torch.no_grad():
            return self.model(ids).logits.tolist()


set_model(DeepSeekPyfunc())
