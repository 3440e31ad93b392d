"""Drop-in replacements for flash-attn 2.x's functions and for PyTorch's scaled_dot_product_attention.

Migrating a project is one import line (docs/COMPAT.md)::

    from flash_attn import flash_attn_func                  # before
    from fa2dispatch.compat import flash_attn_func          # after

    F.scaled_dot_product_attention(q, k, v, is_causal=True)                      # before
    fa2dispatch.compat.scaled_dot_product_attention(q, k, v, is_causal=True)     # after

Each ``flash_attn_*`` function keeps flash-attn 2.6/2.7's signature: the same argument order,
defaults and return convention, so positional calls keep working. Everything runs through the
dispatcher (``fa2dispatch.attention``, ``attention_varlen``, ``kvcache.attention_with_kvcache``):
``fa2dispatch.use_backend`` / ``FA2DISPATCH_BACKEND`` choose a backend, ``fa2dispatch.explain``
(same arguments) says who runs a call, and ``explain_sdpa`` does the same for
``scaled_dot_product_attention``.

What differs from flash-attn, on purpose:

- ``return_attn_probs=True`` returns ``(out, softmax_lse, None)``: the lse is exact, in
  flash-attn's shape, and differentiable; ``S_dmask`` is None (a warning says so once per
  process). flash-attn itself calls its S_dmask "for testing only, not guaranteed to be correct";
  building one means materialising the (Mq, Mkv) matrix per head, the very thing FlashAttention
  avoids, and our kernels never form it. Rebuild probabilities from the lse if you need them:
  ``P = exp(softmax_scale * q k^T - lse)``, masked.
- Dropout draws its mask from fa2dispatch's counter-based RNG (``fa2dispatch.rng``) seeded from
  torch's global CPU generator, so ``torch.manual_seed`` makes it repeatable; the masks are not
  flash-attn's (nor PyTorch SDPA's) bit for bit.
- flash-attn arguments fa2dispatch has no kernel for (rotary embedding, ``cache_batch_idx``,
  ``cache_leftpad``, a paged ``block_table`` on the varlen path) raise ``NotImplementedError``
  naming the argument when they are not None, instead of being ignored.
"""

from __future__ import annotations

import importlib
import math
import threading
import warnings
from dataclasses import dataclass

import torch

from fa2dispatch import api
from fa2dispatch.dispatch import Decision
from fa2dispatch.problem import HEAD_DIM_MAX, HEAD_DIM_MIN, HEAD_DIM_MULTIPLE

__all__ = [
    "TorchSDPAFallback",
    "explain_sdpa",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "scaled_dot_product_attention",
]

_warned: set[str] = set()
_warn_lock = threading.Lock()

S_DMASK_NOTE = ("fa2dispatch.compat: return_attn_probs=True returns (out, softmax_lse, None): softmax_lse is exact, "
                "S_dmask is None (fa2dispatch never materialises the attention probabilities; flash-attn's own "
                "S_dmask is for testing only). Rebuild them from the lse if needed: exp(scale * q k^T - lse).")


def _warn_once(key: str, message: str) -> None:
    with _warn_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, UserWarning, stacklevel=4)  # the caller of flash_attn_*


def _refuse(function: str, **unsupported) -> None:
    """NotImplementedError naming the first flash-attn argument given that fa2dispatch cannot honour."""
    for name, value in unsupported.items():
        if value is not None:
            raise NotImplementedError(
                f"{function}: {name} is not supported by fa2dispatch (got {_short(value)}); "
                f"it must be None. {_WHY_UNSUPPORTED.get(name, '')}".rstrip())


_WHY_UNSUPPORTED = {
    "rotary_cos": "Apply the rotary embedding to q and k before the call (e.g. flash_attn.layers.rotary).",
    "rotary_sin": "Apply the rotary embedding to q and k before the call (e.g. flash_attn.layers.rotary).",
    "cache_batch_idx": "Index the cache yourself (k_cache[cache_batch_idx]) or use a block_table.",
    "cache_leftpad": "Left-padded caches have no kernel here; shift the sequences to start at 0.",
    "block_table": "Paged keys/values are supported by flash_attn_with_kvcache only.",
}


