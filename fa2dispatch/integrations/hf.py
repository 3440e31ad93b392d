"""HuggingFace transformers: run a model's attention through fa2dispatch.

    import fa2dispatch.integrations.hf as fa2hf
    fa2hf.register()                                   # once per process
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fa2dispatch")
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fa2dispatch")

``register()`` adds two entries under one name: the attention function (transformers'
``AttentionInterface``) and the mask builder that goes with it (``AttentionMaskInterface``), so
the model hands us masks in a form we can route. Models whose attention goes through that
interface (Llama, Mistral, Qwen2, Gemma, GPT-2 and most decoder models of transformers >= 4.56)
work; ``attn_implementation`` reaches only those.

How a call is routed, and why:

- No mask (``None``) means exactly the module's own causality, bottom-right aligned: the query
  rows are the last ``Mq`` positions of the ``Mkv`` keys (FlashAttention-2's convention, which
  our kernels run). Our mask builder returns None only then: no padding, and the queries at the
  end of the keys, which is every step of ``generate()`` with the default dynamic cache (prefill,
  then one token at a time, or several with assisted decoding). These calls go to the fast
  backends, like ``fa2dispatch.attention(..., causal=module.is_causal)``.
- Anything else gets transformers' own boolean mask (``sdpa_mask``: padding, static caches whose
  unwritten slots must be hidden, packed sequences, sliding windows that bite, custom masks) and
  runs on the backends that take an arbitrary ``attn_mask``, the reference: correct, but it
  materialises the (Mq, Mkv) scores, so it is slower and uses more memory. Batched generation
  with left padding goes this way. ``fa2dispatch.compat.explain_sdpa`` shows the decision.
- GQA/MQA go to the kernels as they are (no ``repeat_kv`` copy). Dropout is applied when the
  module is training (``dropout`` is the probability the model passes; transformers' eager
  attention uses ``module.training`` the same way). ``softcap`` (Gemma 2) and ``sliding_window``
  (left window ``sliding_window - 1``, as transformers' flash-attention integration) go to the
  kernels' own features.
- Not supported: ``output_attentions=True`` (the probabilities are never formed; attention
  weights come back None, with a warning once), T5-style ``position_bias`` and attention sinks
  (``s_aux``), which raise ``NotImplementedError`` naming them. Mask calls are not supported
  under ``torch.compile`` (fa2dispatch.attention's rule).
"""

from __future__ import annotations

import logging

import torch

from fa2dispatch import api

NAME = "fa2dispatch"

log = logging.getLogger("fa2dispatch")
_warned: set[str] = set()


def register(name: str = NAME) -> str:
    """Register fa2dispatch with transformers under ``name`` (default ``"fa2dispatch"``): the
    attention function and its mask builder. Idempotent. Returns the name to pass as
    ``attn_implementation``. Raises ImportError (saying what to install) without transformers."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as exc:
        raise ImportError("fa2dispatch.integrations.hf needs HuggingFace transformers >= 4.56 with its "
                          f"AttentionInterface and AttentionMaskInterface: pip install 'fa2dispatch[hf]' ({exc})"
                          ) from None
    if not isinstance(name, str):
        raise TypeError(f"name must be a non-empty str, got {type(name).__name__} {name!r}")
    if not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, attention_mask)
    return name


def _queries_at_end_unpadded(q_length, kv_length, q_offset, kv_offset, padding, local_size) -> bool:
    """True when the mask transformers would build is exactly bottom-right causal (query i of
    Mq sees key j of Mkv iff j <= i + Mkv - Mq): no padding, queries at the end of the keys,
    and no window that cuts into the keys. transformers' causal rule is ``kv_idx <= q_idx`` in
    absolute positions (q_idx = i + q_offset, kv_idx = j + kv_offset), which is that rule when
    ``q_offset + Mq == kv_offset + Mkv``. ``q_offset=None`` (transformers 4.x passes positions
    on the device, not an offset): only the cases that need no offset, one query (a decode
    step after the cached keys) or as many queries as keys, as transformers' SDPA path does."""
    if torch.compiler.is_compiling():  # reading the padding mask's values would break the graph
        return False
    if isinstance(q_offset, torch.Tensor) or isinstance(kv_offset, torch.Tensor):
        return False  # static caches: the offset lives on the device, and unwritten slots need hiding
    if local_size is not None and kv_length >= local_size:
        return False  # a sliding / chunked window bites: transformers' mask states it
    if q_offset is None:
        if q_length != 1 and q_length != kv_length:
            return False
    elif q_offset + q_length != kv_offset + kv_length:
        return False
    if padding is not None:
        if padding.shape[-1] < kv_offset + kv_length:
            return False  # keys past the 2-d mask are hidden (transformers pads it with False)
        if not bool(padding[:, kv_offset:kv_offset + kv_length].all()):
            return False
    return True


