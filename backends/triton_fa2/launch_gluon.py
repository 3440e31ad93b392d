"""Launchers of the Gluon forward (``kernels_gluon.attn_fwd_gluon``) for sm_90.

- varlen: ``forward_varlen``, the same routing for ``attention_varlen`` calls with no other
  feature (packed (total, heads, D) tensors, ``varlen_tensor_reasons``).
- 16-bit: ``TritonConfig.fwd_kernel == "gluon"`` routes plain fp16/bf16 calls here
  (``triton_fa2.TritonBackend.forward``) when ``problem_reasons`` and ``tensor_reasons`` are
  empty: head dim 64 or 128, softmax_scale > 0, Mq a multiple of block_m (the output goes back
  through TMA over rows the next head shares), inputs a descriptor can address
  (``launch_hopper._tma_view``); other calls take the Hopper kernel. ``forward`` is also the
  entry point of ``tools/sweep_gluon.py``.
- fp8: ``forward_fp8``, from the ``triton-fp8`` backend (``triton_fp8.launch.gluon_reasons``).
- ping-pong (``kernels_gluon_ws.attn_fwd_gluon_pp``, FA3's schedule: two consumer warpgroups
  taking turns at the tensor cores, a producer warpgroup loading): ``TritonConfig.fwd_kernel ==
  "gluon-pp"`` and ``FP8Config.kernel == "gluon-pp"``, through ``run_pingpong`` when
  ``pp_problem_reasons`` is empty; ``forward_pingpong`` is the checked entry (tools, tests).
- ``compile_sm90`` compiles it offline for the resource report (no GPU needed).
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch
import triton

from .launch_hopper import LOG2E, _tma_view

DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def problem_reasons(problem, config, device) -> list[str]:
    """Why the 16-bit Gluon forward cannot run ``problem`` with ``config`` (a TritonConfig) on
    ``device`` (empty: it can, given addressable tensors)."""
    out = []
    if not (device.vendor == "nvidia" and device.capability is not None and (9, 0) <= device.capability < (10, 0)):
        out.append(f"device {device.arch} (supported: sm_90; Gluon kernels do not run under the interpreter)")
    if problem.dtype not in DTYPES:
        out.append(f"dtype={problem.dtype} (supported: float16, bfloat16)")
    if problem.D not in (64, 128):
        out.append(f"head dim {problem.D} (supported: 64, 128)")
    if not problem.softmax_scale > 0:
        out.append(f"softmax_scale={problem.softmax_scale} (supported: > 0)")
    if set(problem.feature_names) - {"varlen"} or problem.kvcache:
        out.append("features (but varlen) and KV caches are not implemented in the Gluon forward")
    if problem.causal and problem.causal_alignment != "bottom_right":
        out.append(f"causal_alignment={problem.causal_alignment!r}")
    if config.block_m not in (64, 128) or config.num_warps != config.block_m // 16 or config.block_n not in (64, 128):
        out.append(f"block_m={config.block_m} block_n={config.block_n} num_warps={config.num_warps} (supported: "
                   "block_m 64 or 128 with block_m / 16 warps, block_n 64 or 128)")
    if problem.Mq % config.block_m and not problem.varlen:  # varlen stores O through masked pointers
        out.append(f"Mq={problem.Mq} (supported: a multiple of block_m={config.block_m})")
    return out


def tensor_reasons(q, k, v, layout: str) -> list[str]:
    if any(_tma_view(t, layout) is None for t in (q, k, v)):
        return ["q, k, v: a tensor descriptor needs contiguous (B, S, H, D) or (B, H, S, D) rows"]
    return []


def reasons(q, k, v, causal: bool, softmax_scale: float, layout: str, block_m: int, block_n: int) -> list[str]:
    """The checks of ``forward``'s direct callers (the sweep tool), from the tensors alone."""
    out = []
    if q.dtype not in DTYPES:
        out.append(f"dtype={q.dtype} (supported: float16, bfloat16)")
    if q.shape[-1] not in (64, 128):
        out.append(f"head dim {q.shape[-1]} (supported: 64, 128)")
    if not softmax_scale > 0:
        out.append(f"softmax_scale={softmax_scale} (supported: > 0)")
    Mq = q.shape[1] if layout == "bshd" else q.shape[2]
    if block_m not in (64, 128):
        out.append(f"block_m={block_m} (supported: 64 with 4 warps, 128 with 8)")
    if Mq % block_m:
        out.append(f"Mq={Mq} (supported: a multiple of block_m={block_m})")
    return out + tensor_reasons(q, k, v, layout)


