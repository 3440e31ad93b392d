"""Where the GPU time of a dense backward goes, kernel by kernel: ours against cuDNN's.

Issue 7's backward is 0.73-1.02x cuDNN (session 13). The Gluon dK/dV kernel tied the plain one
except in GQA causal S=1k, so the gap is somewhere else: the preprocess (delta = rowsum(dO * O)),
the dQ kernel, or time between the launches. This script runs the backward of one BENCH_PROTOCOL
shape (16k tokens, hidden 2048, bhsd, fp16) ``--calls`` times under ``torch.profiler`` for each
provider and prints every GPU kernel that ran inside ``backward()``: its name, launches per
call, and GPU time per call. The last row is the span from the first kernel's start to the last
one's end, per call, so gaps between kernels show as span minus the kernels' sum:

    python3 tools/profile_bwd.py --seqlen 4096 --head-dim 128 --causal --json /tmp/bwd.json

``ours`` is ``fa2dispatch.attention(..., backend="triton")`` (the shipped tuned config);
``cudnn`` is PyTorch SDPA pinned to CUDNN_ATTENTION. Needs a CUDA GPU. Written in session 13
after the device time ran out: its CPU tests cover the arguments and the summary of profiler
events; it has not run on a GPU yet.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def summarize(events, calls: int) -> dict:
    """Per call: kernel name -> {launches, us}, and the span from the first kernel's start to the
    last one's end. ``events``: torch.profiler's events; the GPU kernels among them are those
    on the CUDA device (memory copies left out)."""
    per_kernel: dict[str, list] = defaultdict(lambda: [0, 0.0])
    start = end = None
    for e in events:
        if e.device_type.name != "CUDA" or not e.name or e.name.startswith("Memcpy"):
            continue
        row = per_kernel[e.name]
        row[0] += 1
        row[1] += e.time_range.elapsed_us()
        start = e.time_range.start if start is None else min(start, e.time_range.start)
        end = e.time_range.end if end is None else max(end, e.time_range.end)
    span = (end - start) / calls if per_kernel else 0.0
    return {"calls": calls, "span_us": span,
            "kernels": {k: {"launches": v[0] / calls, "us": v[1] / calls} for k, v in per_kernel.items()}}


def profile_provider(step, calls: int) -> dict:
    """``summarize`` of ``calls`` runs of ``step`` under torch.profiler, after three untimed ones."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):  # compile, tune, warm caches
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    return summarize(prof.events(), calls)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--providers", default="ours,cudnn", help="comma list of ours, cudnn")
    ap.add_argument("--json", default="", help="also write the rows here")
    args = ap.parse_args(argv)
    providers = [p for p in args.providers.split(",") if p]
    unknown = sorted(set(providers) - {"ours", "cudnn"})
    if unknown:
        ap.error(f"--providers: {', '.join(unknown)} (supported: ours, cudnn)")
    if args.seqlen < 1 or 16384 % args.seqlen or args.head_dim not in (64, 128) or args.calls < 1:
        ap.error(f"--seqlen {args.seqlen} --head-dim {args.head_dim} --calls {args.calls} (supported: a seqlen "
                 "dividing 16384, head dim 64 or 128, calls >= 1)")

    import torch

    if not torch.cuda.is_available():
        print("profile_bwd: needs a CUDA GPU (it profiles GPU kernels)", file=sys.stderr)
        return 2
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import fa2dispatch

    S, D = args.seqlen, args.head_dim
    B, H = 16384 // S, 2048 // D
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, S, D, generator=g, device="cuda", dtype=torch.float16) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)

    def forward(provider):
        if provider == "ours":
            return fa2dispatch.attention(q, k, v, causal=args.causal, layout="bhsd", backend="triton")
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)

    rows = []
    print(f"B={B} H={H} S={S} D={D} causal={args.causal} fp16, backward only, per call "
          f"({torch.cuda.get_device_name()}, torch {torch.__version__})")
    for provider in providers:
        out = forward(provider)

        def step(out=out):
            for t in (q, k, v):
                t.grad = None
            out.backward(dout, retain_graph=True)

        row = {"provider": provider, **profile_provider(step, args.calls)}
        rows.append(row)
        total = sum(kern["us"] for kern in row["kernels"].values())
        print(f"\n{provider}: kernels {total:.1f} us, span {row['span_us']:.1f} us per call")
        for kname, kern in sorted(row["kernels"].items(), key=lambda kv: -kv[1]["us"]):
            print(f"  {kern['us']:9.1f} us  x{kern['launches']:.0f}  {kname[:110]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "B": B, "H": H, "S": S,
                       "D": D, "causal": args.causal, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
