"""The public attention API."""

from __future__ import annotations

import torch

from fa2dispatch import fp8 as _fp8
from fa2dispatch import rng
from fa2dispatch.features import FeatureArgs
from fa2dispatch.dispatch import Decision, call_memo, check_backend_name, decide, remember_call, requested_backend
from fa2dispatch.ops import attention_eager, attention_forward_op
from fa2dispatch.problem import AttentionProblem, make_problem


# Defaults of the feature arguments, compared by identity on the fast path of a plain call
_NO_WINDOW = (-1, -1)
_ZERO = 0.0


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    layout: str = "bshd",
    return_lse: bool = False,
    backend: str = "auto",
    window_size: tuple[int, int] = _NO_WINDOW,
    softcap: float = _ZERO,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = _ZERO,
    generator: torch.Generator | None = None,
    causal_alignment: str = "bottom_right",
    deterministic: bool = False,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    v_layout: str = "natural",
    fp8: bool = False,
    hadamard: bool = False,
):
    """Exact attention ``softmax(softmax_scale * q k^T) v``, FlashAttention-2 style.

    Args:
        q: queries, (B, Mq, H, D) for ``layout="bshd"`` (FlashAttention's convention) or
            (B, H, Mq, D) for ``layout="bhsd"`` (PyTorch SDPA's). float16, bfloat16 or float32
            (float8_e4m3fn is accepted and routed to the fp8 backend where one can run it);
            D a multiple of 8 from 8 to 256; any strides.
        k, v: keys and values, (B, Mkv, Hkv, D) or (B, Hkv, Mkv, D), same dtype and device as
            q. ``H % Hkv == 0``: query head h reads key/value head ``h // (H // Hkv)`` (GQA, MQA).
        causal: mask keys after the query. Bottom-right aligned when Mq != Mkv (query i sees
            key j iff ``j <= i + Mkv - Mq``); a query row that sees no key gives 0 (lse -inf).
        softmax_scale: multiplies the scores; default ``D ** -0.5``.
        layout: ``"bshd"`` or ``"bhsd"``; the output uses the same layout as q.
        return_lse: also return the row log-sum-exp, (B, H, Mq) float32, natural log.
        backend: ``"auto"`` (the dispatcher decides; see ``explain``) or a registered name:
            ``"triton"``, ``"cupy"``, ``"triton-fp8"``, ``"torch-sdpa-cudnn"``, ``"torch-sdpa-flash"``,
            ``"torch-sdpa-efficient"``, ``"reference"``. A named backend that cannot run the call
            raises ``ValueError`` with its reasons. Automatic choice falls back to the next capable
            backend if the chosen one fails to compile or launch (logged once, listed by
            ``fa2dispatch report``).

    FlashAttention-2's features (``fa2dispatch.features`` states the one visibility rule):
        window_size: ``(left, right)``, -1 unbounded: query i sees keys j with
            ``i + shift - left <= j <= i + shift + right`` (sliding-window / local attention);
            ``shift = Mkv - Mq`` (bottom-right) or 0 (top-left). With ``causal`` the right side is 0.
        softcap: > 0: scores become ``softcap * tanh(scores / softcap)`` (Gemma 2), before ALiBi and masks.
        alibi_slopes: float32 (H,) or (B, H): ``-slope * |i + shift - j|`` is added to the scores.
        dropout_p: probability of dropping an attention weight (training); kept weights are scaled
            by ``1 / (1 - dropout_p)``. The mask comes from a counter-based RNG seeded from
            ``generator`` (a ``torch.Generator``) or torch's global CPU generator, so
            ``torch.manual_seed`` makes output and gradients repeatable; the backward regenerates
            the mask instead of storing it. The returned lse is that of the undropped weights.
        causal_alignment: ``"bottom_right"`` (FlashAttention-2, the default) or ``"top_left"``
            (PyTorch SDPA's ``is_causal``: query i sees key j iff ``j <= i``).
        deterministic: True asks for a bit-for-bit repeatable backward; backends that cannot
            promise it are not chosen.

    FP8 (forward only; ``triton-fp8`` on sm_89 / sm_90, chosen automatically for fp8 inputs):
        q_descale, k_descale, v_descale: with float8_e4m3fn q, k, v, FlashAttention-3's descale
            factors: float32 (B, Hkv) on q's device (``q_descale`` may also be (B, H)); the real
            inputs are ``x8 * descale[b, head]``. None: 1. ``fa2dispatch.quantize_fp8`` makes them.
        out_dtype: output dtype of an fp8 call, ``torch.bfloat16`` (default) or ``torch.float16``.
        v_layout: ``"natural"`` (v laid out like k) or ``"transposed"``: v given as V^T, shape
            (B, Hkv, D, Mkv) with Mkv contiguous, the K-major operand of Hopper's fp8 MMA; a
            natural v is transposed once per call (one copy of v; its cost is in BENCHMARKS.md).
        fp8: with float16/bfloat16 q, k, v: quantize them per head on the fly (inference), run
            the fp8 kernel, return the output in the inputs' dtype.
        hadamard: with ``fp8=True``: rotate q and k by a fixed random Hadamard matrix before
            quantizing (q k^T is unchanged; outliers are spread). D must be a power of two.
        fp8 inputs (or ``fp8=True``) that require gradients raise ``ValueError``: there is no
        backward through fp8. Under ``torch.compile`` fp8 calls raise ``NotImplementedError``.

    Raises:
        ValueError / TypeError: invalid input, naming the argument.
        NoBackendError: (a ``NotImplementedError``) no backend can run the call; ``.reasons``
            maps each backend to why not.

    Returns:
        ``out`` shaped and laid out like q, in q's dtype; ``(out, lse)`` if ``return_lse``.
        Differentiable with respect to q, k and v (and through lse).
    """
    if (window_size is _NO_WINDOW and softcap is _ZERO and dropout_p is _ZERO and alibi_slopes is None
            and generator is None and causal_alignment == "bottom_right" and deterministic is False
            and q_descale is None and k_descale is None and v_descale is None and out_dtype is None
            and v_layout == "natural" and fp8 is False and hadamard is False
            and getattr(q, "dtype", None) != torch.float8_e4m3fn and not torch.compiler.is_compiling()):
        # the plain eager call (the common case), without assembling the feature arguments:
        # the same validation and memo as below, keyed the same way (features None)
        problem, choice, decision = _prepare(q, k, v, causal, softmax_scale, layout, return_lse, backend)
        out, lse = attention_eager(q, k, v, problem, choice, decision)
        return (out, lse) if return_lse else out
    return _attention(q, k, v, causal=causal, softmax_scale=softmax_scale, layout=layout, return_lse=return_lse,
                      backend=backend, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                      dropout_p=dropout_p, generator=generator, causal_alignment=causal_alignment,
                      deterministic=deterministic, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
                      out_dtype=out_dtype, v_layout=v_layout, fp8=fp8, hadamard=hadamard)


