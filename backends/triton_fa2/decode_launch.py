"""Launcher of the KV-cache decode kernels (decode.py): append, split-KV attention, combine.

The launch parameters come from ``TritonConfig``'s decode fields (the autotune cache can set
them); a field left at 0 is chosen by ``plan``:

- rows per program (BLOCK_M): the packed (query position x GQA group) rows, rounded up to a
  power of two, 16 at least (tl.dot's smallest M) and 64 at most;
- keys per block (BLOCK_N), warps and pipeline stages: 64 keys (32 for rows over 256 bytes),
  4 warps, 4 stages, from the H100 sweep in docs/DECODE.md;
- splits of the key range: flash-attn 2's ``num_splits_heuristic`` (csrc/flash_attn/
  flash_api.cpp): with ``base`` = programs without splitting and ``target`` = 2 programs per
  SM, no split once base fills 80% of target; otherwise the smallest split count whose wave
  efficiency (waves / ceil(waves)) is within 85% of the best, at most 128 and at most one
  split per key block. (flash-attn also skips counts that give as many key blocks per split
  as one split fewer, which only add an empty split; that filter is left out here, which keeps
  the split counts the H100 numbers in docs/DECODE.md were measured with.) The key length is
  taken from the host-side bound in ``KVCacheArgs`` (the capacity unless ``cache_seqlens``
  was an int), so planning never synchronises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from fa2dispatch.hardware import DeviceInfo
from fa2dispatch.problem import AttentionProblem

from .config import TritonConfig, block_d
from .launch import _dot_precision  # float32 caches: exact dots unless TF32 is allowed

MAX_SPLITS = 128  # flash-attn 2's cap; more splits only add combine traffic
PROGRAMS_PER_SM = 2  # flash-attn 2 sizes the split count for 2 CTAs per SM


@dataclass(frozen=True)
class DecodePlan:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    num_splits: int


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def split_heuristic(base: int, n_key_blocks: int, sm_count: int) -> int:
    """flash-attn 2's ``num_splits_heuristic`` (see the module docstring)."""
    target = max(1, sm_count * PROGRAMS_PER_SM)
    if base >= 0.8 * target:
        return 1
    max_splits = max(1, min(MAX_SPLITS, n_key_blocks, target))
    efficiency = []
    for s in range(1, max_splits + 1):
        waves = base * s / target
        efficiency.append(waves / math.ceil(waves))
    best = max(efficiency)
    for s, eff in enumerate(efficiency, start=1):
        if eff >= 0.85 * best:
            return s
    return 1


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
        # H100 sweep (tools/bench_decode.py --sweep: GPU time in CUDA graphs, D=128 fp16, context
        # 32k, 9 configs x 4 split counts; docs/DECODE.md): 64 keys x 4 stages x 4 warps at the
        # heuristic's split count is within 3.1% of the best at batch 1..16 (and 0.2% at 64, eager)
        # (~100 KB of shared memory: two programs per SM). Rows over 256 bytes (D=256, or
        # float32) take half the keys.
        row_bytes = block_d(problem.D) * problem.dtype.itemsize
        block_n = 64 if row_bytes <= 256 else 32
        warps, stages, sms = 4, 4, device.multiprocessors or 1
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
    table = kv.block_table if kv.block_table is not None else kv.cache_seqlens
    decode.kv_append[(triton.cdiv(n_new, block), problem.Hkv, B)](
        k_new, v_new, k_cache, v_cache, kv.cache_seqlens, table, n_new,
        *k_new.stride(),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        table.stride(0) if kv.block_table is not None else 0,
        HEAD_DIM=problem.D, BLOCK_D=block_d(problem.D), BLOCK_M=block, PAGE_SIZE=problem.paged_block,
    )


def forward_kvcache(problem: AttentionProblem, q, k_cache, v_cache, kv, config: TritonConfig | None,
                    device: DeviceInfo):
    """(out like q, lse (B, H, Mq) float32) over the cache, after appending kv's new rows."""
    from . import decode

    if kv.k_new is not None:
        append(problem, k_cache, v_cache, kv)
    p = plan(problem, kv, config, device)
    B, H, Hkv, Mq, D = problem.B, problem.H, problem.Hkv, problem.Mq, problem.D
    out = torch.empty((B, Mq, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Mq), dtype=torch.float32, device=q.device)
    if p.num_splits > 1:  # one allocation: the partial outputs, then their lse
        rows = B * H * Mq * p.num_splits
        scratch = torch.empty((rows * (D + 1),), dtype=torch.float32, device=q.device)
        out_part, lse_part = scratch[: rows * D], scratch[rows * D:]
    else:
        out_part, lse_part = out, lse  # unused
    table = kv.block_table if kv.block_table is not None else kv.cache_seqlens
    slopes = kv.alibi_slopes.contiguous() if problem.alibi else lse
    left, right = problem.window
    row_blocks = triton.cdiv(Mq * problem.group, p.block_m)
    grid = (B * Hkv * row_blocks, p.num_splits)
    decode.decode_fwd[grid](
        q, k_cache, v_cache, kv.cache_seqlens, table, slopes, out, lse, out_part, lse_part,
        problem.softmax_scale, problem.softcap or 1.0, kv.n_new, left, right,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        table.stride(0) if kv.block_table is not None else 0,
        H if problem.alibi == "bh" else 0,
        H, Hkv, Mq, p.num_splits,
        GROUP=problem.group, HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_M=p.block_m, BLOCK_N=p.block_n,
        PAGE_SIZE=problem.paged_block, SPLIT=p.num_splits > 1,
        CAUSAL=problem.causal, WINDOW_LEFT=left >= 0, WINDOW_RIGHT=right >= 0,
        SOFTCAP=problem.softcap > 0, ALIBI=problem.alibi is not None,
        DOT_PRECISION=_dot_precision(problem, device),
        num_warps=p.num_warps, num_stages=p.num_stages,
    )
    if p.num_splits > 1:
        decode.decode_combine[(B * H * Mq,)](
            out_part, lse_part, out, lse, *out.stride(), H, Mq, p.num_splits,
            BLOCK_S=_pow2_at_least(p.num_splits), HEAD_DIM=D, BLOCK_D=block_d(D),
            num_warps=4,
        )
    return out, lse
