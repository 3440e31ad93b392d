"""FP8 (e4m3) attention forward for sm_89 / sm_90, backend name ``triton-fp8``.

Registered so that fp8 calls are routed here and refused elsewhere with a reason, and so the
report can show where fp8 would run. Capabilities are the real ones (Ada and Hopper have e4m3
tensor cores; forward only); the kernel itself is the FP8 issue's work, and until it exists the
backend says so as its last reason.
"""

from __future__ import annotations

import torch

from fa2dispatch.hardware import DeviceInfo

from ..base import Backend

NOT_WRITTEN = "fp8 kernel not written yet (the FP8 issue)"


class TritonFP8Backend(Backend):
    name = "triton-fp8"
    description = "FP8 e4m3 forward with descale factors on Ada/Hopper tensor cores (Triton)"
    vendors = ("nvidia",)  # AMD's fp8 (e4m3fnuz on gfx942) is a different format: not targeted
    min_capability = (8, 9)  # e4m3 tensor-core MMA exists from sm_89 (Ada) and sm_90 (Hopper)
    packages = ("triton",)
    dtypes = (torch.float8_e4m3fn,)
    supports_backward = False

    def version(self, device: DeviceInfo) -> str:
        return f"triton {device.versions.triton}" if device.versions and device.versions.triton else "-"

    def available(self, device: DeviceInfo) -> list[str]:
        if device.vendor == "amd":
            # gfx942's fp8 is e4m3fnuz (other bias, no -0), gfx90a has none: name the arch
            return [f"fp8 e4m3fn on AMD {device.arch} is not supported (supported: nvidia sm_89+)", NOT_WRITTEN]
        return super().available(device) + [NOT_WRITTEN]
