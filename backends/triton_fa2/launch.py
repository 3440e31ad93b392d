"""Plain launcher functions for the Triton kernels: allocate outputs, compute grids, launch.

Kernels are imported lazily so that ``TRITON_INTERPRET`` is read when the first call needs
them, not when fa2dispatch is imported.
"""

from __future__ import annotations

import torch
import triton

from fa2dispatch.hardware import DeviceInfo
from fa2dispatch.problem import AttentionProblem

from .config import TritonConfig, block_d

LOG2E = 1.4426950408889634  # 1/ln(2)


def _strides(t: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """(batch, head, row, dim) strides of a tensor in either layout."""
    s = t.stride()
    return (s[0], s[2], s[1], s[3]) if layout == "bshd" else (s[0], s[1], s[2], s[3])


def _dot_precision(problem: AttentionProblem, device: DeviceInfo) -> str:
    """float32 inputs get exact float32 dots unless the user allowed TF32 as for torch matmuls."""
    if problem.dtype != torch.float32:
        return "tf32"  # ignored by tl.dot for 16-bit operands
    if device.vendor == "nvidia" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def forward(problem: AttentionProblem, q, k, v, config: TritonConfig, device: DeviceInfo):
    from . import kernels

    B, H, Mq, Mkv, D = problem.B, problem.H, problem.Mq, problem.Mkv, problem.D
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Mq), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(Mq, config.block_m) * B * H,)
    kernels.attn_fwd[grid](
        q, k, v, out, lse, problem.softmax_scale * LOG2E,
        *_strides(q, problem.layout), *_strides(k, problem.layout), *_strides(v, problem.layout),
        *_strides(out, problem.layout),
        H, problem.group, Mq, Mkv,
        CAUSAL=problem.causal, HEAD_DIM=D, BLOCK_D=block_d(D),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, DOT_PRECISION=_dot_precision(problem, device),
        **config.launch_options(device.vendor),
    )
    return out, lse


def backward(problem: AttentionProblem, dout, q, k, v, out, lse, dlse, config: TritonConfig, device: DeviceInfo):
    """dq, dk, dv. ``dlse`` (the gradient reaching the returned lse, or None) folds into delta:
    dS = P * (dP - delta + dlse), since d lse_i / d S_ij = P_ij."""
    from . import kernels

    B, H, Hkv, Mq, Mkv, D = problem.B, problem.H, problem.Hkv, problem.Mq, problem.Mkv, problem.D
    layout, bd = problem.layout, block_d(D)
    precision = _dot_precision(problem, device)
    qk_scale = problem.softmax_scale * LOG2E
    opts = config.launch_options(device.vendor, backward=True)

    delta = torch.empty((B, H, Mq), dtype=torch.float32, device=q.device)
    kernels.attn_bwd_preprocess[(triton.cdiv(Mq, config.dq_block_m) * B * H,)](
        out, dout, delta, *_strides(out, layout), *_strides(dout, layout), H, Mq,
        HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=config.dq_block_m, **opts,
    )
    if dlse is not None:
        delta.sub_(dlse)

    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    kernels.attn_bwd_dkdv[(triton.cdiv(Mkv, config.dkdv_block_n) * B * Hkv,)](
        q, k, v, dout, lse, delta, dk, dv, qk_scale, problem.softmax_scale,
        *_strides(q, layout), *_strides(k, layout), *_strides(v, layout), *_strides(dout, layout),
        *_strides(dk, layout), *_strides(dv, layout),
        H, Hkv, problem.group, Mq, Mkv,
        CAUSAL=problem.causal, HEAD_DIM=D, BLOCK_D=bd,
        BLOCK_M=config.dkdv_block_m, BLOCK_N=config.dkdv_block_n, DOT_PRECISION=precision, **opts,
    )
    kernels.attn_bwd_dq[(triton.cdiv(Mq, config.dq_block_m) * B * H,)](
        q, k, v, dout, lse, delta, dq, qk_scale, problem.softmax_scale,
        *_strides(q, layout), *_strides(k, layout), *_strides(v, layout), *_strides(dout, layout),
        *_strides(dq, layout),
        H, problem.group, Mq, Mkv,
        CAUSAL=problem.causal, HEAD_DIM=D, BLOCK_D=bd,
        BLOCK_M=config.dq_block_m, BLOCK_N=config.dq_block_n, DOT_PRECISION=precision, **opts,
    )
    return dq, dk, dv


MAX_PROGRAMS = 2**31 - 1  # gridDim.x; the program id is a 32-bit int


def grid_reasons(problem: AttentionProblem, config: TritonConfig) -> list[str]:
    """The 1-D grid of the largest launch (query or key blocks x batch x heads) must fit."""
    blocks = max(triton.cdiv(problem.Mq, min(config.block_m, config.dq_block_m)) * problem.H,
                 triton.cdiv(problem.Mkv, config.dkdv_block_n) * problem.Hkv)
    if blocks * problem.B > MAX_PROGRAMS:
        return [f"B={problem.B} x H={problem.H} x Mq={problem.Mq} needs {blocks * problem.B} programs "
                f"(supported: at most {MAX_PROGRAMS})"]
    return []
