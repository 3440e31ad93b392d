"""Cost of the float32 backward's P renormalization (``launch.renormalize_p``, session 6's fix
for fuzz case #726): the Triton float32 backward with it (what ships) and without it (the
DELTA_ONLY pre-pass only where ``delta_from_dp``'s other rules ask for it, no RENORM), timed in
the same process on the same inputs, plus both results' largest difference from a float64
reference. float32 is an exactness path, not a speed one: its dots are FMA chains.

    python tools/bench_fp32_bwd.py                    # GPU: D 64 and 128, full and causal, S=2048
    python tools/bench_fp32_bwd.py --seqlen 4096 --head-dims 128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--tokens", type=int, default=8192, help="B * seqlen")
    p.add_argument("--hidden", type=int, default=1024, help="H * D")
    args = p.parse_args(argv)
    import torch

    import fa2dispatch
    from fa2dispatch.autotune.timer import CudaTimer, WallTimer
    from fa2dispatch.backends.reference import attention_math
    from fa2dispatch.backends.triton_fa2 import launch

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run under TRITON_INTERPRET=1
    shipped = launch.renormalize_p
    timer = CudaTimer() if dev == "cuda" else WallTimer(runs=3, warmup=0)
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu (Triton interpreter)"
    print(f"{name} · torch {torch.__version__} · float32 backward, "
          f"ms (median of {timer.runs})")
    print("| D | causal | B | H | S | renorm ms | without ms | ratio | max err renorm | max err without |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for D in (int(x) for x in args.head_dims.split(",")):
        for causal in (False, True):
            S, H = args.seqlen, max(1, args.hidden // D)
            B = max(1, args.tokens // S)
            g = torch.Generator(device=dev).manual_seed(0)
            q, k, v, dout = (torch.randn(B, S, H, D, generator=g, device=dev) for _ in range(4))
            for t in (q, k, v):
                t.requires_grad_(True)
            out = fa2dispatch.attention(q, k, v, causal=causal, backend="triton")
            qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
            ref_out, _ = attention_math(qd, kd, vd, causal=causal, softmax_scale=D ** -0.5, layout="bshd",
                                        compute_dtype=torch.float64)
            ref_grads = torch.autograd.grad(ref_out, (qd, kd, vd), dout.double())
            row = []
            for renorm in (True, False):
                launch.renormalize_p = shipped if renorm else (lambda problem: False)
                try:
                    grads = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
                    err = max((a.double() - b).abs().max().item() for a, b in zip(grads, ref_grads))
                    ms = timer(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)).ms
                finally:
                    launch.renormalize_p = shipped
                row.append((ms, err))
            (ms_r, err_r), (ms_n, err_n) = row
            print(f"| {D} | {causal} | {B} | {H} | {S} | {ms_r:.3f} | {ms_n:.3f} | {ms_r / ms_n:.2f} | "
                  f"{err_r:.2e} | {err_n:.2e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
