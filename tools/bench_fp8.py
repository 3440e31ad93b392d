#!/usr/bin/env python3
"""Benchmark and accuracy table of the fp8 (e4m3) forward, ``triton-fp8``, in one run.

Protocol as tools/bench.py: ``triton.testing.do_bench(warmup=25, rep=200)`` median, FA2 FLOP
convention 4*B*H*Mq*Mkv*D (halved when causal), B = 16384 // M, H = 2048 // D, layout (B, H, M,
D) contiguous. Measured in the same run: the fp8 matmul ceiling (``torch._scaled_mm``,
8192^3), our bf16 forward (``backend="triton"``), the V transpose the fp8 kernel needs for a
natural-layout V, and the ratios the FP8 issue's target names. Accuracy: RMSE against a
float32 reference for N(0,1) inputs and for outlier inputs N(0,1) + N(0,100) * Bernoulli(0.001),
fp8 with and without the Hadamard rotation, next to our bf16.

    python tools/bench_fp8.py --quick            # d=128 (and 64, 256) at 1k/4k/16k
    python tools/bench_fp8.py --sweep            # also time every config of config_space at 16k

Writes JSON and markdown (``--out`` prefix, default bench_fp8.{json,md}).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from datetime import datetime, timezone

TOKENS, HIDDEN = 16384, 2048
WARMUP_MS, REP_MS = 25, 200
TARGET_TFLOPS, TARGET_CEILING_RATIO, TARGET_BF16_RATIO = 1000.0, 0.8, 1.6


def _bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")


def _tflops(B, H, M, D, causal, ms) -> float:
    flops = 4.0 * B * H * M * M * D / (2 if causal else 1)
    return flops / (ms * 1e-3) / 1e12


def fp8_ceiling() -> float:
    import torch

    n = 8192
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()  # column-major for _scaled_mm
    one = torch.tensor(1.0, device="cuda")
    ms = _bench(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
    return 2.0 * n**3 / (ms * 1e-3) / 1e12


def _inputs(B, H, M, D, dtype, seed=0):
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn((B, H, M, D), device="cuda", generator=g).to(dtype) for _ in range(3)]


def time_cells(head_dims, seqlens, sweep: bool) -> tuple[list[dict], list[dict]]:
    import torch
    from fa2dispatch.backends.triton_fp8 import launch
    from fa2dispatch.backends.triton_fp8.config import config_space

    import fa2dispatch
    from fa2dispatch.hardware import device_info
    from fa2dispatch.problem import make_problem

    rows, sweep_rows = [], []
    for D in head_dims:
        for M in seqlens:
            for causal in (False, True):
                B, H = TOKENS // M, HIDDEN // D
                q, k, v = _inputs(B, H, M, D, torch.bfloat16)
                attn = fa2dispatch.attention
                bf16_ms = _bench(functools.partial(attn, q, k, v, causal=causal, layout="bhsd", backend="triton"))
                (q8, qd), (k8, kd), (v8, vd) = (fa2dispatch.quantize_fp8(t, layout="bhsd") for t in (q, k, v))
                vt = launch.transpose_v(v8, "bhsd")
                kw = {"q_descale": qd, "k_descale": kd, "v_descale": vd, "causal": causal, "layout": "bhsd",
                      "backend": "triton-fp8"}
                ms_vt = _bench(functools.partial(attn, q8, k8, vt, v_layout="transposed", **kw))
                ms_nat = _bench(functools.partial(attn, q8, k8, v8, **kw))
                ms_tr = _bench(functools.partial(launch.transpose_v, v8, "bhsd"))
                row = {"D": D, "M": M, "B": B, "H": H, "causal": causal,
                       "fp8_tflops": _tflops(B, H, M, D, causal, ms_vt), "fp8_ms": ms_vt,
                       "fp8_natural_v_tflops": _tflops(B, H, M, D, causal, ms_nat), "fp8_natural_v_ms": ms_nat,
                       "transpose_ms": ms_tr, "bf16_tflops": _tflops(B, H, M, D, causal, bf16_ms), "bf16_ms": bf16_ms}
                row["fp8_over_bf16"] = row["fp8_tflops"] / row["bf16_tflops"]
                rows.append(row)
                print(f"D={D} M={M} c={int(causal)} fp8 {row['fp8_tflops']:.1f} natV {row['fp8_natural_v_tflops']:.1f} "
                      f"tr {ms_tr:.3f}/{ms_nat:.3f}ms bf16 {row['bf16_tflops']:.1f} x{row['fp8_over_bf16']:.2f}",
                      flush=True)
                if sweep and M == max(seqlens) and not causal:
                    problem = make_problem(q8, k8, vt, causal=causal, layout="bhsd", v_layout="transposed")
                    device = device_info(q.device)
                    args = fa2dispatch.fp8.FP8Args(qd, kd, vd)
                    for config in config_space(problem, device):
                        try:
                            ms = _bench(functools.partial(launch.forward, problem, q8, k8, vt, config, device, args))
                            tf, err = _tflops(B, H, M, D, causal, ms), None
                        except Exception as exc:  # noqa: BLE001 - out of resources and the like
                            tf, err = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                        sweep_rows.append({"D": D, "config": config.short(), "tflops": tf, "error": err})
                        print(f" {D} {config.short().replace('block_', '').replace('num_', '')}: "
                              f"{tf if tf is None else round(tf, 1)} {err or ''}", flush=True)
                torch.cuda.empty_cache()
    return rows, sweep_rows


def _accuracy_input(shape, g, outliers: bool):
    import torch

    x = torch.randn(shape, device="cuda", generator=g)
    if outliers:  # N(0,1) + N(0,100) x Bernoulli(0.001): std 10 on 0.1% of the elements
        spikes = torch.randn(shape, device="cuda", generator=g) * 10.0
        x = x + spikes * (torch.rand(shape, device="cuda", generator=g) < 0.001)
    return x


def _rmse(out, ref) -> float:
    return math.sqrt(((out.float() - ref) ** 2).mean().item())


def accuracy(M=2048, D=128, B=2, H=16) -> list[dict]:
    """RMSE against float32 attention on the bf16-rounded inputs (what every path starts from):
    our bf16 kernel, fp8=True (per-head scales), fp8=True with the Hadamard rotation."""
    import torch
    from fa2dispatch.backends.reference import attention_math

    import fa2dispatch

    out = []
    for name in ("normal", "outliers"):
        g = torch.Generator(device="cuda").manual_seed(1)
        q, k, v = (_accuracy_input((B, H, M, D), g, name == "outliers") for _ in range(3))
        qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
        ref, _ = attention_math(qb.float(), kb.float(), vb.float(), causal=False, softmax_scale=D**-0.5,
                                layout="bhsd", compute_dtype=torch.float32)

        attn = functools.partial(fa2dispatch.attention, qb, kb, vb, layout="bhsd")
        row = {"inputs": name, "M": M, "D": D, "bf16": _rmse(attn(backend="triton"), ref),
               "fp8": _rmse(attn(fp8=True), ref), "fp8_hadamard": _rmse(attn(fp8=True, hadamard=True), ref)}
        out.append(row)
        print(f"accuracy {name:9} RMSE vs fp32: bf16 {row['bf16']:.2e}  fp8 {row['fp8']:.2e}  "
              f"fp8+hadamard {row['fp8_hadamard']:.2e}", flush=True)
    return out


def render(data: dict) -> str:
    lines = [f"## FP8 forward (triton-fp8), {data['device']} — {data['when']}", "",
             f"fp8 matmul ceiling (torch._scaled_mm 8192^3): **{data['ceiling_tflops']:.1f} TFLOP/s**", "",
             "| D | M | causal | fp8 (V^T given) | fp8 (natural V) | V transpose ms | bf16 ours | fp8/bf16 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['D']} | {r['M']} | {r['causal']} | {r['fp8_tflops']:.1f} | {r['fp8_natural_v_tflops']:.1f} "
                     f"| {r['transpose_ms']:.3f} | {r['bf16_tflops']:.1f} | {r['fp8_over_bf16']:.2f} |")
    t = data.get("target")
    if t:
        lines += ["", (f"Target cell (D=128, M={t['M']}, non-causal): fp8 {t['fp8_tflops']:.1f} TFLOP/s "
                       f"(>= {TARGET_TFLOPS:.0f}: {t['meets_tflops']}), {t['ceiling_ratio']:.2f}x the fp8 matmul "
                       f"ceiling (>= {TARGET_CEILING_RATIO}: {t['meets_ceiling']}), {t['bf16_ratio']:.2f}x our bf16 "
                       f"(>= {TARGET_BF16_RATIO}: {t['meets_bf16']}); with a natural V (transpose included) "
                       f"{t['fp8_natural_v_tflops']:.1f} TFLOP/s.")]
    if data.get("sweep"):
        lines += ["", "| D | config (16k, non-causal, V^T given) | TFLOP/s |", "|---|---|---|"]
        lines += [f"| {s['D']} | {s['config']} | {s['tflops'] if s['tflops'] is None else round(s['tflops'], 1)} "
                  f"{s['error'] or ''} |" for s in data["sweep"]]
    lines += ["", "| inputs | RMSE bf16 (ours) | RMSE fp8 | RMSE fp8 + Hadamard |", "|---|---|---|---|"]
    lines += [f"| {a['inputs']} | {a['bf16']:.2e} | {a['fp8']:.2e} | {a['fp8_hadamard']:.2e} |"
              for a in data["accuracy"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="M in 1k, 4k, 16k (default 1k..16k)")
    parser.add_argument("--sweep", action="store_true", help="time every config of config_space at the longest M")
    parser.add_argument("--head-dims", default="64,128,256")
    parser.add_argument("--out", default="bench_fp8", help="output prefix for .json and .md")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_fp8.py needs a CUDA GPU (found none)", file=sys.stderr)
        return 2
    seqlens = (1024, 4096, 16384) if args.quick else (1024, 2048, 4096, 8192, 16384)
    data = {"device": torch.cuda.get_device_name(), "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__}
    data["ceiling_tflops"] = fp8_ceiling()
    print(f"fp8 matmul ceiling {data['ceiling_tflops']:.1f} TFLOP/s", flush=True)
    data["rows"], data["sweep"] = time_cells([int(d) for d in args.head_dims.split(",")], seqlens, args.sweep)
    cell = [r for r in data["rows"] if r["D"] == 128 and r["M"] == max(seqlens) and not r["causal"]]
    if cell:
        c = cell[0]
        data["target"] = {"M": c["M"], "fp8_tflops": c["fp8_tflops"], "fp8_natural_v_tflops": c["fp8_natural_v_tflops"],
                          "ceiling_ratio": c["fp8_tflops"] / data["ceiling_tflops"], "bf16_ratio": c["fp8_over_bf16"]}
        t = data["target"]
        t.update(meets_tflops=t["fp8_tflops"] >= TARGET_TFLOPS, meets_ceiling=t["ceiling_ratio"] >= TARGET_CEILING_RATIO,
                 meets_bf16=t["bf16_ratio"] >= TARGET_BF16_RATIO)
    data["accuracy"] = accuracy()
    text = render(data)
    print(f"wrote {args.out}.json and {args.out}.md")
    with open(args.out + ".json", "w") as f:
        json.dump(data, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
