"""Launcher of the fp8 forward: V's layout, descales, tensor descriptors, output allocation.

Kernels are imported lazily so that ``TRITON_INTERPRET`` is read when the first call needs
them, not when fa2dispatch is imported.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import triton

from fa2dispatch.fp8 import FP8Args
from fa2dispatch.hardware import DeviceInfo
from fa2dispatch.problem import AttentionProblem

from ..triton_fa2.launch import _strides
from ..triton_fa2.launch_hopper import _tma_view  # the 2-D view a descriptor of q or k can address
from .config import FP8Config, block_d

TMA_ALIGN = 16  # bytes: TMA wants 16-byte aligned base addresses and row strides
PP_FP8_CONSUMER_REGS = 240  # the ping-pong kernel's register split for fp8: the one measured (24 + 2 x 240)


TRANSPOSE_BLOCK_M, TRANSPOSE_BLOCK_D = 128, 64  # 128-byte rows written, 64-byte rows read per tile


def transpose_v(v: torch.Tensor, layout: str) -> torch.Tensor:
    """V^T, (B, Hkv, D, Mkv) with Mkv contiguous: the K-major operand Hopper's fp8 wgmma needs
    for P @ V. One copy of V, by a tiled Triton kernel (``kernels.transpose_rows``). The row
    stride is padded to a multiple of 16 elements (bytes, for e4m3) so that a tensor descriptor
    can address it; the padding is never read (the descriptor's shape is Mkv)."""
    from . import kernels

    vh = v if layout == "bhsd" else v.transpose(1, 2)  # (B, Hkv, Mkv, D) view
    B, Hkv, Mkv, D = vh.shape
    padded = -(-Mkv // TMA_ALIGN) * TMA_ALIGN
    buf = torch.empty((B, Hkv, D, padded), dtype=v.dtype, device=v.device)
    x, y = vh.view(torch.uint8), buf.view(torch.uint8)  # bytes: no fp8 arithmetic happens here
    grid = (triton.cdiv(Mkv, TRANSPOSE_BLOCK_M), triton.cdiv(D, TRANSPOSE_BLOCK_D), B * Hkv)
    kernels.transpose_rows[grid](x, y, Hkv, Mkv, D, *x.stride(), y.stride(0), y.stride(1), y.stride(2),
                                 BLOCK_M=TRANSPOSE_BLOCK_M, BLOCK_D=TRANSPOSE_BLOCK_D, num_warps=4)
    return buf[..., :Mkv]


_ONES: dict[torch.device, torch.Tensor] = {}


def _one(device: torch.device) -> torch.Tensor:
    """A float32 1 on ``device``, addressed with strides 0: the descale of a call without one."""
    one = _ONES.get(device)
    if one is None:
        one = _ONES[device] = torch.ones(1, dtype=torch.float32, device=device)
    return one


def _descale(t: torch.Tensor | None, device) -> tuple[torch.Tensor, int, int]:
    if t is None:
        return _one(device), 0, 0
    return t, t.stride(0), t.stride(1)


def _tma_plan(problem: AttentionProblem, q, k, vt, config: FP8Config, device: DeviceInfo):
    """Descriptors and coordinates for the TMA path, or None where it cannot run: not on
    sm_90+, a padded head dim (a descriptor would read the next head's columns), strides that
    are not one 2-D view, or a V^T row stride that is not 16-byte aligned."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if not config.tma or block_d(problem.D) != problem.D:
        return None
    hopper = device.vendor == "nvidia" and device.capability is not None and device.capability >= (9, 0)
    if not (hopper or device.vendor == "cpu"):  # the interpreter emulates descriptors
        return None
    qv, kv = _tma_view(q, problem.layout), _tma_view(k, problem.layout)
    B, Hkv, D, Mkv = vt.shape
    vt_ok = vt.stride(3) == 1 and vt.stride(2) % TMA_ALIGN == 0 and vt.stride(1) == D * vt.stride(2) \
        and vt.stride(0) == Hkv * vt.stride(1) and vt.data_ptr() % TMA_ALIGN == 0
    if qv is None or kv is None or not vt_ok:
        return None
    bm, bn = config.block_m, config.block_n
    q_desc = TensorDescriptor(q, list(qv[0]), list(qv[1]), [bm, D])
    k_desc = TensorDescriptor(k, list(kv[0]), list(kv[1]), [bn, D])
    vt_desc = TensorDescriptor(vt, [B * Hkv * D, Mkv], [vt.stride(2), 1], [D, bn])
    return q_desc, k_desc, vt_desc, qv[2:], kv[2:]


def gluon_reasons(problem: AttentionProblem, q, k, vt, config: FP8Config, device: DeviceInfo) -> list[str]:
    """Why the Gluon kernel (triton_fa2/kernels_gluon.py) cannot run this call with ``config``
    (empty: it can). Those calls run the Triton kernel instead, with the same config fields."""
    out = []
    if not (device.vendor == "nvidia" and device.capability is not None and (9, 0) <= device.capability < (10, 0)):
        out.append("needs sm_90 (wgmma, TMA; Gluon kernels do not run under the interpreter)")
    if problem.D not in (64, 128):
        out.append(f"head dim {problem.D} (supported: 64, 128)")
    if not problem.softmax_scale > 0:
        out.append(f"softmax_scale={problem.softmax_scale} (supported: > 0)")
    if config.kernel == "gluon-pp":
        if config.block_m != 128 or config.num_warps != 12 or config.block_n not in (64, 128):
            out.append(f"block_m={config.block_m} block_n={config.block_n} num_warps={config.num_warps} (the "
                       "ping-pong kernel takes block_m 128 with 12 warps, block_n 64 or 128)")
    elif config.block_m not in (64, 128) or config.num_warps != config.block_m // 16 or config.block_n not in (64, 128):
        out.append(f"block_m={config.block_m} block_n={config.block_n} num_warps={config.num_warps} (supported: "
                   "block_m 64 or 128 with block_m / 16 warps, block_n 64 or 128)")
    if problem.Mq % config.block_m:
        out.append(f"Mq={problem.Mq} (supported: a multiple of block_m={config.block_m}; the output goes back through "
                   "TMA over rows shared with the next head)")
    if problem.output_dtype not in (torch.bfloat16, torch.float16):
        out.append(f"output dtype {problem.output_dtype}")
    if out or device.vendor == "cpu":
        return out
    if _tma_view(q, problem.layout) is None or _tma_view(k, problem.layout) is None:
        out.append("q, k: a tensor descriptor needs contiguous rows of (B, S, H, D) or (B, H, S, D)")
    _, Hkv, D, _ = vt.shape
    if not (vt.stride(3) == 1 and vt.stride(2) % TMA_ALIGN == 0 and vt.stride(1) == D * vt.stride(2)
            and vt.stride(0) == Hkv * vt.stride(1) and vt.data_ptr() % TMA_ALIGN == 0):
        out.append("V^T: rows of Mkv with a 16-byte aligned stride")
    return out


def forward(problem: AttentionProblem, q, k, v, config: FP8Config, device: DeviceInfo,
            fp8_args: FP8Args | None = None, force_pointers: bool = False):
    """(out in the problem's output dtype and q's layout, lse (B, H, Mq) float32)."""
    from . import kernels

    B, H, Mq, Mkv, D = problem.B, problem.H, problem.Mq, problem.Mkv, problem.D
    vt = v if problem.v_layout == "transposed" else transpose_v(v, problem.layout)
    args = fp8_args or FP8Args()
    if config.kernel == "gluon-pp" and not force_pointers and not gluon_reasons(problem, q, k, vt, config, device):
        from ..triton_fa2.launch_gluon import pp_producer_regs, run_pingpong

        return run_pingpong(q, k, None, problem.causal, problem.softmax_scale, problem.layout, config.block_n,
                            config.num_stages, config.v_stages, pp_producer_regs(PP_FP8_CONSUMER_REGS),
                            PP_FP8_CONSUMER_REGS, args.q_descale, args.k_descale, args.v_descale, vt,
                            problem.output_dtype, tile_grid=config.tile_grid)
    if config.kernel == "gluon-pp":  # a call the ping-pong kernel cannot take: one warpgroup, same buffers
        config = replace(config, block_m=64, num_warps=4, kernel="gluon")
    if config.kernel == "gluon" and not force_pointers and not gluon_reasons(problem, q, k, vt, config, device):
        from ..triton_fa2.launch_gluon import forward_fp8

        return forward_fp8(q, k, None, args.q_descale, args.k_descale, args.v_descale, problem.causal,
                           problem.softmax_scale, problem.layout, vt, config.block_m, config.block_n,
                           config.num_stages, config.v_stages, config.num_warps, problem.output_dtype)
    out = torch.empty(q.shape, dtype=problem.output_dtype, device=q.device)
    lse = torch.empty((B, H, Mq), dtype=torch.float32, device=q.device)
    qd, kd, vd = (_descale(t, q.device) for t in (args.q_descale, args.k_descale, args.v_descale))
    qd_group = 1 if args.q_descale is None or args.q_descale.shape[1] == H else problem.group

    plan = None if force_pointers else _tma_plan(problem, q, k, vt, config, device)
    if plan is not None:
        q_in, k_in, vt_in, q_rows, k_rows = plan
    else:
        q_in, k_in, vt_in, q_rows, k_rows = q, k, vt, (0, 0, 0), (0, 0, 0)
    grid = (triton.cdiv(Mq, config.block_m) * B * H,)
    kernels.attn_fwd_fp8[grid](
        q_in, k_in, vt_in, out, lse, qd[0], kd[0], vd[0], problem.softmax_scale,
        *_strides(q, problem.layout), *_strides(k, problem.layout), *vt.stride(), *_strides(out, problem.layout),
        qd[1], qd[2], kd[1], kd[2], vd[1], vd[2],
        *q_rows, *k_rows,
        H, problem.group, qd_group, problem.Hkv, Mq, Mkv,
        CAUSAL=problem.causal, POS_SCALE=problem.softmax_scale > 0, HEAD_DIM=D, BLOCK_D=block_d(D),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, USE_TMA=plan is not None,
        **config.launch_options(),
    )
    return out, lse


MAX_PROGRAMS = 2**31 - 1  # gridDim.x; the program id is a 32-bit int


def grid_reasons(problem: AttentionProblem, config: FP8Config) -> list[str]:
    from ..triton_fa2.launch_gluon import PP_TILE_GRIDS

    if isinstance(config.tile_grid, bool) or config.tile_grid not in PP_TILE_GRIDS:
        return [f"tile_grid={config.tile_grid!r} (supported: {PP_TILE_GRIDS})"]
    blocks = triton.cdiv(problem.Mq, config.block_m) * problem.H * problem.B
    if blocks > MAX_PROGRAMS:
        return [(f"B={problem.B} x H={problem.H} x Mq={problem.Mq} needs {blocks} programs "
                 f"(supported: at most {MAX_PROGRAMS})")]
    return []
