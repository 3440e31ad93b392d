"""The public attention API."""

from __future__ import annotations

import torch

from fa2dispatch.dispatch import Decision, call_memo, check_backend_name, decide, remember_call, requested_backend
from fa2dispatch.ops import attention_eager, attention_forward_op
from fa2dispatch.problem import AttentionProblem, make_problem


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

    Raises:
        ValueError / TypeError: invalid input, naming the argument.
        NoBackendError: (a ``NotImplementedError``) no backend can run the call; ``.reasons``
            maps each backend to why not.

    Returns:
        ``out`` shaped and laid out like q, in q's dtype; ``(out, lse)`` if ``return_lse``.
        Differentiable with respect to q, k and v (and through lse).
    """
    if torch.compiler.is_compiling():
        problem = make_problem(q, k, v, causal=causal, softmax_scale=softmax_scale, layout=layout,
                               return_lse=return_lse)
        check_backend_name(backend)
        # The choice is resolved at trace time (the use_backend context is read then, as
        # torch.compile reads other Python state) and is baked into the graph.
        out, lse = attention_forward_op(
            q, k, v, problem.causal, problem.softmax_scale, problem.layout, _resolve_backend(backend),
            problem.requires_grad, problem.return_lse,
        )
    else:
        problem, choice, decision = _prepare(q, k, v, causal, softmax_scale, layout, return_lse, backend)
        out, lse = attention_eager(q, k, v, problem, choice, decision)
    return (out, lse) if return_lse else out


def _signature(q, k, v, causal, softmax_scale, layout, return_lse, backend) -> tuple | None:
    """Everything validation reads, with the types of the flags (True == 1 must not share an
    entry with 1). None when the inputs are not tensors (full validation says why)."""
    try:
        return (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
                causal, type(causal), softmax_scale, type(softmax_scale), layout, type(layout), return_lse,
                type(return_lse), backend, type(backend),
                torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    except AttributeError:
        return None


def _prepare(q, k, v, causal, softmax_scale, layout, return_lse, backend) -> tuple[AttentionProblem, str, Decision]:
    """(problem, resolved choice, decision) of an eager call, before anything launches.

    Validation and the decision are pure functions of what ``_signature`` collects (strides are
    free) and of the choice in force, so a call seen before is one dictionary lookup
    (``dispatch.call_memo``, cleared with the decision memo and on any run-time failure).
    """
    choice = _resolve_backend(backend)
    key = _signature(q, k, v, causal, softmax_scale, layout, return_lse, backend)
    if key is not None:
        key = (key, choice)
        try:
            hit = call_memo.get(key)
        except TypeError:  # an unhashable argument (say a list for layout): validation names it
            key, hit = None, None
        if hit is not None:
            return hit
    problem = make_problem(q, k, v, causal=causal, softmax_scale=softmax_scale, layout=layout, return_lse=return_lse)
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
) -> Decision:
    """The dispatcher's decision for ``attention(q, k, v, **same arguments)``, without running it."""
    return _prepare(q, k, v, causal, softmax_scale, layout, return_lse, backend)[2]
