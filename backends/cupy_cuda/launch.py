"""Launchers of the CuPy kernels: torch tensors in, torch tensors out, no copies and no host
synchronisation.

Tensors reach the kernels as raw device pointers (``data_ptr()``) with their (batch, head,
row) strides in elements; kernels launch on torch's current stream through a cached
``cupy.cuda.ExternalStream``, so they order with the surrounding torch work exactly as a torch
kernel would. The only copy ever made is of an input whose rows cannot be read in 16-byte
chunks (last stride != 1, a row stride not a multiple of 8 elements, or a misaligned base).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from fa2dispatch.problem import AttentionProblem

from .compile import backward_specs, forward_spec, function
from .config import CupyConfig

LOG2E = 1.4426950408889634  # 1/ln(2)
LSE_PAD = 128  # rows of the backward's lse2/delta buffers are padded to this (>= every query block)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _ready(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when the kernels can read it in 16-byte chunks, else a contiguous copy."""
    ok = t.data_ptr() % 16 == 0 and (t.shape[-1] <= 1 or t.stride(-1) == 1)
    ok = ok and all(s % 8 == 0 for n, s in zip(t.shape[:-1], t.stride()[:-1]) if n > 1)
    return t if ok else t.contiguous().clone() if t.is_contiguous() else t.contiguous()


def _strides(t: torch.Tensor, layout: str) -> tuple:
    """(batch, head, row) strides in elements, as the kernels' int64 arguments."""
    s = t.stride()
    bhm = (s[0], s[2], s[1]) if layout == "bshd" else (s[0], s[1], s[2])
    return tuple(np.int64(x) for x in bhm)


def _ptr(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


_streams: dict = {}


def _launch(spec, grid: int, args: tuple, device_index: int) -> None:
    import cupy

    fn = function(spec, device_index)
    raw = torch.cuda.current_stream(device_index).cuda_stream
    stream = _streams.get((device_index, raw))
    if stream is None:
        with warnings.catch_warnings():
            # cupy 14 deprecates ExternalStream for Stream.from_external (objects with
            # __cuda_stream__); a raw handle is what torch gives on every version we support.
            warnings.simplefilter("ignore", DeprecationWarning)
            stream = _streams[(device_index, raw)] = cupy.cuda.ExternalStream(raw, device_index)
    with cupy.cuda.Device(device_index), stream:
        fn((grid,), (spec.threads,), args, shared_mem=spec.smem)


def forward(problem: AttentionProblem, q, k, v, config: CupyConfig):
    B, H, Mq, Mkv, D = problem.B, problem.H, problem.Mq, problem.Mkv, problem.D
    layout = problem.layout
    q, k, v = _ready(q), _ready(k), _ready(v)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Mq), dtype=torch.float32, device=q.device)
    num_m_blocks = _cdiv(Mq, config.block_m)
    grid = num_m_blocks * B * H
    if grid == 0:
        return out, lse
    spec = forward_spec(problem.dtype, D, problem.causal, config)
    args = (_ptr(q), _ptr(k), _ptr(v), _ptr(out), _ptr(lse),
            *_strides(q, layout), *_strides(k, layout), *_strides(v, layout), *_strides(out, layout),
            np.int32(H), np.int32(problem.group), np.int32(Mq), np.int32(Mkv), np.int32(num_m_blocks),
            np.float32(problem.softmax_scale * LOG2E), np.int32(head_group(config, num_m_blocks, B * H, q.device)))
    _launch(spec, grid, args, q.device.index)
    return out, lse


_sm_counts: dict = {}


