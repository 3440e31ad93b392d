"""``attention_with_kvcache``: decode and chunked prefill over a KV cache (flash-attn 2.x's
``flash_attn_with_kvcache``), contiguous or paged, with the new keys appended in place.

The call is validated here, completely, before anything is written or launched: shapes,
dtypes, devices, the lengths in ``cache_seqlens`` (an appended chunk must fit in the cache),
the page ids in ``block_table``. The problem it builds has ``kvcache=True`` and ``Mkv`` = the
cache capacity; the per-sequence key length ``L_b = cache_seqlens[b] + Mnew`` travels in
``KVCacheArgs``. The dispatcher picks the backend as for any call (``use_backend`` and
``FA2DISPATCH_BACKEND`` apply); a backend that fails at run time on a valid call hands over to
the next capable one, as ``fa2dispatch.ops.run_decision`` does.

Value checks (lengths, page ids) read device tensors: on a GPU that is one synchronisation per
call. They are skipped while a CUDA graph is being captured (a sync is illegal there) and when
``CHECK_VALUES`` is False (or ``FA2DISPATCH_KVCACHE_CHECK=0``): a decode loop that has
validated its bookkeeping can drop them for latency. Shape, dtype and device checks always run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fa2dispatch.problem import (
    DTYPES,
    HEAD_DIM_MAX,
    HEAD_DIM_MIN,
    HEAD_DIM_MULTIPLE,
    AttentionProblem,
    check_like_q,
    resolve_softmax_scale,
    with_features,
)

# Value checks on device tensors (one sync per call); see the module docstring.
CHECK_VALUES = os.environ.get("FA2DISPATCH_KVCACHE_CHECK", "1") != "0"

_FLOAT_DTYPES = tuple(d for d in DTYPES if d.itemsize > 1)  # fp8 caches are not supported


@dataclass(frozen=True)
class KVCacheArgs:
    """Per-call data of a KV-cache call, beside the problem (which fixes the kernel).

    cache_seqlens: int32 (B,) on q's device: the cache lengths *before* the append. Batch b
        attends to its first ``L_b = cache_seqlens[b] + n_new`` keys.
    k_new, v_new: (B, Mnew, Hkv, D) written into the cache at ``cache_seqlens[b] ..`` before
        attention runs, or None.
    block_table: int32 (B, max_blocks_per_seq) page ids of a paged cache, or None.
    alibi_slopes: float32 (H,) or (B, H), or None.
    num_splits: > 0: split the key range into this many parts; 0: the backend decides.
    max_seqlen_k: an upper bound of every L_b known on the host (the capacity, or exact when
        ``cache_seqlens`` was given as an int): the split heuristic reads it without a sync.
    """

    cache_seqlens: torch.Tensor
    k_new: torch.Tensor | None = None
    v_new: torch.Tensor | None = None
    block_table: torch.Tensor | None = None
    alibi_slopes: torch.Tensor | None = None
    num_splits: int = 0
    max_seqlen_k: int = 0

    @property
    def n_new(self) -> int:
        return 0 if self.k_new is None else self.k_new.shape[1]

    def __hash__(self) -> int:  # tensors are not hashable by value; identity is enough
        return id(self)


def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, block_table=None,
                           causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, num_splits=0, return_lse=False):
    """Attention of new queries over a KV cache: decode (Mq = 1) and chunked prefill.

    Args:
        q: (B, Mq, H, D), float16 / bfloat16 / float32.
        k_cache, v_cache: (B_cache, Mcache, Hkv, D) with B_cache >= B (batch b uses cache row
            b), or, with ``block_table``, pages (num_blocks, page_size, Hkv, D). Same dtype and
            device as q; ``H % Hkv == 0`` (GQA / MQA).
        k, v: optional new keys/values (B, Mnew, Hkv, D), both or neither: written into the
            cache *in place* at positions ``cache_seqlens[b] .. cache_seqlens[b] + Mnew - 1``,
            then attended to.
        cache_seqlens: int32 (B,) tensor or an int: the number of valid keys already in each
            sequence's cache (before the append). None: the whole cache (Mcache, or
            max_blocks_per_seq * page_size) is valid, and then k/v cannot be appended.
        block_table: int32 (B, max_blocks_per_seq): position p of sequence b lives in page
            ``block_table[b, p // page_size]`` at row ``p % page_size``.
        causal: bottom-right aligned per sequence: query i sees key j iff ``j <= i + L_b - Mq``.
        softmax_scale, window_size, softcap, alibi_slopes: as in ``fa2dispatch.attention``, with
            ``shift = L_b - Mq`` per sequence (``fa2dispatch.features`` states the rule).
        num_splits: 0 (default): the backend picks how many parts the key range is split into
            (flash-decoding; a heuristic, or the autotune cache's config); > 0 forces it.
        return_lse: also return the log-sum-exp, (B, H, Mq) float32.

    Returns:
        ``out`` like q (``(out, lse)`` with ``return_lse``). A query row that sees no key gives
        0 and lse -inf. Forward only: no gradient flows through the result.

    Raises:
        ValueError / TypeError naming the argument, before anything is written or launched;
        NoBackendError when no backend can run the call.
    """
    from fa2dispatch import dispatch

    problem, kv = prepare(q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal, softmax_scale,
                          window_size, softcap, alibi_slopes, num_splits, return_lse)
    choice = dispatch.requested_backend("auto")
    decision = dispatch.decide(problem, choice)  # memoized: a dictionary lookup once warm
    out, lse = run(decision, problem, q, k_cache, v_cache, kv, choice)
    return (out, lse) if return_lse else out


def run(decision, problem: AttentionProblem, q, k_cache, v_cache, kv: KVCacheArgs, choice: str):
    """Run the decision's ``forward_kvcache``; on a run-time failure of a valid call, the next
    capable backend (``dispatch.record_failure``, as ``ops.run_decision`` does). Appending is
    idempotent (the same rows are written again), so a fallback after a partial run is safe."""
    from fa2dispatch import dispatch
    from fa2dispatch.ops import _simulated_error

    if decision.device.simulated:
        raise _simulated_error(decision)
    with torch.no_grad():
        while True:
            try:
                return decision.backend.forward_kvcache(problem, q, k_cache, v_cache, kv, decision.config)
            except Exception as exc:
                replacement = dispatch.record_failure(decision, choice, "forward", exc)
                if replacement is None:
                    raise
                decision = replacement


def explain_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, block_table=None, causal=False,
                    softmax_scale=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, num_splits=0,
                    return_lse=False):
    """The dispatcher's decision for ``attention_with_kvcache(**same arguments)``, without running it."""
    from fa2dispatch import dispatch

    problem, _ = prepare(q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal, softmax_scale,
                         window_size, softcap, alibi_slopes, num_splits, return_lse)
    return dispatch.decide(problem, dispatch.requested_backend("auto"))


# ------------------------------------------------------------------------------ validation


def _describe(name: str, t: torch.Tensor) -> str:
    return f"{name} (shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device})"


def _check_tensor(name: str, t, dims: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{_describe(name, t)}: expected a {dims}-d tensor {layout}")


_MEMO_LIMIT = 1024
# call signature -> (problem, host bound of the key lengths); see ``prepare``
_memo: dict[tuple, tuple[AttentionProblem, int]] = {}


def _tensor_key(t) -> tuple | None:
    if t is None:
        return None
    return (t.shape, t.stride(), t.dtype, t.device)


def _signature(q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal, softmax_scale, window_size, softcap,
               alibi_slopes, num_splits, return_lse) -> tuple:
    """Everything validation reads besides tensor values, with the types of the scalars (True
    must not share an entry with 1). Raises AttributeError / TypeError for arguments that are
    not what they should be; the full validation then names them."""
    if isinstance(cache_seqlens, torch.Tensor):
        seqlens_key = _tensor_key(cache_seqlens)
    else:
        seqlens_key = (type(cache_seqlens), cache_seqlens)
    return (_tensor_key(q), _tensor_key(k_cache), _tensor_key(v_cache), _tensor_key(k), _tensor_key(v),
            seqlens_key, _tensor_key(block_table), causal, type(causal), softmax_scale, type(softmax_scale),
            tuple(window_size), type(window_size), tuple(map(type, window_size)), softcap, type(softcap),
            _tensor_key(alibi_slopes), num_splits, type(num_splits), return_lse, type(return_lse))


def prepare(q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal, softmax_scale, window_size, softcap,
            alibi_slopes, num_splits, return_lse) -> tuple[AttentionProblem, KVCacheArgs]:
    """Validate a call and describe it: (problem, per-call args). Nothing is written here.

    Validation of everything but tensor values is a pure function of the call's signature
    (shapes, strides, dtypes, devices, the scalar arguments), so a decode loop's repeated call
    is one dictionary lookup plus the value checks (``_check_values``), which run every time."""
    args = (q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal, softmax_scale, window_size, softcap,
            alibi_slopes, num_splits, return_lse)
    try:
        key = _signature(*args)
        hit = _memo.get(key)
    except (AttributeError, TypeError):  # not tensors / unhashable: the full validation says why
        key, hit = None, None
    if hit is None:
        problem, kv = _prepare(*args)
        if key is not None:
            if len(_memo) >= _MEMO_LIMIT:
                _memo.clear()
            _memo[key] = (problem, kv.max_seqlen_k)
        return problem, kv
    problem, max_len = hit
    n_new = 0 if k is None else k.shape[1]
    if isinstance(cache_seqlens, torch.Tensor):
        seqlens = cache_seqlens
    else:  # an int (validated with the signature) or None (the whole cache)
        fill = problem.Mkv if cache_seqlens is None else cache_seqlens
        seqlens = torch.full((problem.B,), fill, dtype=torch.int32, device=q.device)
    if _values_checkable(q):
        _check_values(seqlens, block_table, n_new, problem.Mkv, k_cache.shape[0], cache_seqlens)
    return problem, KVCacheArgs(seqlens, k, v, block_table, alibi_slopes if problem.alibi else None, num_splits,
                                max_len)


def _prepare(q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal, softmax_scale, window_size, softcap,
             alibi_slopes, num_splits, return_lse) -> tuple[AttentionProblem, KVCacheArgs]:
    """The full validation (``prepare`` memoizes what does not depend on tensor values)."""
    paged = block_table is not None
    cache_layout = "(num_blocks, page_size, Hkv, D) with block_table" if paged else "(B_cache, Mcache, Hkv, D)"
    _check_tensor("q", q, 4, "(B, Mq, H, D)")
    _check_tensor("k_cache", k_cache, 4, cache_layout)
    _check_tensor("v_cache", v_cache, 4, cache_layout)
    if q.dtype not in _FLOAT_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in _FLOAT_DTYPES)
        raise TypeError(f"{_describe('q', q)}: dtype not supported (supported: {names})")
    check_like_q(q, k_cache=k_cache, v_cache=v_cache)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.numel() == 0:
            raise ValueError(f"{_describe(name, t)}: every dimension must be >= 1")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape: {_describe('k_cache', k_cache)}, "
                         f"{_describe('v_cache', v_cache)}")
    B, Mq, H, D = q.shape
    n_cache, rows, Hkv, Dk = k_cache.shape
    if Dk != D:
        raise ValueError(f"head dims differ: {_describe('q', q)}, {_describe('k_cache', k_cache)} (must share D)")
    if not (HEAD_DIM_MIN <= D <= HEAD_DIM_MAX and D % HEAD_DIM_MULTIPLE == 0):
        raise ValueError(f"head dim D={D} of {_describe('q', q)} is not supported "
                         f"(supported: {HEAD_DIM_MIN}..{HEAD_DIM_MAX}, multiple of {HEAD_DIM_MULTIPLE})")
    if H % Hkv != 0:
        raise ValueError(f"number of query heads H={H} ({_describe('q', q)}) must be a multiple of the key/value "
                         f"heads Hkv={Hkv} ({_describe('k_cache', k_cache)})")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{_describe(name, t)}: the last dimension must be contiguous "
                             f"(stride {t.stride(-1)}); the cache is written in place, so no copy is made")

    if paged:
        capacity = _check_block_table(block_table, q, B, n_cache, rows)
    else:
        if n_cache < B:
            raise ValueError(f"{_describe('k_cache', k_cache)}: cache batch {n_cache} is smaller than q's batch "
                             f"B={B} ({_describe('q', q)})")
        capacity = rows

    n_new = _check_new_kv(k, v, q, B, Hkv, D)
    seqlens, max_len = _check_seqlens(cache_seqlens, q, B, capacity, n_new)
    if not isinstance(num_splits, int) or isinstance(num_splits, bool):
        raise TypeError(f"num_splits must be an int, got {type(num_splits).__name__}")
    if num_splits < 0:
        raise ValueError(f"num_splits={num_splits} must be >= 0 (0: chosen by the backend)")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    softmax_scale = resolve_softmax_scale(softmax_scale, D)

    if _values_checkable(q):
        _check_values(seqlens, block_table, n_new, capacity, n_cache, cache_seqlens)

    problem = AttentionProblem(B=B, H=H, Hkv=Hkv, Mq=Mq, Mkv=capacity, D=D, dtype=q.dtype, device=q.device,
                               layout="bshd", causal=causal, softmax_scale=float(softmax_scale),
                               return_lse=return_lse, kvcache=True, paged_block=rows if paged else 0)
    # Window normalization with Mkv = capacity is exact for every L_b <= capacity: a left side
    # >= capacity - 1 (or a right side >= Mq - 1) cannot mask a key of any sequence.
    problem = with_features(problem, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes)
    kv = KVCacheArgs(seqlens, k, v, block_table, alibi_slopes if problem.alibi else None, num_splits, max_len)
    return problem, kv


