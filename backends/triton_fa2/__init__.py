"""Triton FlashAttention-2 backend: forward and deterministic backward, NVIDIA and AMD.

``kernels.py`` holds the ``@triton.jit`` bodies, ``launch.py`` the launchers, ``config.py``
the launch parameters. On CPU tensors the kernels run under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import threading

import torch
from packaging.version import Version

from fa2dispatch.hardware import DeviceInfo, device_info
from fa2dispatch.problem import AttentionProblem

from ..base import Backend
from .config import GLUON_DEFAULTS, TritonConfig, default_config

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


INT32_OFFSETS = 2**31
MAX_BLOCK_ROWS = 256  # the largest block_m / block_n of any config (autotune/space.py)


def offset_reasons(problem: AttentionProblem) -> list[str]:
    """What the kernels' 32-bit offsets cannot address, by shape.

    The attention kernels (kernels.py) add batch and head offsets in 64 bits, and with
    INT64_ROWS (set per call by ``_check_strides`` when a tensor's rows reach element 2^31 of
    a batch element) each block's first row too; only offsets inside a block are then 32-bit
    (``stride_reasons`` checks the actual strides). The decode kernels (decode.py) still form a
    row's offset inside one cache sequence in 32 bits: a KV-cache sequence of 2^31 elements or
    more is refused."""
    if problem.kvcache:
        rows = max(problem.Mq * problem.H, problem.Mkv * problem.Hkv) * problem.D
        if rows >= INT32_OFFSETS:
            return [f"one KV-cache sequence holds {rows} elements (Mq*H*D or Mkv*Hkv*D); the decode kernels' "
                    "row offsets inside it are 32-bit (supported: < 2^31)"]
    return []


def _rows_and_strides(problem: AttentionProblem, t: torch.Tensor) -> tuple[int, int, int]:
    """(rows, row stride, dim stride) of one head of a tensor in the problem's layout."""
    s = t.stride()
    if problem.layout == "thd":
        return t.shape[0], s[0], s[2]
    if problem.layout == "bshd":
        return t.shape[1], s[1], s[3]
    return t.shape[2], s[2], s[3]


def stride_reasons(problem: AttentionProblem, **tensors) -> list[str]:
    """Offsets inside one block are 32-bit: up to MAX_BLOCK_ROWS rows of a tensor's row stride,
    plus D of its dim stride, must stay below 2^31 (a row stride of about 2^23 elements or
    more; a stride of 2^31 or more is passed as a 64-bit kernel argument and is fine)."""
    out = []
    for name, t in tensors.items():
        rows, row, dim = _rows_and_strides(problem, t)
        if abs(row) >= INT32_OFFSETS:
            continue  # a 64-bit argument: every product with it is 64-bit
        reach = (min(rows, MAX_BLOCK_ROWS) - 1) * abs(row) + (t.shape[-1] - 1) * abs(dim)
        if reach >= INT32_OFFSETS:
            out.append(f"{name}'s row stride {row} reaches element {reach} inside one block of "
                       f"{MAX_BLOCK_ROWS} rows; offsets inside a block are 32-bit (supported: < 2^31)")
    return out


def needs_int64_rows(problem: AttentionProblem, **tensors) -> bool:
    """Whether some tensor's rows reach element 2^31 of a batch element (row x row stride would
    wrap as a 32-bit product): the kernels then take INT64_ROWS."""
    for t in tensors.values():
        rows, row, dim = _rows_and_strides(problem, t)
        if (rows - 1) * abs(row) + (t.shape[-1] - 1) * abs(dim) >= INT32_OFFSETS:
            return True
    return False


_HOPPER_OK: dict = {}
_GLUON_OK: dict = {}  # (problem, config) -> whether the Gluon forward takes it (tensors aside)
_STRIDES_CHECKED: dict = {}  # (problem, strides of the tensors) -> (stride_reasons, needs_int64_rows)
_MEMO_LIMIT = 4096  # as the dispatcher's memo: past that these start over
_THREAD = threading.local()


def _kernel_takes(memo: dict, reasons, problem: AttentionProblem, config: TritonConfig, device: DeviceInfo) -> bool:
    """Whether ``reasons(problem, config, device)`` is empty, once per (problem, config) in
    ``memo`` (bounded by _MEMO_LIMIT): the warm path stays a lookup."""
    ok = memo.get((problem, config))
    if ok is None:
        if len(memo) >= _MEMO_LIMIT:
            memo.clear()
        ok = memo[(problem, config)] = not reasons(problem, config, device)
    return ok