def _short(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}, dtype {value.dtype}"
    return repr(value)


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _with_probs(out, lse):
    """flash-attn's ``return_attn_probs=True`` convention, ``(out, softmax_lse, S_dmask)``, with
    S_dmask None (the module docstring says why)."""
    _warn_once("S_dmask", S_DMASK_NOTE)
    return out, lse, None


# ------------------------------------------------------------------ dense (B, M, H, D)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn 2.x's ``flash_attn_func`` through fa2dispatch.

    Args:
        q: (B, Mq, H, D); k, v: (B, Mkv, Hkv, D) with ``H % Hkv == 0`` (GQA/MQA: query head h reads
            key/value head ``h // (H // Hkv)``). float16, bfloat16 (or float32, which flash-attn
            refuses and fa2dispatch's reference runs); D a multiple of 8 up to 256.
        dropout_p: probability of dropping an attention weight; 0.0 in evaluation.
        softmax_scale: default ``D ** -0.5``.
        causal: bottom-right aligned when Mq != Mkv (query i sees key j iff ``j <= i + Mkv - Mq``);
            a row that sees no key gives 0.
        window_size: ``(left, right)``, -1 unbounded: sliding-window (local) attention.
        softcap: > 0 soft-caps the scores: ``softcap * tanh(scores / softcap)``.
        alibi_slopes: float32 (H,) or (B, H): ``-slope * |i + Mkv - Mq - j|`` is added to the scores.
        deterministic: ask for a bit-for-bit repeatable backward.
        return_attn_probs: also return ``softmax_lse`` (B, H, Mq) float32 and ``S_dmask``, which
            is always None here (module docstring says why; a warning says so once).

    Returns:
        ``out`` (B, Mq, H, D) in q's dtype, or ``(out, softmax_lse, None)``.
    """
    probs = _check_flag("return_attn_probs", return_attn_probs)
    result = api.attention(q, k, v, causal=causal, softmax_scale=softmax_scale, layout="bshd", return_lse=probs,
                           window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                           deterministic=deterministic)
    return _with_probs(*result) if probs else result


def _unpack(packed: torch.Tensor, name: str, dim: int, parts: int, shape: str) -> tuple[torch.Tensor, ...]:
    """The views of a packed tensor, after the checks whose errors must name the packed argument
    (unpacked, they would name q, k or v, which the caller never passed)."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(packed).__name__}")
    where = f"{name} (shape {tuple(packed.shape)}, dtype {packed.dtype}, device {packed.device})"
    if packed.dim() != dim or packed.shape[-3] != parts:
        raise ValueError(f"{where}: expected {shape}")
    if packed.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{where}: dtype not supported (supported: float16, bfloat16, float32)")
    if packed.numel() == 0:
        raise ValueError(f"{where}: every dimension must be >= 1")
    D = packed.shape[-1]
    if not (HEAD_DIM_MIN <= D <= HEAD_DIM_MAX and D % HEAD_DIM_MULTIPLE == 0):
        raise ValueError(f"{where}: head dim D={D} is not supported "
                         f"(supported: {HEAD_DIM_MIN}..{HEAD_DIM_MAX}, multiple of {HEAD_DIM_MULTIPLE})")
    return packed.unbind(-3)  # views: gradients flow back into the packed tensor


def _check_kv_against_q(q, kv: torch.Tensor, name: str, batch_dims: int) -> None:
    """What ties a packed kv to q (dtype, device, batch, heads, D), named ``name``; the checks of q
    alone stay with ``attention``. ``batch_dims``: 1 for (B, M, ...) tensors, 0 for packed varlen."""
    if not isinstance(q, torch.Tensor) or q.dim() != kv.dim() - 1:
        return  # attention names q's own problem
    where = f"{name} (shape {tuple(kv.shape)}, dtype {kv.dtype}, device {kv.device})"
    if kv.dtype != q.dtype:
        raise TypeError(f"{where}: dtype differs from q's {q.dtype}")
    if kv.device != q.device:
        raise ValueError(f"{where}: device differs from q's {q.device}")
    if batch_dims and kv.shape[0] != q.shape[0]:
        raise ValueError(f"{where}: batch size {kv.shape[0]} differs from q's {q.shape[0]} (q shape {tuple(q.shape)})")
    H, D, Hkv = q.shape[-2], q.shape[-1], kv.shape[-2]
    if kv.shape[-1] != D:
        raise ValueError(f"{where}: head dim {kv.shape[-1]} differs from q's D={D} (q shape {tuple(q.shape)})")
    if H % Hkv != 0:
        raise ValueError(f"{where}: q's H={H} heads (q shape {tuple(q.shape)}) must be a multiple of the "
                         f"key/value heads Hkv={Hkv}")


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``flash_attn_func`` with q, k, v stacked: qkv (B, M, 3, H, D). Returns as ``flash_attn_func``."""
    q, k, v = _unpack(qkv, "qkv", 5, 3, "(B, M, 3, H, D)")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``flash_attn_func`` with k, v stacked: q (B, Mq, H, D), kv (B, Mkv, 2, Hkv, D)."""
    k, v = _unpack(kv, "kv", 5, 2, "(B, Mkv, 2, Hkv, D)")
    _check_kv_against_q(q, kv, "kv", batch_dims=1)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


