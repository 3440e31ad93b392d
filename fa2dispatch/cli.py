"""Command line: ``fa2dispatch demo | info``.

``demo`` runs a few attention calls through the dispatcher on this machine (the GPU if there
is one, else the CPU with Triton under its interpreter), checks each against the float64
reference, and prints what ran and why. ``info`` prints a short environment summary.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from importlib import metadata


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _prepare_interpreter() -> None:
    """Without a GPU, Triton kernels can only run interpreted; must precede the kernels' import."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


DEMO_CALLS = [
    # name, dtype, causal, (B, H, Hkv, Mq, Mkv, D) on CPU, same on GPU
    ("causal GQA 4:1", "float16", True, (1, 8, 2, 96, 96, 64), (4, 32, 8, 4096, 4096, 128)),
    ("decode-like Mq=1", "float16", True, (2, 4, 4, 1, 200, 128), (16, 32, 8, 1, 8192, 128)),
    ("Mq != Mkv, D=40", "float32", False, (1, 4, 4, 70, 130, 40), (2, 16, 16, 1000, 3000, 40)),
    ("bf16 causal", "bfloat16", True, (1, 4, 4, 64, 64, 64), (4, 16, 16, 4096, 4096, 128)),
]


def cmd_demo(args: argparse.Namespace) -> int:
    _prepare_interpreter()
    import torch
    from rich.console import Console
    from rich.table import Table

    import fa2dispatch
    from fa2dispatch.backends.reference import attention_math

    console = Console()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton under TRITON_INTERPRET=1)"
    console.print(f"[bold]fa2dispatch {fa2dispatch.__version__}[/] on {where}")
    table = Table(title="attention calls through the dispatcher (layout bshd, forward + backward)")
    for col in ("call", "B,H,Hkv,Mq,Mkv,D", "dtype", "ran on", "err out", "err grads", "ms"):
        table.add_column(col, overflow="fold")
    failures, why = 0, []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for name, dtype_name, causal, cpu_shape, gpu_shape in DEMO_CALLS:
        B, H, Hkv, Mq, Mkv, D = gpu_shape if device == "cuda" else cpu_shape
        dtype = getattr(torch, dtype_name)

        def rand(*shape):
            return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

        q, k, v = rand(B, Mq, H, D), rand(B, Mkv, Hkv, D), rand(B, Mkv, Hkv, D)
        dout = torch.randn(B, Mq, H, D, generator=gen).to(device=device, dtype=dtype)
        decision = fa2dispatch.explain(q, k, v, causal=causal)
        start = time.perf_counter()
        out = fa2dispatch.attention(q, k, v, causal=causal)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = (time.perf_counter() - start) * 1e3
        ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref_out, _ = attention_math(*ref, causal=causal, softmax_scale=D**-0.5, compute_dtype=torch.float64)
        ref_grads = torch.autograd.grad(ref_out, ref, dout.double())
        err_out = (out.double() - ref_out).abs().max().item()
        err_grad = max((g.double() - r).abs().max().item() for g, r in zip(grads, ref_grads))
        # Sanity bound for the demo only (the tests apply the strict STYLE.md rule).
        ok = err_out < 5e-2 and err_grad < 1e-1
        failures += not ok
        table.add_row(name, f"{B},{H},{Hkv},{Mq},{Mkv},{D}", dtype_name, f"{decision.backend.name} ({decision.source})",
                      f"{err_out:.1e}", f"{err_grad:.1e}" + ("" if ok else " [red]too large[/]"), f"{elapsed:.1f}")
        why.append((name, decision))
    console.print(table)
    console.print("err: max |ours - float64 reference| over out and over dq, dk, dv. "
                  "ms: forward + backward, first call (compilation included).")
    for name, decision in why:
        console.print(f"[bold]{name}[/]: fa2dispatch.explain(...) says")
        console.print(str(decision), markup=False, highlight=False)
    return 1 if failures else 0


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    import fa2dispatch
    from fa2dispatch.backends import BACKENDS
    from fa2dispatch.hardware import device_info

    print(f"fa2dispatch {fa2dispatch.__version__}")
    print(f"python {platform.python_version()} on {platform.platform()}")
    for pkg in ("torch", "triton", "numpy", "cupy-cuda12x", "cupy-cuda13x"):
        print(f"{pkg:14} {_version(pkg)}")
    cuda = torch.cuda.is_available()
    info = device_info(torch.device("cuda" if cuda else "cpu"))
    print(f"device         {info.name} [{info.arch}] vendor={info.vendor} SMs={info.multiprocessors} "
          f"smem/block={info.smem_per_block // 1024} KiB")
    print(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}")
    for name, backend in BACKENDS.items():
        reasons = backend.available(info)
        print(f"backend {name:10} {'available' if not reasons else 'unavailable: ' + '; '.join(reasons)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fa2dispatch", description="FlashAttention-2 dispatch for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run attention through the dispatcher here and print what ran").set_defaults(
        func=cmd_demo)
    sub.add_parser("info", help="short environment summary for bug reports").set_defaults(func=cmd_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
