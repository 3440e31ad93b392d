"""The public attention API."""

from __future__ import annotations

import torch

from fa2dispatch.dispatch import Decision, check_backend_name, decide, requested_backend
from fa2dispatch.ops import attention_eager, attention_forward_op
from fa2dispatch.problem import make_problem


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
            (B, H, Mq, D) for ``layout="bhsd"`` (PyTorch SDPA's). float16, bfloat16 or float32;
            D a multiple of 8 from 8 to 256; any strides.
        k, v: keys and values, (B, Mkv, Hkv, D) or (B, Hkv, Mkv, D), same dtype and device as
            q. ``H % Hkv == 0``: query head h reads key/value head ``h // (H // Hkv)`` (GQA, MQA).
        causal: mask keys after the query. Bottom-right aligned when Mq != Mkv (query i sees
            key j iff ``j <= i + Mkv - Mq``); a query row that sees no key gives 0 (lse -inf).
        softmax_scale: multiplies the scores; default ``D ** -0.5``.
        layout: ``"bshd"`` or ``"bhsd"``; the output uses the same layout as q.
        return_lse: also return the row log-sum-exp, (B, H, Mq) float32, natural log.
        backend: ``"auto"`` (the dispatcher decides; see ``explain``) or a registered name such
            as ``"triton"`` or ``"reference"``; a named backend that cannot run the call raises.

    Returns:
        ``out`` shaped and laid out like q, in q's dtype; ``(out, lse)`` if ``return_lse``.
        Differentiable with respect to q, k and v (and through lse).
    """
    problem, choice = _validate(q, k, v, causal, softmax_scale, layout, return_lse, backend)
    if torch.compiler.is_compiling():
        # choice was resolved at trace time (the use_backend context and the environment are
        # read then, as torch.compile reads other Python state) and is baked into the graph.
        out, lse = attention_forward_op(
            q, k, v, problem.causal, problem.softmax_scale, problem.layout, choice, problem.requires_grad
        )
    else:
        out, lse = attention_eager(q, k, v, problem, choice)
    return (out, lse) if return_lse else out


def _validate(q, k, v, causal, softmax_scale, layout, return_lse, backend):
    """Every check of a call, before anything launches: (problem, resolved backend choice)."""
    problem = make_problem(q, k, v, causal=causal, softmax_scale=softmax_scale, layout=layout)
    check_backend_name(backend)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    return problem, _resolve_backend(backend)


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
    problem, choice = _validate(q, k, v, causal, softmax_scale, layout, return_lse, backend)
    return decide(problem, choice)