# ------------------------------------------------------------------ varlen (total, H, D)


def _attention_varlen():
    """``fa2dispatch.attention_varlen``, or a clear error where this build lacks it."""
    import fa2dispatch

    fn = getattr(fa2dispatch, "attention_varlen", None)
    if fn is None:
        raise NotImplementedError("fa2dispatch.compat: flash_attn_varlen_* need fa2dispatch.attention_varlen, "
                                  "which this build of fa2dispatch does not have")
    return fn


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash-attn 2.x's ``flash_attn_varlen_func``: packed sequences without padding.

    Args:
        q: (total_q, H, D); k, v: (total_k, Hkv, D). Sequence b is rows
            ``cu_seqlens[b]:cu_seqlens[b + 1]``.
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) cumulative lengths, starting at 0.
        max_seqlen_q, max_seqlen_k: the longest query / key sequence.
        block_table: a paged key/value cache; not supported here (must be None: use
            ``flash_attn_with_kvcache`` for paged caches).
        The rest: as ``flash_attn_func``, per sequence (causal is bottom-right within each).

    Returns:
        ``out`` (total_q, H, D), or ``(out, softmax_lse (H, total_q) float32, None)``.
    """
    _refuse("flash_attn_varlen_func", block_table=block_table)
    probs = _check_flag("return_attn_probs", return_attn_probs)
    result = _attention_varlen()(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                                 softmax_scale=softmax_scale, return_lse=probs, window_size=window_size,
                                 softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                                 deterministic=deterministic)
    return _with_probs(*result) if probs else result


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """``flash_attn_varlen_func`` with q, k, v stacked: qkv (total, 3, H, D), one cu_seqlens."""
    q, k, v = _unpack(qkv, "qkv", 4, 3, "(total, 3, H, D)")
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``flash_attn_varlen_func`` with k, v stacked: q (total_q, H, D), kv (total_k, 2, Hkv, D)."""
    k, v = _unpack(kv, "kv", 4, 2, "(total_k, 2, Hkv, D)")
    _check_kv_against_q(q, kv, "kv", batch_dims=0)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


