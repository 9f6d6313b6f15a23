"""Device and numeric precision, chosen at run time from what the hardware supports, and how the host
allocates memory for a CPU run."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform

import torch

from keel.errors import UserError


def pick_device(name: str) -> torch.device:
    """`auto` takes CUDA when present; asking for CUDA on a machine without it is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but this machine has no CUDA device; use train.device=cpu or auto.")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    # oneDNN runs bf16 matmuls at native speed only with AVX-512 BF16 or AMX; elsewhere bf16 is
    # emulated and slower than float32, so auto keeps float32 there.
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and (
        torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    )


def describe_cpu() -> str:
    """The CPU's model name and its class for bf16, e.g. "AMD EPYC, AVX2 only (bf16 emulated)".

    The class says why `pick_dtype` chose what it did on this machine; "native bf16" is exactly
    `cpu_has_bf16()`, so the label and the rule cannot disagree.
    """
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):  # Linux names the CPU here; platform.processor() often does not
        with open("/proc/cpuinfo") as cpuinfo:
            name = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), name)
    if cpu_has_bf16():
        kind = "AMX (native bf16)" if torch.cpu._is_amx_tile_supported() else "AVX512-BF16 (native bf16)"
    elif torch.cpu._is_avx512_supported():
        kind = "AVX512 (no native bf16)"
    elif torch.cpu._is_avx2_supported():
        kind = "AVX2 only (bf16 emulated)"
    else:
        kind = f"{torch.backends.cpu.get_cpu_capability()} (bf16 emulated)"
    return f"{name}, {kind}"


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype for autocast: bf16 where the hardware has it, fp16 on older GPUs, else fp32."""
    if name != "auto":
        dtype = getattr(torch, name)
        if dtype == torch.float16 and device.type == "cpu":
            raise UserError("train.dtype=float16 is not supported on the CPU; use bfloat16 or float32.")
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; weights and optimizer state stay float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """Loss scaling is needed only for fp16, whose narrow exponent underflows small gradients."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory tensors free for reuse instead of returning it to the OS.

    A CPU training step allocates and frees the same activations every step. By default glibc serves
    large blocks with fresh mmaps and unmaps them on free, so every step faults all of them in again:
    66k page faults (258 MiB) per step for bench/throughput.py's mid model, 15-20% of its step time.
    With no mmaps and no trimming, freed blocks stay in the heap and the next step reuses them; the
    process keeps its peak heap until it exits (as jemalloc or tcmalloc set up for PyTorch do).
    Returns whether the setting took: only on Linux with glibc, elsewhere nothing changes.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    # mallopt returns 1 on success; trimming only gives back free memory at the top of the heap.
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def use_deterministic_kernels(enabled: bool) -> None:
    """Make a step's numbers a function of its inputs alone, so resume and repeat are bit-exact.

    Eager CPU kernels already are; compiled code is not: Inductor lowers the embedding's backward
    (an index_put with accumulation) to parallel atomic adds, whose order changes from process to
    process. In deterministic mode it calls the serial aten kernel instead (the embedding gradient
    is a small share of a step). warn_only: a kernel without a deterministic version (some CUDA
    backward passes) warns instead of stopping the run. cuBLAS needs its workspace pinned for
    deterministic GEMMs; that must happen before CUDA initialises, so set it here if the user has not.
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.benchmark = not enabled
