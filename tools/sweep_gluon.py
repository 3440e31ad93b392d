#!/usr/bin/env python3
"""The Gluon forward (backends/triton_fa2/kernels_gluon.py) on a Hopper GPU: each
config checked against float32 attention (next to FlashAttention-2's own error), then timed
with cuDNN, FlashAttention-2 and our dispatched Triton forward in the same process.

BENCH_PROTOCOL.md shapes (16k tokens, hidden 2048, (B, H, S, D) contiguous, random normal),
``triton.testing.do_bench(warmup=25, rep=--rep, median)``, FLOPs 4 B H S^2 D (halved causal).

    python tools/sweep_gluon.py --head-dims 128 --seqlens 1024,4096,16384 --configs 64:64:2:2:4:0,64:128:2:1:4:0
"""
# ruff: noqa: B023  (timed closures run inside the iteration that defines them)

from __future__ import annotations

import argparse
import json
import sys


def _first_run(call, row: dict, name: str, D: int, S: int, causal: bool):
    """(out, lse) of a config's first call (compile included), or None with its error recorded
    in the row and printed: a config that fails is a row with its reason, not the end of the sweep."""
    import torch

    try:
        result = call()
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001
        row["err"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        print(f"  {name} D={D} S={S} causal={int(causal)}: {row['err'][name]}", flush=True)
        return None
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-dims", default="128")
    ap.add_argument("--seqlens", default="1024,4096,16384")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    ap.add_argument("--configs", default="64:64:2:2:4:0",
                    help="block_m:block_n:k_stages:v_stages:warps:q_regs[:ws[:pp[:tg[:sec]]]],... (ws > 0: the "
                         "warp-specialized kernel, kernels_gluon_ws.py, with ws registers for its producer; warps and "
                         "q_regs unused; pp > 0 as well: the ping-pong kernel, block_m 128, pp registers per consumer "
                         "warpgroup, tg its grid (launch_gluon.PP_TILE_GRIDS: 0 the launcher's choice, 1 one CTA per "
                         "tile, 2 persistent) and sec its causal sections in heads (-1 the default, 0 all heads))")
    ap.add_argument("--rep", type=int, default=100)
    ap.add_argument("--fp8", action="store_true",
                    help="e4m3 inputs (per-head descales, V^T given): against the triton-fp8 backend, our bf16 "
                         "forward and the fp8 matmul ceiling (tools/bench_fp8.py's), instead of the 16-bit peers")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from fa2dispatch.backends.triton_fa2 import launch_gluon
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    import fa2dispatch

    if not torch.cuda.is_available():
        print("sweep_gluon needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    configs = [_config(c) for c in args.configs.split(",")]
    if args.fp8:
        return fp8_sweep(args, configs)
    rows = []
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} {args.dtype}", flush=True)
    for D in (int(d) for d in args.head_dims.split(",")):
        for S in (int(s) for s in args.seqlens.split(",")):
            B, H = 16384 // S, 2048 // D
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=dtype, generator=g) for _ in range(3))
            for causal in (bool(int(c)) for c in args.causal.split(",")):
                flops = 4 * B * H * S * S * D / (2 if causal else 1)
                row = {"D": D, "S": S, "causal": causal, "dtype": args.dtype, "tflops": {}, "err": {}}
                # float32 reference on the first batch element (the whole call would not fit at 16k)
                q1, k1, v1 = (t[:1].float() for t in (q, k, v))
                ref = F.scaled_dot_product_attention(q1, k1, v1, is_causal=causal)
                ref_lse = torch.logsumexp((q1 @ k1.transpose(-1, -2)) * D**-0.5
                                          + (torch.full((S, S), float("-inf"), device="cuda").triu(1) if causal else 0),
                                          -1) if S <= 4096 else None

                def flash():
                    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

                def cudnn():
                    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

                def ours():
                    return fa2dispatch.attention(q, k, v, causal=causal, layout="bhsd", backend="triton")

                row["err"]["flash"] = (flash()[:1].float() - ref).abs().max().item()
                providers = {"cudnn": cudnn, "flash": flash, "triton": ours}
                for bm, bn, ks, vs, w, qr, ws, pp, tg, sec in configs:
                    if ws and pp:
                        name = f"pp{bm}x{bn}k{ks}v{vs}r{ws}c{pp}" + _grid_name(tg, sec)

                        def call(bn=bn, ks=ks, vs=vs, ws=ws, pp=pp, tg=tg, sec=sec):
                            return launch_gluon.forward_pingpong(q, k, v, causal, None, "bhsd", bn, ks, vs, ws, pp,
                                                                 tile_grid=tg, sec_heads=None if sec < 0 else sec)
                    elif ws:
                        name = f"ws{bm}x{bn}k{ks}v{vs}r{ws}"

                        def call(bm=bm, bn=bn, ks=ks, vs=vs, ws=ws):
                            return launch_gluon.forward_ws(q, k, v, causal, None, "bhsd", bm, bn, ks, vs, ws)
                    else:
                        name = f"g{bm}x{bn}k{ks}v{vs}w{w}" + ("q" if qr else "")

                        def call(bm=bm, bn=bn, ks=ks, vs=vs, w=w, qr=qr):
                            return launch_gluon.forward(q, k, v, causal, None, "bhsd", bm, bn, ks, vs, w, bool(qr))
                    result = _first_run(call, row, name, D, S, causal)
                    if result is None:
                        continue
                    out, lse = result
                    err = (out[:1].float() - ref).abs().max().item()
                    lerr = (lse[:1] - ref_lse).abs().max().item() if ref_lse is not None else None
                    nan = bool(torch.isnan(out).any() or torch.isnan(lse).any())
                    row["err"][name] = err
                    row["err"][name + "_lse"] = lerr
                    bad = nan or not err <= 3 * row["err"]["flash"] + 1e-3 or (lerr is not None and lerr > 1e-2)
                    print(f"  {name} D={D} S={S} causal={int(causal)}: max err {err:.2e} (flash {row['err']['flash']:.2e})"
                          f" lse {lerr if lerr is None else f'{lerr:.1e}'}{'  BAD' if bad else ''}", flush=True)
                    if bad:
                        continue
                    providers[name] = call
                for name, fn in providers.items():
                    try:
                        ms = do_bench(fn, warmup=25, rep=args.rep, return_mode="median")
                        row["tflops"][name] = flops / ms / 1e9
                    except Exception as exc:  # noqa: BLE001
                        row["err"][name + "_run"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                tf = row["tflops"]
                base = tf.get("cudnn")
                cells = "  ".join(f"{n} {t:6.1f}" + (f" ({t / base:.2f})" if base else "") for n, t in tf.items())
                print(f"D={D} S={S:5} causal={int(causal)}  {cells}", flush=True)
                rows.append(row)
                del q1, k1, v1, ref
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


def _config(text: str) -> tuple[int, ...]:
    """One --configs entry: ten ints, the optional ws, pp and tg 0 and sec -1 when left out."""
    try:
        fields = [int(x) for x in text.split(":")]
    except ValueError:
        fields = []
    if not 6 <= len(fields) <= 10:
        raise SystemExit(f"--configs {text!r}: 6 to 10 colon-separated ints expected")
    return tuple(fields + [0, 0, 0, -1][len(fields) - 6:])


def _grid_name(tg: int, sec: int) -> str:
    """The ping-pong grid and sections in a config's name (nothing for the defaults)."""
    return (f"g{tg}" if tg else "") + (f"s{sec}" if sec >= 0 else "")


def fp8_sweep(args, configs) -> int:
    """The fp8 forward: each config's output against float32 attention on the dequantized inputs
    (next to the triton-fp8 backend's error on the same inputs), then TFLOP/s (FA2 convention)
    with the triton-fp8 backend (V^T given), our bf16 forward and the fp8 matmul ceiling."""
    import torch
    import torch.nn.functional as F
    from bench_fp8 import fp8_ceiling
    from fa2dispatch.backends.triton_fa2 import launch_gluon
    from fa2dispatch.backends.triton_fp8.launch import transpose_v
    from triton.testing import do_bench

    import fa2dispatch

    ceiling = fp8_ceiling()
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} fp8 matmul ceiling {ceiling:.1f} TFLOP/s",
          flush=True)
    rows = []
    for D in (int(d) for d in args.head_dims.split(",")):
        for S in (int(s) for s in args.seqlens.split(",")):
            B, H = 16384 // S, 2048 // D
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v = (torch.randn(B, H, S, D, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3))
            (q8, qd), (k8, kd), (v8, vd) = (fa2dispatch.quantize_fp8(t, layout="bhsd") for t in (q, k, v))
            vt = transpose_v(v8, "bhsd")
            for causal in (bool(int(c)) for c in args.causal.split(",")):
                flops = 4 * B * H * S * S * D / (2 if causal else 1)
                row = {"D": D, "S": S, "causal": causal, "tflops": {}, "err": {}, "ceiling": ceiling}
                deq = [(t8[:1].float() * d[:1, :, None, None]) for t8, d in ((q8, qd), (k8, kd), (v8, vd))]
                ref = F.scaled_dot_product_attention(*deq, is_causal=causal)
                kw = {"q_descale": qd, "k_descale": kd, "v_descale": vd, "causal": causal, "layout": "bhsd",
                      "backend": "triton-fp8"}
                providers = {"triton-fp8": lambda: fa2dispatch.attention(q8, k8, vt, v_layout="transposed", **kw),
                             "bf16 ours": lambda: fa2dispatch.attention(q, k, v, causal=causal, layout="bhsd",
                                                                         backend="triton")}
                base_err = (providers["triton-fp8"]()[:1].float() - ref).abs().max().item()
                row["err"]["triton-fp8"] = base_err
                for bm, bn, ks, vs, w, _, ws, pp, tg, sec in configs:  # ws and pp: the ping-pong kernel
                    if ws and pp:
                        name = f"pp{bm}x{bn}k{ks}v{vs}r{ws}c{pp}" + _grid_name(tg, sec)
                        call = (lambda bn=bn, ks=ks, vs=vs, ws=ws, pp=pp, tg=tg, sec=sec: launch_gluon.forward_pingpong(
                            q8, k8, v8, causal, None, "bhsd", bn, ks, vs, ws, pp, qd, kd, vd, vt, tile_grid=tg,
                            sec_heads=None if sec < 0 else sec))
                    else:
                        name = f"g{bm}x{bn}k{ks}v{vs}w{w}"
                        call = (lambda bm=bm, bn=bn, ks=ks, vs=vs, w=w: launch_gluon.forward_fp8(
                            q8, k8, v8, qd, kd, vd, causal, None, "bhsd", vt, bm, bn, ks, vs, w))
                    result = _first_run(call, row, name, D, S, causal)
                    if result is None:
                        continue
                    out, lse = result
                    err = (out[:1].float() - ref).abs().max().item()
                    row["err"][name] = err
                    bad = bool(torch.isnan(out).any() or torch.isnan(lse).any()) or not err <= 2 * base_err + 1e-3
                    print(f"  {name} D={D} S={S} causal={int(causal)}: max err {err:.2e} (triton-fp8 {base_err:.2e})"
                          f"{'  BAD' if bad else ''}", flush=True)
                    if not bad:
                        providers[name] = call
                for name, fn in providers.items():
                    row["tflops"][name] = flops / do_bench(fn, warmup=25, rep=args.rep, return_mode="median") / 1e9
                tf = row["tflops"]
                cells = "  ".join(f"{n} {t:6.1f}" for n, t in tf.items())
                print(f"fp8 D={D} S={S:5} causal={int(causal)}  {cells}  (ceiling x{max(tf.values()) / ceiling:.2f})",
                      flush=True)
                rows.append(row)
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "fp8": True, "rows": rows},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
