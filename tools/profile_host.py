"""Where the host time of a dense ``fa2dispatch.attention`` call goes, forward and backward.

bench.py's ``host_us`` column showed 0.8-2.3 ms of host time per backward call of ours against
0.3-0.9 ms for cuDNN's (session 11). A call whose host time passes the timer's L2 flush
(~90 us) is timed partly as idle GPU, so that time is part of the benchmark's number. This
script times each pass from an idle queue (median of ``--calls``, synchronised before each) and
prints cProfile's top entries for each, on the GPU:

    python3 tools/profile_host.py --seqlen 1024 --head-dim 128 --backend auto

``--breakdown`` (forward only) splits one call's host time into layers, each timed on its own
from an idle queue and back to back: the whole ``attention`` call; the backend's ``forward``
as the dispatcher called it (its checks, descriptors, allocations and launch); the Gluon
launcher it called (``launch_gluon.run_pingpong`` or ``run_forward``), if any; the last
``fast_launch.launch`` it made, replayed (the cache key over every argument, then the
launcher); the compiled kernel's launcher alone (``kernel.run``: packing the arguments and
encoding any TMA descriptors, then the driver); and one plain torch kernel launch for scale.
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
    ap.add_argument("--breakdown", action="store_true",
                    help="forward only: the host time of each layer of the call (module docstring)")
    args = ap.parse_args(argv)
    if args.calls < 1:
        ap.error(f"--calls {args.calls}: at least 1")
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

    if args.breakdown:  # as bench.py's forward rows call it: inputs without gradients
        qd, kd, vd = (t.detach() for t in (q, k, v))
        return breakdown(lambda: fa2dispatch.attention(qd, kd, vd, causal=args.causal, layout="bhsd",
                                                       backend=args.backend), args.calls)

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


def host_times(fn, calls: int, sync) -> tuple[float, float]:
    """(median us from an idle queue, mean us back to back) of ``fn``'s host time; ``sync``
    waits for the device."""
    idle = []
    for _ in range(calls):
        sync()
        t0 = time.perf_counter()
        fn()
        idle.append(time.perf_counter() - t0)
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    back = time.perf_counter() - t0
    sync()
    return statistics.median(idle) * 1e6, back / calls * 1e6


def breakdown(fwd, calls: int, device: str = "cuda") -> int:
    """Time each layer of ``fwd`` (a forward ``attention`` call) on the host; see the module
    docstring. Layers the call does not go through (a backend without ``fast_launch``) are
    left out. ``device`` "cpu" only for tests (no sync, the layers' wiring)."""
    import torch
    from fa2dispatch.backends import BACKENDS
    from fa2dispatch.backends.triton_fa2 import fast_launch, launch_gluon

    launches, forwards, runs = [], [], []
    gluon_runs = {name: getattr(launch_gluon, name) for name in ("run_pingpong", "run_forward")}
    real = fast_launch.launch
    fast_launch.launch = lambda *a: launches.append(a) or real(*a)

    def spy(call, seen):
        return lambda *a, **kw: seen.append((call, a, kw)) or call(*a, **kw)

    for backend in BACKENDS.values():  # an instance attribute over the class's method, removed below
        backend.forward = spy(backend.forward, forwards)
    for name, run in gluon_runs.items():  # the Gluon launchers, as the backend looks them up
        setattr(launch_gluon, name, spy(run, runs))
    try:
        for _ in range(3):
            fwd()
    finally:
        fast_launch.launch = real
        for backend in BACKENDS.values():
            del backend.forward
        for name, run in gluon_runs.items():
            setattr(launch_gluon, name, run)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    x = torch.zeros(1, device=device)
    rows = [("attention (the whole call)", fwd)]
    if forwards:
        forward, a, kw = forwards[-1]
        rows.append((f"{forward.__self__.name}.forward: the backend's own layer", lambda: forward(*a, **kw)))
    if runs:
        run, run_a, run_kw = runs[-1]
        rows.append((f"launch_gluon.{run.__name__}: descriptors, allocations, launch", lambda: run(*run_a, **run_kw)))
    if launches:
        fn, grid, kargs, meta, kernels = launches[-1]
        rows.append((f"fast_launch.launch({fn.fn.__name__}, {len(kargs)} args): key + launcher",
                     lambda: real(*launches[-1])))
        device, stream = fast_launch._device_and_stream()
        found = kernels.get((fn.fn.__name__, device, tuple(fast_launch._arg_key(a) for a in kargs),
                             tuple(meta.items())))
        if fast_launch.FAST_LAUNCH and found is not None:
            kernel, tail = found
            g = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
            rows.append(("kernel.run: the launcher alone", lambda: kernel.run(
                *g, stream, kernel.function, kernel.packed_metadata, None, None, None, *kargs, *tail)))
        else:
            print(f"(the fast path was not taken: {fast_launch.REFUSED or 'no compiled kernel kept'})")
    rows.append(("one torch kernel (x.add_(1)), for scale", lambda: x.add_(1)))
    print(f"host us per call ({calls} calls): median from an idle queue | mean back to back")
    for name, call in rows:
        idle, back = host_times(call, calls, sync)
        print(f"  {idle:8.1f} | {back:8.1f}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
