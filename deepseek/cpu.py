"""What training on a CPU needs to know and set: whether bf16 matmuls are fast here, how to keep the memory
allocator from handing big blocks back to the kernel between steps, and how many threads this training may
take when others run beside it; and what the machine is, for the records of runs and benchmarks."""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import platform
import tempfile
from pathlib import Path
from types import TracebackType
from typing import IO

import torch

# glibc's mallopt() parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def describe_machine(device: torch.device, threads: bool = True) -> str:
    """The GPU, or the CPU and its cores (and torch's threads now, when threads is set)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return f"{cpu_model()} ({os.cpu_count()} cores" + (
        f", {torch.get_num_threads()} torch threads)" if threads else ")"
    )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX tiles or AVX512-BF16 dot products).

    There oneDNN's bf16 GEMMs run 2.5 to 6 times faster than fp32 (docs/benchmarks.md); elsewhere bf16 is
    emulated through fp32 and only adds casts.
    """
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the kernel; False where not glibc.

    Every training step frees and reallocates the same large tensors (the embedding's gradient, bf16 copies of
    the weights). By default glibc serves blocks over 32 MiB with mmap and unmaps them on free, so each step
    faults those pages back in, zero-filled by the kernel: 150 ms of a 2.1 s `seed`-preset step went to
    filling one 113 MB gradient. With mmap off and trimming at most every 2 GiB, the process keeps its peak
    memory mapped and reuses it (the reason PyTorch's CPU performance guides suggest jemalloc or tcmalloc).
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to set
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


# Where CPU trainings register while they run: one directory for every process of the machine.
TRAININGS_DIR = Path(tempfile.gettempdir()) / "deepseek-repro-trainings"


def machine_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class CoreShare:
    """This training's share of the machine's cores among the CPU trainings running on it at once.

    While it trains, each holds an exclusive lock on a file of its own in TRAININGS_DIR; the kernel drops the
    lock when the process ends, however it ends. The locked files are the trainings running now, and each one
    sizes torch's thread pool to cores // trainings, checking again as others start and finish. Without this,
    two trainings on two cores (`dvc queue start -j 2`) each run two threads that wait on each other's cores:
    about 20 times slower each, measured.
    """

    def __init__(self, directory: Path = TRAININGS_DIR, cores: int | None = None) -> None:
        self.directory, self.cores = directory, cores or machine_cores()
        self._file: IO[str] | None = None

    def __enter__(self) -> CoreShare:
        self.directory.mkdir(parents=True, exist_ok=True)
        for path in self.directory.glob("*.lock"):  # files of trainings that died without removing theirs
            if not _locked(path):
                path.unlink(missing_ok=True)
        # Locked before it takes its name, so that no one ever sees it unlocked and removes it.
        fd, temporary = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        self._file = os.fdopen(fd, "w")
        fcntl.flock(self._file, fcntl.LOCK_EX)
        os.replace(temporary, self.directory / f"{os.getpid()}.lock")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._file is not None:
            (self.directory / f"{os.getpid()}.lock").unlink(missing_ok=True)
            self._file.close()
            self._file = None

    def trainings(self) -> int:
        """The trainings registered now, this one included."""
        own = f"{os.getpid()}.lock"
        return max(1, sum(1 for path in self.directory.glob("*.lock") if path.name == own or _locked(path)))

    def threads(self) -> int:
        return max(1, self.cores // self.trainings())


def _locked(path: Path) -> bool:
    """Whether a live process holds the lock of a registration file."""
    try:
        with open(path) as file:
            try:
                fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False
    except FileNotFoundError:
        return False
