"""Probe the Triton CPU interpreter for the defects that would make bf16 results wrong.

Known upstream defects (triton-lang/triton): #11584, ``tl.dot`` on bf16 multiplies the raw
bit patterns; #8322, fp32 -> bf16 casts truncate instead of rounding to nearest even. The
backend refuses bf16 under an interpreter that shows either, with the reason, rather than
return wrong numbers. A fixed Triton (or a harness that patches the interpreter) passes the
probe and gets bf16 back with no code change here.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _probe_kernel(A, B, C, X, Y, N: tl.constexpr):
    r = tl.arange(0, N)
    a = tl.load(A + r[:, None] * N + r[None, :])
    b = tl.load(B + r[:, None] * N + r[None, :])
    tl.store(C + r[:, None] * N + r[None, :], tl.dot(a, b))
    tl.store(Y + r, tl.load(X + r).to(tl.bfloat16))


@functools.lru_cache(maxsize=1)
def bf16_defects() -> tuple[str, ...]:
    """Reasons bf16 is wrong under this interpreter; empty when it computes correctly."""
    n = 16
    a = torch.arange(n * n, dtype=torch.float32).reshape(n, n).remainder(5).sub(2).to(torch.bfloat16)
    b = a.t().contiguous()
    c = torch.empty(n, n, dtype=torch.float32)
    # 1 + 2^-8 + 2^-10 lies past the midpoint between the bf16 neighbours 1 and 1 + 2^-7.
    x = torch.full((n,), 1.0 + 2**-8 + 2**-10, dtype=torch.float32)
    y = torch.empty(n, dtype=torch.bfloat16)
    _probe_kernel[(1,)](a, b, c, x, y, N=n)
    reasons = []
    if not torch.equal(c, a.float() @ b.float()):
        reasons.append("the Triton interpreter computes bf16 tl.dot on raw bits (triton#11584)")
    if not torch.equal(y, x.to(torch.bfloat16)):
        reasons.append("the Triton interpreter truncates fp32->bf16 casts (triton#8322)")
    return tuple(reasons)
