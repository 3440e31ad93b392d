"""Raw ops: forward and backward through the dispatcher, with autograd, in two flavours.

- Eager calls go through ``_AttentionFunction`` (an ``autograd.Function``): no operator
  registry in the way, so a warm call is the dispatcher's dictionary lookup plus the launch.
- Under ``torch.compile`` the same work is the custom op ``fa2dispatch::attention_forward``
  (``torch.library``) with a fake implementation and registered autograd, so a model that
  calls ``attention`` traces with ``fullgraph=True``.

Both flavours call ``run_decision`` (through ``run_forward``) and ``run_backward``, the only
places a backend is invoked, and where a run-time failure falls back to the next candidate.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from fa2dispatch.dispatch import Decision, decide, record_failure
from fa2dispatch.problem import AttentionProblem, make_problem


# ``choice`` is the caller's backend request already resolved against the use_backend context
# (dispatch.requested_backend), so the backward runs where the forward ran even if the context
# has changed in between.


def _simulated_error(decision: Decision) -> RuntimeError:
    return RuntimeError(
        f"FA2DISPATCH_SIMULATE is set: the dispatcher plans for a simulated {decision.device.name} "
        f"[{decision.device.arch}], where no kernel can run. Use fa2dispatch.explain(...) or "
        "`fa2dispatch report` to plan; unset FA2DISPATCH_SIMULATE to compute."
    )


def run_forward(problem: AttentionProblem, q, k, v, choice: str, features=None):
    """(out, lse, the Decision that ran). On a run-time failure the next candidate runs."""
    return run_decision(decide(problem, choice), problem, q, k, v, choice, features=features)


def _extra(fp8_args, features) -> dict:
    """Keyword arguments beyond the plain interface, only when given: ``fp8_args``
    (``fa2dispatch.fp8.FP8Args``, the descales of an fp8 call) and ``features``
    (``fa2dispatch.features.FeatureArgs``: ALiBi slopes, dropout RNG state, cu_seqlens). A
    backend that takes neither keeps the plain interface; dispatch never sends a call with
    features to a backend whose capability data lacks them."""
    extra = {}
    if fp8_args is not None:
        extra["fp8_args"] = fp8_args
    if features is not None:
        extra["features"] = features
    return extra


def run_decision(decision: Decision, problem: AttentionProblem, q, k, v, choice: str, fp8_args=None,
                 features=None):
    """``run_forward`` for a decision already made."""
    if decision.device.simulated:
        raise _simulated_error(decision)
    extra = _extra(fp8_args, features)
    while True:
        try:
            out, lse = decision.backend.forward(problem, q, k, v, decision.config, **extra)
            return out, lse, decision
        except Exception as exc:
            replacement = record_failure(decision, choice, "forward", exc)
            if replacement is None:
                raise
            decision = replacement


def run_backward(decision: Decision, problem: AttentionProblem, dout, dlse, q, k, v, out, lse, choice: str,
                 features=None):
    """(dq, dk, dv) on the backend whose forward produced ``out`` and ``lse``. On a run-time
    failure, the next candidate that can take another backend's forward residuals runs."""
    if dout is None:
        dout = torch.zeros_like(out)
    extra = _extra(None, features)
    while True:
        try:
            return decision.backend.backward(problem, dout, q, k, v, out, lse, decision.config, dlse=dlse, **extra)
        except Exception as exc:
            replacement = record_failure(decision, choice, "backward", exc, needs_foreign_lse=True)
            if replacement is None:
                raise
            decision = replacement


class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, problem: AttentionProblem, backend: str, decision: Decision, features=None):
        out, lse, decision = run_decision(decision, problem, q, k, v, backend, features=features)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.problem, ctx.backend, ctx.decision, ctx.features = problem, backend, decision, features
        ctx.set_materialize_grads(False)  # an unused lse gets None, not a tensor of zeros to subtract
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = run_backward(ctx.decision, ctx.problem, dout, dlse, q, k, v, out, lse, ctx.backend,
                                  ctx.features)
        return dq, dk, dv, None, None, None, None