def _check_block_table(block_table, q, B: int, n_blocks: int, page_size: int) -> int:
    if not isinstance(block_table, torch.Tensor):
        raise TypeError(f"block_table must be a torch.Tensor or None, got {type(block_table).__name__}")
    where = _describe("block_table", block_table)
    if block_table.dtype != torch.int32:
        raise TypeError(f"{where}: dtype must be torch.int32")
    if block_table.device != q.device:
        raise ValueError(f"{where}: must be on q's device {q.device}")
    if block_table.dim() != 2 or block_table.shape[0] != B or block_table.shape[1] < 1:
        raise ValueError(f"{where}: expected shape (B={B}, max_blocks_per_seq >= 1)")
    if block_table.stride(1) != 1:
        raise ValueError(f"{where}: the last dimension must be contiguous (stride {block_table.stride(1)})")
    return block_table.shape[1] * page_size


def _check_new_kv(k, v, q, B: int, Hkv: int, D: int) -> int:
    if (k is None) != (v is None):
        given, missing = ("k", "v") if v is None else ("v", "k")
        raise ValueError(f"{given} is given but {missing} is None: pass both new keys and values, or neither")
    if k is None:
        return 0
    for name, t in (("k", k), ("v", v)):
        _check_tensor(name, t, 4, "(B, Mnew, Hkv, D)")
        check_like_q(q, **{name: t})
        if t.shape[0] != B or t.shape[2] != Hkv or t.shape[3] != D or t.shape[1] < 1:
            raise ValueError(f"{_describe(name, t)}: expected shape (B={B}, Mnew >= 1, Hkv={Hkv}, D={D})")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape: {_describe('k', k)}, {_describe('v', v)}")
    return k.shape[1]


