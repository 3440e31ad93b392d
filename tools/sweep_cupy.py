"""Forward variants of the CuPy backend against PyTorch SDPA's flash backend (FlashAttention-2)
in one process: BENCH_PROTOCOL.md shapes (16k tokens, hidden 2048, (B, H, S, D) contiguous),
triton's do_bench (warmup 25 ms, rep 200 ms, median, L2 cleared before each call) as
tools/bench.py. Per cell the flash measurement is taken before and after the variants, and the
whole sequence repeats ``--reps`` times, so the spread of flash against itself shows the
run-to-run noise next to the differences between variants. Each variant's output is compared
bit for bit with the first variant of the same forward kernel (the mma.sync variants only
reorder work or skip exact zeros; wgmma variants with one key block size differ only in rows per
CTA and ring depth), and the first of each with FlashAttention-2's.

    python tools/sweep_cupy.py --seqlens 2048,4096 --dtypes fp16,bf16 --json out.json \\
        --variants "base:;ws1:warp_skip=1;hg:head_group=0" [--noncausal-variants base]

A variant is ``name:field=value,field=value`` over the default config (CupyConfig fields;
``o_smem`` takes 0/1). Rows are printed as they come and written to --json at the end.
"""
# ruff: noqa: B023  (timed lambdas run inside the iteration that defines them)

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace


def parse_variants(text: str, base):
    out = []
    for item in filter(None, text.split(";")):
        name, _, fields = item.partition(":")
        kw = {}
        for f in filter(None, fields.split(",")):
            k, v = f.split("=")
            kw[k] = bool(int(v)) if k == "o_smem" else int(v) if v.lstrip("-").isdigit() else v
        out.append((name, replace(base, **kw)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlens", default="2048,4096,8192,16384")
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--variants", default="base:")
    ap.add_argument("--noncausal-variants", default=None, help="names from --variants (default: all)")
    ap.add_argument("--causal", default="1,0")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from fa2dispatch.backends import BACKENDS
    from fa2dispatch.backends.cupy_cuda import compile as cc
    from fa2dispatch.backends.cupy_cuda.config import default_config
    from triton.testing import do_bench

    from fa2dispatch.hardware import device_info
    from fa2dispatch.problem import AttentionProblem

    backend = BACKENDS["cupy"]
    dev = device_info(torch.device("cuda"))
    D = args.head_dim
    base = default_config(D, dev)
    variants = parse_variants(args.variants, base)
    nc_names = set(args.noncausal_variants.split(",")) if args.noncausal_variants else {n for n, _ in variants}
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} default {base.short()}", flush=True)
    for name, cfg in variants:
        print(f"# variant {name}: {cfg.short()}", flush=True)

    def bench(fn):
        return do_bench(fn, warmup=25, rep=200, return_mode="median")

    rows = []
    t_start = time.time()
    for S in (int(s) for s in args.seqlens.split(",")):  # short sequences (the close cells) first
        for dname in args.dtypes.split(","):
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dname]
            B, H = 16384 // S, 2048 // D
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=dtype, generator=g) for _ in range(3))
            for causal in (bool(int(c)) for c in args.causal.split(",")):
                flops = 4 * B * H * S * S * D / (2 if causal else 1)
                todo = [(n, c) for n, c in variants if causal or n in nc_names]
                prob = AttentionProblem(B, H, H, S, S, D, dtype, q.device, "bhsd", causal, D**-0.5)
                refs = {}
                for name, cfg in todo:  # compile, warm up, and check against the first variant
                    out, lse = backend.forward(prob, q, k, v, cfg)
                    torch.cuda.synchronize()
                    kind = (cfg.fwd_kernel, cfg.block_n) if cfg.fwd_kernel == "wgmma" else cfg.fwd_kernel
                    ref = refs.get(kind)
                    if ref is None:
                        refs[kind] = (out, lse)
                        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                            fo = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                        err = (out.float() - fo.float()).abs().max().item()
                        print(f"  {dname} S={S} causal={int(causal)} {name}: max |ours - flash| {err:.2e}", flush=True)
                    elif not (torch.equal(out, ref[0]) and torch.equal(lse, ref[1])):
                        err = (out.float() - ref[0].float()).abs().max().item()
                        print(f"  MISMATCH {dname} S={S} causal={int(causal)} {name}: max diff {err:.2e}", flush=True)
                del refs
                times = {"flash": []}
                times.update({n: [] for n, _ in todo})

                def flash():
                    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

                for _ in range(args.reps):
                    times["flash"].append(bench(flash))
                    for name, cfg in todo:
                        times[name].append(bench(lambda cfg=cfg: backend.forward(prob, q, k, v, cfg)))
                    times["flash"].append(bench(flash))
                tf = {n: [flops / ms / 1e9 for ms in t] for n, t in times.items()}
                fl = statistics.median(tf["flash"])
                parts = [f"flash {fl:6.1f} [{min(tf['flash']):.1f}-{max(tf['flash']):.1f}]"]
                for name, _ in todo:
                    m = statistics.median(tf[name])
                    parts.append(f"{name} {m:6.1f} ({m / fl:.3f})")
                print(f"{dname} S={S:5} causal={int(causal)}  " + "  ".join(parts), flush=True)
                rows.append({"dtype": dname, "S": S, "causal": causal, "D": D, "tflops": tf,
                             "ratio": {n: statistics.median(tf[n]) / fl for n, _ in todo}})
    print(f"# sweep {time.time() - t_start:.0f} s", flush=True)
    for (spec, _), fn in cc._functions.items():
        if spec.kernel.startswith("fa2_fwd"):
            print(f"#  {dict(spec.defines)}: regs {getattr(fn, 'num_regs', '?')} "
                  f"local {getattr(fn, 'local_size_bytes', '?')} B", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "variants": {n: c.short() for n, c in variants}, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