# ------------------------------------------------------------------ KV cache (inference)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """flash-attn 2.x's ``flash_attn_with_kvcache`` through ``fa2dispatch.kvcache``.

    q (B, Mq, H, D); k_cache, v_cache (B, Mcache, Hkv, D), or (num_blocks, page, Hkv, D) with a
    ``block_table`` (B, max_blocks) int32. ``k``, ``v`` (B, Mnew, Hkv, D), when given, are written
    into the cache in place at ``cache_seqlens`` before attention; ``cache_seqlens`` is an int or
    int32 (B,). Causal is bottom-right within each sequence's ``cache_seqlens (+ Mnew)`` keys.
    Forward only (flash-attn's is too).

    Not supported (``NotImplementedError`` naming the argument when not None): ``rotary_cos`` /
    ``rotary_sin`` (apply the rotary embedding beforehand; ``rotary_interleaved`` is then
    irrelevant and ignored), ``cache_batch_idx``, ``cache_leftpad``.

    Returns ``out`` (B, Mq, H, D), or ``(out, softmax_lse (B, H, Mq) float32)`` with
    ``return_softmax_lse``.
    """
    _refuse("flash_attn_with_kvcache", rotary_cos=rotary_cos, rotary_sin=rotary_sin,
            cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad)
    _check_flag("rotary_interleaved", rotary_interleaved)
    _check_flag("return_softmax_lse", return_softmax_lse)
    try:
        kvcache = importlib.import_module("fa2dispatch.kvcache")
    except ImportError as exc:
        raise NotImplementedError("fa2dispatch.compat.flash_attn_with_kvcache needs fa2dispatch.kvcache, which this "
                                  f"build of fa2dispatch does not have ({exc})") from None
    return kvcache.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens,
                                          block_table=block_table, causal=causal, softmax_scale=softmax_scale,
                                          window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                                          num_splits=num_splits, return_lse=return_softmax_lse)


# ------------------------------------------------------------------ PyTorch SDPA


@dataclass(frozen=True)
class TorchSDPAFallback:
    """``explain_sdpa``'s answer for a call fa2dispatch hands to PyTorch's own
    ``scaled_dot_product_attention``: a shape or dtype no fa2dispatch path takes."""

    reason: str

    def __str__(self) -> str:
        return f"torch.nn.functional.scaled_dot_product_attention runs it (not fa2dispatch): {self.reason}"


@dataclass(frozen=True)
class _SdpaCall:
    """An SDPA call in fa2dispatch's terms: 4-d (B, H, M, D) q, k, v and ``_attention``'s
    feature keywords (``squeeze``: the caller gave 3-d (H, M, D) inputs)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool
    feats: dict
    squeeze: bool


def _sdpa_route(query, key, value, attn_mask, dropout_p, is_causal, scale,
                enable_gqa) -> _SdpaCall | TorchSDPAFallback:
    """How one SDPA call runs: in fa2dispatch (``_SdpaCall``) or PyTorch's (``TorchSDPAFallback``).

    fa2dispatch takes 4-d (B, H, M, D) inputs (3-d (H, M, D) as B = 1) with equal batch sizes,
    one head dim for q, k and v, a dtype and D its kernels or reference take. Anything else is
    PyTorch's own. Argument errors PyTorch would raise are raised here as ValueError/TypeError."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check_flag("is_causal", is_causal)
    _check_flag("enable_gqa", enable_gqa)
    if is_causal and attn_mask is not None:
        # PyTorch's rule: the causal mask and an explicit mask are exclusive
        raise ValueError("scaled_dot_product_attention: attn_mask and is_causal=True cannot both be given "
                         "(fold the causal mask into attn_mask)")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale={scale!r} must be finite")
    mask_dim = attn_mask.dim() if isinstance(attn_mask, torch.Tensor) else 0
    if {query.dim(), key.dim(), value.dim()} not in ({3}, {4}) or mask_dim > query.dim():
        return TorchSDPAFallback(f"inputs of {query.dim()}/{key.dim()}/{value.dim()} dims, attn_mask of {mask_dim} "
                                 "(fa2dispatch takes (B, H, M, D) or (H, M, D), a mask of no more dims)")
    squeeze = query.dim() == 3
    if squeeze:  # (H, M, D): one batch
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if mask_dim == 3:
            attn_mask = attn_mask.unsqueeze(0)
    B, H, _, D = query.shape
    Hkv, Dk, Dv = key.shape[1], key.shape[-1], value.shape[-1]
    if key.shape[0] != B or value.shape[0] != B:
        return TorchSDPAFallback(f"batch sizes differ (query {tuple(query.shape)}, key {tuple(key.shape)}, value "
                                 f"{tuple(value.shape)}): fa2dispatch does not broadcast batches")
    if not Dk == D == Dv:
        return TorchSDPAFallback(f"head dims differ (query D={D}, key {Dk}, value {Dv}): fa2dispatch needs one D")
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return TorchSDPAFallback(f"dtype {query.dtype} (fa2dispatch: float16, bfloat16, float32)")
    if not (HEAD_DIM_MIN <= D <= HEAD_DIM_MAX and D % HEAD_DIM_MULTIPLE == 0):
        return TorchSDPAFallback(f"head dim D={D} (fa2dispatch: {HEAD_DIM_MIN}..{HEAD_DIM_MAX}, multiple of "
                                 f"{HEAD_DIM_MULTIPLE})")
    _check_sdpa_tensors(query, key, value, enable_gqa)
    if H != Hkv and not enable_gqa:
        raise ValueError(f"scaled_dot_product_attention: query has {H} heads and key/value {Hkv}; pass "
                         "enable_gqa=True for grouped-query attention (PyTorch's rule)")
    if mask_dim and attn_mask.is_floating_point() and attn_mask.dtype != query.dtype:
        attn_mask = attn_mask.to(query.dtype)  # PyTorch adds a float mask of any float dtype
    # SDPA's is_causal is top-left aligned: query i sees key j iff j <= i (features.py)
    feats = {"window_size": (-1, -1), "softcap": 0.0, "alibi_slopes": None, "dropout_p": dropout_p,
             "causal_alignment": "top_left", "deterministic": False, "attn_mask": attn_mask}
    return _SdpaCall(query, key, value, is_causal, feats, squeeze)


def _check_sdpa_tensors(query, key, value, enable_gqa) -> None:
    """What ties key and value to query, with SDPA's argument names (``attention`` would name
    them q, k, v). (B, H, M, D) inputs of one batch and head dim, which routing has established."""
    def where(name, t):
        return f"{name} (shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device})"

    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise TypeError(f"{where(name, t)}: dtype differs from query's {query.dtype}")
        if t.device != query.device:
            raise ValueError(f"{where(name, t)}: device differs from query's {query.device}")
    if value.shape[1:3] != key.shape[1:3]:
        raise ValueError(f"{where('value', value)}: heads and length must match {where('key', key)}")
    H, Hkv = query.shape[1], key.shape[1]
    if enable_gqa and (Hkv == 0 or H % Hkv != 0):
        raise ValueError(f"{where('query', query)} has H={H} heads, not a multiple of the Hkv={Hkv} heads of "
                         f"{where('key', key)}")


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """PyTorch's ``torch.nn.functional.scaled_dot_product_attention`` through fa2dispatch.

    Same arguments and semantics: query (B, H, Mq, D), key/value (B, Hkv, Mkv, D) (or without
    the batch dim); ``attn_mask`` bool (True keeps) or float (added to the scores), broadcastable
    to (B, H, Mq, Mkv); ``is_causal`` top-left aligned (query i sees key j iff j <= i, also when
    Mq != Mkv); ``scale`` default ``D ** -0.5``; ``enable_gqa`` lets H be a multiple of Hkv.
    A row that sees no key gives 0. Returns (B, H, Mq, D) in query's dtype; differentiable.

    Routing (``explain_sdpa`` shows it for a call): plain and causal calls go to the dispatcher
    like ``fa2dispatch.attention``; a call with ``attn_mask`` goes to backends that take an
    arbitrary mask (the reference: correct, but it materialises the scores, so slower), with the
    other backends' reasons in the decision. Shapes no fa2dispatch path takes (other ranks,
    differing head dims of q/k and v, broadcast batches, D outside 8..256 or not a multiple of
    8, other dtypes) and mask or dropout calls under ``torch.compile`` run PyTorch's own SDPA.
    Dropout uses fa2dispatch's RNG (``torch.manual_seed`` makes it repeatable), not PyTorch's
    masks.
    """
    call = _sdpa_route(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if isinstance(call, _SdpaCall) and torch.compiler.is_compiling() and (attn_mask is not None or dropout_p):
        call = TorchSDPAFallback("attn_mask / dropout_p under torch.compile")
    if isinstance(call, TorchSDPAFallback):
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa)
    out = api._attention(call.q, call.k, call.v, causal=call.causal, softmax_scale=scale, layout="bhsd",
                         return_lse=False, backend="auto", generator=None, q_descale=None, k_descale=None,
                         v_descale=None, out_dtype=None, v_layout="natural", fp8=False, hadamard=False, **call.feats)
    return out.squeeze(0) if call.squeeze else out


def explain_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False) -> Decision | TorchSDPAFallback:
    """Who runs ``scaled_dot_product_attention(same arguments)``, without running it: the
    dispatcher's ``Decision`` (``str()`` lists every backend not chosen, with its reasons), or a
    ``TorchSDPAFallback`` saying why PyTorch's own SDPA runs it."""
    call = _sdpa_route(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if isinstance(call, TorchSDPAFallback):
        return call
    return api._prepare(call.q, call.k, call.v, call.causal, scale, "bhsd", False, "auto", None, call.feats)[2]
