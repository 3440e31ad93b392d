#!/usr/bin/env python3
"""Time the Triton forward or backward under a handful of block configurations on this GPU.

A stop-gap for choosing per-device-family defaults (backends/triton_fa2/config.py) before the
autotuner exists: the BENCH_PROTOCOL.md cases, fp16, each candidate checked against the
default config's results before it is timed. Prints one table; writes JSON with --json.

    python tools/sweep_configs.py --mode bwd --head-dims 64,128 --seqlens 4096,16384
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

FIELDS = {
    "fwd": ("block_m", "block_n", "num_warps", "num_stages"),
    "bwd": ("dkdv_block_m", "dkdv_block_n", "dq_block_m", "dq_block_n", "bwd_num_warps", "bwd_num_stages"),
}
FWD_CANDIDATES = [
    (128, 64, 8, 3),
    (128, 64, 4, 3),
    (128, 128, 8, 2),
    (128, 128, 8, 3),
    (128, 64, 8, 4),
    (128, 32, 4, 3),
    (64, 64, 4, 3),
    (64, 128, 4, 2),
    (128, 128, 4, 2),
    (256, 64, 8, 2),
]
BWD_CANDIDATES = [
    (32, 128, 128, 32, 8, 2),
    (64, 128, 128, 64, 8, 2),
    (64, 128, 128, 32, 8, 2),
    (32, 128, 128, 64, 8, 2),
    (64, 64, 64, 64, 4, 2),
    (32, 64, 64, 32, 4, 3),
    (64, 128, 128, 64, 8, 3),
    (16, 128, 128, 16, 8, 2),
    (32, 128, 128, 32, 4, 2),
    (64, 64, 64, 64, 8, 3),
    (32, 64, 64, 32, 4, 2),
    (64, 128, 128, 64, 8, 1),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("fwd", "bwd"), default="bwd")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--seqlens", default="4096,16384")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch
    from triton.testing import do_bench

    from fa2dispatch.backends.triton_fa2 import launch
    from fa2dispatch.backends.triton_fa2.config import default_config
    from fa2dispatch.hardware import device_info
    from fa2dispatch.problem import make_problem

    if not torch.cuda.is_available():
        print("sweep_configs.py needs a CUDA GPU (found none)")
        return 2
    dev = device_info(torch.device("cuda"))
    candidates = FWD_CANDIDATES if args.mode == "fwd" else BWD_CANDIDATES
    rows = []
    for d in map(int, args.head_dims.split(",")):
        for s in map(int, args.seqlens.split(",")):
            for causal in (False, True):
                B, H = 16384 // s, 2048 // d
                g = torch.Generator(device="cuda").manual_seed(0)
                q, k, v, dout = (torch.randn(B, H, s, d, device="cuda", dtype=torch.float16, generator=g)
                                 for _ in range(4))
                problem = make_problem(q, k, v, causal=causal, layout="bhsd")
                base = default_config(problem, dev)
                out, lse = launch.forward(problem, q, k, v, base, dev)
                if args.mode == "fwd":
                    def run(cfg):
                        return launch.forward(problem, q, k, v, cfg, dev)
                else:
                    def run(cfg):
                        return launch.backward(problem, dout, q, k, v, out, lse, None, cfg, dev)
                ref = run(base)
                flops = (2.5 if args.mode == "bwd" else 1.0) * 4 * B * H * s * s * d / (2 if causal else 1)
                for cand in candidates:
                    cfg = replace(base, **dict(zip(FIELDS[args.mode], cand)))
                    row = {"D": d, "S": s, "causal": causal, "config": cand}
                    try:
                        got = run(cfg)
                        diff = max((a.float() - b.float()).abs().max().item() / max(1.0, b.float().abs().max().item())
                                   for a, b in zip(got, ref))
                        if not diff < 1e-2:
                            raise RuntimeError(f"results differ from the default config's by {diff:.2e}")
                        ms = do_bench(lambda: run(cfg), warmup=25, rep=100, return_mode="median")
                        row["tflops"] = flops / ms * 1e-9
                    except Exception as exc:  # out of resources, compile failure: record and go on
                        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                    rows.append(row)
                    print(f"D={d} S={s} causal={causal} {cand}: "
                          f"{row.get('tflops', 0):.1f} TFLOP/s {row.get('error', '')}", flush=True)
                del q, k, v, dout, out, lse, ref
                torch.cuda.empty_cache()
    # Summary: geometric-mean speed per candidate over the cases, per head dim.
    print(f"\ncandidate {FIELDS[args.mode]}: geomean TFLOP/s per head dim")
    for d in map(int, args.head_dims.split(",")):
        for cand in candidates:
            vals = [r["tflops"] for r in rows if r["D"] == d and r["config"] == cand and "tflops" in r]
            n_cases = len({(r["S"], r["causal"]) for r in rows if r["D"] == d})
            if len(vals) == n_cases:
                gm = 1.0
                for v_ in vals:
                    gm *= v_ ** (1 / len(vals))
                print(f"D={d} {cand}: {gm:.1f}  ({', '.join(f'{v_:.0f}' for v_ in vals)})")
            else:
                print(f"D={d} {cand}: failed in {n_cases - len(vals)} case(s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
