"""CuPy backend: FlashAttention-2 in CUDA C++ (.cu files) compiled at run time with NVRTC.

Registered so that reports, cache keys and ``backend="cupy"`` know it. Its availability
reasons are the real ones (cupy, NVRTC, an NVIDIA sm_80+ device); the CUDA C++ kernels
themselves are the CuPy backend issue's work, and until they exist the backend says so as its
last reason rather than pretending to run.
"""

from __future__ import annotations

import functools

import torch

from fa2dispatch.hardware import DeviceInfo

from ..base import Backend

NOT_WRITTEN = "CUDA C++ kernels not written yet (the CuPy backend issue); nothing to compile"


@functools.lru_cache(maxsize=None)
def _nvrtc_problem() -> str | None:
    """None if NVRTC loads through cupy, else why not. Imports cupy: only on the slow path."""
    try:
        import cupy

        major_minor = cupy.cuda.nvrtc.getVersion()
    except Exception as exc:  # ImportError, CUDARuntimeError, missing libnvrtc.so ...
        return f"NVRTC missing ({type(exc).__name__}: {exc})".strip()
    return None if major_minor else "NVRTC missing"


class CupyBackend(Backend):
    name = "cupy"
    description = "FlashAttention-2 in CUDA C++ compiled at run time by NVRTC through cupy.RawModule"
    vendors = ("nvidia",)
    min_capability = (8, 0)  # mma.sync m16n8k16 with bf16, cp.async
    packages = ("cupy",)
    dtypes = (torch.float16, torch.bfloat16)

    def version(self, device: DeviceInfo) -> str:
        return f"cupy {device.versions.cupy}" if device.versions and device.versions.cupy else "-"

    def available(self, device: DeviceInfo) -> list[str]:
        reasons = super().available(device)
        if not reasons and not device.simulated:
            problem = _nvrtc_problem()
            if problem:
                reasons.append(problem)
        return reasons + [NOT_WRITTEN]
