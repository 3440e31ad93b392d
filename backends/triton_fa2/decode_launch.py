"""Launcher of the KV-cache decode kernels (decode.py): append, split-KV attention, combine.

The launch parameters come from ``TritonConfig``'s decode fields (the autotune cache can set
them); a field left at 0 is chosen by ``plan``:

- rows per program (BLOCK_M): the packed (query position x GQA group) rows, rounded up to a
  power of two, 16 at least (tl.dot's smallest M) and 64 at most;
- keys per block (BLOCK_N), warps and pipeline stages: 64 keys x 3 stages (32 keys x 4 stages
  for rows over 256 bytes), 4 warps, from the H100 sweep in docs/DECODE.md;
- splits of the key range: ``split_heuristic``: from the H100 sweep, the count whose
  B x Hkv x row blocks x splits programs fill the SMs best at one program per SM, among the
  counts that give every split the same number of key blocks (at most 128, at most 2 programs
  per SM; no split once the programs without splitting fill 80% of the SMs). The key length is
  taken from the host-side bound in ``KVCacheArgs`` (the capacity unless ``cache_seqlens``
  was an int), so planning never synchronises. (flash-attn 2's ``num_splits_heuristic``, used
  before, sizes for 2 programs per SM and picked uneven counts: 57 splits at B=1, 13% slower.)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton

from fa2dispatch.hardware import DeviceInfo
from fa2dispatch.problem import AttentionProblem

from . import fast_launch
from .config import TritonConfig, block_d
from .launch import _dot_precision  # float32 caches: exact dots unless TF32 is allowed

MAX_SPLITS = 128  # flash-attn 2's cap; more splits only add combine traffic
MAX_PROGRAMS_PER_SM = 2  # split counts are tried up to 2 programs per SM (co-resident at 3 stages)


@dataclass(frozen=True)
class DecodePlan:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    num_splits: int


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def active_splits(splits: int, n_key_blocks: int) -> int:
    """The splits that get a key block: the kernel gives each ``cdiv(blocks, splits)`` blocks."""
    per_split = -(-n_key_blocks // max(1, splits))
    return -(-n_key_blocks // per_split)


def split_heuristic(base: int, n_key_blocks: int, sm_count: int) -> int:
    """Split count for ``base`` programs without splitting over ``n_key_blocks`` key blocks.

    From the H100 sweep (tools/bench_decode.py --sweep, docs/DECODE.md): one program per SM
    streaming equal parts of the cache is fastest (B*Hkv*splits = 128 programs on 132 SMs beat
    228-256 by 1-6%, 96-112 programs lose 3-8%, and uneven parts cost up to 8%). So: only counts
    whose every split gets the same number of blocks (``active_splits(s) == s``), at most
    ``MAX_PROGRAMS_PER_SM`` programs per SM; the best wave efficiency ``P / (ceil(P / SMs) * SMs)``
    of P = base * s programs wins, the smaller count on ties (within 1%). No split once base
    fills 80% of the SMs."""
    sms = max(1, sm_count)
    if base >= 0.8 * sms:
        return 1
    best_s, best_eff = 1, 0.0
    cap = max(1, min(MAX_SPLITS, n_key_blocks, (MAX_PROGRAMS_PER_SM * sms) // max(1, base)))
    for s in range(1, cap + 1):
        if active_splits(s, n_key_blocks) != s:
            continue
        programs = base * s
        eff = programs / (math.ceil(programs / sms) * sms)
        if eff > best_eff * 1.01:
            best_s, best_eff = s, eff
    return best_s


def _visible_bound(problem: AttentionProblem, max_len: int) -> int:
    """Upper bound of the keys one program's rows can see (the split heuristic's length)."""
    left = problem.window[0]
    if left >= 0:
        return min(max_len, left + problem.Mq + max(problem.window[1], 0) + 1)
    return max_len


_plans: dict[tuple, DecodePlan] = {}


def plan(problem: AttentionProblem, kv, config: TritonConfig | None, device: DeviceInfo) -> DecodePlan:
    """The launch plan; memoized (a decode loop asks the same question every step)."""
    key = (problem, kv.max_seqlen_k, kv.num_splits, config, device)
    found = _plans.get(key)
    if found is None:
        if len(_plans) >= 1024:
            _plans.clear()
        found = _plans[key] = _plan(problem, kv, config, device)
    return found


def _plan(problem: AttentionProblem, kv, config: TritonConfig | None, device: DeviceInfo) -> DecodePlan:
    cfg = config if config is not None else TritonConfig()
    rows = problem.Mq * problem.group
    if device.vendor == "cpu":  # the interpreter: small tiles, few wasted rows
        block_m, block_n, warps, stages, sms = 16, 16, 4, 1, 4
    else:
        block_m = min(64, max(16, _pow2_at_least(rows)))
        # H100 sweep (tools/bench_decode.py --sweep, 2026-11-25 00:33 UTC: GPU time in CUDA graphs,
        # D=128 fp16, context 32k, 12 configs x 8-11 split counts at B = 1, 2, 4, 8; docs/DECODE.md):
        # 64 keys x 3 stages x 4 warps at split_heuristic's count is the best or within 1.1% of it
        # at every batch (~100 KB of shared memory: two programs fit an SM). Rows over 256 bytes
        # (D=256, or float32) take half the keys and keep 4 stages (not swept).
        row_bytes = block_d(problem.D) * problem.dtype.itemsize
        block_n, stages = (64, 3) if row_bytes <= 256 else (32, 4)
        warps, sms = 4, device.multiprocessors or 1
    block_n = cfg.decode_block_n or block_n
    warps = cfg.decode_num_warps or warps
    stages = cfg.decode_num_stages or stages
    key_blocks = max(1, triton.cdiv(_visible_bound(problem, kv.max_seqlen_k), block_n))
    if kv.num_splits > 0:
        splits = kv.num_splits
    elif cfg.num_splits > 0:
        splits = cfg.num_splits
    else:
        base = problem.B * problem.Hkv * triton.cdiv(rows, block_m)
        splits = split_heuristic(base, key_blocks, sms)
    # A split past the last key block would only ever be empty: the clamp changes no result.
    splits = max(1, min(splits, triton.cdiv(problem.Mkv, block_n)))
    return DecodePlan(block_m, block_n, warps, stages, splits)


def append(problem: AttentionProblem, k_cache, v_cache, kv) -> None:
    """Write the new keys/values into the cache at cache_seqlens[b] .. (one launch)."""
    from . import decode

    k_new, v_new = kv.k_new, kv.v_new
    if v_new.stride() != k_new.stride():
        v_new = v_new.contiguous()
        k_new = k_new.contiguous()
    B, n_new = k_new.shape[0], k_new.shape[1]
    block = min(64, max(16, _pow2_at_least(n_new)))
    paged = kv.block_table is not None
    table = kv.block_table if paged else kv.cache_seqlens
    scalars = (n_new, *k_new.stride(), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
               v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), table.stride(0) if paged else 0)
    meta = {"HEAD_DIM": problem.D, "BLOCK_D": block_d(problem.D), "BLOCK_M": block, "PAGE_SIZE": problem.paged_block}
    key = (problem.dtype, problem.D, problem.paged_block, scalars)  # everything the specialization reads
    kernels = _append_kernels.get(key)
    if kernels is None:
        if len(_append_kernels) >= 1024:
            _append_kernels.clear()
        kernels = _append_kernels[key] = {}
    _launch(decode.kv_append, (triton.cdiv(n_new, block), problem.Hkv, B),
            (k_new, v_new, k_cache, v_cache, kv.cache_seqlens, table), scalars, meta, kernels)


_append_kernels: dict[tuple, dict] = {}


# Programmatic dependent launch of decode_combine (sm_90+):
# the combine grid is launched while decode_fwd runs and waits for it in hardware, so the
# combine's launch latency is hidden (decode.py, decode_fwd's docstring).
# Off by default until measured on a GPU (tools/bench_decode.py --sweep prints the A/B):
# FA2DISPATCH_DECODE_PDL=1 turns it on.
USE_PDL = os.environ.get("FA2DISPATCH_DECODE_PDL", "0") == "1"

# The combine folded into decode_fwd (decode.py, FUSED_COMBINE): the last split of a row block to
# finish combines it, and there is no second launch. Up to MAX_FUSED_SPLITS splits (the combine's
# split loop is unrolled); NVIDIA and the CPU interpreter (the AMD memory model of the arrival
# protocol is untested). Off by default: on the H100 it was slower than the combine kernel
# (B=1, 8 calls per graph: 31.5 us fused, 30.3 with the counters' memset taken out, 29.3 with
# the kernel; docs/DECODE.md, "Session 10"). FA2DISPATCH_DECODE_FUSED=1 turns it on.
USE_FUSED = os.environ.get("FA2DISPATCH_DECODE_FUSED", "0") == "1"
MAX_FUSED_SPLITS = 32


@dataclass(frozen=True)
class _Launch:
    """Everything of the two launches that is fixed for one (problem, plan, strides): built once
    per decode loop, so a step only allocates its outputs and passes the tensors."""

    plan: DecodePlan
    out_shape: tuple
    lse_shape: tuple
    part_rows: int  # float32 partial rows (0: no split)
    fused: bool  # decode_fwd combines (FUSED_COMBINE): no decode_combine launch, an arrival counter per program
    grid: tuple
    scalars: tuple  # decode_fwd's arguments after the 11 tensors
    meta: dict  # decode_fwd's constexprs and options
    combine_grid: tuple
    combine_scalars: tuple
    combine_meta: dict
    kernels: dict  # fast_launch's cache of compiled kernels for this spec


def _launch(fn, grid: tuple, tensors: tuple, scalars: tuple, meta: dict, kernels: dict) -> None:
    """``fn[grid](*tensors, *scalars, **meta)``; eager calls after the first go straight to the
    compiled kernel's launcher (fast_launch.py: JITFunction.run re-derives the specialization of
    ~45 arguments every call). ``kernels`` is this _Launch's own cache."""
    fast_launch.launch(fn, grid, (*tensors, *scalars), meta, kernels)


