"""Quick look at the CuPy backend on a GPU: errors against float32 math at a few shapes (with
the worst element's position, to debug fragment layouts) and forward/backward timings of
chosen configs against PyTorch SDPA's flash backend (BENCH_PROTOCOL.md shapes: 16k tokens,
hidden 2048, (B, H, S, D) contiguous).

    python tools/cupy_smoke.py [--check] [--bench] [--configs "128,64,8;128,64,4,0"] [--seqlens 2048,8192]

--configs: block_m,block_n,num_warps[,o_smem (0/1; omitted: the default's, causal only)].
Timings: triton.testing.do_bench (as tools/bench.py: L2 cleared before each call, median)
where triton imports, else back-to-back launches between two events.
"""
# ruff: noqa: B023  (timed lambdas run inside the iteration that defines them)

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from fa2dispatch.backends import BACKENDS
from fa2dispatch.backends.cupy_cuda.config import CupyConfig, default_config

from fa2dispatch.hardware import device_info
from fa2dispatch.problem import AttentionProblem


def _problem(B, H, Hkv, Mq, Mkv, D, dtype, causal, layout="bhsd", grad=False):
    return AttentionProblem(B, H, Hkv, Mq, Mkv, D, dtype, torch.device("cuda"), layout, causal, D**-0.5,
                            requires_grad=grad)