def _attention(q, k, v, *, causal, softmax_scale, layout, return_lse, backend, window_size, softcap, alibi_slopes,
               dropout_p, generator, causal_alignment, deterministic, q_descale, k_descale, v_descale, out_dtype,
               v_layout, fp8, hadamard, attn_mask=None):
    """``attention`` with an SDPA-style ``attn_mask`` besides (``fa2dispatch.compat`` only)."""
    feats = dict(window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                 causal_alignment=causal_alignment, deterministic=deterministic, attn_mask=attn_mask)
    rng.check_generator(generator)
    fp8_call = fp8 is not False or hadamard is not False or q_descale is not None or k_descale is not None \
        or v_descale is not None or out_dtype is not None or v_layout != "natural" \
        or getattr(q, "dtype", None) == torch.float8_e4m3fn
    if fp8_call:
        if torch.compiler.is_compiling():
            raise NotImplementedError("fa2dispatch.attention: fp8 calls (float8_e4m3fn inputs, descales, fp8=True) "
                                      "are not supported under torch.compile; call them eagerly")
        return _attention_fp8(q, k, v, causal, softmax_scale, layout, return_lse, backend, q_descale, k_descale,
                              v_descale, out_dtype, v_layout, fp8, hadamard, feats)
    if torch.compiler.is_compiling():
        problem = make_problem(q, k, v, causal=causal, softmax_scale=softmax_scale, layout=layout,
                               return_lse=return_lse, **feats)
        check_backend_name(backend)
        if problem.dropout_p or problem.attn_mask:
            raise NotImplementedError("fa2dispatch.attention: dropout_p > 0 and attn_mask are not supported under "
                                      "torch.compile (the RNG state is drawn per call in eager code); call it eagerly")
        # The choice is resolved at trace time (the use_backend context is read then, as
        # torch.compile reads other Python state) and is baked into the graph.
        out, lse = attention_forward_op(
            q, k, v, problem.causal, problem.softmax_scale, problem.layout, _resolve_backend(backend),
            problem.requires_grad, problem.return_lse, list(problem.window), problem.softcap, alibi_slopes,
            problem.causal_alignment, problem.deterministic,
        )
    else:
        problem, choice, decision = _prepare(q, k, v, causal, softmax_scale, layout, return_lse, backend,
                                             feats=feats)
        features = feature_args(problem, alibi_slopes, generator, attn_mask=attn_mask)
        out, lse = attention_eager(q, k, v, problem, choice, decision, features=features)
    return (out, lse) if return_lse else out


