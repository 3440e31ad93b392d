"""Probe the Triton CPU interpreter for the fp32 -> e4m3 cast defect that makes fp8 results wrong.

Known upstream defect (triton-lang/triton#8322; the fix is triton#11897): the interpreter's
``_convert_float`` rounds ties away from zero, drops the carry when rounding overflows the
mantissa (126.24 -> e4m3 gives 64, not 128) and rounds subnormal results twice. The kernel
casts P to e4m3, so the backend refuses fp8 under an interpreter that shows it, with the
reason, rather than return wrong numbers. A fixed Triton (or a harness that patches the
interpreter, tests/interpreter_fixes.py) passes the probe and gets fp8 with no code change.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# A tie (1 + 2^-4 between 1 and 1.125), a carry into the exponent (126.24 -> 128), a subnormal
# (3 * 2^-10 -> 2^-8, a tie rounded to even) and ordinary values.
PROBE_VALUES = (1.0625, 126.24, 3 * 2.0**-10, 0.3, -17.5, 2.0**-9, 200.0, 1.0)


@triton.jit
def _probe_kernel(X, Y, N: tl.constexpr):
    r = tl.arange(0, N)
    tl.store(Y + r, tl.load(X + r).to(tl.float8e4nv))


@functools.lru_cache(maxsize=1)
def fp8_defects() -> tuple[str, ...]:
    """Reasons fp8 is wrong under this interpreter; empty when it casts correctly."""
    x = torch.tensor(PROBE_VALUES, dtype=torch.float32)
    y = torch.empty(len(PROBE_VALUES), dtype=torch.float8_e4m3fn)
    _probe_kernel[(1,)](x, y, N=len(PROBE_VALUES))
    if not torch.equal(y.view(torch.uint8), x.to(torch.float8_e4m3fn).view(torch.uint8)):
        return ("dtype=float8_e4m3fn: the Triton interpreter rounds fp32->fp8 casts wrongly (triton#8322)",)
    return ()
