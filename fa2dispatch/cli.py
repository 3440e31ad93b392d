"""Command line: ``fa2dispatch demo | info | report | autotune``.

``demo`` runs a few attention calls through the dispatcher on this machine (the GPU if there
is one, else the CPU with Triton under its interpreter), checks each against the float64
reference, and prints what ran and why. ``info`` prints a short environment summary for bug
reports; ``report`` the backend selection report (``fa2dispatch.report``), ``--json`` for
machines. Both take ``--simulate NAME`` to describe a simulated device profile. ``autotune``
tunes problem buckets here and caches the winners (``fa2dispatch.autotune.command``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import NoReturn


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


def _demo_call(fa2dispatch, torch, attention_math, spec, device, backend, gen) -> tuple[list[str], object, bool]:
    """One call forward + backward against the float64 reference: (table cells, decision, ok)."""
    name, dtype_name, causal, cpu_shape, gpu_shape = spec
    B, H, Hkv, Mq, Mkv, D = gpu_shape if device == "cuda" else cpu_shape
    dtype = getattr(torch, dtype_name)
    q, k, v = (torch.randn(B, m, h, D, generator=gen).to(device=device, dtype=dtype).requires_grad_()
               for m, h in ((Mq, H), (Mkv, Hkv), (Mkv, Hkv)))
    dout = torch.randn(B, Mq, H, D, generator=gen).to(device=device, dtype=dtype)
    cells = [name, f"{B},{H},{Hkv},{Mq},{Mkv},{D}", dtype_name, backend]
    try:
        decision = fa2dispatch.explain(q, k, v, causal=causal, backend=backend)
    except ValueError as exc:  # a forced backend that cannot run this call says why
        return cells + [f"refused: {str(exc).split('): ', 1)[-1]}", "-", "-", "-"], None, True
    start = time.perf_counter()
    out = fa2dispatch.attention(q, k, v, causal=causal, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) * 1e3
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, _ = attention_math(*ref, causal=causal, softmax_scale=D**-0.5, compute_dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref_out, ref, dout.double())
    err_out = (out.double() - ref_out).abs().max().item()
    err_grad = max((g.double() - r).abs().max().item() for g, r in zip(grads, ref_grads))
    ok = err_out < 5e-2 and err_grad < 1e-1  # sanity bound for the demo; the tests apply STYLE.md's rule
    return cells + [f"{decision.backend.name} ({decision.source})", f"{err_out:.1e}",
                    f"{err_grad:.1e}" + ("" if ok else " [red]too large[/]"), f"{elapsed:.1f}"], decision, ok


def cmd_demo(args: argparse.Namespace) -> int:
    _prepare_interpreter()
    _check_env_backend(args)
    import torch
    from rich.console import Console
    from rich.table import Table

    import fa2dispatch
    from fa2dispatch.backends.reference import attention_math

    console = Console()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton kernels under TRITON_INTERPRET=1)"
    console.print(f"[bold]fa2dispatch {fa2dispatch.__version__}[/] on {where}")
    # On CPU the dispatcher picks the reference (far faster than the interpreter); the demo
    # also forces the Triton kernels so that they run here too.
    backends = ("auto",) if device == "cuda" else ("auto", "triton")
    table = Table(title="attention calls (layout bshd, forward + backward) against a float64 reference")
    for col in ("call", "B,H,Hkv,Mq,Mkv,D", "dtype", "backend=", "ran on", "err out", "err grads", "ms"):
        table.add_column(col, overflow="fold")
    failures, why = 0, []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for spec in DEMO_CALLS:
        for backend in backends:
            cells, decision, ok = _demo_call(fa2dispatch, torch, attention_math, spec, device, backend, gen)
            table.add_row(*cells)
            failures += not ok
            if backend == "auto":
                why.append((spec[0], decision))
    console.print(table)
    console.print("err: max |result - float64 reference| over out and over dq, dk, dv. "
                  "ms: forward + backward, first call (compilation included).")
    name, decision = why[0]
    console.print(f"[bold]{name}[/]: fa2dispatch.explain(q, k, v, causal=True) says")
    console.print(str(decision), markup=False, highlight=False)
    console.print("Every choice on this machine: `fa2dispatch report` (or `--simulate h100` for another device).")
    return 1 if failures else 0


def _usage_error(args: argparse.Namespace, message: str) -> NoReturn:
    """Exit 2 with one line on stderr, as argparse does for a bad flag (no traceback)."""
    print(f"fa2dispatch {args.command}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _simulation(args: argparse.Namespace) -> str | None:
    """--simulate, else FA2DISPATCH_SIMULATE; an unknown name in the environment exits 2 as
    argparse does for the flag."""
    from fa2dispatch.report import resolve_simulation

    try:
        return resolve_simulation(args.simulate)
    except ValueError as exc:
        _usage_error(args, str(exc))


def _check_env_backend(args: argparse.Namespace) -> None:
    """FA2DISPATCH_BACKEND names a registered backend (or "auto"): the commands that run attention
    would otherwise fail on their first call, after a traceback. ``report`` and ``info`` describe
    the environment instead: they print the bad value (the report per call) and exit 0."""
    from fa2dispatch.dispatch import ENV_BACKEND, check_backend_name

    value = os.environ.get(ENV_BACKEND) or "auto"
    try:
        check_backend_name(value, ENV_BACKEND)
    except ValueError as exc:
        _usage_error(args, str(exc))


def cache_dir_problem(text: str) -> str | None:
    """Why the autotuner could not write its cache into directory ``text``, or None. Checked before
    anything is timed, so a typo costs no tuning run (a missing directory is created, parents too)."""
    if not text.strip():
        return "is empty (give a directory)"
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            return f"{str(path)!r} exists and is not a directory"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{str(path)!r} is not writable"
        return None
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{str(path)!r} cannot be created: {str(ancestor)!r} is not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{str(path)!r} cannot be created: {str(ancestor)!r} is not writable"
    return None


def _check_cache_dir(args: argparse.Namespace) -> None:
    """--cache-dir, else FA2DISPATCH_CACHE_DIR when set: a directory autotune can write."""
    from fa2dispatch.autotune.cache import ENV_CACHE_DIR

    if args.cache_dir is not None:
        source, value = "argument --cache-dir", args.cache_dir
    elif os.environ.get(ENV_CACHE_DIR):
        source, value = ENV_CACHE_DIR, os.environ[ENV_CACHE_DIR]
    else:
        return  # the platform's user cache dir; autotune says so if there is none
    problem = cache_dir_problem(value)
    if problem is not None:
        _usage_error(args, f"{source}: {problem}" if source.startswith("argument") else
                     f"{source}={value!r}: {problem}")


def cmd_info(args: argparse.Namespace) -> int:
    from fa2dispatch.report import collect_summary, summary_lines

    print("\n".join(summary_lines(collect_summary(_simulation(args)))))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import contextlib
    import json

    from fa2dispatch.report import collect, render

    simulate = _simulation(args)
    if args.json:
        # stdout carries the JSON alone: anything a probe prints goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            data = collect(simulate)
        print(json.dumps(data, indent=2, default=str))
        return 0
    from rich.console import Console

    render(collect(simulate), Console())
    return 0


def _add_simulate(parser: argparse.ArgumentParser) -> None:
    from fa2dispatch.hardware import ENV_SIMULATE, PROFILES

    parser.add_argument("--simulate", choices=list(PROFILES), metavar="NAME",
                        help=f"describe a simulated device instead of this machine's (wins over {ENV_SIMULATE}); "
                        f"one of: {', '.join(PROFILES)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fa2dispatch", description="FlashAttention-2 dispatch for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run attention through the dispatcher here and print what ran").set_defaults(
        func=cmd_demo)
    info = sub.add_parser("info", help="short environment summary for bug reports")
    _add_simulate(info)
    info.set_defaults(func=cmd_info)
    report = sub.add_parser("report", help="backend selection report: the device, every backend, who runs what")
    report.add_argument("--json", action="store_true", help="print the report as JSON (and nothing else) to stdout")
    _add_simulate(report)
    report.set_defaults(func=cmd_report)
    from fa2dispatch.autotune.command import add_arguments as add_autotune_arguments

    autotune = sub.add_parser("autotune", help="time the candidates of each problem bucket here; cache the winners")
    add_autotune_arguments(autotune)
    _add_simulate(autotune)
    args = parser.parse_args(argv)
    if args.command == "autotune":
        _check_env_backend(args)
        _check_cache_dir(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
