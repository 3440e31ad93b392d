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
    """(batch, head, row, dim) strides of a tensor in any layout; packed varlen tensors
    ("thd": (total, heads, D)) have no batch stride (sequences start at cu_seqlens rows)."""
    s = t.stride()
    if layout == "thd":
        return (0, s[1], s[0], s[2])
    return (s[0], s[2], s[1], s[3]) if layout == "bshd" else (s[0], s[1], s[2], s[3])


def _lse_strides(problem: AttentionProblem, total_q: int) -> tuple[int, int]:
    """(batch, head) strides of lse/delta: (B, H, Mq) dense, (H, total_q) varlen."""
    return (0, total_q) if problem.varlen else (problem.H * problem.Mq, problem.Mq)


def _lse_shape(problem: AttentionProblem, total_q: int) -> tuple[int, ...]:
    return (problem.H, total_q) if problem.varlen else (problem.B, problem.H, problem.Mq)


def feature_launch(problem: AttentionProblem, features, device: torch.device) -> tuple[list, dict]:
    """(runtime arguments, constexprs) of the features, in the kernels' order: CuQ, CuK,
    win_left, win_right, cap_a, cap_b, Slopes, stride_sz, stride_sh, seed, offset, p_drop,
    rp_drop. Unused pointers get a 1-element dummy (never read: the constexpr is off)."""
    left, right = problem.window
    slopes = features.alibi_slopes if problem.alibi else None
    dummy = _dummy(device)
    cu_q = features.cu_seqlens_q if problem.varlen else dummy
    cu_k = features.cu_seqlens_k if problem.varlen else dummy
    if slopes is None:
        slopes, s_z, s_h = _dummy(device, torch.float32), 0, 0
    elif slopes.dim() == 1:
        s_z, s_h = 0, slopes.stride(0)
    else:
        s_z, s_h = slopes.stride(0), slopes.stride(1)
    cap = problem.softcap
    p = problem.dropout_p
    args = [cu_q, cu_k, max(left, 0), max(right, 0),
            problem.softmax_scale / cap if cap else 0.0, cap * LOG2E if cap else 0.0,
            slopes, s_z, s_h,
            features.seed if p else 0, features.offset if p else 0, p, 1.0 / (1.0 - p)]
    constexprs = dict(TOP_LEFT=problem.causal_alignment == "top_left", HAS_LEFT=left >= 0,
                      HAS_RIGHT=right >= 0 and not problem.causal, SOFTCAP=bool(cap), ALIBI=problem.alibi is not None,
                      DROPOUT=bool(p), VARLEN=problem.varlen)
    return args, constexprs


_DUMMIES: dict = {}