def _check_strides(problem: AttentionProblem, **tensors) -> bool:
    """``stride_reasons`` as a run-time refusal (the dispatcher's fallback takes the call
    elsewhere; a forced call raises), and ``needs_int64_rows`` as the answer, once per problem
    and strides: the warm path stays a lookup."""
    key = (problem, *[t.stride() for t in tensors.values()])  # forward (3) and backward (5) differ in length
    found = _STRIDES_CHECKED.get(key)
    if found is None:
        if len(_STRIDES_CHECKED) >= _MEMO_LIMIT:
            _STRIDES_CHECKED.clear()
        found = _STRIDES_CHECKED[key] = (stride_reasons(problem, **tensors), needs_int64_rows(problem, **tensors))
    too_far, int64_rows = found
    if too_far:
        raise NotImplementedError("triton: " + "; ".join(too_far))
    return int64_rows


def ensure_cuda_context(device: torch.device) -> None:
    """Make the device's CUDA context current in this thread, once per thread and device.

    Host-side tensor descriptors (TMA) are encoded through the driver API, which needs a
    current context; a thread that has only run torch ops from the caching allocator may not
    have one yet ("Failed to create tensor map descriptor: invalid device context", seen from
    worker threads on the H100). A stream query makes the runtime bind it."""
    if device.type != "cuda":
        return
    done = getattr(_THREAD, "devices", None)
    if done is None:
        done = _THREAD.devices = set()
    if device.index not in done:
        torch.cuda.current_stream(device).query()
        done.add(device.index)  # (problem, config) -> whether the Hopper forward takes it


def _gluon_default(problem: AttentionProblem, config: TritonConfig) -> TritonConfig:
    """For a gluon-pp config on a call the ping-pong kernel cannot take (Mq not a multiple of
    128, varlen, ...): the one-warpgroup Gluon kernel's default blocks (GLUON_DEFAULTS), which
    falls back in turn where it cannot run; the plain kernel's blocks where D has no default."""
    from dataclasses import replace

    if problem.D in GLUON_DEFAULTS:
        m, n, k_stages, v_stages = GLUON_DEFAULTS[problem.D]
        return replace(config, block_m=m, block_n=n, num_warps=m // 16, num_stages=k_stages, fwd_v_stages=v_stages,
                       fwd_kernel="gluon", fwd_maxnreg=0)
    return replace(config, block_m=64, block_n=64, num_warps=4, num_stages=2, fwd_kernel="", fwd_maxnreg=0,
                   fwd_v_stages=0)


def _hopper_fallback(problem: AttentionProblem, config: TritonConfig) -> TritonConfig:
    """For a gluon config on a call the Gluon kernel cannot take: the Hopper kernel's measured
    choice of blocks (launch_hopper.measured_choice), else the plain kernel with these fields."""
    from dataclasses import replace

    from .launch_hopper import measured_choice

    choice = measured_choice(problem, config)
    if choice is None:
        return replace(config, fwd_kernel="", fwd_v_stages=0)
    hopper, options = choice
    return replace(hopper, fwd_kernel="hopper", fwd_order=options.order, fwd_maxnreg=options.maxnreg, fwd_v_stages=0)


