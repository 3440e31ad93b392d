#!/usr/bin/env python3
"""Time the Hopper forward variants against the current Triton forward and cuDNN/FA2 in one run.

BENCH_PROTOCOL.md cases (16k tokens per batch, hidden 2048, bhsd contiguous, random normal
inputs), fp16 unless --dtype; forward only. Providers: ``plain`` (launch.forward at the
default config), ``cudnn`` and ``fa2`` (torch SDPA pinned to CUDNN_ATTENTION / FLASH_ATTENTION),
and each variant of VARIANTS (launch_hopper.forward). Each variant's output is checked against
the plain kernel's (max |diff| / max |ref| < 1e-2, and its lse) before it is timed; a variant
that fails or errors is recorded, not timed. Prints one table (TFLOP/s, ratio to cuDNN) and
writes JSON with --json.

    python tools/sweep_hopper.py --head-dims 64,128 --seqlens 512,1024,4096,16384 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

# name -> (head dim -> (block_m, block_n, num_warps, num_stages)), HopperOptions fields (a dict
# value is per head dim). Registers and shared memory per program (offline sm_90 compile,
# launch_hopper.compile_sm90) decide how many programs share an SM: noted per entry.
VARIANTS = {
    # d64: 188 regs x 4 warps, 66 KB: 2/SM.  d128: 189 regs x 8 warps, 164 KB: 1/SM
    "tma": ({64: (128, 64, 4, 3), 128: (128, 128, 8, 2)}, {}),
    # d64: capped at 168 regs: 3/SM.  d128: 148 regs, 132 KB: 1/SM
    "tma_n64": ({64: (128, 64, 4, 3), 128: (128, 64, 8, 3)}, {"maxnreg": {64: 168, 128: 0}}),
    # 8 warps capped at 128 regs, no spills: d64 83 KB, d128 98 KB: 2/SM
    "tma_r128": ({64: (128, 128, 8, 2), 128: (128, 64, 8, 2)}, {"maxnreg": 128}),
    "tma_r128_lpt": ({64: (128, 128, 8, 2), 128: (128, 64, 8, 2)}, {"maxnreg": 128, "order": 1}),
    "tma_r128_pers": ({64: (128, 128, 8, 2), 128: (128, 64, 8, 2)},
                      {"maxnreg": 128, "order": 1, "persistent": True, "programs_per_sm": 2}),
    # producer warpgroup + 2 consumer warpgroups (12 warps, setmaxnreg); d128 spills (~480 B stack)
    "ws": ({64: (128, 128, 4, 2), 128: (128, 128, 4, 2)}, {"warp_specialize": True}),
    "ws_n64": ({64: (128, 64, 4, 3), 128: (128, 64, 4, 2)}, {"warp_specialize": True}),
}


def _options(d: int, fields: dict):
    from fa2dispatch.backends.triton_fa2.launch_hopper import HopperOptions

    return HopperOptions(**{k: (v[d] if isinstance(v, dict) else v) for k, v in fields.items()})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    p.add_argument("--variants", default=",".join(n for n in VARIANTS if not n.startswith("ws")),
                   help="default: all but ws* (the warp-specialized kernel hung on the H100; "
                   "naming one sets FA2DISPATCH_HOPPER_WS=1 for its child, under --timeout)")
    p.add_argument("--rep", type=int, default=200, help="do_bench rep in ms (BENCH_PROTOCOL: 200)")
    p.add_argument("--json", default=None)
    p.add_argument("--timeout", type=int, default=50, help="seconds per provider's child process")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one provider, rows as JSON lines
    args = p.parse_args(argv)
    if args.child is None:
        return _parent(args)

    import torch
    import triton

    from fa2dispatch.hardware import device_info

    if not torch.cuda.is_available():
        print("sweep_hopper.py needs a CUDA GPU (found none)")
        return 2
    dev = device_info(torch.device("cuda"))
    meta = {"gpu": torch.cuda.get_device_name(), "driver": dev.driver, "torch": torch.__version__,
            "triton": triton.__version__, "dtype": args.dtype, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "rep_ms": args.rep}
    print(meta, flush=True)
    names = [] if args.child == "peers" else [args.child]
    with open(args.json, "a") as sink:
        for d in map(int, args.head_dims.split(",")):
            for s in map(int, args.seqlens.split(",")):
                for causal in (False, True):
                    row = _case(args, d, s, causal, names, dev)
                    sink.write(json.dumps(row) + "\n")
                    sink.flush()
                    t = row["tflops"]
                    errors = "; ".join(f"{n}: {e}" for n, e in row["errors"].items())
                    print(f"D={d} S={s} causal={causal}: " + "  ".join(f"{n}={t[n]:.0f}" for n in t)
                          + (f"  errors: {errors}" if errors else ""), flush=True)
                    torch.cuda.empty_cache()
    return 0


def _case(args, d: int, s: int, causal: bool, names: list[str], dev) -> dict:
    """One BENCH_PROTOCOL case: the peers (child "peers") or one variant, checked then timed."""
    import torch
    from fa2dispatch.backends.triton_fa2 import launch, launch_hopper
    from fa2dispatch.backends.triton_fa2.config import default_config
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa
    from triton.testing import do_bench

    from fa2dispatch.problem import make_problem

    B, H = 16384 // s, 2048 // d
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, s, d, device="cuda", dtype=getattr(torch, args.dtype), generator=g)
               for _ in range(3))
    problem = make_problem(q, k, v, causal=causal, layout="bhsd")
    base = default_config(problem, dev)
    flops = 4 * B * H * s * s * d / (2 if causal else 1)
    try:
        ref_out, ref_lse = launch.forward(problem, q, k, v, base, dev)
    except Exception as exc:  # noqa: BLE001  (launch.py is edited by others: fall back to cuDNN's output)
        print(f"plain forward failed ({type(exc).__name__}: {str(exc)[:200]}); reference = cuDNN")
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref_out, ref_lse = sdpa(q, k, v, is_causal=causal), None
    scale = ref_out.float().abs().max().item()

    def bench(fn):
        fn()
        torch.cuda.synchronize()
        return flops / do_bench(fn, warmup=25, rep=args.rep, return_mode="median") * 1e-9

    row = {"D": d, "S": s, "causal": causal, "B": B, "H": H, "tflops": {}, "errors": {}}
    if args.child == "peers":
        row["tflops"]["plain"] = bench(lambda: launch.forward(problem, q, k, v, base, dev))
        for peer, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("fa2", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    row["tflops"][peer] = bench(lambda: sdpa(q, k, v, is_causal=causal))
            except Exception as exc:  # noqa: BLE001  (a peer missing on this build: record it)
                row["errors"][peer] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
    for name in names:
        blocks, fields = VARIANTS[name]
        cfg = replace(base, **dict(zip(("block_m", "block_n", "num_warps", "num_stages"), blocks[d])))
        opts = _options(d, fields)
        try:
            out, lse = launch_hopper.forward(problem, q, k, v, cfg, dev, opts)
            diff = (out.float() - ref_out.float()).abs().max().item() / max(scale, 1.0)
            ldiff = 0.0 if ref_lse is None else (lse - ref_lse).abs().max().item()
            if not (diff < 1e-2 and ldiff < 1e-3):
                raise RuntimeError(f"differs from the plain kernel: out {diff:.2e}, lse {ldiff:.2e}")
            row["tflops"][name] = bench(lambda cfg=cfg, opts=opts: launch_hopper.forward(problem, q, k, v, cfg, dev, opts))
        except Exception as exc:  # noqa: BLE001  (out of resources, compile failure: record and go on)
            row["errors"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return row

def _parent(args) -> int:
    """Run the peers and each variant in its own child process with a timeout, so that a
    variant that hangs the GPU (a warp-specialization deadlock) or crashes costs its timeout
    only; merge the rows; print the table; write JSON."""
    import os
    import subprocess
    import tempfile

    names = [n for n in args.variants.split(",") if n]
    merged: dict = {}
    meta = {}
    hung = False
    for child in ["peers"] + names:
        if hung and child.startswith("ws"):
            print(f"[{child}] skipped: an earlier warp-specialized child timed out")
            continue
        fd, path = tempfile.mkstemp(suffix=".jsonl")
        os.close(fd)
        cmd = [sys.executable, __file__, "--child", child, "--json", path, "--head-dims", args.head_dims,
               "--seqlens", args.seqlens, "--dtype", args.dtype, "--rep", str(args.rep)]
        t0 = time.time()
        env = dict(os.environ, FA2DISPATCH_HOPPER_WS="1") if child.startswith("ws") else None
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False,
                                  timeout=2 * args.timeout if child == "peers" else args.timeout)
            status = f"rc={proc.returncode}"
            log = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            status = f"TIMEOUT after {args.timeout}s"
            hung = hung or child.startswith("ws")
            log = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        print(f"[{child}] {status} in {time.time() - t0:.0f}s", flush=True)
        if status != "rc=0":
            print("\n".join(f"[{child}]   {line[:300]}" for line in log.splitlines()[-3:]))
        for line in log.splitlines():
            if line.startswith("{'gpu'"):
                meta = meta or eval(line)  # our own child's dict repr
            elif "Error" in line or "error" in line:
                print(f"[{child}]   {line[:300]}")
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                key = (r["D"], r["S"], r["causal"])
                m = merged.setdefault(key, {k: r[k] for k in ("D", "S", "causal", "B", "H")} | {"tflops": {}, "errors": {}})
                m["tflops"].update(r["tflops"])
                m["errors"].update(r["errors"])
        os.unlink(path)
        if status != "rc=0":
            for m in merged.values():
                if child not in m["tflops"] and child != "peers":
                    m["errors"].setdefault(child, status)
    rows = [merged[k] for k in sorted(merged)]
    cols = ["plain", "cudnn", "fa2"] + names
    print(f"\n{meta.get('gpu')} {meta.get('date')} torch {meta.get('torch')} triton {meta.get('triton')} {args.dtype} fwd TFLOP/s"
          " (x = ratio to cuDNN)")
    print(f"{'case':22}" + "".join(f"{c:>15}" for c in cols))
    for r in rows:
        t, cu = r["tflops"], r["tflops"].get("cudnn")
        cells = []
        for c in cols:
            if c not in t:
                cells.append(f"{'err':>15}")
            elif cu and c != "cudnn":
                cells.append(f"{t[c]:9.0f} {t[c] / cu:4.2f}x")
            else:
                cells.append(f"{t[c]:15.0f}")
        print(f"D={r['D']:<3} S={r['S']:<5} {'causal' if r['causal'] else 'full':6}  " + "".join(cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "variants": {n: [VARIANTS[n][0], VARIANTS[n][1]] for n in names}, "rows": rows},
                      f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
