"""CuPy backend: FlashAttention-2 forward and deterministic backward in CUDA C++, compiled at
run time by NVRTC through ``cupy.RawModule``; no build step at install.

- ``fa2_fwd.cu``, ``fa2_bwd.cu``, ``common.cuh``: the kernels (mma.sync m16n8k16 with fp32
  accumulators, ldmatrix, cp.async; fp16 and bf16; head dims 8..256, multiple of 8).
- ``compile.py``: sources, ``-D`` specialisation, the module caches (how the keys are made is
  in its docstring). ``config.py``: ``CupyConfig``, defaults, the tuner's candidates.
- ``launch.py``: raw pointers and strides in, torch's current stream, no synchronisation.
- ``nvrtc_check.py``: the same sources compiled offline with NVRTC through ctypes (CI).
"""

from __future__ import annotations

import functools

import torch

from fa2dispatch.hardware import DeviceInfo
from fa2dispatch.problem import AttentionProblem

from ..base import Backend
from .config import CupyConfig, config_reasons, config_space, default_config


@functools.cache
def _nvrtc_problem() -> str | None:
    """None if NVRTC loads through cupy, else why not. Imports cupy: only on the slow path."""
    try:
        import cupy

        major_minor = cupy.cuda.nvrtc.getVersion()
    except Exception as exc:  # noqa: BLE001 (ImportError, CUDARuntimeError, missing libnvrtc.so ...)
        return f"NVRTC missing ({type(exc).__name__}: {exc})".strip()
    return None if major_minor else "NVRTC missing"


# The wgmma forward is sm_90a code; NVRTC has that target from CUDA 12.0.
SM90A_NVRTC = (12, 0)


@functools.cache
def _nvrtc_version() -> tuple[int, int] | None:
    """CuPy's NVRTC version, or None when it cannot be asked (no cupy, no libnvrtc)."""
    try:
        from cupy.cuda import nvrtc

        return tuple(nvrtc.getVersion())
    except Exception:  # noqa: BLE001 (ImportError, CUDARuntimeError, missing libnvrtc.so ...)
        return None


def sm90a_reason(device: DeviceInfo) -> str | None:
    """Why the wgmma forward cannot be compiled for this device's run time, or None. Simulated
    devices (reports, tests) have no NVRTC to ask: assumed able."""
    if device.simulated:
        return None
    version = _nvrtc_version()
    if version is not None and version < SM90A_NVRTC:
        return (f"fwd_kernel='wgmma' needs NVRTC {SM90A_NVRTC[0]}.{SM90A_NVRTC[1]}+ for sm_90a "
                f"(CuPy's NVRTC: {version[0]}.{version[1]})")
    return None


# fa2_fwd.cu takes each row's max over the raw scores and scales it once; that is the max of the
# scaled scores only for a positive scale. Found 2026-11-25 (session 8): with a negative scale the
# masked keys (-inf raw) turned into p = 2^+inf, and at scale 0 the first rescale computed
# -inf * 0 = NaN. Refused rather than compiled in: every other backend takes any finite scale.
_SCALE_REASON = ("softmax_scale={:g} (supported: > 0; the CuPy forward takes row maxima of the raw scores, "
                 "which order like the scaled ones only for a positive scale)")


class CupyBackend(Backend):
    name = "cupy"
    description = "FlashAttention-2 in CUDA C++ compiled at run time by NVRTC through cupy.RawModule"
    vendors = ("nvidia",)
    min_capability = (8, 0)  # mma.sync m16n8k16 with bf16, cp.async, ldmatrix
    packages = ("cupy",)
    dtypes = (torch.float16, torch.bfloat16)
    deterministic = True  # dK/dV and dQ in separate kernels, each element summed by one thread
    supports_gqa = True
    supports_lse_grad = True
    supports_causal_unequal = True
    config_type = CupyConfig

    def version(self, device: DeviceInfo) -> str:
        return f"cupy {device.versions.cupy}" if device.versions and device.versions.cupy else "-"

    def available(self, device: DeviceInfo) -> list[str]:
        reasons = super().available(device)
        if not reasons and not device.simulated:
            problem = _nvrtc_problem()
            if problem:
                reasons.append(problem)
        return reasons

    def feature_reasons(self, problem: AttentionProblem) -> list[str]:
        reasons = super().feature_reasons(problem)
        if not problem.softmax_scale > 0:
            reasons.append(_SCALE_REASON.format(problem.softmax_scale))
        return reasons

    def not_supported_reasons(self, problem: AttentionProblem, device: DeviceInfo) -> list[str]:
        reasons = super().not_supported_reasons(problem, device)
        if reasons:
            return reasons
        from .launch import grid_reasons

        cfg = self.default_config(problem, device)
        return grid_reasons(problem, cfg) + config_reasons(problem.D, cfg, device.smem_per_block or None,
                                                           problem.requires_grad, device.capability or None)

    def default_config(self, problem: AttentionProblem, device: DeviceInfo) -> CupyConfig:
        return default_config(problem.D, device, wgmma=sm90a_reason(device) is None)

    def config_reasons(self, problem, device, config) -> list[str]:
        from .launch import grid_reasons

        if not isinstance(config, CupyConfig):
            return [f"config {config!r} is not a CupyConfig"]
        why = sm90a_reason(device) if config.fwd_kernel == "wgmma" else None
        return ([why] if why else []) + grid_reasons(problem, config) + config_reasons(problem.D, config, device.smem_per_block or None,
                                                              problem.requires_grad, device.capability or None)

    def config_space(self, problem: AttentionProblem, device: DeviceInfo) -> list[CupyConfig]:
        return config_space(problem, device, wgmma=sm90a_reason(device) is None)

    def forward(self, problem, q, k, v, config):
        from .launch import forward  # lazily: launching imports cupy

        if not problem.softmax_scale > 0:  # the dispatcher never sends these; direct callers get the reason
            raise ValueError("the CuPy forward cannot run this call: " + _SCALE_REASON.format(problem.softmax_scale))

        return forward(problem, q, k, v, config or self.default_config(problem, _device(q)))

    def backward(self, problem, dout, q, k, v, out, lse, config, dlse=None):
        from .launch import backward

        return backward(problem, dout, q, k, v, out, lse, dlse, config or self.default_config(problem, _device(q)))


def _device(t: torch.Tensor) -> DeviceInfo:
    from fa2dispatch.hardware import device_info

    return device_info(t.device)