class TritonBackend(Backend):
    name = "triton"
    description = "FlashAttention-2 forward + deterministic backward in Triton (NVIDIA, AMD, CPU interpreter)"
    vendors = ("nvidia", "amd", "cpu")
    min_capability = (8, 0)
    amd_archs = AMD_ARCHS
    packages = ("triton",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    deterministic = True  # dQ and dK/dV are summed on chip; no atomics
    supports_kvcache = supports_paged_kv = True  # decode_launch.py: split-KV decode, paged or not
    # kernels.py: constexpr-gated, so a plain call compiles to the plain kernel
    supports_window = supports_softcap = supports_alibi = supports_dropout = True
    supports_top_left = supports_varlen = True
    config_type = TritonConfig

    def version(self, device: DeviceInfo) -> str:
        return triton_version(device)

    def available(self, device: DeviceInfo) -> list[str]:
        return super().available(device) or triton_reasons(device)

    def not_supported_reasons(self, problem: AttentionProblem, device: DeviceInfo) -> list[str]:
        reasons = super().not_supported_reasons(problem, device)
        if reasons:
            return reasons
        from .launch import grid_reasons  # imports triton: only once the base checks found it installed

        reasons.extend(grid_reasons(problem, default_config(problem, device)))
        reasons.extend(offset_reasons(problem))
        if problem.dtype == torch.bfloat16 and device.vendor == "cpu" and not device.simulated and _interpreting():
            from .interpreter import bf16_defects

            reasons.extend(f"dtype=bfloat16: {r}" for r in bf16_defects())
        return reasons

    def default_config(self, problem: AttentionProblem, device: DeviceInfo) -> TritonConfig:
        return default_config(problem, device)

    def config_reasons(self, problem, device, config) -> list[str]:
        from .launch import grid_reasons

        return grid_reasons(problem, config)

    def forward(self, problem, q, k, v, config, features=None):
        from .launch import forward  # lazily: importing launch imports Triton

        int64_rows = _check_strides(problem, q=q, k=k, v=v)
        device = device_info(q.device)
        if config.fwd_kernel == "gluon-pp" and features is None:
            from . import launch_gluon

            ok = _kernel_takes(_GLUON_OK, launch_gluon.pp_problem_reasons, problem, config, device)
            if ok and not launch_gluon.tensor_reasons(q, k, v, problem.layout):
                ensure_cuda_context(q.device)
                return launch_gluon.run_pingpong(q, k, v, problem.causal, problem.softmax_scale, problem.layout,
                                                 config.block_n, config.num_stages,
                                                 config.fwd_v_stages or config.num_stages,
                                                 launch_gluon.pp_producer_regs(config.fwd_maxnreg), config.fwd_maxnreg,
                                                 tile_grid=config.fwd_tile_grid)
        if config.fwd_kernel == "gluon-pp":  # a call the ping-pong kernel cannot take: the one-warpgroup kernel's default
            config = _gluon_default(problem, config)
        if config.fwd_kernel == "gluon" and (features is None or problem.varlen):
            from . import launch_gluon

            ok = _kernel_takes(_GLUON_OK, launch_gluon.problem_reasons, problem, config, device)
            if ok and problem.varlen and not launch_gluon.varlen_tensor_reasons(q, k, v):
                ensure_cuda_context(q.device)
                return launch_gluon.forward_varlen(q, k, v, features.cu_seqlens_q, features.cu_seqlens_k, problem.Mq,
                                                   problem.Mkv, problem.causal, problem.softmax_scale,
                                                   config.block_m, config.block_n, config.num_stages,
                                                   config.fwd_v_stages or config.num_stages, config.num_warps)
            if ok and not problem.varlen and not launch_gluon.tensor_reasons(q, k, v, problem.layout):
                ensure_cuda_context(q.device)
                return launch_gluon.run_forward(q, k, v, problem.causal, problem.softmax_scale, problem.layout,
                                                config.block_m, config.block_n, config.num_stages,
                                                config.fwd_v_stages or config.num_stages, config.num_warps)
            if problem.varlen:  # a varlen call the Gluon kernel cannot take: the plain kernel's own default
                config = default_config(problem, device, hopper=False)
            else:
                config = _hopper_fallback(problem, config)  # ragged Mq, strided tensors, ...
        if config.fwd_kernel == "hopper" and features is None:
            from . import launch_hopper

            if _kernel_takes(_HOPPER_OK, launch_hopper.reasons, problem, config, device):
                ensure_cuda_context(q.device)
                return launch_hopper.forward(problem, q, k, v, config, device, checked=True)
        return forward(problem, q, k, v, config, device, features, int64_rows=int64_rows)

    def backward(self, problem, dout, q, k, v, out, lse, config, dlse=None, features=None):
        from .launch import backward

        int64_rows = _check_strides(problem, q=q, k=k, v=v, out=out, dout=dout)
        return backward(problem, dout, q, k, v, out, lse, dlse, config, device_info(q.device), features,
                        int64_rows=int64_rows)

    def forward_kvcache(self, problem, q, k_cache, v_cache, kv, config):
        from .decode_launch import forward_kvcache

        return forward_kvcache(problem, q, k_cache, v_cache, kv, config, device_info(q.device))

