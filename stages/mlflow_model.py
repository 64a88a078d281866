"""The MLflow pyfunc model, logged as code (MLflow's "models from code"), so loading it unpickles nothing.

`mlflow.pyfunc.load_model(uri).predict(token_ids)` returns next-token logits, [batch][seq][vocab]; token_ids is
a list of equal-length lists of ints, a 2-D integer NumPy array or a DataFrame (rows = sequences).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from mlflow.models import set_model
from mlflow.pyfunc.model import PythonModel, PythonModelContext  # where mlflow.pyfunc's names are defined


class DeepSeekPyfunc(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        from deepseek.checkpoint import load_model

        self.model = load_model(context.artifacts["model"])

    # No type hint on model_input: MLflow validates input against it, and list[list[int]] refuses a NumPy array
    # while list[Any] reads a DataFrame's first column only. Unhinted, MLflow passes the input through as given.
    def predict(  # type: ignore[no-untyped-def,override]
        self, model_input, params: dict[str, Any] | None = None
    ) -> list[list[list[float]]]:
        """Token ids, one row per sequence, all of one length -> logits, [batch][seq][vocab] nested lists.

        model_input: a list of lists of ints, a 2-D integer NumPy array, or a pandas DataFrame whose rows are
        sequences and whose columns are positions.
        """
        ids = torch.from_numpy(np.array(model_input, dtype=np.int64))  # a copy: inputs may be read-only
        if ids.dim() != 2:
            raise ValueError(f"expected token ids of shape [batch, seq], got shape {list(ids.shape)}")
        with torch.no_grad():
            logits: list[list[list[float]]] = self.model(ids).logits.tolist()  # typed here: module calls return Any
        return logits


set_model(DeepSeekPyfunc())