def _reference(q, k, v, causal, group):
    """float32 math in (B, H, M, D), bottom-right causal."""
    q, k, v = (t.float() for t in (q, k, v))
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        mq, mkv = q.shape[2], k.shape[2]
        i = torch.arange(mq, device=q.device)[:, None]
        j = torch.arange(mkv, device=q.device)[None, :]
        s = s.masked_fill(j > i + mkv - mq, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return p @ v, lse


def _worst(name, ours, ref):
    err = (ours.float() - ref.float()).abs().nan_to_num(float("inf"))
    idx = tuple(int(x) for x in torch.unravel_index(err.argmax(), err.shape))
    print(f"    {name:4} max err {err.max().item():.3e} at {idx} ours {ours[idx].item():.4f} ref {ref[idx].item():.4f}"
          f"  nan={torch.isnan(ours).sum().item()}")
    return err.max().item()


def check(cases):
    backend = BACKENDS["cupy"]
    dev = device_info(torch.device("cuda"))
    for B, H, Hkv, Mq, Mkv, D, dtype, causal in cases:
        prob = _problem(B, H, Hkv, Mq, Mkv, D, dtype, causal, grad=True)
        cfg = default_config(D, dev)
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(B, H, Mq, D, device="cuda", generator=g).to(dtype)
        k = torch.randn(B, Hkv, Mkv, D, device="cuda", generator=g).to(dtype)
        v = torch.randn(B, Hkv, Mkv, D, device="cuda", generator=g).to(dtype)
        do = torch.randn(B, H, Mq, D, device="cuda", generator=g).to(dtype)
        print(f"{str(dtype)[6:]} B{B} H{H}/{Hkv} q{Mq} k{Mkv} d{D} causal={causal}  {cfg.short()}")
        try:
            out, lse = backend.forward(prob, q, k, v, cfg)
            dq, dk, dv = backend.backward(prob, do, q, k, v, out, lse, cfg)
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 (a debugging tool: show and go on)
            print("    FAILED:", type(exc).__name__, str(exc)[:2000])
            continue
        leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
        ref, ref_lse = _reference(*leaves, causal, H // Hkv)
        rdq, rdk, rdv = torch.autograd.grad(ref, leaves, do.float())
        _worst("out", out, ref)
        finite = torch.isfinite(ref_lse)
        print(f"    lse  max err {(lse[finite] - ref_lse[finite]).abs().max().item():.3e}  "
              f"-inf rows ok={torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))}")
        for name, a, b in (("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
            _worst(name, a, b)


def _time(fn, reps=15, inner=10):
    """ms per call: triton's do_bench as tools/bench.py runs it (warmup 25 ms, rep 200 ms, L2
    cleared before each call, median) where triton imports; else the median over ``reps`` of
    ``inner`` back-to-back calls between two events."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    times.sort()
    return times[len(times) // 2]


def bench(configs, seqlens, D=128, dtype=torch.float16, modes=("fwd",)):
    backend = BACKENDS["cupy"]
    for S in seqlens:
        B, H = 16384 // S, 2048 // D
        q, k, v, do = (torch.randn(B, H, S, D, device="cuda", dtype=dtype) for _ in range(4))
        for causal in (False, True):
            flops = 4 * B * H * S * S * D / (2 if causal else 1)
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                ms = _time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
            line = f"S={S:5} causal={int(causal)} flash fwd {flops / ms / 1e9:6.1f}"
            if "bwd" in modes:
                qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
                with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                    o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal)
                    ms = _time(lambda: torch.autograd.grad(o, (qq, kk, vv), do, retain_graph=True))
                line += f" bwd {2.5 * flops / ms / 1e9:6.1f}"
            print(line, "TFLOP/s")
            for cfg in configs:
                prob = _problem(B, H, H, S, S, D, dtype, causal, grad="bwd" in modes)
                reasons = backend.config_reasons(prob, device_info(q.device), cfg)
                if reasons:  # timed anyway: the limits are estimates
                    print(f"   (config_reasons: {reasons})")
                t0 = time.time()
                out, lse = backend.forward(prob, q, k, v, cfg)
                torch.cuda.synchronize()
                first = time.time() - t0
                ms = _time(lambda: backend.forward(prob, q, k, v, cfg))
                label = (f"{cfg.block_m}x{cfg.block_n}x{cfg.num_warps}{'' if cfg.o_smem is None else ' o_smem=' + str(int(cfg.o_smem))} "
                         f"dkdv {cfg.dkdv_block_m}x{cfg.dkdv_block_n} "
                         f"dq {cfg.dq_block_m}x{cfg.dq_block_n} s{cfg.bwd_stages}")
                line = f"   cupy {label:40} fwd {flops / ms / 1e9:6.1f}"
                if "bwd" in modes:
                    ms = _time(lambda: backend.backward(prob, do, q, k, v, out, lse, cfg))
                    line += f" bwd {2.5 * flops / ms / 1e9:6.1f}"
                print(line, f"TFLOP/s (first call {first:.1f}s)")
    from fa2dispatch.backends.cupy_cuda import compile as cc

    for (spec, _), fn in cc._functions.items():
        if spec.kernel == "fa2_fwd":
            print(f"   {dict(spec.defines)}: regs {getattr(fn, 'num_regs', '?')} "
                  f"local {getattr(fn, 'local_size_bytes', '?')} B smem {spec.smem}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--configs", default="")
    ap.add_argument("--bwd-configs", default="", help='"dkdv_block_m,dkdv_block_n,bwd_stages;..." '
                    "(dq blocks transposed)")
    ap.add_argument("--seqlens", default="2048,8192")
    ap.add_argument("--modes", default="fwd")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtypes", default="fp16", help="fp16,bf16 (--bench)")
    args = ap.parse_args()
    if args.check:
        f16, b16 = torch.float16, torch.bfloat16
        check([
            (1, 2, 2, 128, 128, 64, f16, False),
            (2, 4, 4, 300, 300, 128, f16, False),
            (2, 4, 4, 300, 300, 128, b16, True),
            (1, 4, 2, 257, 513, 64, f16, True),
            (1, 4, 1, 513, 257, 128, b16, True),
            (1, 2, 2, 200, 333, 40, f16, True),
            (1, 2, 2, 190, 190, 256, b16, False),
            (1, 2, 2, 100, 300, 200, f16, True),
            (1, 2, 2, 77, 90, 8, f16, False),
        ])
    if args.bench:
        dev = device_info(torch.device("cuda"))
        configs = [default_config(args.head_dim, dev)]
        for text in filter(None, args.configs.split(";")):
            m, n, w, *p = (int(x) for x in text.split(","))
            configs.append(CupyConfig(**{**configs[0].as_dict(), "block_m": m, "block_n": n, "num_warps": w,
                                         "o_smem": bool(p[0]) if p else configs[0].o_smem}))  # default: None
        for text in filter(None, args.bwd_configs.split(";")):
            m, n, st = (int(x) for x in text.split(","))
            configs.append(CupyConfig(**{**configs[0].as_dict(), "dkdv_block_m": m, "dkdv_block_n": n,
                                         "dq_block_m": n, "dq_block_n": m, "bwd_stages": st}))
        for name in args.dtypes.split(","):
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[name]
            print(f"# {name}")
            bench(configs, [int(s) for s in args.seqlens.split(",")], D=args.head_dim, dtype=dtype,
                  modes=args.modes.split(","))


if __name__ == "__main__":
    main()