def _check_seqlens(cache_seqlens, q, B: int, capacity: int, n_new: int) -> tuple[torch.Tensor, int]:
    """(int32 (B,) tensor of the lengths before the append, host bound of the lengths after)."""
    if cache_seqlens is None:
        if n_new:
            raise ValueError("k and v are given but cache_seqlens is None: the append position is "
                             "cache_seqlens[b]; pass the current lengths")
        return torch.full((B,), capacity, dtype=torch.int32, device=q.device), capacity
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        if not 0 <= cache_seqlens <= capacity - n_new:
            raise ValueError(f"cache_seqlens={cache_seqlens}: must be in 0..{capacity - n_new} (the cache holds "
                             f"{capacity} keys per sequence and {n_new} new keys are appended)")
        return torch.full((B,), cache_seqlens, dtype=torch.int32, device=q.device), cache_seqlens + n_new
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be an int32 torch.Tensor, an int or None, "
                        f"got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"{_describe('cache_seqlens', cache_seqlens)}: dtype must be torch.int32")
    if cache_seqlens.device != q.device:
        raise ValueError(f"{_describe('cache_seqlens', cache_seqlens)}: must be on q's device {q.device}")
    if tuple(cache_seqlens.shape) != (B,):
        raise ValueError(f"{_describe('cache_seqlens', cache_seqlens)}: expected shape (B={B},)")
    return cache_seqlens, capacity


