"""What training on a CPU needs to know and set: whether bf16 matmuls are fast here, and how to keep the memory
allocator from handing big blocks back to the kernel between steps."""

from __future__ import annotations

import ctypes
import ctypes.util

import torch

# glibc's mallopt() parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


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
