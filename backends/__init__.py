"""Registered backends and the priority order the dispatcher walks per device family.

Names are kebab-case; they appear in reports, cache keys and ``backend=``. The order below is
the choice when the autotune cache has no winner for a call; every entry quotes the
measurement behind it, or says that none was possible here.
"""

from __future__ import annotations

from fa2dispatch.hardware import DeviceInfo

from .base import Backend, Config
from .cupy_cuda import CupyBackend
from .reference import ReferenceBackend
from .torch_sdpa import TorchSDPACudnn, TorchSDPAEfficient, TorchSDPAFlash
from .triton_fa2 import TritonBackend
from .triton_fp8 import TritonFP8Backend

BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (TritonBackend(), CupyBackend(), TritonFP8Backend(), TorchSDPACudnn(), TorchSDPAFlash(),
              TorchSDPAEfficient(), ReferenceBackend())
}

PRIORITY: dict[str, tuple[str, ...]] = {
    # H100, fp16/bf16, BENCHMARKS.md (2026-11-24): cuDNN's forward is 1.1-1.7x ours (ours is
    # 0.59-0.89x cuDNN) and its backward 0.9-1.35x ours; ours is 1.02-1.66x PyTorch's
    # FlashAttention-2 in both directions. The memory-efficient kernel is the slowest fused one
    # (it covers fp32 and any head count only after ours). triton-fp8 takes the fp8 calls,
    # which nothing else runs.
    "nvidia-sm90": ("triton-fp8", "torch-sdpa-cudnn", "triton", "cupy", "torch-sdpa-flash",
                    "torch-sdpa-efficient", "reference"),
    # Ampere/Ada (sm_80, sm_86, sm_89): not measured here (no such GPU lent). Ours first because
    # it beat PyTorch's FlashAttention-2 on the H100 with the same algorithm; cuDNN's lead there
    # came from Hopper-specific instructions (wgmma, TMA) that these parts lack.
    "nvidia": ("triton-fp8", "triton", "cupy", "torch-sdpa-flash", "torch-sdpa-cudnn",
               "torch-sdpa-efficient", "reference"),
    # CDNA (MI200/MI300): not measured here (no AMD GPU lent). Ours first, then ROCm's fused
    # kernels (AOTriton), then the reference.
    "amd": ("triton", "torch-sdpa-flash", "torch-sdpa-efficient", "reference"),
    # CPU: the reference (PyTorch math) runs B=1 H=8 M=128 D=64 causal in 2.9 ms on this
    # project's CI machine; the Triton interpreter takes 736 ms for the same call. The
    # interpreter is for testing kernels, so it comes second.
    "cpu": ("reference", "triton"),
}


def family(device: DeviceInfo) -> str:
    """The priority list a device uses."""
    if device.vendor == "nvidia":
        return "nvidia-sm90" if device.capability is not None and device.capability >= (9, 0) else "nvidia"
    if device.vendor in PRIORITY:
        return device.vendor
    return "cpu"  # other torch devices (mps, xpu, meta): only the reference can run there


def priority(device: DeviceInfo) -> tuple[str, ...]:
    """Every registered backend, most preferred first: the family's list, then the rest."""
    order = PRIORITY[family(device)]
    return order + tuple(name for name in BACKENDS if name not in order)


__all__ = ["BACKENDS", "PRIORITY", "Backend", "Config", "family", "priority"]