def attention_mask(batch_size, q_length=None, kv_length=None, q_offset=0, kv_offset=0, attention_mask=None,
                   local_size=None, allow_is_causal_skip=True, cache_position=None, **kwargs):
    """transformers' mask builder for ``"fa2dispatch"`` (``AttentionMaskInterface``): None when
    the mask is the module's own bottom-right causality (``_queries_at_end_unpadded``), else
    transformers' ``sdpa_mask`` in full (bool, (B, 1, Mq, Mkv), True keeps).

    ``sdpa_mask`` itself may return None in another case, an empty static cache at prefill, where
    it relies on SDPA's top-left ``is_causal``; our None must always mean bottom-right, so that
    case gets the full mask (``allow_is_causal_skip=False``). Its bidirectional skip (no padding,
    non-causal module) means the same for both and is kept. transformers 5.x passes ``q_length``
    and ``q_offset``; 4.x passes ``cache_position`` (the queries' positions) instead."""
    from transformers.masking_utils import sdpa_mask

    if cache_position is not None:  # transformers 4.x
        if allow_is_causal_skip and _queries_at_end_unpadded(cache_position.shape[0], kv_length, None, kv_offset,
                                                             attention_mask, local_size):
            return None
        return sdpa_mask(batch_size=batch_size, cache_position=cache_position, kv_length=kv_length,
                         kv_offset=kv_offset, attention_mask=attention_mask, local_size=local_size,
                         allow_is_causal_skip=False, **kwargs)
    if allow_is_causal_skip and _queries_at_end_unpadded(q_length, kv_length, q_offset, kv_offset, attention_mask,
                                                         local_size):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, local_size=local_size,
                     allow_is_causal_skip=False, **kwargs)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, softcap: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention function for ``"fa2dispatch"`` (``AttentionInterface``).

    query (B, H, Mq, D), key/value (B, Hkv, Mkv, D) as transformers passes them; returns
    ``(attn_output (B, Mq, H, D), None)``. ``attention_mask``: None (the module's causality,
    bottom-right, see the module docstring) or a bool/float mask broadcastable to
    (B, H, Mq, Mkv) (routed to backends that take one: the reference)."""
    if kwargs.get("output_attentions"):
        _warn_once("output_attentions", "fa2dispatch attention does not return attention weights "
                   "(output_attentions=True): they are never materialised; use attn_implementation='eager' for them")
    for name in ("position_bias", "s_aux"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"fa2dispatch attention: {name} is not supported (model "
                                      f"{type(module).__name__}); use attn_implementation='sdpa' or 'eager'")
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    is_causal = bool(is_causal)
    # transformers' eager attention drops with training=module.training; do the same
    dropout_p = float(dropout) if getattr(module, "training", False) else 0.0
    cap = float(softcap) if softcap else 0.0
    # (B, M, H, D) views: FlashAttention's layout, so the output comes back as transformers wants it
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    if attention_mask is None:
        window = (-1, -1)
        if sliding_window is not None and sliding_window > 0:
            # transformers' window W: query i sees keys i - W < j (<= i): left = W - 1
            window = (sliding_window - 1, -1 if is_causal else sliding_window - 1)
        out = api.attention(q, k, v, causal=is_causal, softmax_scale=scaling, layout="bshd", window_size=window,
                            softcap=cap, dropout_p=dropout_p)
        return out, None
    mask = attention_mask
    if mask.shape[-1] > key.shape[-2]:  # a mask sized for a longer cache than the keys given
        mask = mask[..., : key.shape[-2]]
    if mask.dtype != torch.bool and mask.dtype != query.dtype:
        mask = mask.to(query.dtype)
    # transformers' mask already holds the causality, padding and any window
    out = api._attention(q, k, v, causal=False, softmax_scale=scaling, layout="bshd", return_lse=False,
                         backend="auto", window_size=(-1, -1), softcap=cap, alibi_slopes=None, dropout_p=dropout_p,
                         generator=None, causal_alignment="bottom_right", deterministic=False, q_descale=None,
                         k_descale=None, v_descale=None, out_dtype=None, v_layout="natural", fp8=False,
                         hadamard=False, attn_mask=mask)
    return out, None
