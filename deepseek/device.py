"""Where and how a training computes: the device, the precision, the seeds, and the process-wide settings that
the program running a training applies (the train stage, the benchmarks), never the library on import.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from deepseek import distributed
from deepseek.cpu import CoreShare, fast_bf16, keep_freed_memory, native_bf16_units
from deepseek.errors import UserError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when available. Under torchrun each rank takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is cuda but no CUDA device is available; use auto or cpu")
    return torch.device("cuda", distributed.local_rank()) if name == "cuda" else torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 mixed precision on CUDA where supported (else fp16, with a GradScaler), and on CPUs that multiply
    bf16 natively (AMX or AVX512-BF16); fp32 on other CPUs."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if fast_bf16() else torch.float32
    dtype: torch.dtype = getattr(torch, name)
    return dtype


def precision_reason(name: str, device: torch.device) -> str:
    """Why training runs in resolve_dtype(name, device), for the log and the tracking server."""
    if name != "auto":
        return f"train.dtype {name}"
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        return f"train.dtype auto: this GPU {'computes' if supported else 'has no'} bf16"
    units = native_bf16_units()
    if units:
        return f"train.dtype auto: this CPU multiplies bf16 natively ({', '.join(units)})"
    return "train.dtype auto: this CPU has no native bf16 (AMX-BF16 or AVX512-BF16), which float32 outruns"


def describe_precision(dtype: torch.dtype) -> str:
    """How training computes, for the log and the tracking server."""
    if dtype == torch.float32:
        return "float32"
    return f"{str(dtype).removeprefix('torch.')} autocast over float32 weights and optimizer state"


def configure_host(device: torch.device, threads: int) -> CoreShare | None:
    """Apply the process-wide settings a training wants, in the program that runs it: TF32 matmuls on CUDA; on
    CPU, glibc keeping freed memory for reuse (deepseek.cpu.keep_freed_memory). Returns the share of the machine's
    cores to give Trainer(core_share=...) where train.threads is 0 on CPU, else None."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return None
    keep_freed_memory()
    return CoreShare() if threads == 0 else None