def feature_args(problem: AttentionProblem, alibi_slopes, generator, cu_seqlens_q=None,
                 cu_seqlens_k=None, attn_mask=None) -> FeatureArgs | None:
    """The per-call data beside the problem, or None for a call that needs none. A dropout call
    draws its RNG state here, once per call (the backward reuses it)."""
    if not (problem.alibi or problem.dropout_p or problem.varlen or problem.attn_mask):
        return None
    seed, offset = (0, 0)
    if problem.dropout_p:
        seed, offset = rng.draw_seed(generator)
    return FeatureArgs(alibi_slopes if problem.alibi else None, seed, offset, cu_seqlens_q, cu_seqlens_k,
                       attn_mask if problem.attn_mask else None)


def _tensor_key(t) -> tuple | None:
    """What validation reads of an optional tensor argument (None stays None; anything else is
    keyed by its type alone, and validation refuses it before a decision is remembered)."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        return (type(t),)
    return (t.shape, t.dtype, t.device)


def _attention_fp8(q, k, v, causal, softmax_scale, layout, return_lse, backend, q_descale, k_descale, v_descale,
                   out_dtype, v_layout, fp8, hadamard, feats):
    """An eager fp8 call: on-the-fly quantization for ``fp8=True``, then the fp8 kernel."""
    if fp8 is not False or hadamard is not False:
        _check_on_the_fly(q, k, v, fp8, hadamard, q_descale, k_descale, v_descale, out_dtype, v_layout)
        # shapes, layout, devices, head dim: the inputs' own errors (naming q, k, v) come first
        make_problem(q, k, v, causal=causal, softmax_scale=softmax_scale, layout=layout, return_lse=return_lse)
        if hadamard:
            _fp8.hadamard_rotation(q.shape[-1])  # a ValueError naming hadamard for D not a power of two
        out_dtype = q.dtype  # the output comes back in the inputs' dtype
        q, k, v, args = _fp8.quantize_inputs(q, k, v, layout, hadamard)
        q_descale, k_descale, v_descale = args.q_descale, args.k_descale, args.v_descale
    fp8_extra = (q_descale, k_descale, v_descale, out_dtype, v_layout)
    problem, choice, decision = _prepare(q, k, v, causal, softmax_scale, layout, return_lse, backend, fp8_extra,
                                         feats)
    args = _fp8.FP8Args(q_descale, k_descale, v_descale)
    out, lse = attention_eager(q, k, v, problem, choice, decision, args)
    return (out, lse) if return_lse else out


def _check_on_the_fly(q, k, v, fp8, hadamard, q_descale, k_descale, v_descale, out_dtype, v_layout) -> None:
    for name, flag in (("fp8", fp8), ("hadamard", hadamard)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if hadamard and not fp8:
        raise ValueError("hadamard=True needs fp8=True: the rotation is applied to q and k before they are "
                         "quantized (rotate pre-quantized inputs yourself with fa2dispatch.fp8.hadamard)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"fp8=True quantizes float16/bfloat16 inputs, but {name} (shape {tuple(t.shape)}) is "
                            f"{t.dtype}" + (": pass fp8 inputs without fp8=True, with their descales"
                                            if t.dtype == torch.float8_e4m3fn else ""))
    given = [n for n, t in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale),
                            ("out_dtype", out_dtype)) if t is not None]
    if given or v_layout != "natural":
        given += ["v_layout"] if v_layout != "natural" else []
        raise ValueError(f"fp8=True computes the scales itself and returns the inputs' dtype: "
                         f"{', '.join(given)} cannot be given with it")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("fp8=True with inputs that require grad: fp8 attention is forward-only (there is no "
                         "backward through the fp8 quantization); call it under torch.no_grad() / "
                         "torch.inference_mode(), or drop fp8=True for training")


def _signature(q, k, v, causal, softmax_scale, layout, return_lse, backend, fp8_extra=None,
               feats: dict | None = None) -> tuple | None:
    """Everything validation reads, with the types of the flags (True == 1 must not share an
    entry with 1). None when the inputs are not tensors (full validation says why)."""
    try:
        return (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
                causal, type(causal), softmax_scale, type(softmax_scale), layout, type(layout), return_lse,
                type(return_lse), backend, type(backend),
                torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad),
                None if fp8_extra is None else (*map(_tensor_key, fp8_extra[:3]), fp8_extra[3],
                                                type(fp8_extra[3]), fp8_extra[4], type(fp8_extra[4])),
                None if feats is None else _feature_key(feats))
    except AttributeError:
        return None


def _feature_key(feats: dict) -> tuple | None:
    """What validation reads of the feature arguments, with the types of the scalars; the
    default set (a plain call) keys as None."""
    if feats == _NO_FEATURES and all(type(feats[n]) is type(_NO_FEATURES[n]) for n in feats):
        return None
    window = feats["window_size"]
    return (tuple(window) if isinstance(window, (tuple, list)) else window, type(window),
            tuple(map(type, window)) if isinstance(window, (tuple, list)) else None,
            feats["softcap"], type(feats["softcap"]), _tensor_key(feats["alibi_slopes"]), feats["dropout_p"],
            type(feats["dropout_p"]), feats["causal_alignment"], feats["deterministic"], type(feats["deterministic"]),
            _tensor_key(feats.get("attn_mask")))


_NO_FEATURES = dict(window_size=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=0.0,
                    causal_alignment="bottom_right", deterministic=False, attn_mask=None)


def _prepare(q, k, v, causal, softmax_scale, layout, return_lse, backend,
             fp8_extra: tuple | None = None, feats: dict | None = None) -> tuple[AttentionProblem, str, Decision]:
    """(problem, resolved choice, decision) of an eager call, before anything launches.

    Validation and the decision are pure functions of what ``_signature`` collects (strides are
    free) and of the choice in force, so a call seen before is one dictionary lookup
    (``dispatch.call_memo``, cleared with the decision memo and on any run-time failure).
    """
    choice = _resolve_backend(backend)
    key = _signature(q, k, v, causal, softmax_scale, layout, return_lse, backend, fp8_extra, feats)
    if key is not None:
        key = (key, choice)
        try:
            hit = call_memo.get(key)
        except TypeError:  # an unhashable argument (say a list for layout): validation names it
            key, hit = None, None
        if hit is not None:
            return hit
    if fp8_extra is None:
        problem = make_problem(q, k, v, causal=causal, softmax_scale=softmax_scale, layout=layout,
                               return_lse=return_lse, **(feats or {}))
    else:
        problem = make_problem(q, k, v, causal=causal, softmax_scale=softmax_scale, layout=layout,
                               return_lse=return_lse, out_dtype=fp8_extra[3], v_layout=fp8_extra[4], **(feats or {}))
        _fp8.check_fp8_args(problem, *fp8_extra[:3])
    check_backend_name(backend)
    prepared = (problem, choice, decide(problem, choice))
    if key is not None:
        remember_call(key, prepared)
    return prepared


def _resolve_backend(backend: str) -> str:
    return requested_backend(backend)


# Dynamo cannot trace ContextVar.get, so under torch.compile this runs eagerly at trace time and
# its result is a constant of the graph. torch.compiler.assume_constant_result(fn) does nothing
# but set this flag; calling it here would import torch._dynamo, and with it Triton, at
# `import fa2dispatch`, before a caller can choose TRITON_INTERPRET. Tests cover both effects.
_resolve_backend._dynamo_marked_constant = True


def explain(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    layout: str = "bshd",
    return_lse: bool = False,
    backend: str = "auto",
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    causal_alignment: str = "bottom_right",
    deterministic: bool = False,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    v_layout: str = "natural",
    fp8: bool = False,
    hadamard: bool = False,
) -> Decision:
    """The dispatcher's decision for ``attention(q, k, v, **same arguments)``, without running it.
    With ``fp8=True`` it describes the quantized call (q, k, v in float8_e4m3fn)."""
    feats = dict(window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                 causal_alignment=causal_alignment, deterministic=deterministic, attn_mask=None)
    rng.check_generator(generator)
    if fp8 is not False or hadamard is not False:
        _check_on_the_fly(q, k, v, fp8, hadamard, q_descale, k_descale, v_descale, out_dtype, v_layout)
        if hadamard:
            _fp8.hadamard_rotation(q.shape[-1])
        out_dtype = q.dtype
        # shape-only stand-ins: one byte each, expanded (explain must not allocate a copy of q, k, v)
        q, k, v = (torch.empty((), dtype=torch.float8_e4m3fn, device=t.device).expand(t.shape) for t in (q, k, v))
    fp8_extra = (q_descale, k_descale, v_descale, out_dtype, v_layout)
    if all(x is None for x in fp8_extra[:4]) and v_layout == "natural" and getattr(q, "dtype", None) != \
            torch.float8_e4m3fn:
        fp8_extra = None
    return _prepare(q, k, v, causal, softmax_scale, layout, return_lse, backend, fp8_extra, feats)[2]
