"""DeviceInfo: what the library knows about the device a call runs on.

This is the only module that asks the device. Every probe is guarded: a failing probe
leaves a field empty, it never breaks a call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceInfo:
    vendor: str  # "nvidia" | "amd" | "cpu"
    name: str
    arch: str  # "sm_90", "gfx942", "cpu"
    capability: tuple[int, int] | None  # NVIDIA compute capability; None elsewhere
    multiprocessors: int
    smem_per_block: int  # bytes a block may use (opt-in limit on NVIDIA)
    warp_size: int

    @property
    def is_gpu(self) -> bool:
        return self.vendor in ("nvidia", "amd")


CPU = DeviceInfo(
    vendor="cpu", name="cpu", arch="cpu", capability=None, multiprocessors=0, smem_per_block=0, warp_size=1
)

# Opt-in shared memory per block by compute capability (CUDA programming guide, table
# "technical specifications per compute capability"); torch does not expose this value.
_NVIDIA_SMEM = {(8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 7): 163 * 1024, (8, 9): 99 * 1024, (9, 0): 227 * 1024}


@functools.lru_cache(maxsize=None)
def _cuda_device_info(index: int) -> DeviceInfo:
    props = torch.cuda.get_device_properties(index)
    if torch.version.hip is not None:
        arch = getattr(props, "gcnArchName", "gfx").split(":")[0]
        return DeviceInfo(
            vendor="amd",
            name=props.name,
            arch=arch,
            capability=None,
            multiprocessors=props.multi_processor_count,
            smem_per_block=64 * 1024,  # LDS per workgroup on CDNA2/CDNA3
            warp_size=64,
        )
    cap = (props.major, props.minor)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or _NVIDIA_SMEM.get(cap, 48 * 1024)
    return DeviceInfo(
        vendor="nvidia",
        name=props.name,
        arch=f"sm_{props.major}{props.minor}",
        capability=cap,
        multiprocessors=props.multi_processor_count,
        smem_per_block=smem,
        warp_size=32,
    )


@functools.lru_cache(maxsize=None)
def _other_device_info(device_type: str) -> DeviceInfo:
    """Devices no kernel here targets (mps, xpu, meta ...): only the reference runs there."""
    return DeviceInfo(vendor=device_type, name=device_type, arch=device_type, capability=None,
                      multiprocessors=0, smem_per_block=0, warp_size=1)


def device_info(device: torch.device) -> DeviceInfo:
    """DeviceInfo of a tensor's device, cached per device index."""
    if device.type == "cuda":
        return _cuda_device_info(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "cpu":
        return CPU
    return _other_device_info(device.type)
