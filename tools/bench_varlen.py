#!/usr/bin/env python3
"""attention_varlen against dense attention at the same total tokens, per backend (issue 8:
"varlen at the same total tokens within 10% of the dense speed").

16k tokens in total, H=16, D=128, sequences of S tokens each (B = total / S), packed for varlen
and as a (B, S, H, D) batch for dense. Per (dtype, S, causal, pass): dense ``fa2dispatch.attention``
with the dispatcher's choice (its backend is printed), then ``attention_varlen`` with the
dispatcher's choice ("auto") and pinned to each backend that declares varlen; a backend that
refuses the call prints its reason. ``--unequal`` adds packs of random lengths (the same total,
the longest S) where only varlen applies, against the dense batch of S.

Every timing is fa2dispatch.autotune.timer.CudaTimer (warm-up, L2 flushed before each run,
median between device events). "fwd+bwd" times the forward and ``torch.autograd.backward``.

    python tools/bench_varlen.py --out varlen.json
    python tools/bench_varlen.py --dtypes float16 --seqlens 512,4096 --passes fwd
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

TOTAL, H, D = 16384, 16, 128
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
VARLEN_BACKENDS = ("auto", "triton", "torch-sdpa-cudnn", "torch-sdpa-flash")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _call(fn, grad: bool, dout):
    import torch

    def run():
        out = fn()
        if grad:
            torch.autograd.backward(out, dout)

    return run


def _host_ms(run, calls: int = 10) -> float:
    """Median host time of one call from an idle queue (synchronised before each): Python, checks
    and launches. CudaTimer's flush runs ahead of each timed call, so host time up to the
    flush's length is hidden; a call whose host time is longer is timed partly idle."""
    import statistics
    import time

    import torch

    samples = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(samples)


def lengths_for(total: int, longest: int, unequal: bool, seed: int = 0) -> list[int]:
    """Equal lengths S, or random lengths in [S/4, S] (the first one S) summing to ``total``."""
    if not unequal:
        return [longest] * (total // longest)
    import random

    rnd = random.Random(seed)
    lens, left = [longest], total - longest
    while left > 0:
        n = min(left, rnd.randint(max(1, longest // 4), longest))
        lens.append(n)
        left -= n
    return lens


def rows_for(timer, dtype, seqlen: int, causal: bool, grad: bool, unequal: bool) -> list[dict]:
    import torch

    import fa2dispatch
    from fa2dispatch.dispatch import decide
    from fa2dispatch.varlen import make_varlen_problem, runs_as_dense

    lens = lengths_for(TOTAL, seqlen, unequal)
    B = TOTAL // seqlen
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(TOTAL, H, D, device="cuda", dtype=dtype, generator=g) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(grad)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    qd, kd, vd = (t.detach().reshape(B, seqlen, H, D).requires_grad_(grad) for t in (q, k, v))
    dense_fn = functools.partial(fa2dispatch.attention, qd, kd, vd, causal=causal)
    dense = timer(_call(dense_fn, grad, dout.reshape(B, seqlen, H, D)))
    dense_backend = fa2dispatch.explain(qd, kd, vd, causal=causal).backend.name
    base = {"dtype": str(dtype).removeprefix("torch."), "S": seqlen, "B": len(lens), "causal": causal,
            "pass": "fwd+bwd" if grad else "fwd", "lengths": "unequal" if unequal else "equal",
            "dense_backend": dense_backend, "dense_ms": dense.ms,
            "dense_host_ms": _host_ms(_call(dense_fn, grad, dout.reshape(B, seqlen, H, D)))}
    rows = []
    for backend in VARLEN_BACKENDS:
        row = dict(base, varlen_backend=backend, varlen_ms=None, ratio=None, note="")
        try:
            with torch.set_grad_enabled(grad):
                problem = make_varlen_problem(q, k, v, cu, cu, max(lens), max(lens), causal=causal)
            if backend == "auto" and runs_as_dense(problem, q.shape[0], k.shape[0]):
                chosen = f"dense:{dense_backend}"  # a uniform pack runs as the dense call (varlen.runs_as_dense)
            else:
                chosen = decide(problem, backend).backend.name
            row["ran_on"] = chosen
            fn = functools.partial(fa2dispatch.attention_varlen, q, k, v, cu, cu, max(lens), max(lens),
                                   causal=causal, backend=backend)
            t = timer(_call(fn, grad, dout))
            row.update(varlen_ms=t.ms, ratio=t.ms / dense.ms, host_ms=_host_ms(_call(fn, grad, dout)))
        except Exception as exc:  # a refused or failing backend is a row with its reason
            row["note"] = _first_line(exc)
        rows.append(row)
        ratio = f"{row['ratio']:.3f}" if row["ratio"] is not None else "-"
        ms = f"{row['varlen_ms'] * 1e3:9.1f}" if row["varlen_ms"] is not None else "        -"
        host = f" host {row['host_ms'] * 1e3:6.1f} (dense {base['dense_host_ms'] * 1e3:6.1f})" if row.get("host_ms") else ""
        print(f"{base['dtype']:>8} S={seqlen:>5} {'causal' if causal else 'full':>6} {base['pass']:>7} "
              f"{base['lengths']:>7} dense[{dense_backend}] {dense.ms * 1e3:8.1f} us | {backend}"
              f"{'->' + row.get('ran_on', '?') if backend == 'auto' else ''} {ms} us x{ratio}{host} "
              f"{row['note'][:100]}", flush=True)
    return rows


def _profile(dtype, seqlen: int, calls: int = 200) -> int:
    import cProfile
    import pstats

    import torch

    import fa2dispatch

    lens = lengths_for(TOTAL, seqlen, True)
    q, k, v = (torch.randn(TOTAL, H, D, device="cuda", dtype=dtype) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")

    def run():
        return fa2dispatch.attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=True, backend="triton")

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        run()
        torch.cuda.synchronize()
    prof.disable()
    print(f"cProfile of {calls} calls (each followed by a synchronize), S={seqlen} unequal causal {dtype}")
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--seqlens", default=",".join(map(str, SEQLENS)))
    parser.add_argument("--passes", default="fwd,fwd+bwd")
    parser.add_argument("--causal", default="false,true")
    parser.add_argument("--unequal", action="store_true", help="also packs of random lengths")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--profile", action="store_true",
                        help="only cProfile the host side of attention_varlen (backend triton, the first dtype "
                             "and seqlen, unequal lengths, causal): where its host time goes")
    args = parser.parse_args(argv)

    import torch

    from fa2dispatch.autotune.timer import CudaTimer

    if not torch.cuda.is_available():
        print("bench_varlen: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.profile:
        return _profile(getattr(torch, args.dtypes.split(",")[0]), int(args.seqlens.split(",")[0]))
    timer = CudaTimer(runs=args.runs)
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__} cuDNN {torch.backends.cudnn.version()}; "
          f"total tokens {TOTAL}, H={H}, D={D}", flush=True)
    rows = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        for grad in ("fwd+bwd" == p for p in args.passes.split(",")):
            for causal in (c == "true" for c in args.causal.split(",")):
                for seqlen in map(int, args.seqlens.split(",")):
                    for unequal in (False, True) if args.unequal else (False,):
                        if unequal and seqlen == TOTAL:
                            continue
                        rows += rows_for(timer, dtype, seqlen, causal, grad, unequal)
                        if args.out:  # after every group: a run cut short keeps what it measured
                            with open(args.out, "w") as f:
                                json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                           "cudnn": torch.backends.cudnn.version(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
