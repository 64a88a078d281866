"""Every pipeline execution is one MLflow run in one store; its artifacts are the DVC outputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from deepseek.checkpoint import load_model
from stages.params import load_yaml
from stages.tracking import EXPERIMENT, flatten


def store(repo: Path) -> mlflow.MlflowClient:
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(uri)


@pytest.mark.slow
def test_all_three_runs_land_in_one_store(tracked_repo):
    client = store(tracked_repo)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    assert experiment.artifact_location == (tracked_repo / "mlartifacts").as_uri()
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3
    params = {r.info.run_name: r.data.params for r in runs}
    assert {"lr-3e-5", "layers-3"} <= set(params)
    assert sorted(float(p["train.lr"]) for p in params.values()) == [3e-5, 0.003, 0.003]
    assert float(params["lr-3e-5"]["train.min_lr"]) == 3e-6
    # The model fields as built: the tiny preset's 2 layers, but 3 where -S model.num_layers=3 set them.
    assert {name: int(p["model.num_layers"]) for name, p in params.items()} == {
        name: 3 if name == "layers-3" else 2 for name in params
    }
    base = load_yaml((tracked_repo / "params.yaml").read_text())
    for r in runs:
        assert r.info.status == "FINISHED"
        assert set(flatten(base)) <= set(r.data.params)  # every param, flattened
        assert len(client.get_metric_history(r.info.run_id, "loss")) == 3  # max_steps 6, log_interval 2
        assert len(client.get_metric_history(r.info.run_id, "val_loss_sampled")) == 2
        assert "val.bits_per_character" in r.data.metrics
        # Facts of the corpus are the run's dataset, not params or metrics that would crowd every comparison.
        assert not any(key.startswith(("data.", "model.parameters.")) for key in r.data.metrics)
        assert int(r.data.tags["model.parameters.total"]) > 0
        assert r.data.tags["train.precision_reason"].startswith("train.dtype")  # what auto saw, or the setting
        assert r.inputs is not None
        (dataset,) = [d.dataset for d in r.inputs.dataset_inputs]
        assert dataset.profile is not None
        assert dataset.name == "shakespeare" and json.loads(dataset.profile)["characters"] > 0
        assert {"git_commit", "git_dirty", "data_sha256", "dvc_exp_name", "dvc_baseline_rev"} <= set(r.data.tags)
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"checkpoint", "checkpoints", "samples", "figures", "tokenizer", "params.yaml", "dvc.lock"} <= artifacts
        assert {a.path for a in client.list_artifacts(r.info.run_id, "samples")} == {
            "samples/samples.md",
            "samples/samples.json",
        }
    queued = [r for r in runs if r.info.run_name in ("lr-3e-5", "layers-3")]
    assert len(queued) == 2 and all(r.data.tags["dvc_baseline_rev"] for r in queued)


@pytest.mark.slow
def test_checkpoint_artifact_is_the_dvc_tracked_file(tracked_repo, tmp_path):
    client = store(tracked_repo)
    run_id = json.loads((tracked_repo / "reports" / "mlflow_run.json").read_text())["run_id"]
    downloaded = Path(client.download_artifacts(run_id, "checkpoint", str(tmp_path)))
    tracked = tracked_repo / "model" / "final"
    assert (downloaded / "model.safetensors").read_bytes() == (tracked / "model.safetensors").read_bytes()
    # ... and it is the file in DVC's cache that dvc.lock points to.
    lock = yaml.safe_load((tracked_repo / "dvc.lock").read_text())
    final = next(o for o in lock["stages"]["train"]["outs"] if o["path"] == "model/final")
    manifest = tracked_repo / ".dvc" / "cache" / "files" / "md5" / final["md5"][:2] / final["md5"][2:]
    entries = {e["relpath"]: e["md5"] for e in json.loads(manifest.read_text())}
    assert hashlib.md5((downloaded / "model.safetensors").read_bytes()).hexdigest() == entries["model.safetensors"]
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    torch.testing.assert_close(load_model(downloaded)(ids).logits, load_model(tracked)(ids).logits, rtol=0, atol=0)


@pytest.mark.slow
def test_registered_model_loads_back_to_the_same_logits(tracked_repo, tmp_path):
    client = store(tracked_repo)
    version = client.get_model_version_by_alias("deepseek-repro", "candidate")
    assert version.run_id is not None
    assert int(version.version) == 3  # one version per run; the alias is on the newest
    pyfunc = mlflow.pyfunc.load_model("models:/deepseek-repro@candidate")
    ids = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]]
    checkpoint = load_model(client.download_artifacts(version.run_id, "checkpoint", str(tmp_path)))
    expected = checkpoint(torch.tensor(ids)).logits.detach().numpy()
    # Every documented input format: lists, a NumPy array of any integer type, a DataFrame with a row per sequence.
    for model_input in (ids, np.array(ids), np.array(ids, dtype=np.int32), pd.DataFrame(ids)):
        np.testing.assert_allclose(np.array(pyfunc.predict(model_input)), expected, rtol=0, atol=1e-6)