def _values_checkable(q) -> bool:
    if q.device.type == "cpu":
        return True  # no synchronisation to avoid
    if not CHECK_VALUES or torch.compiler.is_compiling():
        return False
    return not (q.is_cuda and torch.cuda.is_current_stream_capturing())


def _check_values(seqlens: torch.Tensor, block_table, n_new: int, capacity: int, n_blocks: int,
                  given_seqlens) -> None:
    """Lengths in range and page ids valid: one fused test, one host read (the details are
    computed only on the failure path). On a GPU the test is one launch of the Triton kernel
    ``kv_check`` (one flag per sequence) and the read is ``tolist`` of those flags; elsewhere,
    or without Triton, the same test as a few torch ops."""
    check_len = not (isinstance(given_seqlens, int) or given_seqlens is None)  # else checked on the host
    if not check_len and block_table is None:
        return
    flags = None
    if seqlens.is_cuda:
        flags = _flags_triton(seqlens, block_table, n_new, capacity, n_blocks, check_len)
    if flags is None:
        bad_len, bad_page = _flags_torch(seqlens, block_table, n_new, capacity, n_blocks, check_len)
    else:
        bad_len = any(f & 1 for f in flags)
        bad_page = any(f & 2 for f in flags)
    if check_len and bad_len:
        lo, hi = int(seqlens.min()), int(seqlens.max())
        raise ValueError(f"{_describe('cache_seqlens', seqlens)}: values must be in 0..{capacity - n_new} "
                         f"(the cache holds {capacity} keys per sequence and {n_new} new keys are appended); "
                         f"got min {lo}, max {hi}")
    if block_table is not None and bad_page:
        where = _describe("block_table", block_table)
        raise ValueError(f"{where}: page ids of the pages in use must be in 0..{n_blocks - 1} "
                         f"(k_cache has {n_blocks} pages); got min {int(block_table.min())}, "
                         f"max {int(block_table.max())}")


