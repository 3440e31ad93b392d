"""DeviceInfo: what the library knows about the device a call runs on.

This is the only module that asks the device (and the driver, and which libraries are
installed). Every probe is guarded: a failing probe leaves a field empty (None), it never
breaks a call or the report.

Simulated devices (``FA2DISPATCH_SIMULATE=h100`` or ``fa2dispatch report --simulate h100``)
replace the real device in every decision, so selection can be planned and tested on a CPU
machine. A simulated device assumes a torch build for its platform (CUDA or ROCm) with this
machine's torch version; optional packages (triton, cupy) count as installed only if they are
installed here. Kernels cannot run on a simulated device: ``attention`` refuses (see
``dispatch.select``), ``explain`` and the report work.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass, replace

import torch
from packaging.version import InvalidVersion, Version

ENV_SIMULATE = "FA2DISPATCH_SIMULATE"


@dataclass(frozen=True)
class Versions:
    """Library versions as installed ("2.11.0+cu130"); None where a package is missing."""

    torch: str
    triton: str | None
    cupy: str | None

    def parsed(self, package: str) -> Version | None:
        """The version of ``package`` for comparisons (``packaging``), None if missing or unparsable."""
        text = getattr(self, package)
        try:
            return None if text is None else Version(text)
        except InvalidVersion:
            return None


@dataclass(frozen=True)
class DeviceInfo:
    vendor: str  # "nvidia" | "amd" | "cpu" (other torch device types: their own name, e.g. "mps")
    name: str  # product name as the driver reports it
    arch: str  # "sm_90", "gfx942", "cpu"
    capability: tuple[int, int] | None  # NVIDIA compute capability; None elsewhere
    multiprocessors: int  # SMs (NVIDIA) or CUs (AMD); 0 on CPU
    smem_per_block: int  # bytes a block may use (opt-in limit on NVIDIA, LDS on AMD)
    warp_size: int  # 32 on NVIDIA, 64 on AMD CDNA
    driver: str | None = None  # kernel driver version ("580.159.04"); None if unknown
    toolkit: str | None = None  # "cuda 13.0" / "hip 6.4" as torch was built; None on CPU
    versions: Versions | None = None
    simulated: bool = False
    index: int | None = None  # torch device index; None for CPU and simulated devices

    @property
    def is_gpu(self) -> bool:
        return self.vendor in ("nvidia", "amd")

    @property
    def key(self) -> str:
        """Short identity of the device kind: same key, same kernels and configs apply."""
        return f"{self.name} [{self.arch}]"


# Opt-in shared memory per block by compute capability (CUDA programming guide, table
# "technical specifications per compute capability"); used where torch does not expose it.
_NVIDIA_SMEM = {(8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 7): 163 * 1024, (8, 9): 99 * 1024,
                (9, 0): 227 * 1024, (10, 0): 227 * 1024, (12, 0): 99 * 1024}
_AMD_LDS = 64 * 1024  # LDS per workgroup on CDNA2/CDNA3 (gfx90a, gfx942)


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@functools.lru_cache(maxsize=None)
def versions() -> Versions:
    """Installed versions of torch, triton and cupy (cupy ships as cupy-cuda12x, -cuda13x, ...)."""
    cupy = None
    if importlib.util.find_spec("cupy") is not None:
        cupy = _dist_version("cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x", "cupy-rocm-6-0", "cupy-rocm-5-0", "cupy")
        cupy = cupy or "installed (version unknown)"
    triton = None
    if importlib.util.find_spec("triton") is not None:
        triton = _dist_version("triton", "pytorch-triton", "pytorch-triton-rocm") or "installed (version unknown)"
    return Versions(torch=torch.__version__, triton=triton, cupy=cupy)


def _read_first_line(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline().strip() or None
    except OSError:
        return None


@functools.lru_cache(maxsize=None)
def _nvidia_driver() -> str | None:
    """The kernel module's version ("580.159.04"), else the CUDA driver API version."""
    line = _read_first_line("/proc/driver/nvidia/version")  # Linux: "NVRM version: ... Kernel Module  580.159.04 ..."
    if line:
        for word in line.split():
            if word.count(".") >= 1 and word.replace(".", "").isdigit():
                return word
    try:
        api = torch._C._cuda_getDriverVersion()  # e.g. 13000; guarded: private and optional
        return f"CUDA driver API {api // 1000}.{api % 1000 // 10}"
    except Exception:
        return None


@functools.lru_cache(maxsize=None)
def _amd_driver() -> str | None:
    return _read_first_line("/sys/module/amdgpu/version")


