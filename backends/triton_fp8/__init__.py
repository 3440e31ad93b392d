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
from ..triton_fa2 import triton_reasons, triton_version
from .config import FP8Config, config_space, default_config


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
        return triton_version(device)

    def available(self, device: DeviceInfo) -> list[str]:
        if device.vendor == "amd":
            # gfx942's fp8 is e4m3fnuz (other bias, no -0), gfx90a has none: name the arch
            return [f"fp8 e4m3fn on AMD {device.arch} is not supported (supported: nvidia sm_89+)"]
        reasons = super().available(device) or triton_reasons(device)
        if not reasons and device.vendor == "cpu" and not device.simulated:
            from .interpreter import fp8_defects  # under the interpreter: its fp8 casts must round right

            reasons.extend(fp8_defects())
        return reasons

    def not_supported_reasons(self, problem: AttentionProblem, device: DeviceInfo) -> list[str]:
        reasons = super().not_supported_reasons(problem, device)
        if reasons:
            return reasons
        from .launch import grid_reasons  # imports triton: only once the base checks found it installed

        return grid_reasons(problem, default_config(problem, device))

    def default_config(self, problem: AttentionProblem, device: DeviceInfo) -> FP8Config:
        return default_config(problem, device)

    def config_space(self, problem: AttentionProblem, device: DeviceInfo) -> list[FP8Config]:
        return config_space(problem, device)

    def config_reasons(self, problem, device, config) -> list[str]:
        from .launch import grid_reasons

        return grid_reasons(problem, config)

    def forward(self, problem, q, k, v, config, fp8_args=None):
        from ..triton_fa2 import ensure_cuda_context
        from .launch import forward  # lazily: importing launch imports Triton

        ensure_cuda_context(q.device)  # its tensor descriptors need a current context in this thread
        return forward(problem, q, k, v, config, device_info(q.device), fp8_args)