def head_group(config: CupyConfig, num_m_blocks: int, num_bh: int, device: torch.device) -> int:
    """Heads per group of the causal work order (fa2_fwd.cu), in 1..num_bh. ``head_group`` 0:
    about one wave of CTAs per group (2 per SM, the D=128 default's occupancy), at least one head."""
    g = config.head_group
    if g == 0:
        sms = _sm_counts.get(device.index)
        if sms is None:
            sms = _sm_counts[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
        g = max(1, (2 * sms) // max(1, num_m_blocks))
    return max(1, min(g, num_bh))


def backward(problem: AttentionProblem, dout, q, k, v, out, lse, dlse, config: CupyConfig):
    """dq, dk, dv. ``dlse`` (gradient reaching the returned lse, or None) folds into delta:
    dS = P (dP - delta) with delta = rowsum(dO O) - dlse, since d lse_i / d S_ij = P_ij."""
    B, H, Hkv, Mq, Mkv, D = problem.B, problem.H, problem.Hkv, problem.Mq, problem.Mkv, problem.D
    layout = problem.layout
    q, k, v, out, dout = (_ready(t) for t in (q, k, v, out, dout))
    if Mq == 0 or Mkv == 0 or B * H == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    index = q.device.index
    lse = lse.detach().to(torch.float32).contiguous()
    if dlse is not None:
        dlse = dlse.detach().to(torch.float32).contiguous()
    specs = backward_specs(problem.dtype, D, problem.causal, config)
    scales = (np.float32(problem.softmax_scale * LOG2E), np.float32(problem.softmax_scale))

    mq_pad = _cdiv(Mq, LSE_PAD) * LSE_PAD
    rows = B * H * mq_pad
    lse2 = torch.empty(rows, dtype=torch.float32, device=q.device)
    delta = torch.empty(rows, dtype=torch.float32, device=q.device)
    _launch(specs["pre"], _cdiv(rows, 4),
            (_ptr(out), _ptr(dout), _ptr(lse), _ptr(dlse), _ptr(lse2), _ptr(delta),
             *_strides(out, layout), *_strides(dout, layout), np.int32(H), np.int32(Mq), np.int32(mq_pad),
             np.int64(rows)), index)

    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    qkvo = (*_strides(q, layout), *_strides(k, layout), *_strides(v, layout), *_strides(dout, layout))
    num_m_blocks = _cdiv(Mq, config.dq_block_m)
    if Mkv <= config.dq_block_n:
        # Rows see one key block at most: delta from the P and dP the gradients use (fa2_bwd_delta),
        # not rowsum(dO O), so a row with one visible key gets dS = 0 exactly (fuzz #614).
        _launch(specs["delta"], num_m_blocks * B * H,
                (_ptr(q), _ptr(k), _ptr(v), _ptr(dout), _ptr(lse2), _ptr(delta), *qkvo,
                 np.int32(H), np.int32(problem.group), np.int32(Mq), np.int32(Mkv), np.int32(mq_pad),
                 np.int32(num_m_blocks), scales[0]), index)
        if dlse is not None:  # fa2_bwd_pre folded dlse into the delta this replaced
            delta.view(B * H, mq_pad)[:, :Mq].sub_(dlse.reshape(B * H, Mq))

    from .config import dkdv_split

    num_n_blocks = _cdiv(Mkv, config.dkdv_block_n)
    _launch(specs["dkdv"], num_n_blocks * B * Hkv * dkdv_split(D),
            (_ptr(q), _ptr(k), _ptr(v), _ptr(dout), _ptr(lse2), _ptr(delta), _ptr(dk), _ptr(dv),
             *qkvo, *_strides(dk, layout), *_strides(dv, layout),
             np.int32(H), np.int32(Hkv), np.int32(problem.group), np.int32(Mq), np.int32(Mkv), np.int32(mq_pad),
             np.int32(num_n_blocks), *scales), index)

    _launch(specs["dq"], num_m_blocks * B * H,
            (_ptr(q), _ptr(k), _ptr(v), _ptr(dout), _ptr(lse2), _ptr(delta), _ptr(dq), *qkvo, *_strides(dq, layout),
             np.int32(H), np.int32(problem.group), np.int32(Mq), np.int32(Mkv), np.int32(mq_pad),
             np.int32(num_m_blocks), *scales), index)
    return dq, dk, dv


MAX_PROGRAMS = 2**31 - 1  # gridDim.x; blockIdx.x is read as a 32-bit int


def grid_reasons(problem: AttentionProblem, config: CupyConfig) -> list[str]:
    """The 1-D grid of the largest launch must fit gridDim.x."""
    from .config import dkdv_split

    blocks = max(_cdiv(problem.Mq, min(config.block_m, config.dq_block_m)) * problem.H,
                 _cdiv(problem.Mkv, config.dkdv_block_n) * problem.Hkv * dkdv_split(problem.D),
                 _cdiv(_cdiv(problem.Mq, LSE_PAD) * LSE_PAD * problem.H, 4))
    if blocks * problem.B > MAX_PROGRAMS:
        return [(f"B={problem.B} x H={problem.H} x Mq={problem.Mq} needs {blocks * problem.B} CTAs "
                 f"(supported: at most {MAX_PROGRAMS})")]
    return []
