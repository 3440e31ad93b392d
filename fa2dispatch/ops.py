"""Raw ops: forward and backward through the dispatcher, with autograd, in two flavours.

- Eager calls go through ``_AttentionFunction`` (an ``autograd.Function``): no operator
  registry in the way, so a warm call is the dispatcher's dictionary lookup plus the launch.
- Under ``torch.compile`` the same work is the custom op ``fa2dispatch::attention_forward``
  (``torch.library``) with a fake implementation and registered autograd, so a model that
  calls ``attention`` traces with ``fullgraph=True``.

Both flavours call ``run_forward`` / ``run_backward``, the only place a backend is invoked.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from fa2dispatch.dispatch import decide
from fa2dispatch.problem import AttentionProblem, make_problem


# ``choice`` is the caller's backend request already resolved against the use_backend context
# and the environment (dispatch.requested_backend), so the backward runs where the forward
# ran even if the context has changed in between.


def run_forward(problem: AttentionProblem, q, k, v, choice: str):
    decision = decide(problem, choice)
    return decision.backend.forward(problem, q, k, v, decision.config)


def run_backward(problem: AttentionProblem, dout, dlse, q, k, v, out, lse, choice: str):
    decision = decide(problem, choice)
    if dout is None:
        dout = torch.zeros_like(out)
    return decision.backend.backward(problem, dout, q, k, v, out, lse, decision.config, dlse=dlse)


class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, problem: AttentionProblem, backend: str):
        out, lse = run_forward(problem, q, k, v, backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.problem, ctx.backend = problem, backend
        ctx.set_materialize_grads(False)  # an unused lse gets None, not a tensor of zeros to subtract
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = run_backward(ctx.problem, dout, dlse, q, k, v, out, lse, ctx.backend)
        return dq, dk, dv, None, None


def attention_eager(q, k, v, problem: AttentionProblem, backend: str):
    if problem.requires_grad:
        return _AttentionFunction.apply(q, k, v, problem, backend)
    return run_forward(problem, q, k, v, backend)


# ------------------------------------------------------------------ torch.library custom op


def _problem(q, k, v, causal: bool, softmax_scale: float, layout: str, needs_grad: bool) -> AttentionProblem:
    problem = make_problem(q, k, v, causal=causal, softmax_scale=softmax_scale, layout=layout)
    if problem.requires_grad != needs_grad:  # inside the op autograd is off; keep the caller's view
        problem = replace(problem, requires_grad=needs_grad)
    return problem


@torch.library.custom_op("fa2dispatch::attention_forward", mutates_args=())
def attention_forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    causal: bool, softmax_scale: float, layout: str, backend: str, needs_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    problem = _problem(q, k, v, causal, softmax_scale, layout, needs_grad)
    return run_forward(problem, q, k, v, backend)


@attention_forward_op.register_fake
def _(q, k, v, causal, softmax_scale, layout, backend, needs_grad):
    B, H, Mq = (q.shape[0], q.shape[2], q.shape[1]) if layout == "bshd" else q.shape[:3]
    return q.new_empty(q.shape), q.new_empty((B, H, Mq), dtype=torch.float32)


@torch.library.custom_op("fa2dispatch::attention_backward", mutates_args=())
def attention_backward_op(
    dout: torch.Tensor, dlse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor,
    causal: bool, softmax_scale: float, layout: str, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    problem = _problem(q, k, v, causal, softmax_scale, layout, True)
    return run_backward(problem, dout, dlse, q, k, v, out, lse, backend)


@attention_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, causal, softmax_scale, layout, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, softmax_scale, layout, backend, _ = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (causal, softmax_scale, layout, backend)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    # The op's schema takes tensors, so an unused output's gradient arrives as zeros.
    dout = torch.zeros_like(out) if dout is None else dout
    dlse = torch.zeros_like(lse) if dlse is None else dlse
    dq, dk, dv = attention_backward_op(dout, dlse, q, k, v, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


attention_forward_op.register_autograd(_backward, setup_context=_setup_context)
