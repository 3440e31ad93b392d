"""Where the host time of a dense ``fa2dispatch.attention`` call goes, forward and backward.

bench.py's ``host_us`` column showed 0.8-2.3 ms of host time per backward call of ours against
0.3-0.9 ms for cuDNN's (session 11). A call whose host time passes the timer's L2 flush
(~90 us) is timed partly as idle GPU, so that time is part of the benchmark's number. This
script times each pass from an idle queue (median of ``--calls``, synchronised before each) and
prints cProfile's top entries for each, on the GPU:

    python3 tools/profile_host.py --seqlen 1024 --head-dim 128 --backend auto
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time


def main(argv=None) -> int:
    import torch

    import fa2dispatch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--top", type=int, default=22)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_host: needs a GPU (host time of real launches)")
        return 2
    S, D = args.seqlen, args.head_dim
    B, H = 16384 // S, 2048 // D  # bench.py's cases: 16k tokens, hidden 2048
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, S, D, generator=g, device="cuda", dtype=torch.float16) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)

    def fwd():
        return fa2dispatch.attention(q, k, v, causal=args.causal, layout="bhsd", backend=args.backend)

    out = fwd()
    print(f"B={B} H={H} S={S} D={D} causal={args.causal} backend={args.backend}")
    print(fa2dispatch.explain(q, k, v, causal=args.causal, layout="bhsd", backend=args.backend))

    def bwd():
        for t in (q, k, v):
            t.grad = None
        out.backward(dout, retain_graph=True)

    for name, fn in (("forward", fwd), ("backward", bwd)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.calls):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        print(f"== {name}: host us per call from an idle queue, median {statistics.median(times) * 1e6:.1f}, "
              f"min {min(times) * 1e6:.1f}")
        prof = cProfile.Profile()
        for _ in range(args.calls):
            torch.cuda.synchronize()
            prof.enable()
            fn()
            prof.disable()
        torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
