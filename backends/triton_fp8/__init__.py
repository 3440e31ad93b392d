"""FP8 (e4m3) attention forward for sm_89 / sm_90, backend name ``triton-fp8``.

``kernels.py`` holds the ``@triton.jit`` body, ``launch.py`` the launcher (V's layout,
descales, tensor descriptors), ``config.py`` the launch parameters, ``interpreter.py`` the probe
for the CPU interpreter's fp8 cast defect. Forward only: fp8 inputs that require gradients
are refused in validation (``problem.py``). On CPU tensors the kernel runs under
``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import torch

from fa2dispatch.hardware import DeviceInfo, device_info
from fa2dispatch.problem import AttentionProblem

from ..base import Backend
from ..triton_fa2 import MIN_TRITON
from .config import FP8Config, config_space, default_config


def _interpreting() -> bool:
    from .. import triton_fa2

    return triton_fa2._interpreting()


class TritonFP8Backend(Backend):
    name = "triton-fp8"
    description = "FP8 e4m3 forward with descale factors on Ada/Hopper tensor cores (Triton)"
    # AMD's fp8 (e4m3fnuz on gfx942) is a different format: not targeted. CPU: the interpreter.
    vendors = ("nvidia", "cpu")
    min_capability = (8, 9)  # e4m3 tensor-core MMA exists from sm_89 (Ada) and sm_90 (Hopper)
    packages = ("triton",)
    dtypes = (torch.float8_e4m3fn,)
    supports_backward = False
    config_type = FP8Config

    def version(self, device: DeviceInfo) -> str:
        return f"triton {device.versions.triton}" if device.versions and device.versions.triton else "-"

    def available(self, device: DeviceInfo) -> list[str]:
        if device.vendor == "amd":
            # gfx942's fp8 is e4m3fnuz (other bias, no -0), gfx90a has none: name the arch
            return [f"fp8 e4m3fn on AMD {device.arch} is not supported (supported: nvidia sm_89+)"]
        reasons = super().available(device)
        if reasons:
            return reasons
        found = device.versions.parsed("triton") if device.versions is not None else None
        if found is not None and found < MIN_TRITON:
            reasons.append(f"triton {found} is older than {MIN_TRITON} (supported: >= {MIN_TRITON})")
        if device.vendor == "cpu" and not device.simulated:
            if not _interpreting():
                reasons.append("CPU tensors run Triton only under the interpreter: set TRITON_INTERPRET=1")
            else:
                from .interpreter import fp8_defects

                reasons.extend(fp8_defects())
        return reasons

    def not_supported_reasons(self, problem: AttentionProblem, device: DeviceInfo) -> list[str]:
        from .launch import grid_reasons

        reasons = super().not_supported_reasons(problem, device)
        if reasons:
            return reasons
        return grid_reasons(problem, default_config(problem, device))

    def default_config(self, problem: AttentionProblem, device: DeviceInfo) -> FP8Config:
        return default_config(problem, device)

    def config_space(self, problem: AttentionProblem, device: DeviceInfo) -> list[FP8Config]:
        return config_space(problem, device)

    def config_reasons(self, problem, device, config) -> list[str]:
        from .launch import grid_reasons

        return grid_reasons(problem, config)

    def forward(self, problem, q, k, v, config, fp8_args=None):
        from .launch import forward  # lazily: importing launch imports Triton

        return forward(problem, q, k, v, config, device_info(q.device), fp8_args)