_launches: dict[tuple, _Launch] = {}

# Arrival counters of the fused combine, per (device, stream): zero between launches (the last
# program of each row block resets its own), and never shared by two launches that can run at
# once, because launches on one stream run in order. A CUDA stream handle is a hardware queue, so
# two torch.cuda.Stream objects over one pooled handle are the same queue and share safely.
_COUNTERS: dict[tuple, torch.Tensor] = {}


def _arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """n int32 zeros for one fused decode launch. Eager CUDA calls share one buffer per stream
    (allocated once, kept zero by the kernel). Under CUDA graph capture each call gets its own
    zeroed buffer (a memset node in the graph): a buffer shared with other graphs, which may be
    replayed concurrently on other streams, could count two launches as one."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, dtype=torch.int32, device=device)
    key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    found = _COUNTERS.get(key)
    if found is None or found.numel() < n:
        found = _COUNTERS[key] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return found


def _launch_spec(problem: AttentionProblem, q, k_cache, v_cache, kv, config, device: DeviceInfo) -> _Launch:
    paged = kv.block_table is not None
    key = (problem, kv.max_seqlen_k, kv.num_splits, config, device, q.stride(), k_cache.stride(), v_cache.stride(),
           kv.block_table.stride(0) if paged else 0, kv.n_new, USE_PDL, USE_FUSED,
           problem.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32)
    found = _launches.get(key)
    if found is not None:
        return found
    p = plan(problem, kv, config, device)
    B, H, Hkv, Mq, D = problem.B, problem.H, problem.Hkv, problem.Mq, problem.D
    out_shape = (B, Mq, H, D)
    out_stride = (Mq * H * D, H * D, D, 1)  # torch.empty(out_shape) is contiguous
    left, right = problem.window
    split = p.num_splits > 1
    fused = split and USE_FUSED and p.num_splits <= MAX_FUSED_SPLITS and device.vendor in ("nvidia", "cpu")
    pdl = (split and not fused and USE_PDL and device.vendor == "nvidia"
           and tuple(device.capability or (0, 0)) >= (9, 0))
    row_blocks = triton.cdiv(Mq * problem.group, p.block_m)
    scalars = (problem.softmax_scale, problem.softcap or 1.0, kv.n_new, left, right,
               *q.stride(), *k_cache.stride(), *v_cache.stride(), *out_stride,
               kv.block_table.stride(0) if paged else 0, H if problem.alibi == "bh" else 0,
               H, Hkv, Mq, p.num_splits)
    meta = {"GROUP": problem.group, "HEAD_DIM": D, "BLOCK_D": block_d(D), "BLOCK_M": p.block_m,
            "BLOCK_N": p.block_n, "PAGE_SIZE": problem.paged_block, "SPLIT": split, "CAUSAL": problem.causal,
            "WINDOW_LEFT": left >= 0, "WINDOW_RIGHT": right >= 0, "SOFTCAP": problem.softcap > 0,
            "ALIBI": problem.alibi is not None, "DOT_PRECISION": _dot_precision(problem, device),
            "num_warps": p.num_warps, "num_stages": p.num_stages}
    if fused:
        meta.update(FUSED_COMBINE=True, BLOCK_S=_pow2_at_least(p.num_splits))
    combine_meta = {"BLOCK_S": _pow2_at_least(p.num_splits), "HEAD_DIM": D, "BLOCK_D": block_d(D), "num_warps": 4}
    if pdl:
        meta["PDL"] = True
        combine_meta.update(PDL=True, launch_pdl=True)
    found = _Launch(p, out_shape, (B, H, Mq), B * H * Mq * p.num_splits if split else 0, fused,
                    (B * Hkv * row_blocks, p.num_splits), scalars, meta, (B * H * Mq,),
                    (*out_stride, H, Mq, p.num_splits), combine_meta, {})
    if len(_launches) >= 1024:
        _launches.clear()
    _launches[key] = found
    return found


def forward_kvcache(problem: AttentionProblem, q, k_cache, v_cache, kv, config: TritonConfig | None,
                    device: DeviceInfo):
    """(out like q, lse (B, H, Mq) float32) over the cache, after appending kv's new rows."""
    from . import decode

    if kv.k_new is not None:
        append(problem, k_cache, v_cache, kv)
    spec = _launch_spec(problem, q, k_cache, v_cache, kv, config, device)
    out = torch.empty(spec.out_shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(spec.lse_shape, dtype=torch.float32, device=q.device)
    rows = spec.part_rows
    if rows:  # one allocation: the partial outputs, then their lse
        D = problem.D
        scratch = torch.empty((rows * (D + 1),), dtype=torch.float32, device=q.device)
        out_part, lse_part = scratch[: rows * D], scratch[rows * D:]
    else:
        out_part, lse_part = out, lse  # unused
    table = kv.block_table if kv.block_table is not None else kv.cache_seqlens
    slopes = kv.alibi_slopes.contiguous() if problem.alibi else lse
    arrivals = _arrival_counters(q.device, spec.grid[0]) if spec.fused else lse  # lse: unused
    _launch(decode.decode_fwd, spec.grid, (q, k_cache, v_cache, kv.cache_seqlens, table, slopes, out, lse,
                                           out_part, lse_part, arrivals), spec.scalars, spec.meta, spec.kernels)
    if rows and not spec.fused:
        _launch(decode.decode_combine, spec.combine_grid, (out_part, lse_part, out, lse), spec.combine_scalars,
                spec.combine_meta, spec.kernels)
    return out, lse
