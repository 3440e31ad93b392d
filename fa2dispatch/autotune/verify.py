"""The accuracy rule (STYLE.md) and the check every autotune winner passes before it is stored.

Rule: ``max|ours - truth| <= 2 * max|torch_lowprec - truth| + floor``, truth being
``attention_math`` in float64, torch_lowprec the same math in the input's precision, and the
floor 8 float32 ulps of the largest quantity the call produces. Where PyTorch's float32 math
is exact by structure (one key: dq is exactly 0) our float32 accumulation along another path
still leaves a few ulps (measured 4.1 ulps at Mkv=1, D=136); 8 keeps a 2x margin. The tests
use the same function.
"""

from __future__ import annotations

import torch

from fa2dispatch.backends import BACKENDS, Config
from fa2dispatch.backends.reference import attention_math
from fa2dispatch.problem import AttentionProblem

FLOOR_ULPS = 8
EPS32 = torch.finfo(torch.float32).eps
VERIFY_MAX_LEN = 384  # the check runs the config at a reduced size of the same kind


def within_tolerance(ours: torch.Tensor, truth: torch.Tensor, lowprec: torch.Tensor,
                     magnitude: float | None = None) -> tuple[bool, float, float]:
    """(ok, our max error, the bound). NaN in ``ours`` is never ok."""
    if torch.isnan(ours).any():
        return False, float("nan"), 0.0
    err = (ours.double() - truth.double()).abs().max().item() if ours.numel() else 0.0
    err_pt = (lowprec.double() - truth.double()).abs().max().item() if ours.numel() else 0.0
    if magnitude is None:
        magnitude = truth.abs().max().item() if truth.numel() else 0.0
    bound = 2 * err_pt + FLOOR_ULPS * EPS32 * max(1.0, magnitude)
    return err <= bound, err, bound


def reduced(problem: AttentionProblem) -> AttentionProblem:
    """The same kind of problem (dtype, D, causal, GQA ratio, Mq:Mkv ratio) small enough for a
    float64 reference: lengths scaled down to at most VERIFY_MAX_LEN, two key/value heads."""
    scale = min(1.0, VERIFY_MAX_LEN / max(problem.Mq, problem.Mkv))
    return AttentionProblem(
        B=1, H=2 * problem.group, Hkv=2, Mq=max(1, round(problem.Mq * scale)), Mkv=max(1, round(problem.Mkv * scale)),
        D=problem.D, dtype=problem.dtype, device=problem.device, layout=problem.layout, causal=problem.causal,
        softmax_scale=problem.softmax_scale, requires_grad=problem.requires_grad, return_lse=problem.return_lse)


def verify(backend_name: str, config: Config | None, problem: AttentionProblem, seed: int = 0) -> str | None:
    """None if the backend with this config computes a reduced problem of this kind within the
    rule (forward, and backward when the problem has gradients); otherwise what was wrong.
    Calls with FlashAttention-2's features (windows, ALiBi, dropout, varlen ...) are not tuned:
    their per-call data (slopes, seeds, cu_seqlens) has no stand-in here yet, so a timing
    would measure another kernel; they run with the backend's default config."""
    if problem.feature_names:
        return f"feature calls ({', '.join(problem.feature_names)}) are not autotuned; they use the default config"
    small = reduced(problem)
    backend = BACKENDS[backend_name]
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(heads: int, m: int) -> torch.Tensor:
        shape = (small.B, m, heads, small.D) if small.layout == "bshd" else (small.B, heads, m, small.D)
        return torch.randn(shape, generator=gen).to(device=small.device, dtype=small.dtype)

    q, k, v, dout = rand(small.H, small.Mq), rand(small.Hkv, small.Mkv), rand(small.Hkv, small.Mkv), rand(
        small.H, small.Mq)
    out, lse = backend.forward(small, q, k, v, config)
    results = {"out": out}
    if small.requires_grad:
        results.update(zip(("dq", "dk", "dv"), backend.backward(small, dout, q, k, v, out, lse, config)))
    truth = _math(small, q, k, v, dout, torch.float64)
    low = _math(small, q, k, v, dout, small.dtype if small.dtype != torch.float32 else torch.float32)
    magnitude = max(t.abs().max().item() for t in truth.values())
    for name, ours in results.items():
        ok, err, bound = within_tolerance(ours, truth[name], low[name], magnitude)
        if not ok:
            return f"{name}: max error {err:.3e} > bound {bound:.3e} at {small.describe()}"
    return None


def _math(problem: AttentionProblem, q, k, v, dout, dtype) -> dict[str, torch.Tensor]:
    leaves = [t.detach().to(dtype).requires_grad_(problem.requires_grad) for t in (q, k, v)]
    with torch.enable_grad():
        out, _ = attention_math(*leaves, causal=problem.causal, softmax_scale=problem.softmax_scale,
                                layout=problem.layout, compute_dtype=dtype)
        result = {"out": out}
        if problem.requires_grad:
            result.update(zip(("dq", "dk", "dv"), torch.autograd.grad(out, leaves, dout.to(dtype))))
    return result