def _gl_dtype(dtype: torch.dtype):
    from triton.experimental.gluon import language as gl

    return {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16, torch.float8_e4m3fn: gl.float8e4nv}[dtype]


@functools.lru_cache(maxsize=64)
def _smem_layout(block: tuple, dtype: torch.dtype):
    """The swizzled shared-memory layout of a TMA block: Gluon computes it in ~15 us (a
    constexpr function call), four times per launch, so it is computed once per block."""
    from triton.experimental.gluon import language as gl

    return gl.NVMMASharedLayout.get_default_for(list(block), _gl_dtype(dtype))


def _gl_desc(t: torch.Tensor, shape, strides, block):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    return TensorDescriptor(t, list(shape), list(strides), list(block), _smem_layout(tuple(block), t.dtype))


def _desc(t: torch.Tensor, layout: str, block_rows: int):
    (shape, strides, rows_z, rows_h, cols_h) = _tma_view(t, layout)
    return _gl_desc(t, shape, strides, [block_rows, t.shape[-1]]), (rows_z, rows_h, cols_h)


# Compiled Gluon kernels for fast_launch (every launcher here), and a float32 one per device: the
# descale pointers of a 16-bit call, never read (one allocation and fill kernel per call before).
_KERNELS: dict = {}
_ONES: dict = {}


def _one(device: torch.device) -> torch.Tensor:
    found = _ONES.get(device)
    if found is None:
        found = _ONES[device] = torch.ones(1, 1, dtype=torch.float32, device=device)
    return found


