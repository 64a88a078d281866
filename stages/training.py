"""The train stage's work: the model, its tracking run, resume, training and the saved outputs.

Apart from the command (stages/train.py), so that `deepseek train --help` starts without loading torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import click
import torch

from deepseek import distributed
from deepseek.checkpoint import (
    CONFIG,
    INFO,
    MODEL_DIR,
    WEIGHTS,
    ResumePoint,
    find_resume_point,
    list_checkpoints,
    run_fingerprint,
    save_model,
)
from deepseek.config import ModelConfig
from deepseek.cpu import describe_machine
from deepseek.device import (
    configure_host,
    describe_precision,
    precision_reason,
    resolve_device,
    resolve_dtype,
    seed_everything,
)
from deepseek.files import check_replaceable, directory_lock, write_json
from deepseek.generate import Sampler
from deepseek.model import DeepSeekLM
from deepseek.stopping import TrainingStopped
from deepseek.train_metrics import FitMetrics
from deepseek.trainer import Trainer, TrainOutputs
from deepseek.versions import warn_if_different
from stages import environment, tracking
from stages.options import TRAIN_LOG, VAL_LOG
from stages.params import DataParams, Params, SampleParams, load_params
from stages.stage_code import code_version
from stages.tokenizer import SavedTokenizer, load_meta, load_tokenizer, load_tokens


def run_training(
    params_path: str, data_stats: Path, tokens_dir: Path, tokenizer_dir: Path, model_dir: Path, reports_dir: Path
) -> None:
    """The train command's work (its --help says what it does)."""
    distributed.init_from_env()  # under torchrun; a no-op for one process
    params = load_params(params_path)
    tracking.check_tracking_uri()
    meta = load_meta(tokens_dir)
    config = params.model.config(meta["vocab_size"])
    tokenizer = load_tokenizer(tokenizer_dir)
    stats = json.loads(data_stats.read_text()) if data_stats.exists() else {}

    seed_everything(params.seed)
    model = DeepSeekLM(config)
    counts = model.parameter_counts()
    device = resolve_device(params.train.device)
    precision = describe_precision(resolve_dtype(params.train.dtype, device))
    _announce(params, counts, precision, device)
    # What the trained weights depend on; a checkpoint resumes only onto the same (stages/stage_code.py: "code").
    fingerprint = {
        "params": run_fingerprint(config.to_dict(), params.train.optimisation(), params.seed),
        "data": run_fingerprint(meta, stats.get("sha256")),
        "code": code_version(),
    }
    # One training at a time writes model_dir (rank 0 writes for all ranks).
    with directory_lock(model_dir, "training") if distributed.is_main() else nullcontext():
        check_replaceable(model_dir / "final", MODEL_DIR, inputs=[tokenizer_dir])  # before training, not after
        resume = _resume_point(model_dir / "checkpoints", fingerprint, params.train.max_steps)
        tags = _run_tags(params, stats, config, counts, precision, device)
        run = _tracking_run(params, config.to_dict(), tags, stats, resume, params_path, tokenizer_dir)
        if distributed.is_main():
            run.write_run_file(reports_dir / tracking.RUN_FILE)
        trainer = Trainer(
            model,
            params.train,
            params.seed,
            TrainOutputs(model_dir / "checkpoints", reports_dir / TRAIN_LOG, reports_dir / VAL_LOG),
            sampler=_sampler(params.sample, tokenizer),
            sinks=[run],
            checkpoint_info={"fingerprint": fingerprint, "mlflow_run_id": run.run_id},
            core_share=configure_host(device, params.train.threads),
        )
        if resume is not None:
            trainer.resume(resume)
        metrics = _fit(trainer, run, tokens_dir)
        trained = trainer.full_model()  # on every rank: under FSDP, a collective that gathers the shards to rank 0
        if distributed.is_main():
            _save_outputs(trained, metrics, counts, run, params, model_dir, tokenizer_dir, reports_dir)


def _resume_point(checkpoint_dir: Path, fingerprint: dict[str, str], max_steps: int) -> ResumePoint | None:
    """Where an interrupted training of the same params, data and code stopped; None to start over, which a
    finished training also does: rerunning it (dvc repro -f) trains again, in a new MLflow run."""
    # Under torchrun rank 0 looks first: it alone removes leftovers and sets checkpoints aside; the others read.
    if not distributed.is_main():
        distributed.barrier()
    resume = find_resume_point(checkpoint_dir, fingerprint)
    if distributed.is_main():
        distributed.barrier()
    if resume is not None and resume.step >= max_steps:
        click.echo(f"{resume.path} is a finished training of these params, data and code: training again")
        return None
    if resume is not None:
        warn_if_different(resume.environment, f"the checkpoint {resume.path}")
    return resume


def _announce(params: Params, counts: dict[str, int], precision: str, device: torch.device) -> None:
    """The run in one line: the model's size, the steps, and how and why it computes as it does."""
    click.echo(
        f"model: {counts['total'] / 1e6:.2f}M parameters, {counts['active'] / 1e6:.2f}M active per token; "
        f"{params.train.max_steps} steps of {params.train.tokens_per_step:,} tokens; {precision} on {device.type} "
        f"({precision_reason(params.train.dtype, device)})"
    )


