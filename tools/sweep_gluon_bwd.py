"""Time the Gluon dK/dV kernel (launch_gluon_bwd.dkdv; session 12, branch s12-gluon-dkdv)
against the plain Triton dK/dV kernel it would replace, on the H100, with the whole backward of
each and cuDNN's backward in the same run. bench.py's cases: 16k tokens, hidden 2048, fp16.

- ``triton bwd``: launch.backward as the backend runs it (preprocess, dK/dV, dQ);
- ``triton dkdv``: that, minus the same backward with its dK/dV launch stubbed out;
- ``gluon dkdv``: the Gluon kernel alone, per config (block_m, num_warps), checked against the
  Triton kernel's dK and dV first (max abs difference printed);
- ``projected``: triton bwd - triton dkdv + gluon dkdv, as TFLOP/s (backward = 2.5x forward
  FLOPs) and against cuDNN's backward (SDPA, out.backward).

    python3 tools/sweep_gluon_bwd.py --head-dims 64,128 --seqlens 1024,4096,16384
"""

from __future__ import annotations

import argparse


def _without_dkdv(launch, kernels, problem, dout, q, k, v, out, lse, config, info):
    """launch.backward with its plain dK/dV launch skipped: the rest of the backward's time.
    Launches go through ``launch._launch`` (fast_launch) where it exists, else ``fn[grid]``."""
    real_kernel = kernels.attn_bwd_dkdv
    real_launch = getattr(launch, "_launch", None)

    class _Skip:
        def __getitem__(self, grid):
            return lambda *a, **kw: None

    if real_launch is not None:
        launch._launch = lambda fn, *a, **kw: None if fn is real_kernel else real_launch(fn, *a, **kw)
    else:
        kernels.attn_bwd_dkdv = _Skip()
    try:
        return launch.backward(problem, dout, q, k, v, out, lse, None, config, info)
    finally:
        kernels.attn_bwd_dkdv = real_kernel
        if real_launch is not None:
            launch._launch = real_launch


def main(argv=None) -> int:
    import torch
    from fa2dispatch.backends.triton_fa2 import kernels, launch, launch_gluon_bwd
    from fa2dispatch.backends.triton_fa2.config import TritonConfig
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    from fa2dispatch.hardware import device_info
    from fa2dispatch.problem import make_problem

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--seqlens", default="1024,4096,16384")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--configs", default="64:4,32:4,32:8", help="block_m:num_warps,...")
    ap.add_argument("--triton-config", default="64:64:4:2",
                    help="the plain backward's dkdv_block_m:dkdv_block_n:warps:stages (the shipped cache's usual pick)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    info = device_info(dev)
    configs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")]
    bm, bn, w, st = (int(x) for x in args.triton_config.split(":"))
    tcfg = TritonConfig(block_m=64, block_n=64, num_warps=w, num_stages=st, dkdv_block_m=bm, dkdv_block_n=bn,
                        dq_block_m=bn, dq_block_n=bm, bwd_num_warps=w, bwd_num_stages=st)
    print(f"# {info.name}, torch {torch.__version__}; plain backward config {tcfg}")

    def run_case(D: int, S: int, causal: bool) -> None:
        B, H = 16384 // S, 2048 // D
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, dout = (torch.randn(B, H, S, D, generator=g, device="cuda", dtype=torch.float16)
                         for _ in range(4))
        scale = D**-0.5
        flops = 4 * B * H * S * S * D * (0.5 if causal else 1.0) * 2.5
        problem = make_problem(q, k, v, causal=causal, softmax_scale=scale, layout="bhsd")
        out, lse = launch.forward(problem, q, k, v, tcfg, info)
        full = do_bench(lambda: launch.backward(problem, dout, q, k, v, out, lse, None, tcfg, info),
                        warmup=25, rep=200, return_mode="median")
        rest = do_bench(lambda: _without_dkdv(launch, kernels, problem, dout, q, k, v, out, lse, tcfg, info),
                        warmup=25, rep=200, return_mode="median")
        _, dk_t, dv_t = launch.backward(problem, dout, q, k, v, out, lse, None, tcfg, info)
        delta = (dout.float() * out.float()).sum(-1).contiguous()
        qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            o = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, is_causal=causal, scale=scale)
            cudnn = do_bench(lambda: o.backward(dout, retain_graph=True), warmup=25, rep=200,
                             grad_to_none=[qg, kg, vg], return_mode="median")
        line = (f"D={D} S={S:5d} causal={int(causal)}  cudnn bwd {flops / cudnn * 1e-9:6.1f}  "
                f"triton bwd {flops / full * 1e-9:6.1f}  triton dkdv {full - rest:.3f} ms")
        for block_m, warps in configs:
            why = launch_gluon_bwd.dkdv_reasons(q, k, v, dout, causal, scale, "bhsd", block_m, warps)
            if why:
                line += f" | g{block_m}w{warps}: -"
                continue
            dk, dv = launch_gluon_bwd.dkdv(q, k, v, dout, lse, delta, causal, scale, "bhsd", block_m, warps)
            diff = max((dk.float() - dk_t.float()).abs().max().item(), (dv.float() - dv_t.float()).abs().max().item())
            ms = do_bench(lambda bm=block_m, w=warps: launch_gluon_bwd.dkdv(q, k, v, dout, lse, delta, causal, scale,
                                                                           "bhsd", bm, w),
                          warmup=25, rep=200, return_mode="median")
            proj = rest + ms
            line += (f" | g{block_m}w{warps}: {ms:.3f} ms (diff {diff:.1e}) -> {flops / proj * 1e-9:6.1f}"
                     f" x{cudnn / proj:.2f} cudnn")
        print(line, flush=True)

    for D in (int(x) for x in args.head_dims.split(",")):
        for S in (int(x) for x in args.seqlens.split(",")):
            for causal in (bool(int(x)) for x in args.causal.split(",")):
                run_case(D, S, causal)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
