"""What training on a CPU needs to know and set: whether bf16 matmuls are fast here, how to keep the memory
allocator from handing big blocks back to the kernel between steps, and how many threads this training may
take when other trainings or other programs run beside it; and what the machine is, for the records of runs
and benchmarks."""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
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
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The CPU's feature flags as Linux lists them (avx512_bf16, amx_bf16, ...); empty elsewhere."""
    return _cpuinfo("flags")


def _cpuinfo(field: str) -> str:
    """The first CPU's `field` in /proc/cpuinfo; empty where there is none (not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def native_bf16_units() -> list[str]:
    """This CPU's units that multiply bf16 matrices natively (AMX tiles, AVX512-BF16 dot products); none elsewhere,
    where bf16 is emulated through fp32 and only adds casts."""
    units = {"AMX-BF16": torch.cpu._is_amx_tile_supported(), "AVX512-BF16": torch.cpu._is_avx512_bf16_supported()}
    return [name for name, present in units.items() if present]


def fast_bf16() -> bool:
    """Whether bf16 training is at least as fast as float32 on this CPU: where it multiplies bf16 natively. The CI
    gate times both precisions on its machine and fails if this picks the slower (docs/ci.md)."""
    return bool(native_bf16_units())


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


@dataclass(frozen=True)
class CpuTimes:
    at: float  # time.monotonic() of the reading
    busy: float  # seconds the cores this process may use have been busy since boot, whoever ran on them
    own: float  # CPU seconds of this process, all its threads


def cpu_times() -> CpuTimes | None:
    """A reading of /proc/stat (Linux; None elsewhere): user, nice, system, irq and softirq time of each core in
    this process's affinity mask."""
    cores = {f"cpu{core}" for core in os.sched_getaffinity(0)} if hasattr(os, "sched_getaffinity") else set()
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    ticks = 0
    for line in lines:
        name, *fields = line.split()
        if name in cores:
            user, nice, system, _idle, _iowait, irq, softirq = (int(value) for value in fields[:7])
            ticks += user + nice + system + irq + softirq
    own = os.times()
    return CpuTimes(time.monotonic(), ticks / os.sysconf("SC_CLK_TCK"), own.user + own.system)


# /proc/stat counts in clock ticks (10 ms): a window much shorter than this reads mostly rounding. Each step asks
# for the load, and a new reading is taken once a window has passed, so a training adapts within a step or two.
LOAD_WINDOW_S = 0.5


class ForeignLoad:
    """How many of this process's cores other programs keep busy: the cores' busy time less this process's own
    CPU time, over the last window.

    OpenMP's threads wait for each other at the end of every parallel region, so a training whose thread pool
    counts a core that another program holds waits on that core's time slices at every op: beside one busy
    process on two cores, a step took 15 to 20 times as long (docs/benchmarks.md). Child processes (data loader
    workers, other ranks) count as other programs.
    """

    def __init__(self, read: Callable[[], CpuTimes | None] = cpu_times) -> None:
        self._read = read
        self._last = read()
        self._busy: int | None = None  # the last window's answer

    def busy_cores(self) -> int:
        """Cores busy with other work over the last window, rounded (a core counts when over half of it is)."""
        now = self._read()
        if now is None or self._last is None:
            return 0
        if now.at - self._last.at < LOAD_WINDOW_S:
            if self._busy is not None:
                return self._busy
            time.sleep(LOAD_WINDOW_S - (now.at - self._last.at))  # the first answer waits for a whole window
            now = self._read() or now
        others = ((now.busy - self._last.busy) - (now.own - self._last.own)) / (now.at - self._last.at)
        self._last, self._busy = now, max(0, int(others + 0.5))
        return self._busy


class CoreShare:
    """This training's share of the machine's cores: those that other programs leave free, divided among the CPU
    trainings running on it at once.

    While it trains, each holds an exclusive lock on a file of its own in TRAININGS_DIR; the kernel drops the
    lock when the process ends, however it ends. The locked files are the trainings running now, and each one
    sizes torch's thread pool to cores // trainings, checking again as others start and finish. Without this,
    two trainings on two cores (`dvc queue start -j 2`) each run two threads that wait on each other's cores:
    about 20 times slower each, measured. Other programs' load (ForeignLoad) takes its cores out first.
    """

    def __init__(
        self, directory: Path = TRAININGS_DIR, cores: int | None = None, load: ForeignLoad | None = None
    ) -> None:
        self.directory, self.cores = directory, cores or machine_cores()
        self.load = load or ForeignLoad()
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

    def threads(self) -> tuple[int, str]:
        """The threads this training should run now, and why: its share of the cores, less the cores that other
        work keeps busy (the other trainings' load is in there too, at their share each)."""
        trainings, busy = self.trainings(), self.load.busy_cores()
        share = max(1, self.cores // trainings)
        if self.cores - busy >= share:
            return share, f"{trainings} training{'s' if trainings > 1 else ''} share {self.cores} cores"
        return max(1, self.cores - busy), f"{busy} of {self.cores} cores busy with other work"


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


def size_thread_pool(threads: int, core_share: CoreShare | None) -> str | None:
    """Size torch's thread pool as train.threads says: N threads; 0 with a core share, the cores other programs
    leave free, divided among the trainings running now; 0 without one, as it is. Returns the change, to log."""
    if threads:
        wanted, why = threads, "train.threads"
    elif core_share is not None:
        wanted, why = core_share.threads()
    else:
        return None
    if wanted == torch.get_num_threads():
        return None
    torch.set_num_threads(wanted)
    return f"{wanted} CPU thread{'s' if wanted > 1 else ''} ({why})"