def _fit(trainer: Trainer, run: tracking.Run, tokens_dir: Path) -> FitMetrics:
    """trainer.fit, with the MLflow run closed as KILLED or FAILED, and the exit code, when it stops early."""
    try:
        return trainer.fit(load_tokens(tokens_dir, "train"), load_tokens(tokens_dir, "val"))
    except TrainingStopped as stopped:
        run.finish("KILLED")
        click.echo(str(stopped) if stopped.by_signal else f"Error: {stopped}", err=True)
        sys.exit(stopped.exit_code)
    except BaseException:
        run.finish("FAILED")
        raise


def _sampler(sample: SampleParams, tokenizer: SavedTokenizer) -> Sampler:
    """Training's periodic sample: the first of the sample stage's prompts, with its settings."""
    return Sampler(
        encode=tokenizer.encode,
        decode=tokenizer.decode,
        prompt=sample.prompts[0],
        max_new_tokens=sample.max_new_tokens,
        temperature=sample.temperature,
        top_k=sample.top_k,
        top_p=sample.top_p,
        seed=sample.seed,
    )


def _tracking_run(
    params: Params,
    model_config: dict[str, Any],
    tags: dict[str, str],
    stats: dict[str, Any],  # data_stats.json
    resume: ResumePoint | None,
    params_path: str,
    tokenizer_dir: Path,
) -> tracking.Run:
    """The MLflow run: the interrupted one a resumed training goes on in, or a new one with params, tags,
    the dataset and the tokenizer."""
    if not distributed.is_main():
        return tracking.Run(None, None)  # only rank 0 tracks and writes files
    if resume is not None and resume.mlflow_run_id:
        run = tracking.Run.attach(resume.mlflow_run_id)
        run.claim()
        run.monitor_system(resumed=True)
        return run
    # The model section as it resolved (its nulls are the preset's values), so runs compare by what they trained.
    logged = params.values | {"model": {"preset": params.model.preset, **model_config}}
    run = tracking.Run.start(params=logged, tags=tags)
    run.log_dataset(stats, source=_corpus_uri(params.data))
    run.log_artifact(params_path)
    run.log_artifact(tokenizer_dir, "tokenizer")
    run.log_text(environment.pip_freeze(), f"environment/{environment.FREEZE_FILE}")
    run.monitor_system(resumed=False)
    return run


def _save_outputs(
    model: DeepSeekLM,
    metrics: FitMetrics,
    counts: dict[str, int],
    run: tracking.Run,
    params: Params,
    model_dir: Path,
    tokenizer_dir: Path,
    reports_dir: Path,
) -> None:
    """model/final, the training summary, and their copies in MLflow: artifacts and a registered model."""
    final_dir = save_model(model, model_dir / "final", tokenizer_dir=tokenizer_dir)
    final = dataclasses.asdict(metrics)
    write_json(reports_dir / "train_summary.json", final | {"parameters": counts})
    run.log_metrics({f"final.{k}": v for k, v in final.items()})
    run.log_artifact(final_dir, "checkpoint")  # the same bytes as the DVC-tracked model/final
    for checkpoint in list_checkpoints(model_dir / "checkpoints"):
        for name in (WEIGHTS, CONFIG, INFO):
            run.log_artifact(checkpoint / name, f"checkpoints/{checkpoint.name}")
    mlflow = params.mlflow
    tracking.log_model(run, final_dir, mlflow.model_name if mlflow.register_model else None, mlflow.alias)
    run.finish()
    click.echo(
        f"done: train loss {metrics.train_loss:.4f}, sampled val loss {metrics.val_loss_sampled:.4f}; "
        f"model in {final_dir}" + (f"; MLflow run {run.run_id}" if run.active else "")
    )


def _corpus_uri(data: DataParams) -> str:
    return f"{data.smollm_dataset}/{data.smollm_subset}" if data.source == "smollm" else data.path


def _run_tags(
    params: Params,
    stats: dict[str, Any],
    config: ModelConfig,
    counts: dict[str, int],
    precision: str,
    device: torch.device,
) -> dict[str, str]:
    """What the run is, for finding and comparing runs: code, data, machine, study; and facts of the model.

    Parameter counts and cache sizes are facts of the model, tags rather than metrics: MLflow's comparison plots
    the first metric a run logged, which is then the training loss.
    """
    tags = {
        **tracking.git_state(),
        "data_sha256": stats.get("sha256", "unknown"),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
        "train.precision": precision,
        "train.precision_reason": precision_reason(params.train.dtype, device),  # what auto saw on this machine
        "train.device": device.type,
        "machine": describe_machine(device, threads=False),  # train.threads may change them while it runs
        **environment.tags(device, tracking.project_root()),
    }
    tags |= {f"model.parameters.{kind}": str(count) for kind, count in counts.items()}
    tags |= {
        f"model.kv_cache_bytes_per_token.{kind}": str(size) for kind, size in config.cache_bytes_per_token().items()
    }
    if params.study.name:
        tags |= {"study": params.study.name, "study.cell": params.study.cell}
    return tags