def _dummy(device: torch.device, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    key = (device, dtype)
    t = _DUMMIES.get(key)
    if t is None:
        t = _DUMMIES[key] = torch.zeros(2, dtype=dtype, device=device)
    return t


_NO_FEATURES = None  # FeatureArgs() built lazily (features imports problem)


def _features(features):
    global _NO_FEATURES
    if features is not None:
        return features
    if _NO_FEATURES is None:
        from fa2dispatch.features import FeatureArgs

        _NO_FEATURES = FeatureArgs()
    return _NO_FEATURES


def _dot_precision(problem: AttentionProblem, device: DeviceInfo) -> str:
    """float32 inputs get exact float32 dots unless the user allowed TF32 as for torch matmuls."""
    if problem.dtype != torch.float32:
        return "tf32"  # ignored by tl.dot for 16-bit operands
    if device.vendor == "nvidia" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


# Compiled kernels of this module's launches, for fast_launch (Triton's own path the first time
# and whenever a hook, the interpreter or FA2DISPATCH_FAST_LAUNCH=0 asks for it).
_KERNELS: dict = {}


def _launch(fn, grid: tuple, args: tuple, meta: dict) -> None:
    """``fn[grid](*args, **meta)`` through fast_launch: a warm backward's three launches spent
    most of its host time in ``JITFunction.run`` (tools/profile_host.py)."""
    from . import fast_launch

    fast_launch.launch(fn, grid, args, meta, _KERNELS)


def forward(problem: AttentionProblem, q, k, v, config: TritonConfig, device: DeviceInfo, features=None,
            int64_rows: bool = False):
    from . import kernels

    B, H, Mq, Mkv, D = problem.B, problem.H, problem.Mq, problem.Mkv, problem.D
    features = _features(features)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(_lse_shape(problem, q.shape[0]), dtype=torch.float32, device=q.device)
    fargs, fconst = feature_launch(problem, features, q.device)
    grid = (triton.cdiv(Mq, config.block_m) * B * H,)
    _launch(kernels.attn_fwd, grid, (
        q, k, v, out, lse, problem.softmax_scale * LOG2E,
        *_strides(q, problem.layout), *_strides(k, problem.layout), *_strides(v, problem.layout),
        *_strides(out, problem.layout), *_lse_strides(problem, q.shape[0]),
        H, problem.group, Mq, Mkv, *fargs,
    ), dict(
        CAUSAL=problem.causal, HEAD_DIM=D, BLOCK_D=block_d(D),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, DOT_PRECISION=_dot_precision(problem, device),
        INT64_ROWS=int64_rows, **fconst, **config.launch_options(device.vendor),
    ))
    return out, lse


def keys_per_row(problem: AttentionProblem) -> int:
    """The most keys one query row can see (window and causal bound; Mkv otherwise)."""
    left, right = problem.window
    if problem.causal:
        right = 0 if right < 0 else min(right, 0)
    if left >= 0 and right >= 0:
        return min(problem.Mkv, left + right + 1)
    return problem.Mkv


def renormalize_p(problem: AttentionProblem) -> bool:
    """Whether the backward scales each row's recomputed P by 1 / sum_j P_ij (the kernels'
    RENORM, the row sums written by the DELTA_ONLY pass): float32 inputs only. P comes back
    from the lse stored in natural log, whose float32 rounding at |lse| ~ 1e3 (ALiBi at long
    positions) leaves every row a factor ~1 + 1e-4; PyTorch's float32 softmax has no such
    factor, and summed over thousands of rows into dV it missed the STYLE.md bound 9x (fuzz
    case #726 on the H100, kernels.attn_bwd_dkdv). 16-bit inputs round P to 16 bits for the
    dots anyway, and their kernels stay as they were."""
    return problem.dtype == torch.float32


def delta_from_dp(problem: AttentionProblem, config: TritonConfig) -> bool:
    """Whether the backward's delta comes from dP (the DELTA_ONLY pass) instead of dO . O.

    Dropout needs it: O holds the dropped P, rounded. Rows that see at most one block of keys
    take it too: there the pass reads what the preprocess reads (one row block of q and dO
    against one key block, instead of O and dO), and a row that sees one key gets dS = 0
    exactly. With dO . O, the preprocess and the tensor-core dP sum the same products in
    different orders, which left such a row a few float32 ulps of gradient (fuzz case #223 on
    the H100: dq 3.4e-6 where the exact value is 0, docs/PENDING_S5.md). Every float32
    backward takes it as well: the same pass writes the row sums that ``renormalize_p`` needs."""
    return bool(problem.dropout_p) or keys_per_row(problem) <= config.dq_block_n or renormalize_p(problem)


def backward(problem: AttentionProblem, dout, q, k, v, out, lse, dlse, config: TritonConfig, device: DeviceInfo,
             features=None, int64_rows: bool = False):
    """dq, dk, dv. ``dlse`` (the gradient reaching the returned lse, or None) folds into delta:
    dS = P * (dP - delta + dlse), since d lse_i / d S_ij = P_ij."""
    from . import kernels

    B, H, Hkv, Mq, Mkv, D = problem.B, problem.H, problem.Hkv, problem.Mq, problem.Mkv, problem.D
    layout, bd = problem.layout, block_d(D)
    precision = _dot_precision(problem, device)
    qk_scale = problem.softmax_scale * LOG2E
    opts = config.launch_options(device.vendor, backward=True)
    features = _features(features)
    fargs, fconst = feature_launch(problem, features, q.device)
    lse_strides = _lse_strides(problem, q.shape[0])

    delta = torch.empty(_lse_shape(problem, q.shape[0]), dtype=torch.float32, device=q.device)
    renorm = renormalize_p(problem)
    # 1 / sum_j P_ij per row, written by the DELTA_ONLY pass (float32 only; else never read)
    corr = torch.empty_like(delta) if renorm else _dummy(q.device, torch.float32)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dq_grid = (triton.cdiv(Mq, config.dq_block_m) * B * H,)
    dq_args = (q, k, v, dout, lse, delta, corr, dq, qk_scale, problem.softmax_scale,
               *_strides(q, layout), *_strides(k, layout), *_strides(v, layout), *_strides(dout, layout),
               *_strides(dq, layout), *lse_strides,
               H, problem.group, Mq, Mkv, *fargs)
    dq_meta = dict(CAUSAL=problem.causal, HEAD_DIM=D, BLOCK_D=bd,
                   BLOCK_M=config.dq_block_m, BLOCK_N=config.dq_block_n, DOT_PRECISION=precision, **fconst,
                   RENORM=renorm, INT64_ROWS=int64_rows, **opts)
    if delta_from_dp(problem, config):
        # delta = rowsum(P * dP) from the (dropped) dP itself (one more pass over the keys: the
        # dQ kernel's DELTA_ONLY mode), not dO . O: O is rounded to its dtype, and a row that
        # sees one key would otherwise get a gradient of that rounding's size where the exact
        # one is 0.
        _launch(kernels.attn_bwd_dq, dq_grid, dq_args, dict(dq_meta, DELTA_ONLY=True))
    else:
        _launch(kernels.attn_bwd_preprocess, dq_grid, (
            out, dout, delta, *_strides(out, layout), *_strides(dout, layout), *lse_strides, H, Mq, fargs[0],
        ), dict(HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=config.dq_block_m, VARLEN=problem.varlen, INT64_ROWS=int64_rows,
                **opts))
    if dlse is not None:
        delta.sub_(dlse)

    if config.bwd_kernel == "gluon" and _gluon_dkdv_takes(problem, config, device, q, k, v, dout, lse, int64_rows):
        from . import launch_gluon_bwd

        dk, dv = launch_gluon_bwd.run_dkdv(q, k, v, dout, lse, delta, problem.causal, problem.softmax_scale, layout,
                                           config.dkdv_block_m, config.dkdv_num_warps or config.bwd_num_warps,
                                           config.bwd_num_stages)
    else:
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        _launch(kernels.attn_bwd_dkdv, (triton.cdiv(Mkv, config.dkdv_block_n) * B * Hkv,), (
            q, k, v, dout, lse, delta, corr, dk, dv, qk_scale, problem.softmax_scale,
            *_strides(q, layout), *_strides(k, layout), *_strides(v, layout), *_strides(dout, layout),
            *_strides(dk, layout), *_strides(dv, layout), *lse_strides,
            H, Hkv, problem.group, Mq, Mkv, *fargs,
        ), dict(
            CAUSAL=problem.causal, HEAD_DIM=D, BLOCK_D=bd,
            BLOCK_M=config.dkdv_block_m, BLOCK_N=config.dkdv_block_n, DOT_PRECISION=precision, **fconst,
            RENORM=renorm, INT64_ROWS=int64_rows, **config.launch_options(device.vendor, backward=True, dkdv=True),
        ))
    _launch(kernels.attn_bwd_dq, dq_grid, dq_args, dict(dq_meta, DELTA_ONLY=False))
    return dq, dk, dv


_GLUON_DKDV_OK: dict = {}  # (problem, config) -> whether the Gluon dK/dV kernel takes it (bounded)


def _gluon_dkdv_takes(problem: AttentionProblem, config: TritonConfig, device: DeviceInfo, q, k, v, dout, lse,
                      int64_rows: bool) -> bool:
    """Whether ``config``'s Gluon dK/dV kernel runs this call (launch_gluon_bwd's problem and
    tensor reasons; lse contiguous (B, H, Mq) as every dense forward stores it); else the plain
    kernel runs with the same blocks."""
    from . import launch_gluon_bwd

    key = (problem, config)
    ok = _GLUON_DKDV_OK.get(key)
    if ok is None:
        if len(_GLUON_DKDV_OK) >= 1024:
            _GLUON_DKDV_OK.clear()
        ok = _GLUON_DKDV_OK[key] = not launch_gluon_bwd.problem_reasons(problem, config, device)
    return (ok and not int64_rows and lse.is_contiguous()
            and not launch_gluon_bwd.tensor_reasons(q, k, v, dout, problem.layout))


MAX_PROGRAMS = 2**31 - 1  # gridDim.x; the program id is a 32-bit int


def grid_reasons(problem: AttentionProblem, config: TritonConfig) -> list[str]:
    """The 1-D grid of the largest launch (query or key blocks x batch x heads) must fit, and
    no block may pass MAX_BLOCK_ROWS rows (``stride_reasons`` bounds in-block offsets by it);
    fwd_tile_grid is one of launch_gluon.PP_TILE_GRIDS."""
    from . import MAX_BLOCK_ROWS
    from .launch_gluon import PP_TILE_GRIDS

    if isinstance(config.fwd_tile_grid, bool) or config.fwd_tile_grid not in PP_TILE_GRIDS:
        return [f"fwd_tile_grid={config.fwd_tile_grid!r} (supported: {PP_TILE_GRIDS})"]
    big = [f"{name}={value}" for name, value in (("block_m", config.block_m), ("block_n", config.block_n),
                                                 ("dkdv_block_m", config.dkdv_block_m),
                                                 ("dkdv_block_n", config.dkdv_block_n),
                                                 ("dq_block_m", config.dq_block_m), ("dq_block_n", config.dq_block_n))
           if value > MAX_BLOCK_ROWS]
    if big:
        return [f"{', '.join(big)} (supported: blocks of at most {MAX_BLOCK_ROWS} rows)"]
    blocks = max(triton.cdiv(problem.Mq, min(config.block_m, config.dq_block_m)) * problem.H,
                 triton.cdiv(problem.Mkv, config.dkdv_block_n) * problem.Hkv)
    if blocks * problem.B > MAX_PROGRAMS:
        return [f"B={problem.B} x H={problem.H} x Mq={problem.Mq} needs {blocks * problem.B} programs "
                f"(supported: at most {MAX_PROGRAMS})"]
    return []