def pp_schedule(n_tiles: int, n_mb: int, grid: int, causal: bool, sec: int | None = None) -> list[list[tuple[int, int]]]:
    """The ping-pong kernel's persistent schedule, in plain Python: for each CTA, the
    (batch x head, row block) of each tile it runs, in order. It mirrors
    ``kernels_gluon_ws._pp_rounds``, ``_pp_tile_at`` and ``_pp_tile`` for tests and for
    reasoning about balance; the GPU tests check the kernel itself (every row of every tile
    against float64). ``sec``: the causal sections' width in (batch x head)s, as
    ``run_pingpong`` passes it (None: ``pp_sections``' default)."""
    n_bh = n_tiles // n_mb
    sec = pp_sections(n_bh, sec)
    out = []
    for pid in range(grid):
        full, rem = divmod(n_tiles, grid)
        last = pid + (full & 1) * (grid - 1 - 2 * pid) if causal else pid
        tiles = []
        for r in range(full + (last < rem)):
            p = pid + (r & 1) * (grid - 1 - 2 * pid) if causal else pid
            t = r * grid + p
            if causal:
                s, u = divmod(t, sec * n_mb)
                width = min(sec, n_bh - s * sec)
                tiles.append((s * sec + u % width, n_mb - 1 - u // width))
            else:
                tiles.append((t // n_mb, t % n_mb))
        out.append(tiles)
    return out


# The causal ping-pong order's sections: (batch x head)s whose tiles run longest first among
# themselves before the next section starts (kernels_gluon_ws._pp_tile). Two keeps two heads' K
# and V in flight per section, inside L2; every head at once (one section) spilled it at D=128
# (session 13, H100 D=128 fp16 causal x cuDNN: 0.98 / 1.01 / 1.02 at S = 1k / 2k / 4k in
# sections of two, persistent, against 0.93 / - / 0.93 in one section).
PP_SECTION_HEADS = 2


# fwd_tile_grid (FP8Config.tile_grid): how the ping-pong kernel's tiles meet its CTAs. 0: the
# launcher's choice (pp_per_tile); 1: one CTA per tile; 2: persistent, one CTA per SM.
PP_TILE_GRIDS = {0: "the launcher's choice", 1: "one CTA per tile", 2: "persistent"}
# Causal calls with more row blocks per head than this get one CTA per tile under the launcher's
# choice: the persistent snake over sections of two heads drifts out of balance there (the
# sections restart at the longest tile every 2 x n_mb tiles). H100, D=128 fp16 causal x cuDNN,
# session 13: persistent 0.98 / 1.01 / 1.02 / 0.80 / 0.74 at S = 1k / 2k / 4k / 8k / 16k (8 to
# 128 row blocks), one CTA per tile 0.82 / 0.91 / 0.98 / 1.00 / 1.06.
PP_PERSISTENT_CAUSAL_MB = 32


def pp_per_tile(tile_grid: int, causal: bool, n_mb: int) -> bool:
    """Whether ``tile_grid`` (PP_TILE_GRIDS) launches one CTA per tile for a call with n_mb
    row blocks per head."""
    if isinstance(tile_grid, bool) or tile_grid not in PP_TILE_GRIDS:
        raise ValueError(f"fwd_tile_grid={tile_grid!r}: expected one of {sorted(PP_TILE_GRIDS)} ({PP_TILE_GRIDS})")
    if tile_grid == 0:
        return causal and n_mb > PP_PERSISTENT_CAUSAL_MB
    return tile_grid == 1


def pp_sections(n_bh: int, sec: int | None = None) -> int:
    """The section width the kernel gets: ``sec`` (default PP_SECTION_HEADS; 0 = one section of
    all n_bh), capped at n_bh."""
    sec = PP_SECTION_HEADS if sec is None else sec
    if isinstance(sec, bool) or not isinstance(sec, int) or sec < 0:
        raise ValueError(f"sec_heads={sec!r}: expected an int >= 0 (0: one section of every head)")
    return n_bh if sec == 0 else min(sec, n_bh)


def _sm_count(device: torch.device) -> int:
    """Multiprocessors of the tensor's device (cached with its DeviceInfo): the persistent grid."""
    from fa2dispatch.hardware import device_info

    return device_info(device).multiprocessors


def _shapes(q, k, layout: str) -> tuple[int, int, int, int, int]:
    """(B, H, Hkv, Mq, Mkv) of a dense call."""
    if layout == "bshd":
        return q.shape[0], q.shape[2], k.shape[2], q.shape[1], k.shape[1]
    return q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2]


def forward(q, k, v, causal: bool = False, softmax_scale: float | None = None, layout: str = "bhsd",
            block_m: int = 64, block_n: int = 64, k_stages: int = 2, v_stages: int = 2, num_warps: int = 4,
            q_regs: bool = False, maxnreg: int = 0):
    """The checked entry (tools/sweep_gluon.py, tests): raises ValueError naming what the kernel
    cannot take, then ``run_forward``."""
    D = q.shape[-1]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    why = reasons(q, k, v, causal, scale, layout, block_m, block_n)
    if num_warps != block_m // 16:
        why.append(f"num_warps={num_warps} (block_m={block_m} takes {block_m // 16}: 16 rows per warp)")
    if why:
        raise ValueError("the Gluon forward cannot run this call: " + "; ".join(why))
    return run_forward(q, k, v, causal, scale, layout, block_m, block_n, k_stages, v_stages, num_warps, q_regs,
                       maxnreg)


def _dense_setup(q, k, v, layout: str, block_m: int, block_n: int):
    """A dense 16-bit call's output, lse and descriptors: (B, H, Hkv, Mq, Mkv), out, lse, the q, k,
    v, o descriptors, and the q and k row arguments (rows per z, rows per head, column offset)."""
    B, H, Hkv, Mq, Mkv = _shapes(q, k, layout)
    out = torch.empty_like(q)
    lse = torch.empty((B, H, Mq), dtype=torch.float32, device=q.device)
    qd, q_rows = _desc(q, layout, block_m)
    kd, k_rows = _desc(k, layout, block_n)
    vd, _ = _desc(v, layout, block_n)
    od, _ = _desc(out, layout, block_m)
    return (B, H, Hkv, Mq, Mkv), out, lse, (qd, kd, vd, od), (*q_rows, *k_rows)


def run_forward(q, k, v, causal: bool, softmax_scale: float, layout: str, block_m: int, block_n: int,
                k_stages: int, v_stages: int, num_warps: int, q_regs: bool = False, maxnreg: int = 0):
    """The 16-bit forward without ``forward``'s checks: for TritonBackend.forward, which has asked
    ``problem_reasons`` and ``tensor_reasons`` already."""
    from . import fast_launch, kernels_gluon

    (B, H, Hkv, Mq, Mkv), out, lse, descs, rows = _dense_setup(q, k, v, layout, block_m, block_n)
    one = _one(q.device)
    meta = {"CAUSAL": causal, "K_STAGES": k_stages, "V_STAGES": v_stages, "Q_REGS": q_regs, "FP8": False,
            "VARLEN": False, "num_warps": num_warps, **({"maxnreg": maxnreg} if maxnreg else {})}
    fast_launch.launch(kernels_gluon.attn_fwd_gluon, (triton.cdiv(Mq, block_m) * B * H,),
                       (*descs, lse, softmax_scale * LOG2E, H, H // Hkv, Mq, Mkv, *rows,
                        one, one, one, 0, 0, 0, 0, 0, 0, 1, Hkv, lse, lse, out, 0, 0), meta, _KERNELS)
    return out, lse


def forward_ws(q, k, v, causal: bool = False, softmax_scale: float | None = None, layout: str = "bhsd",
               block_m: int = 128, block_n: int = 128, k_stages: int = 2, v_stages: int = 2, producer_regs: int = 24):
    """The warp-specialized kernel (``kernels_gluon_ws.attn_fwd_gluon_ws``, branch s9-gluon-ws:
    not yet run on a GPU): 16-bit, dense; block_m / 16 consumer warps plus a producer warpgroup."""
    from . import kernels_gluon_ws

    D = q.shape[-1]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    why = reasons(q, k, v, causal, scale, layout, block_m, block_n)
    if why:
        raise ValueError("the warp-specialized Gluon forward cannot run this call: " + "; ".join(why))
    (B, H, Hkv, Mq, Mkv), out, lse, descs, rows = _dense_setup(q, k, v, layout, block_m, block_n)
    grid = (triton.cdiv(Mq, block_m) * B * H,)
    kernels_gluon_ws.attn_fwd_gluon_ws[grid](*descs, lse, scale * LOG2E, H, H // Hkv, Mq, Mkv, *rows,
                                             CAUSAL=causal, K_STAGES=k_stages, V_STAGES=v_stages,
                                             PRODUCER_REGS=producer_regs, num_warps=block_m // 16)
    return out, lse


def forward_fp8(q8, k8, v8, q_descale=None, k_descale=None, v_descale=None, causal: bool = False,
                softmax_scale: float | None = None, layout: str = "bhsd", v_transposed=None,
                block_m: int = 64, block_n: int = 128, k_stages: int = 2, v_stages: int = 2, num_warps: int = 4,
                out_dtype: torch.dtype = torch.bfloat16):
    """The same kernel on e4m3 q, k, v with float32 descales (B, H or Hkv) / (B, Hkv), as the
    ``triton-fp8`` backend takes them; output ``out_dtype``. ``v_transposed``: V^T (B, Hkv, D,
    Mkv) with Mkv contiguous and a 16-byte row stride, else made from ``v8`` (one copy)."""
    from ..triton_fp8.launch import transpose_v
    from . import fast_launch, kernels_gluon

    D = q8.shape[-1]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    B, H, Hkv, Mq, Mkv = _shapes(q8, k8, layout)
    if Mq % block_m or D not in (64, 128) or not scale > 0 or num_warps != block_m // 16:
        raise ValueError("the Gluon fp8 forward takes Mq % block_m == 0, D in (64, 128), softmax_scale > 0, "
                         "num_warps = block_m / 16 (triton_fp8.launch.gluon_reasons)")
    vt = v_transposed if v_transposed is not None else transpose_v(v8, layout)
    out = torch.empty_like(q8, dtype=out_dtype)  # q8's memory order: O goes back through q's row arguments
    lse = torch.empty((B, H, Mq), dtype=torch.float32, device=q8.device)
    qd, (qz, qh, qc) = _desc(q8, layout, block_m)
    kd, (kz, kh, kc) = _desc(k8, layout, block_n)
    vd = _gl_desc(vt, [B * Hkv * D, Mkv], [vt.stride(2), 1], [D, block_n])
    od, _ = _desc(out, layout, block_m)
    one = _one(q8.device)
    qs, ks, vs = (t if t is not None else one for t in (q_descale, k_descale, v_descale))
    strides = [x for t, given in ((qs, q_descale), (ks, k_descale), (vs, v_descale))
               for x in ((t.stride(0), t.stride(1)) if given is not None else (0, 0))]
    qd_group = 1 if q_descale is None or q_descale.shape[1] == H else H // Hkv
    meta = {"CAUSAL": causal, "K_STAGES": k_stages, "V_STAGES": v_stages, "Q_REGS": False, "FP8": True,
            "VARLEN": False, "num_warps": num_warps}
    fast_launch.launch(kernels_gluon.attn_fwd_gluon, (triton.cdiv(Mq, block_m) * B * H,),
                       (qd, kd, vd, od, lse, scale * LOG2E, H, H // Hkv, Mq, Mkv, qz, qh, qc, kz, kh, kc,
                        qs, ks, vs, *strides, qd_group, Hkv, lse, lse, out, 0, 0), meta, _KERNELS)
    return out, lse


def varlen_tensor_reasons(q, k, v) -> list[str]:
    """Packed (total, heads, D) tensors a descriptor over the (total, heads x D) view can read:
    heads and D contiguous, a 16-byte row stride and base."""
    out = []
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(2) != 1 or t.stride(1) != t.shape[2] or (t.stride(0) * t.element_size()) % 16 \
                or t.data_ptr() % 16:
            out.append(f"{name}: the Gluon varlen forward needs (total, heads, D) rows with heads and D contiguous "
                       f"and 16-byte aligned (strides {tuple(t.stride())})")
    return out


def forward_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                   softmax_scale: float, block_m: int = 64, block_n: int = 64, k_stages: int = 2,
                   v_stages: int = 2, num_warps: int = 4):
    """Packed sequences (``attention_varlen``): q (total_q, H, D), k and v (total_k, Hkv, D), int32
    cumulative lengths; out like q and lse (H, total_q). The caller has checked the call
    (``problem_reasons`` with a varlen problem, ``varlen_tensor_reasons``)."""
    from . import fast_launch, kernels_gluon

    total_q, H, D = q.shape
    total_k, Hkv, _ = k.shape
    B = cu_seqlens_q.shape[0] - 1
    out = torch.empty_like(q)
    lse = torch.empty((H, total_q), dtype=torch.float32, device=q.device)
    if total_q == 0 or B == 0:
        return out, lse
    qd = _gl_desc(q, [total_q, H * D], [q.stride(0), 1], [block_m, D])
    kd = _gl_desc(k, [total_k, Hkv * D], [k.stride(0), 1], [block_n, D])
    vd = _gl_desc(v, [total_k, Hkv * D], [v.stride(0), 1], [block_n, D])
    one = _one(q.device)
    meta = {"CAUSAL": causal, "K_STAGES": k_stages, "V_STAGES": v_stages, "Q_REGS": False, "FP8": False,
            "VARLEN": True, "num_warps": num_warps}
    fast_launch.launch(kernels_gluon.attn_fwd_gluon, (triton.cdiv(max_seqlen_q, block_m) * B * H,),
                       (qd, kd, vd, qd, lse, softmax_scale * LOG2E, H, H // Hkv, max_seqlen_q, max_seqlen_k,
                        0, 0, D, 0, 0, D, one, one, one, 0, 0, 0, 0, 0, 0, 1, Hkv,
                        cu_seqlens_q, cu_seqlens_k, out, out.stride(0), total_q), meta, _KERNELS)
    return out, lse


PP_BLOCK_M = 128  # the ping-pong kernel's rows per CTA: two consumer warpgroups of 64
PP_WARPS = 12  # its warps: two consumer warpgroups and a producer warpgroup
PP_CONSUMER_REGS = (240, 232)  # the register splits tools/sweep_gluon.py measured (H100, 2026-11-25)


def pp_producer_regs(consumer_regs: int) -> int:
    """The producer warpgroup's registers beside ``consumer_regs`` per consumer thread: the two
    measured splits, 24 + 2 x 240 and 32 + 2 x 232 (at most 65536 / 128 per thread in all)."""
    return 24 if consumer_regs >= 240 else 32


def pp_problem_reasons(problem, config, device) -> list[str]:
    """``problem_reasons`` for a ``fwd_kernel="gluon-pp"`` config (the ping-pong kernel): dense
    calls only, Mq a multiple of 128, block_n 64 or 128, a measured register split."""
    out = [r for r in problem_reasons(problem, replace(config, block_m=64, num_warps=4), device)
           if not r.startswith(("block_m=", "Mq="))]
    if problem.varlen:
        out.append("varlen (the ping-pong kernel takes dense calls only)")
    if config.block_m != PP_BLOCK_M or config.num_warps != PP_WARPS or config.block_n not in (64, 128) \
            or config.fwd_maxnreg not in PP_CONSUMER_REGS:
        out.append(f"block_m={config.block_m} block_n={config.block_n} num_warps={config.num_warps} "
                   f"fwd_maxnreg={config.fwd_maxnreg} (supported: block_m {PP_BLOCK_M}, {PP_WARPS} warps, block_n "
                   f"64 or 128, consumer registers {' or '.join(map(str, PP_CONSUMER_REGS))})")
    if problem.Mq % PP_BLOCK_M:
        out.append(f"Mq={problem.Mq} (supported: a multiple of {PP_BLOCK_M})")
    return out


def forward_pingpong(q, k, v, causal: bool = False, softmax_scale: float | None = None, layout: str = "bhsd",
                     block_n: int = 128, k_stages: int = 2, v_stages: int = 2, producer_regs: int = 24,
                     consumer_regs: int = 240, q_descale=None, k_descale=None, v_descale=None, v_transposed=None,
                     out_dtype: torch.dtype = torch.bfloat16, tile_grid: int = 0, sec_heads: int | None = None):
    """The ping-pong kernel (``kernels_gluon_ws.attn_fwd_gluon_pp``), checked: dense; 128 query
    rows per CTA, 64 per consumer warpgroup. 16-bit q, k, v; or e4m3 with float32 descales and
    an ``out_dtype`` output, as ``forward_fp8`` takes them. Raises ValueError naming what it
    cannot take; then ``run_pingpong`` (``tile_grid``: PP_TILE_GRIDS; ``sec_heads``: the causal
    order's sections, ``pp_sections``)."""
    fp8 = q.dtype == torch.float8_e4m3fn
    D = q.shape[-1]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    _, _, _, Mq, _ = _shapes(q, k, layout)
    if fp8:
        why = [] if D in (64, 128) and scale > 0 and Mq % PP_BLOCK_M == 0 else \
            [f"fp8 takes D in (64, 128), softmax_scale > 0, Mq % {PP_BLOCK_M} == 0"]
        why += tensor_reasons(q, k, v, layout)
    else:
        why = reasons(q, k, v, causal, scale, layout, PP_BLOCK_M, block_n)
    if block_n not in (64, 128):
        why.append(f"block_n={block_n} (supported: 64, 128)")
    if not 128 * (producer_regs + 2 * consumer_regs) <= 65536 or consumer_regs % 8 or producer_regs % 8 \
            or not 24 <= producer_regs <= consumer_regs <= 256:
        why.append(f"producer_regs={producer_regs} consumer_regs={consumer_regs} (multiples of 8 in [24, 256], "
                   "producer <= consumer, 128 x (producer + 2 x consumer) <= 65536)")
    for check in (lambda: pp_sections(1, sec_heads), lambda: pp_per_tile(tile_grid, causal, 1)):
        try:
            check()
        except ValueError as exc:
            why.append(str(exc))
    if why:
        raise ValueError("the ping-pong Gluon forward cannot run this call: " + "; ".join(why))
    return run_pingpong(q, k, v, causal, scale, layout, block_n, k_stages, v_stages, producer_regs, consumer_regs,
                        q_descale, k_descale, v_descale, v_transposed, out_dtype, tile_grid, sec_heads)


def run_pingpong(q, k, v, causal: bool, softmax_scale: float, layout: str, block_n: int, k_stages: int,
                 v_stages: int, producer_regs: int, consumer_regs: int, q_descale=None, k_descale=None,
                 v_descale=None, v_transposed=None, out_dtype: torch.dtype = torch.bfloat16,
                 tile_grid: int = 0, sec_heads: int | None = None):
    """``forward_pingpong`` without its checks (TritonBackend.forward and the triton-fp8 backend
    have asked ``pp_problem_reasons`` / ``tensor_reasons`` already), through fast_launch.
    ``tile_grid`` (PP_TILE_GRIDS): one CTA per tile (the same schedule with one round) or one
    per SM, or the launcher's choice between them (``pp_per_tile``)."""
    from ..triton_fp8.launch import transpose_v
    from . import fast_launch, kernels_gluon_ws

    fp8 = q.dtype == torch.float8_e4m3fn
    D = q.shape[-1]
    B, H, Hkv, Mq, Mkv = _shapes(q, k, layout)
    rows_wg = PP_BLOCK_M // 2
    # O goes back through q's row arguments: empty_like keeps q's memory order (bhsd-ordered
    # memory under a bshd view, say), where a plain empty would not
    out = torch.empty_like(q, dtype=out_dtype if fp8 else q.dtype)
    lse = torch.empty((B, H, Mq), dtype=torch.float32, device=q.device)
    qd, q_rows = _desc(q, layout, rows_wg)
    kd, k_rows = _desc(k, layout, block_n)
    od, _ = _desc(out, layout, rows_wg)
    one = _one(q.device)
    if fp8:
        vt = v_transposed if v_transposed is not None else transpose_v(v, layout)
        vd = _gl_desc(vt, [B * Hkv * D, Mkv], [vt.stride(2), 1], [D, block_n])
        qs, ks, vs = (t if t is not None else one for t in (q_descale, k_descale, v_descale))
        strides = [x for t, given in ((qs, q_descale), (ks, k_descale), (vs, v_descale))
                   for x in ((t.stride(0), t.stride(1)) if given is not None else (0, 0))]
        qd_group = 1 if q_descale is None or q_descale.shape[1] == H else H // Hkv
    else:
        vd, _ = _desc(v, layout, block_n)
        qs = ks = vs = one
        strides, qd_group = [0] * 6, 1
    meta = {"CAUSAL": causal, "K_STAGES": k_stages, "V_STAGES": v_stages, "PRODUCER_REGS": producer_regs,
            "CONSUMER_REGS": consumer_regs, "FP8": fp8, "num_warps": 4}
    n_tiles = triton.cdiv(Mq, PP_BLOCK_M) * B * H
    # Persistent: one CTA per SM (one fits), each running a round of tiles at a time, so the next
    # tile's Q and first keys load under the current tile's tail (non-causal S=1k: 0.88x to 0.99x
    # cuDNN, session 12). Causal rounds go longest first inside sections of two heads
    # (pp_sections) and snake (kernels_gluon_ws._pp_tile_at): a plain stride over unequal causal
    # tiles lost (0.93x to 0.77x at S=1k, 1.07x to 0.76x at S=16k).
    # One CTA per tile: grid = n_tiles is one round, each CTA one tile, in the same order.
    per_tile = pp_per_tile(tile_grid, causal, triton.cdiv(Mq, PP_BLOCK_M))
    grid = (n_tiles if per_tile else min(n_tiles, _sm_count(q.device)),)
    fast_launch.launch(kernels_gluon_ws.attn_fwd_gluon_pp, grid,
                       (qd, kd, vd, od, lse, softmax_scale * LOG2E, H, H // Hkv, Mq, Mkv, *q_rows, *k_rows,
                        qs, ks, vs, *strides, qd_group, Hkv, n_tiles, pp_sections(B * H, sec_heads)), meta, _KERNELS)
    return out, lse


def compile_ws_sm90(dtype: torch.dtype, head_dim: int, causal: bool, block_m: int = 128, block_n: int = 128,
                    k_stages: int = 2, v_stages: int = 2, producer_regs: int = 24, pingpong: bool = False,
                    consumer_regs: int = 240, fp8: bool = False) -> dict:
    """``compile_sm90`` for the warp-specialized kernels (kernels_gluon_ws.py): resources, wgmma
    and setmaxnreg counts, and the warps of all partitions. pingpong: ``attn_fwd_gluon_pp``
    (block_m is then the CTA's rows, two warpgroups' worth)."""
    import triton.language
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    from . import kernels_gluon_ws
    from .launch_hopper import _cubin_usage

    fn = kernels_gluon_ws.attn_fwd_gluon_pp if pingpong else kernels_gluon_ws.attn_fwd_gluon_ws
    warps = 4 if pingpong else block_m // 16
    rows = block_m // 2 if pingpong else block_m  # q and o blocks: one warpgroup's rows when ping-ponging

    def desc(dt, block):
        t = torch.zeros((256, 256), dtype=dt)  # metadata only: never read
        return mangle_type(_gl_desc(t, [256, 256], [256, 1], block))

    # fp8 (the ping-pong kernel only): e4m3 q, k and V^T (blocks (D, block_n)); ``dtype`` is the output's
    ins = torch.float8_e4m3fn if fp8 else dtype
    sig = {"q_desc": desc(ins, [rows, head_dim]), "k_desc": desc(ins, [block_n, head_dim]),
           "v_desc": desc(ins, [head_dim, block_n] if fp8 else [block_n, head_dim]),
           "o_desc": desc(dtype, [rows, head_dim]), "Lse": "*fp32", "qk_scale": "fp32"}
    for name in fn.arg_names:
        sig.setdefault(name, "*fp32" if name in ("QDs", "KDs", "VDs") else "i32")
    constexprs = {"CAUSAL": causal, "K_STAGES": k_stages, "V_STAGES": v_stages, "PRODUCER_REGS": producer_regs,
                  "num_warps": warps,
                  **({"CONSUMER_REGS": consumer_regs, "FP8": fp8} if pingpong else {})}
    sig.update({name: "constexpr" for name in constexprs})
    kernel = triton.compile(GluonASTSource(fn, sig, constexprs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": warps})
    usage = _cubin_usage(kernel.asm["cubin"])
    usage.update(smem=kernel.metadata.shared, wgmma=kernel.asm["ptx"].count("wgmma.mma_async"),
                 setmaxnreg=kernel.asm["ptx"].count("setmaxnreg"), num_warps=kernel.metadata.num_warps)
    return usage


def compile_sm90(dtype: torch.dtype, head_dim: int, causal: bool, block_m: int = 64, block_n: int = 64,
                 k_stages: int = 2, v_stages: int = 2, q_regs: bool = False, varlen: bool = False) -> dict:
    """Compile the kernel for sm_90 without a GPU (Gluon's AST source, Triton's own ptxas) and
    report its resources (``launch_hopper._cubin_usage``: registers, stack, local-memory
    instructions) plus shared memory and the PTX's wgmma count. ``dtype`` float8_e4m3fn compiles
    the fp8 variant (bf16 output, V^T blocks)."""
    import triton.language
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    from . import kernels_gluon
    from .launch_hopper import _cubin_usage

    fp8 = dtype == torch.float8_e4m3fn
    warps = block_m // 16

    def desc(t_dtype, cols, block):
        t = torch.zeros((256, cols), dtype=t_dtype)  # metadata only: never read
        return mangle_type(_gl_desc(t, [256, cols], [cols, 1], block))

    sig = {"q_desc": desc(dtype, head_dim, [block_m, head_dim]), "k_desc": desc(dtype, head_dim, [block_n, head_dim]),
           "v_desc": desc(dtype, 256, [head_dim, block_n]) if fp8 else desc(dtype, head_dim, [block_n, head_dim]),
           "o_desc": desc(torch.bfloat16 if fp8 else dtype, head_dim, [block_m, head_dim]),
           "Lse": "*fp32", "qk_scale": "fp32", "QDs": "*fp32", "KDs": "*fp32", "VDs": "*fp32",
           "CuQ": "*i32", "CuK": "*i32", "Out": "*" + {torch.float16: "fp16"}.get(dtype, "bf16")}
    for name in kernels_gluon.attn_fwd_gluon.arg_names:
        sig.setdefault(name, "i32")
    constexprs = {"CAUSAL": causal, "K_STAGES": k_stages, "V_STAGES": v_stages, "Q_REGS": q_regs, "FP8": fp8,
                  "VARLEN": varlen, "num_warps": warps}
    sig.update({name: "constexpr" for name in constexprs})
    src = GluonASTSource(kernels_gluon.attn_fwd_gluon, sig, constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    usage = _cubin_usage(kernel.asm["cubin"])
    usage.update(smem=kernel.metadata.shared, wgmma=kernel.asm["ptx"].count("wgmma.mma_async"))
    return usage
