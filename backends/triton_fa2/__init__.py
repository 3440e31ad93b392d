"""Triton FlashAttention-2 backend: forward and deterministic backward, NVIDIA and AMD.

``kernels.py`` holds the ``@triton.jit`` bodies, ``launch.py`` the launchers, ``config.py``
the launch parameters. On CPU tensors the kernels run under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
from packaging.version import Version

from fa2dispatch.hardware import DeviceInfo, device_info
from fa2dispatch.problem import AttentionProblem

from ..base import Backend
from .config import TritonConfig, default_config

# CDNA2/CDNA3/CDNA4 (MI200, MI300, MI350) and RDNA3 take Triton's dot lowering.
AMD_ARCHS = ("gfx90a", "gfx942", "gfx950", "gfx1100", "gfx1101", "gfx1200", "gfx1201")


def _interpreting() -> bool:
    """Whether our kernels run (or, once imported, will run) under the interpreter."""
    import sys

    kernels = sys.modules.get(__name__ + ".kernels")
    if kernels is not None:
        return type(kernels.attn_fwd).__name__ == "InterpretedFunction"
    import triton

    return bool(triton.knobs.runtime.interpret)


# Oldest Triton we declare (pyproject's `triton` extra); CI and the GPU image use 3.6.0, the only
# version the kernels are tested with.
MIN_TRITON = Version("3.2")


def triton_version(device: DeviceInfo) -> str:
    """The report's version text of a Triton backend."""
    return f"triton {device.versions.triton}" if device.versions and device.versions.triton else "-"


def triton_reasons(device: DeviceInfo) -> list[str]:
    """What every Triton backend needs beyond the base checks: Triton >= MIN_TRITON, and on CPU
    tensors the interpreter."""
    reasons = []
    found = device.versions.parsed("triton") if device.versions is not None else None
    if found is not None and found < MIN_TRITON:
        reasons.append(f"triton {found} is older than {MIN_TRITON} (supported: >= {MIN_TRITON})")
    if device.vendor == "cpu" and not device.simulated and not _interpreting():
        reasons.append("CPU tensors run Triton only under the interpreter: set TRITON_INTERPRET=1")
    return reasons


class TritonBackend(Backend):
    name = "triton"
    description = "FlashAttention-2 forward + deterministic backward in Triton (NVIDIA, AMD, CPU interpreter)"
    vendors = ("nvidia", "amd", "cpu")
    min_capability = (8, 0)
    amd_archs = AMD_ARCHS
    packages = ("triton",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    deterministic = True  # dQ and dK/dV are summed on chip; no atomics
    config_type = TritonConfig

    def version(self, device: DeviceInfo) -> str:
        return triton_version(device)

    def available(self, device: DeviceInfo) -> list[str]:
        return super().available(device) or triton_reasons(device)

    def not_supported_reasons(self, problem: AttentionProblem, device: DeviceInfo) -> list[str]:
        from .launch import grid_reasons

        reasons = super().not_supported_reasons(problem, device)
        if reasons:
            return reasons
        reasons.extend(grid_reasons(problem, default_config(problem, device)))
        if problem.dtype == torch.bfloat16 and device.vendor == "cpu" and not device.simulated and _interpreting():
            from .interpreter import bf16_defects

            reasons.extend(f"dtype=bfloat16: {r}" for r in bf16_defects())
        return reasons

    def default_config(self, problem: AttentionProblem, device: DeviceInfo) -> TritonConfig:
        return default_config(problem, device)

    def config_reasons(self, problem, device, config) -> list[str]:
        from .launch import grid_reasons

        return grid_reasons(problem, config)

    def forward(self, problem, q, k, v, config):
        from .launch import forward  # lazily: importing launch imports Triton

        return forward(problem, q, k, v, config, device_info(q.device))

    def backward(self, problem, dout, q, k, v, out, lse, config, dlse=None):
        from .launch import backward

        return backward(problem, dout, q, k, v, out, lse, dlse, config, device_info(q.device))
