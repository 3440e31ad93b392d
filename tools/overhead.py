"""Dispatch overhead: the warm ``fa2dispatch.attention`` call against launching the same kernel
directly (``tools/bench.py --overhead``).

Shapes are tiny and decode-like, so a call is bound by the host (Python, the launcher), not by
the GPU: per-call wall time then measures host work. "direct" is the backend's own launcher
(``Backend.forward`` with a problem and config built beforehand: output allocation, strides,
the kernel launch), which is what calling the kernel yourself costs; "api" is
``fa2dispatch.attention`` with the backend named, "auto" the same call left to the dispatcher
(compared with the direct launch of whichever backend it picks). Rounds alternate direct and
API so drift hits both; the overhead is the median over rounds of (API - direct) within a
round, with the garbage collector off while timing.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Any, Callable

# (label, B, H, Hkv, Mq, Mkv, D, dtype, causal)
SHAPES = [
    ("decode 1x8 Mkv=128 d64", 1, 8, 8, 1, 128, 64, "float16", False),
    ("decode GQA 4x32/8 Mkv=512 d128", 4, 32, 8, 1, 512, 128, "bfloat16", True),
    ("prefill 1x16 M=128 d64 causal", 1, 16, 16, 128, 128, 64, "float16", True),
]
BACKENDS = ("triton", "torch-sdpa-flash", "torch-sdpa-cudnn", "torch-sdpa-efficient")
CALLS, ROUNDS = 1000, 15


def _per_call_us(fn: Callable[[], Any], calls: int) -> float:
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def _compare(direct: Callable, api: Callable) -> tuple[float, float, float]:
    """(direct us/call, API us/call, overhead us/call), medians over rounds."""
    for _ in range(3):  # warm-up: compilation, memo, allocator
        direct()
        api()
    d, a = [], []
    gc.disable()
    try:
        for _ in range(ROUNDS):
            d.append(_per_call_us(direct, CALLS))
            a.append(_per_call_us(api, CALLS))
    finally:
        gc.enable()
    return statistics.median(d), statistics.median(a), statistics.median(y - x for x, y in zip(d, a))


def measure() -> list[dict]:
    import torch

    import fa2dispatch
    from fa2dispatch import dispatch
    from fa2dispatch.backends import BACKENDS as REGISTRY
    from fa2dispatch.problem import make_problem

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for label, B, H, Hkv, Mq, Mkv, D, dtype_name, causal in SHAPES:
        dtype = getattr(torch, dtype_name)
        q = torch.randn(B, Mq, H, D, device="cuda", dtype=dtype, generator=gen)
        k = torch.randn(B, Mkv, Hkv, D, device="cuda", dtype=dtype, generator=gen)
        v = torch.randn(B, Mkv, Hkv, D, device="cuda", dtype=dtype, generator=gen)
        problem = make_problem(q, k, v, causal=causal)
        auto = dispatch.select(problem)
        for name in (*BACKENDS, "auto"):
            backend_name = auto.backend.name if name == "auto" else name
            reasons = REGISTRY[backend_name].not_supported_reasons(problem, auto.device)
            row = {"shape": label, "path": name, "backend": backend_name}
            if reasons:
                rows.append({**row, "skipped": "; ".join(reasons)})
                continue
            decision = auto if name == "auto" else dispatch.select(problem, name)
            backend, config = decision.backend, decision.config

            def direct(backend=backend, config=config):
                return backend.forward(problem, q, k, v, config)

            def api(name=name):
                return fa2dispatch.attention(q, k, v, causal=causal, backend=name)

            try:
                direct_us, api_us, overhead_us = _compare(direct, api)
            except Exception as exc:  # one backend failing must not hide the others
                rows.append({**row, "skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
                continue
            rows.append({**row, "direct_us": direct_us, "api_us": api_us, "overhead_us": overhead_us})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| shape | path | backend | direct us/call | api us/call | overhead us |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['shape']} | {r['path']} | {r['backend']} | - | - | skipped: {r['skipped']} |")
        else:
            lines.append(f"| {r['shape']} | {r['path']} | {r['backend']} | {r['direct_us']:.1f} | "
                         f"{r['api_us']:.1f} | {r['overhead_us']:+.1f} |")
    return "\n".join(lines)