_kv_check = None  # the Triton kernel, once imported (False: not available)


def _flags_triton(seqlens, block_table, n_new: int, capacity: int, n_blocks: int, check_len: bool):
    """Per-sequence flags (bit 0: length, bit 1: page id) from one launch and one host read, or
    None where the Triton kernel is not available."""
    global _kv_check
    if _kv_check is None:
        try:
            from fa2dispatch.backends.triton_fa2.decode import kv_check
        except Exception:  # noqa: BLE001 - no Triton: the torch ops below
            kv_check = False
        _kv_check = kv_check
    if _kv_check is False:
        return None
    flags = torch.empty_like(seqlens)
    paged = block_table is not None
    page = capacity // block_table.shape[1] if paged else 0
    try:
        _kv_check[(seqlens.shape[0],)](
            seqlens, block_table if paged else seqlens, flags, n_new, capacity - n_new, n_blocks,
            block_table.stride(0) if paged else 0, CHECK_LEN=check_len, PAGE_SIZE=page, BLOCK_T=256, num_warps=1)
    except Exception:  # noqa: BLE001 - cannot compile / launch here: the torch ops from now on
        _kv_check = False
        return None
    return flags.tolist()


def _flags_torch(seqlens, block_table, n_new: int, capacity: int, n_blocks: int, check_len: bool):
    """(bad length, bad page id) as host bools, from torch ops and one host read."""
    flags = []
    if check_len:
        flags.append(((seqlens < 0) | (seqlens > capacity - n_new)).any())
    if block_table is not None:
        # only the pages that hold a key of the sequence matter (flash-attn leaves the rest unread)
        page = capacity // block_table.shape[1]
        used = (seqlens.long() + n_new + page - 1) // page  # pages in use per sequence
        col = torch.arange(block_table.shape[1], device=block_table.device)
        out_of_range = (block_table < 0) | (block_table >= n_blocks)
        flags.append((out_of_range & (col[None, :] < used[:, None])).any())
    found = torch.stack(flags).tolist()
    return (found[0] if check_len else False), (found[-1] if block_table is not None else False)