def attention_eager(q, k, v, problem: AttentionProblem, backend: str, decision: Decision, fp8_args=None,
                    features=None):
    """An eager call with the decision already made (api._prepare): with autograd when the
    problem has gradients, else the forward alone. fp8 problems never have gradients
    (validation refuses them), so ``fp8_args`` only reaches the forward."""
    if problem.requires_grad:
        return _AttentionFunction.apply(q, k, v, problem, backend, decision, features)
    out, lse, _ = run_decision(decision, problem, q, k, v, backend, fp8_args, features)
    return out, lse


# ------------------------------------------------------------------ torch.library custom op


def _problem(q, k, v, causal: bool, softmax_scale: float, layout: str, needs_grad: bool,
             return_lse: bool, window: list[int], softcap: float, alibi_slopes, causal_alignment: str,
             deterministic: bool) -> AttentionProblem:
    problem = make_problem(q, k, v, causal=causal, softmax_scale=softmax_scale, layout=layout, return_lse=return_lse,
                           window_size=tuple(window), softcap=softcap, alibi_slopes=alibi_slopes,
                           causal_alignment=causal_alignment, deterministic=deterministic)
    if problem.requires_grad != needs_grad:  # inside the op autograd is off; keep the caller's view
        problem = replace(problem, requires_grad=needs_grad)
    return problem


@torch.library.custom_op("fa2dispatch::attention_forward", mutates_args=())
def attention_forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    causal: bool, softmax_scale: float, layout: str, backend: str, needs_grad: bool, return_lse: bool,
    window: list[int], softcap: float, alibi_slopes: torch.Tensor | None, causal_alignment: str, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    problem = _problem(q, k, v, causal, softmax_scale, layout, needs_grad, return_lse, window, softcap, alibi_slopes,
                       causal_alignment, deterministic)
    out, lse, _ = run_forward(problem, q, k, v, backend, _op_features(problem, alibi_slopes))
    return out, lse


def _op_features(problem: AttentionProblem, alibi_slopes):
    from fa2dispatch.features import FeatureArgs

    return FeatureArgs(alibi_slopes) if problem.alibi else None


# The custom op carries no fp8 arguments (descales, out_dtype, v_layout): fp8 calls under
# torch.compile are refused in api.attention with a NotImplementedError that says so.


@attention_forward_op.register_fake
def _(q, k, v, causal, softmax_scale, layout, backend, needs_grad, return_lse, window, softcap, alibi_slopes,
      causal_alignment, deterministic):
    B, H, Mq = (q.shape[0], q.shape[2], q.shape[1]) if layout == "bshd" else q.shape[:3]
    return q.new_empty(q.shape), q.new_empty((B, H, Mq), dtype=torch.float32)


@torch.library.custom_op("fa2dispatch::attention_backward", mutates_args=())
def attention_backward_op(
    dout: torch.Tensor, dlse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor,
    causal: bool, softmax_scale: float, layout: str, backend: str, return_lse: bool,
    window: list[int], softcap: float, alibi_slopes: torch.Tensor | None, causal_alignment: str, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    problem = _problem(q, k, v, causal, softmax_scale, layout, True, return_lse, window, softcap, alibi_slopes,
                       causal_alignment, deterministic)
    # The decision memo holds the backend the forward ran on (a fallback updates it).
    return run_backward(decide(problem, backend), problem, dout, dlse, q, k, v, out, lse, backend,
                        _op_features(problem, alibi_slopes))


@attention_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, causal, softmax_scale, layout, backend, return_lse, window, softcap,
      alibi_slopes, causal_alignment, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, softmax_scale, layout, backend, _, return_lse, window, softcap, alibi_slopes, alignment, det = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes)
    ctx.args = (causal, softmax_scale, layout, backend, return_lse, window, softcap)
    ctx.tail = (alignment, det)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, alibi_slopes = ctx.saved_tensors
    # The op's schema takes tensors, so an unused output's gradient arrives as zeros.
    dout = torch.zeros_like(out) if dout is None else dout
    dlse = torch.zeros_like(lse) if dlse is None else dlse
    dq, dk, dv = attention_backward_op(dout, dlse, q, k, v, out, lse, *ctx.args, alibi_slopes, *ctx.tail)
    return (dq, dk, dv) + (None,) * 11


attention_forward_op.register_autograd(_backward, setup_context=_setup_context)
