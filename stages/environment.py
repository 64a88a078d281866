"""What an MLflow run records of the software and the machine it ran on (docs/environment.md).

- tags `env.*`: Python's and the main libraries' versions, the sha256 of requirements.lock, and the CPU's model
  and flags or the GPU's name and driver;
- the artifact `environment/pip-freeze.txt`: every installed package, as `pip freeze` lists them;
- the registered model's requirements: the exact versions of the libraries it is served with.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import torch

from deepseek.cpu import cpu_flags, cpu_model
from deepseek.versions import versions

LOCK_FILE = "requirements.lock"
FREEZE_FILE = "pip-freeze.txt"
SERVING_LIBRARIES = ("torch", "safetensors", "numpy", "transformers")  # what the pyfunc model imports


def tags(device: torch.device, root: Path) -> dict[str, str]:
    """The env.* tags of a run on device, in the project at root."""
    found = {f"env.{name}": version for name, version in versions().items()}
    found["env.lock_sha256"] = lock_digest(root / LOCK_FILE)
    return found | machine_tags(device)


def lock_digest(lock: Path) -> str:
    """sha256 of the lock file the environment was installed from; "none" without one."""
    return hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else "none"


def machine_tags(device: torch.device) -> dict[str, str]:
    """The GPU's name, its driver and torch's CUDA; or the CPU's model and flags."""
    if device.type == "cuda":
        return {
            "env.gpu": torch.cuda.get_device_name(device),
            "env.gpu_driver": _nvidia_driver(),
            "env.cuda": str(torch.version.cuda),
        }
    return {"env.cpu": cpu_model(), "env.cpu_flags": cpu_flags()}


def pip_freeze() -> str:
    """`pip freeze` of this Python; a line saying why where pip is missing or fails."""
    result = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True)
    if result.returncode != 0:
        return f"# pip freeze failed: {result.stderr.strip()[-500:]}\n"
    return result.stdout


def serving_requirements() -> list[str]:
    """The registered model's pip requirements: this run's versions, without a local label such as +cpu, so that
    a CUDA build of the same torch serves it too."""
    installed = versions()
    return [f"{name}=={installed[name].split('+')[0]}" for name in SERVING_LIBRARIES]


def _nvidia_driver() -> str:
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else "unknown"
