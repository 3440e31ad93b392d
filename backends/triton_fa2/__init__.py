"""Triton FlashAttention-2 backend: forward and deterministic backward, NVIDIA and AMD.

``kernels.py`` holds the ``@triton.jit`` bodies, ``launch.py`` the launchers, ``config.py``
the launch parameters. On CPU tensors the kernels run under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import importlib.util

import torch

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


class TritonBackend(Backend):
    name = "triton"
    vendors = ("nvidia", "amd", "cpu")
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    deterministic = True  # dQ and dK/dV are summed on chip; no atomics

    def available(self, device: DeviceInfo) -> list[str]:
        reasons = super().available(device)
        if importlib.util.find_spec("triton") is None:
            return reasons + ["triton not installed"]
        if device.vendor == "cpu":
            if not _interpreting():
                reasons.append("CPU tensors run Triton only under the interpreter: set TRITON_INTERPRET=1")
        elif device.vendor == "nvidia" and device.capability < (8, 0):
            reasons.append(f"requires sm_80+ but device is {device.arch}")
        elif device.vendor == "amd" and device.arch not in AMD_ARCHS:
            reasons.append(f"arch {device.arch} (supported: {', '.join(AMD_ARCHS)})")
        return reasons

    def not_supported_reasons(self, problem: AttentionProblem, device: DeviceInfo) -> list[str]:
        from .launch import grid_reasons

        reasons = super().not_supported_reasons(problem, device)
        if reasons:
            return reasons
        reasons.extend(grid_reasons(problem, default_config(problem, device)))
        if problem.dtype == torch.bfloat16 and _interpreting():
            from .interpreter import bf16_defects

            reasons.extend(f"dtype=bfloat16: {r}" for r in bf16_defects())
        return reasons

    def default_config(self, problem: AttentionProblem, device: DeviceInfo) -> TritonConfig:
        return default_config(problem, device)

    def forward(self, problem, q, k, v, config):
        from .launch import forward  # lazily: importing launch imports Triton

        return forward(problem, q, k, v, config, device_info(q.device))

    def backward(self, problem, dout, q, k, v, out, lse, config, dlse=None):
        from .launch import backward

        return backward(problem, dout, q, k, v, out, lse, dlse, config, device_info(q.device))
