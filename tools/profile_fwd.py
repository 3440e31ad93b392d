#!/usr/bin/env python3
"""One forward call of one provider, for Nsight Compute (``ncu``) to profile: where a kernel's
time goes (tensor-pipe use, issue slots, warp stalls) when event timings say only "how long".

BENCH_PROTOCOL.md shapes: 16,384 tokens (B = 16384 / S), hidden 2048 (H = 2048 / D), (B, H, S,
D) contiguous, random normal inputs. The call runs ``--warmup`` times (compiles, autotune-cache
lookups), then once more; profile that last launch with ``--launch-skip``:

    ncu --clock-control none -k regex:'fa2_fwd|flash_fwd' --launch-skip 3 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats ... \\
        python3 tools/profile_fwd.py --provider cupy --seqlen 2048

Providers: ``cupy`` / ``triton`` / ``auto`` (``fa2dispatch.attention(..., backend=...)``), ``flash``
and ``cudnn`` (PyTorch SDPA pinned to that backend). ``tools/profile_fwd.sh`` runs the set the
session-8 notes compare (docs/CUPY_BACKEND.md).
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--provider", required=True, choices=("cupy", "triton", "auto", "flash", "cudnn"))
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("profile_fwd needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    S, D = args.seqlen, args.head_dim
    B, H = 16384 // S, 2048 // D
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=dtype, generator=g) for _ in range(3))
    if args.provider in ("flash", "cudnn"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[args.provider]

        def call():
            with sdpa_kernel(kernel):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=args.causal)
    else:
        import fa2dispatch

        def call():
            return fa2dispatch.attention(q, k, v, causal=args.causal, layout="bhsd", backend=args.provider)

    for _ in range(args.warmup + 1):
        call()
    torch.cuda.synchronize()
    print(f"{args.provider} S={S} D={D} B={B} H={H} {args.dtype} causal={args.causal}: ran", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
