"""The public attention API."""

from __future__ import annotations

import torch

from fa2dispatch.dispatch import Decision, check_backend_name, decide, requested_backend
from fa2dispatch.ops import attention_eager, attention_forward_op, run_forward
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
    compiling = torch.compiler.is_compiling()
    problem, choice = _validate(q, k, v, causal, softmax_scale, layout, return_lse, backend, compiling)
    if compiling:
        # choice was resolved at trace time (the use_backend context and the environment are
        # read then, as torch.compile reads other Python state) and is baked into the graph.
        out, lse = attention_forward_op(
            q, k, v, problem.causal, problem.softmax_scale, problem.layout, choice, problem.requires_grad,
            problem.return_lse,
        )
    elif problem.requires_grad:
        out, lse = attention_eager(q, k, v, problem, choice)
    else:
        out, lse, _ = run_forward(problem, q, k, v, choice)
    return (out, lse) if return_lse else out


_PROBLEM_MEMO_LIMIT = 4096
_problems: dict[tuple, AttentionProblem] = {}


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


def _validate(q, k, v, causal, softmax_scale, layout, return_lse, backend, compiling=False):
    """Every check of a call, before anything launches: (problem, resolved backend choice).

    Validation is a pure function of shapes, dtypes, devices and the arguments (strides are free),
    so a call whose signature passed before reuses its problem (one dictionary lookup).
    """
    # Under torch.compile validation runs once, at trace time; the memo is for eager calls.
    key = None if compiling else _signature(q, k, v, causal, softmax_scale, layout, return_lse, backend)
    try:
        problem = _problems.get(key) if key is not None else None
    except TypeError:  # an unhashable argument (say a list for layout): validation names it
        key, problem = None, None
    if problem is None:
        problem = make_problem(q, k, v, causal=causal, softmax_scale=softmax_scale, layout=layout,
                               return_lse=return_lse)
        check_backend_name(backend)
        if key is not None:
            if len(_problems) >= _PROBLEM_MEMO_LIMIT:
                _problems.clear()
            _problems[key] = problem
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
    problem, choice = _validate(q, k, v, causal, softmax_scale, layout, return_lse, backend,
                                torch.compiler.is_compiling())
    return decide(problem, choice)
