"""The KV-cache call as plain PyTorch: append, gather each sequence's keys, ``attention_math``.

Per sequence b, the first ``L_b = cache_seqlens[b] + Mnew`` keys are sliced out of the cache
(or gathered page by page through ``block_table``) and handed to ``attention_math``, the
project's one reference math, which applies causal / window / ALiBi with
``shift = L_b - Mq`` (bottom-right, ``fa2dispatch.features``). Nothing here re-derives the
softmax. Slow (a Python loop over sequences), and meant to be: it is the ground truth of the
decode kernels' tests and the CPU path.
"""

from __future__ import annotations

import torch

from fa2dispatch.problem import AttentionProblem

from .reference import attention_math


def append_kv(problem: AttentionProblem, k_cache, v_cache, kv) -> None:
    """Write ``kv.k_new`` / ``kv.v_new`` into the cache at ``cache_seqlens[b] ..``, in place."""
    if kv.k_new is None:
        return
    n_new = kv.n_new
    starts = kv.cache_seqlens.tolist()
    for b, start in enumerate(starts):
        pos = torch.arange(start, start + n_new, device=k_cache.device)
        if problem.paged_block:
            page = problem.paged_block
            blocks = kv.block_table[b].long()[pos // page]
            k_cache[blocks, pos % page] = kv.k_new[b]
            v_cache[blocks, pos % page] = kv.v_new[b]
        else:
            k_cache[b, pos] = kv.k_new[b]
            v_cache[b, pos] = kv.v_new[b]


def sequence_kv(problem: AttentionProblem, k_cache, v_cache, kv, b: int, length: int):
    """The first ``length`` keys and values of sequence b, (length, Hkv, D)."""
    if not problem.paged_block:
        return k_cache[b, :length], v_cache[b, :length]
    page = problem.paged_block
    blocks = kv.block_table[b, : -(-length // page)].long()
    k = k_cache[blocks].reshape(-1, *k_cache.shape[2:])[:length]
    v = v_cache[blocks].reshape(-1, *v_cache.shape[2:])[:length]
    return k, v


def kvcache_math(problem: AttentionProblem, q, k_cache, v_cache, kv,
                 compute_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the cache as it is now (no append): (out (B, Mq, H, D), lse (B, H, Mq)),
    both in ``compute_dtype``."""
    lengths = (kv.cache_seqlens.long() + kv.n_new).tolist()
    slopes = kv.alibi_slopes if problem.alibi else None
    outs, lses = [], []
    for b, length in enumerate(lengths):
        if length == 0:  # no key: every row sees nothing (out 0, lse -inf)
            outs.append(q.new_zeros((problem.Mq, problem.H, problem.D), dtype=compute_dtype))
            lses.append(torch.full((problem.H, problem.Mq), float("-inf"), dtype=compute_dtype, device=q.device))
            continue
        k, v = sequence_kv(problem, k_cache, v_cache, kv, b, length)
        alibi = None if slopes is None else (slopes if slopes.dim() == 1 else slopes[b:b + 1])
        out, lse = attention_math(q[b:b + 1], k[None], v[None], causal=problem.causal,
                                  softmax_scale=problem.softmax_scale, layout="bshd", compute_dtype=compute_dtype,
                                  window=problem.window, softcap=problem.softcap, alibi_slopes=alibi,
                                  causal_alignment="bottom_right")
        outs.append(out[0])
        lses.append(lse[0])
    return torch.stack(outs), torch.stack(lses)


def forward_kvcache(problem: AttentionProblem, q, k_cache, v_cache, kv) -> tuple[torch.Tensor, torch.Tensor]:
    """ReferenceBackend.forward_kvcache: append, then float32 math; out in q's dtype, lse float32."""
    append_kv(problem, k_cache, v_cache, kv)
    out, lse = kvcache_math(problem, q, k_cache, v_cache, kv)
    return out.to(problem.dtype).contiguous(), lse.float().contiguous()