@functools.lru_cache(maxsize=None)
def _cuda_device_info(index: int) -> DeviceInfo:
    props = torch.cuda.get_device_properties(index)
    if torch.version.hip is not None:
        arch = (getattr(props, "gcnArchName", "") or "gfx").split(":")[0]
        return DeviceInfo(
            vendor="amd", name=props.name, arch=arch, capability=None,
            multiprocessors=props.multi_processor_count,
            smem_per_block=getattr(props, "shared_memory_per_block", 0) or _AMD_LDS,
            warp_size=getattr(props, "warp_size", 64) or 64,
            driver=_amd_driver(), toolkit=f"hip {torch.version.hip}", versions=versions(), index=index,
        )
    cap = (props.major, props.minor)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or _NVIDIA_SMEM.get(cap, 48 * 1024)
    return DeviceInfo(
        vendor="nvidia", name=props.name, arch=f"sm_{props.major}{props.minor}", capability=cap,
        multiprocessors=props.multi_processor_count, smem_per_block=smem,
        warp_size=getattr(props, "warp_size", 32) or 32,
        driver=_nvidia_driver(), toolkit=f"cuda {torch.version.cuda}", versions=versions(), index=index,
    )


@functools.lru_cache(maxsize=None)
def _cpu_info() -> DeviceInfo:
    return replace(CPU, versions=versions())


@functools.lru_cache(maxsize=None)
def _other_device_info(device_type: str) -> DeviceInfo:
    """Devices no kernel here targets (mps, xpu, meta ...): only the reference runs there."""
    return DeviceInfo(vendor=device_type, name=device_type, arch=device_type, capability=None,
                      multiprocessors=0, smem_per_block=0, warp_size=1, versions=versions())


CPU = DeviceInfo(vendor="cpu", name="cpu", arch="cpu", capability=None, multiprocessors=0, smem_per_block=0,
                 warp_size=1)

# Simulated profiles: the figures each vendor publishes for the part (SM/CU count, opt-in shared
# memory per block or LDS per workgroup, warp size). The toolkit is a typical one for the part.
PROFILES: dict[str, DeviceInfo] = {
    "h100": DeviceInfo("nvidia", "NVIDIA H100 80GB HBM3", "sm_90", (9, 0), 132, 227 * 1024, 32,
                       toolkit="cuda 12.8", simulated=True),
    "a100": DeviceInfo("nvidia", "NVIDIA A100-SXM4-80GB", "sm_80", (8, 0), 108, 163 * 1024, 32,
                       toolkit="cuda 12.8", simulated=True),
    "rtx4090": DeviceInfo("nvidia", "NVIDIA GeForce RTX 4090", "sm_89", (8, 9), 128, 99 * 1024, 32,
                          toolkit="cuda 12.8", simulated=True),
    "mi300x": DeviceInfo("amd", "AMD Instinct MI300X", "gfx942", None, 304, _AMD_LDS, 64,
                         toolkit="hip 6.4", simulated=True),
    "mi250x": DeviceInfo("amd", "AMD Instinct MI250X", "gfx90a", None, 110, _AMD_LDS, 64,
                         toolkit="hip 6.4", simulated=True),
    "cpu": replace(CPU, simulated=True),
}


def check_profile(name: str, source: str = "simulate") -> None:
    if name not in PROFILES:
        raise ValueError(f"{source}={name!r} is not a known device profile (known: {', '.join(PROFILES)})")


@functools.lru_cache(maxsize=None)
def simulated_device(name: str) -> DeviceInfo:
    """The profile ``name`` with this machine's library versions."""
    check_profile(name)
    return replace(PROFILES[name], versions=versions())


def simulation() -> str | None:
    """The profile named by ``FA2DISPATCH_SIMULATE``, or None (validated: an unknown name raises)."""
    name = os.environ.get(ENV_SIMULATE) or None
    if name is not None:
        check_profile(name, ENV_SIMULATE)
    return name


def device_info(device: torch.device) -> DeviceInfo:
    """DeviceInfo of a real torch device, cached per device index. Ignores simulation."""
    if device.type == "cuda":
        return _cuda_device_info(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "cpu":
        return _cpu_info()
    return _other_device_info(device.type)


def dispatch_device(device: torch.device, simulate: str | None = None) -> DeviceInfo:
    """The device the dispatcher plans for: the simulated profile if one is named, else the real one."""
    if simulate is not None:
        return simulated_device(simulate)
    return device_info(device)


def current_device(simulate: str | None = None) -> DeviceInfo:
    """The device a report describes: the simulated profile, else CUDA device 0's current, else CPU."""
    if simulate is not None:
        return simulated_device(simulate)
    try:
        if torch.cuda.is_available():
            return device_info(torch.device("cuda"))
    except Exception:  # a broken driver must not break the report
        pass
    return _cpu_info()
