#!/usr/bin/env python3
"""Benchmark fa2dispatch.attention against PyTorch's attention kernels (BENCH_PROTOCOL.md).

Cases follow the FlashAttention-2 paper: 16,384 tokens per batch (B = 16384 // Mq) and a
hidden size of 2048 (H = 2048 // D), layout (B, H, Mq, D) contiguous, Mq == Mkv, random
normal inputs. Every provider is measured in the same run: absolute times drift between
machines, so what we quote are TFLOP/s and our ratio to each peer from one run.

    python tools/bench.py                                   # full matrix, fwd + bwd, fp16
    python tools/bench.py --quick --modes fwd --providers ours,flash

Heavy imports (torch, triton, rich, fa2dispatch) live inside functions so that the file
imports, and `--help` works, on a machine without them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, ContextManager

TOKENS = 16384  # tokens per batch: B = TOKENS // Mq
HIDDEN = 2048  # model width: H = HIDDEN // D
DEFAULT_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_SEQLENS = (1024, 4096, 16384)
DEFAULT_HEAD_DIMS = (64, 128)
WARMUP_MS, REP_MS = 25, 200  # protocol: do_bench(warmup=25, rep=200, return_mode="median")
PROVIDERS = ("ours", "flash", "cudnn", "efficient", "flex")
PEERS = PROVIDERS[1:]
PEER_SHORT = {"flash": "flash", "cudnn": "cudnn", "efficient": "eff", "flex": "flex"}
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
# Sanity bound only (the real accuracy tests live in tests/): two fp16/bf16 kernels at these
# sizes differ by ~1e-3 in the output; gradients are compared relative to their own size.
CHECK_ATOL = 2e-2
# The chunked fp32 fallback reference holds ~4 Mq x Mkv fp32 matrices per head (scores,
# probabilities and their gradients); this caps what one chunk of heads may take.
REFERENCE_CHUNK_BYTES = 8 << 30
NO_GPU_MESSAGE = "bench.py needs a CUDA GPU (found none)"


class CudaContextLost(RuntimeError):
    """A kernel left the CUDA context unusable (e.g. illegal address); nothing after it is trustworthy."""


@dataclass(frozen=True)
class Case:
    """One benchmark cell: shapes in the project's vocabulary plus what is timed."""

    mode: str  # "fwd" | "bwd"
    dtype: str  # "fp16" | "bf16"
    causal: bool
    B: int
    H: int
    Mq: int
    Mkv: int
    D: int

    @property
    def flops(self) -> float:
        """Protocol FLOPs: 4*B*H*Mq*Mkv*D forward, halved when causal; backward is 2.5x forward."""
        fwd = 4.0 * self.B * self.H * self.Mq * self.Mkv * self.D
        if self.causal:
            fwd /= 2
        return fwd * (2.5 if self.mode == "bwd" else 1.0)

    @property
    def label(self) -> str:
        return f"{self.mode} {self.dtype} causal={self.causal} D={self.D} Mq={self.Mq} (B={self.B} H={self.H})"

    def key(self) -> dict[str, Any]:
        return {"mode": self.mode, "dtype": self.dtype, "causal": self.causal, "B": self.B, "H": self.H,
                "Mq": self.Mq, "Mkv": self.Mkv, "D": self.D}


@dataclass
class Provider:
    """How to build one provider's attention call for a case, and the context it must run in."""

    name: str
    make: Callable[[Case], Callable]  # case -> fn(q, k, v) -> out
    context: Callable[[], ContextManager] = contextlib.nullcontext


# ----------------------------------------------------------------------------- CLI


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _name_list(allowed: tuple[str, ...] | list[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{text!r} (choose from: {', '.join(allowed)})")
        return names

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=_int_list, default=None,
                   help=f"comma list of Mq (= Mkv); default {','.join(map(str, DEFAULT_SEQLENS))}")
    p.add_argument("--quick", action="store_true",
                   help=f"seqlens {','.join(map(str, QUICK_SEQLENS))} only (ignored if --seqlens is given)")
    p.add_argument("--head-dims", type=_int_list, default=list(DEFAULT_HEAD_DIMS),
                   help="comma list of D; default 64,128 (256 where supported)")
    p.add_argument("--modes", type=_name_list(("fwd", "bwd")), default=["fwd", "bwd"], help="default fwd,bwd")
    p.add_argument("--causal", choices=("both", "true", "false"), default="both")
    p.add_argument("--dtype", type=_name_list(tuple(DTYPES)), default=["fp16"],
                   help="fp16 | bf16 | fp16,bf16; default fp16")
    p.add_argument("--providers", type=_name_list(PROVIDERS), default=list(PROVIDERS),
                   help=f"comma list, subset of {','.join(PROVIDERS)}")
    p.add_argument("--flex", action=argparse.BooleanOptionalAction, default=True,
                   help="include FlexAttention (torch.compile'd); --no-flex skips it and its compile time")
    # "ours" means our kernel: on the H100 the dispatcher itself prefers cuDNN for many cells,
    # and timing that as "ours" would compare cuDNN with itself.
    p.add_argument("--backend", default="triton", help="passed to fa2dispatch.attention(backend=...); default triton")
    p.add_argument("--overhead", action="store_true",
                   help="measure the warm dispatch overhead on tiny decode-like shapes (tools/overhead.py) instead")
    p.add_argument("--seed", type=int, default=0, help="seed for the random inputs")
    p.add_argument("--json", default="bench_results.json", help="where to write rows + header as JSON")
    p.add_argument("--markdown", default=None, help="also write a GitHub markdown table (for BENCHMARKS.md)")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                   help="also write a PNG (TFLOP/s against seqlen, one line per provider) next to the JSON "
                        "(tools/bench_plot.py; needs matplotlib)")
    args = p.parse_args(argv)

    if args.seqlens is None:
        args.seqlens = list(QUICK_SEQLENS if args.quick else DEFAULT_SEQLENS)
    for s in args.seqlens:
        if s <= 0 or TOKENS % s:
            p.error(f"--seqlens: {s} does not divide {TOKENS} tokens per batch")
    for d in args.head_dims:
        if d <= 0 or HIDDEN % d:
            p.error(f"--head-dims: {d} does not divide hidden size {HIDDEN}")
    if not args.flex:
        args.providers = [x for x in args.providers if x != "flex"]
    if not args.providers:
        p.error("no providers left to measure")
    return args


def build_cases(args: argparse.Namespace) -> list[Case]:
    """The matrix in table order: mode, dtype, causal, D, Mq."""
    causals = {"both": (False, True), "true": (True,), "false": (False,)}[args.causal]
    return [
        Case(mode, dtype, causal, B=TOKENS // s, H=HIDDEN // d, Mq=s, Mkv=s, D=d)
        for mode in args.modes for dtype in args.dtype for causal in causals
        for d in args.head_dims for s in args.seqlens
    ]


# ----------------------------------------------------------------------------- providers


def _ours_provider(backend: str) -> Provider:
    def make(case: Case) -> Callable:
        import fa2dispatch  # here, not at the top: an import failure is a per-cell reason, not a crash

        def run(q, k, v):
            return fa2dispatch.attention(q, k, v, causal=case.causal, layout="bhsd", backend=backend)

        return run

    return Provider("ours", make)


def _sdpa_provider(name: str) -> Provider:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_BACKENDS[name])

    def make(case: Case) -> Callable:
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=case.causal)

    # The pin wraps the whole measurement rather than each call, so no context-manager
    # overhead lands inside the timer. Backward follows the kernel chosen in forward.
    return Provider(name, make, lambda: sdpa_kernel([backend]))


def _causal_mask(b, h, q_idx, kv_idx):
    # Top-left aligned, like SDPA's is_causal when Mq == Mkv.
    return q_idx >= kv_idx


def _flex_provider() -> Provider:
    def make(case: Case) -> Callable:
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        # Every case is a new static shape; starting from empty dynamo caches keeps the
        # recompile limit from silently sending later cases back to (slow) eager flex.
        torch._dynamo.reset()
        compiled = torch.compile(flex_attention, dynamic=False)
        mask = None
        if case.causal:
            mask = create_block_mask(_causal_mask, B=None, H=None, Q_LEN=case.Mq, KV_LEN=case.Mkv, device="cuda")
        return lambda q, k, v: compiled(q, k, v, block_mask=mask)

    return Provider("flex", make)


def build_providers(names: list[str], backend: str) -> dict[str, Provider]:
    out: dict[str, Provider] = {}
    for name in names:
        if name == "ours":
            out[name] = _ours_provider(backend)
        elif name == "flex":
            out[name] = _flex_provider()
        else:
            out[name] = _sdpa_provider(name)
    return out


# ----------------------------------------------------------------------------- measuring


def _reason(exc: BaseException, caught: list) -> str:
    """One line saying why a cell is empty.

    SDPA's "no available kernel" error says nothing itself; the why comes as warnings
    ("Flash attention requires ..."), so those are appended, and only for that error.
    """
    first = (str(exc).strip().splitlines() or [""])[0]
    text = f"{type(exc).__name__}: {first}"
    if "kernel" in first.lower() or "backend" in first.lower():
        details = []
        for w in caught:
            line = (str(w.message).strip().splitlines() or [""])[0]
            if line and "not used because" not in line and line not in details:
                details.append(line)
        if details:
            text += " [" + "; ".join(details[:3]) + "]"
    return text[:300]


def _ensure_context_alive() -> None:
    import torch

    try:
        torch.cuda.synchronize()
    except Exception as exc:  # a sticky CUDA error: every later number would be garbage
        raise CudaContextLost(str(exc).splitlines()[0]) from exc


def make_inputs(case: Case, seed: int) -> tuple:
    """q, k, v (B, H, M, D) contiguous from a seeded generator; dout too for backward cases."""
    import torch

    dtype = getattr(torch, DTYPES[case.dtype])
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(m):
        return torch.randn((case.B, case.H, m, case.D), generator=g, device="cuda", dtype=dtype)

    q, k, v = randn(case.Mq), randn(case.Mkv), randn(case.Mkv)
    dout = None
    if case.mode == "bwd":
        dout = randn(case.Mq)
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v, dout


def time_ms(provider: Provider, case: Case, q, k, v, dout) -> float:
    """Median ms of one call (fwd) or of out.backward(dout, retain_graph=True) (bwd)."""
    import torch
    from triton.testing import do_bench

    fn = provider.make(case)
    with provider.context():
        if case.mode == "fwd":
            bench, grads = (lambda: fn(q, k, v)), None
        else:
            out = fn(q, k, v)
            bench, grads = (lambda: out.backward(dout, retain_graph=True)), [q, k, v]
        bench()  # outside the timer: compilation, autotuning and lazy init stay out
        torch.cuda.synchronize()  # so an asynchronous failure is charged to this provider
        return do_bench(bench, warmup=WARMUP_MS, rep=REP_MS, grad_to_none=grads, return_mode="median")


def host_us(provider: Provider, case: Case, q, k, v, dout, calls: int = 5) -> float:
    """Median host time of one timed call, from an idle queue (synchronised before each), in us.
    do_bench zeroes a 256 MiB buffer before each run (~90 us on an H100); a call whose host time
    is longer than that is timed partly as idle GPU, and this column shows when that happens."""
    import statistics
    import time

    import torch

    fn = provider.make(case)
    samples = []
    with provider.context():
        out = fn(q, k, v) if case.mode == "bwd" else None
        for _ in range(calls):
            torch.cuda.synchronize()
            start = time.perf_counter()
            if out is None:
                fn(q, k, v)
            else:
                out.backward(dout, retain_graph=True)
            samples.append((time.perf_counter() - start) * 1e6)
    torch.cuda.synchronize()
    for t in (q, k, v):
        t.grad = None
    return statistics.median(samples)


def measure(provider: Provider, case: Case, tensors: tuple) -> tuple[float | None, str | None]:
    """(ms, None) or (None, reason); never raises except when the CUDA context is gone."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return time_ms(provider, case, *tensors), None
        except Exception as exc:
            reason = _reason(exc, caught)
    for t in tensors[:3]:
        t.grad = None
    torch.cuda.empty_cache()
    _ensure_context_alive()
    return None, reason


# ----------------------------------------------------------------------------- sanity check


def _forward_backward(fn: Callable, q, k, v, dout) -> tuple:
    """fp32 copies of out (and dq, dk, dv when dout is given) from fresh leaves."""
    import torch

    if dout is None:
        with torch.no_grad():
            return fn(q, k, v).float(), []
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return out.detach().float(), [t.grad.float() for t in leaves]


def _math_reference(case: Case, q, k, v, dout) -> tuple:
    """The project's one reference (attention_math, fp32), a few batch entries at a time, so
    Mq = 16k never needs every B*H*Mq*Mkv score at once. Each chunk runs its backward right
    away: keeping every chunk's graph alive would bring back the memory the chunking avoids.
    """
    import torch

    from fa2dispatch.backends.reference import attention_math

    B, H, Mq, D = q.shape
    step = max(1, REFERENCE_CHUNK_BYTES // (16 * H * Mq * k.shape[2]))  # 4 fp32 Mq x Mkv matrices per head
    outs, grads = [], [[], [], []]
    for i in range(0, B, step):
        with torch.set_grad_enabled(dout is not None):
            leaves = [t[i:i + step].detach().float().requires_grad_(dout is not None) for t in (q, k, v)]
            o, _ = attention_math(*leaves, causal=case.causal, softmax_scale=D**-0.5, layout="bhsd")
        if dout is not None:
            o.backward(dout[i:i + step].float())
            for g, leaf in zip(grads, leaves):
                g.append(leaf.grad)
        outs.append(o.detach())
        del o, leaves
    return torch.cat(outs), ([] if dout is None else [torch.cat(g) for g in grads])


def _reference(case: Case, q, k, v, dout) -> tuple[str, Any, list]:
    """The flash peer's result; the chunked fp32 math attention where flash cannot run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    try:
        with warnings.catch_warnings(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            warnings.simplefilter("ignore")
            out, grads = _forward_backward(
                lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=case.causal), q, k, v, dout)
            return "flash", out, grads
    except Exception:
        out, grads = _math_reference(case, q, k, v, dout)
        return "math", out, grads


def check_ours(provider: Provider, case: Case, tensors: tuple) -> dict[str, Any]:
    """Compare ours with a reference once; status 'ok', 'MISMATCH', 'error' (ours raised) or 'no-ref'."""
    import torch

    q, k, v, dout = tensors
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            got, got_grads = _forward_backward(provider.make(case), q, k, v, dout)
        except Exception as exc:
            reason = _reason(exc, caught)
            torch.cuda.empty_cache()
            _ensure_context_alive()
            return {"status": "error", "reason": reason}
    try:
        ref_name, ref, ref_grads = _reference(case, q, k, v, dout)
    except Exception as exc:
        torch.cuda.empty_cache()
        _ensure_context_alive()
        return {"status": "no-ref", "reason": _reason(exc, [])}
    # Relative to the reference's own size: output entries are O(1) or less, gradients grow with Mkv.
    errs = [(a - b).abs().max().item() / max(1.0, b.abs().max().item())
            for a, b in zip([got, *got_grads], [ref, *ref_grads])]
    worst = float("nan") if any(e != e for e in errs) else max(errs)  # a NaN must not vanish in max()
    del got, got_grads, ref, ref_grads
    torch.cuda.empty_cache()
    ok = worst <= CHECK_ATOL  # False for NaN too
    return {"status": "ok" if ok else "MISMATCH", "reference": ref_name, "max_rel_diff": worst}


# ----------------------------------------------------------------------------- ceilings + environment


def _bench_ms(fn: Callable) -> float:
    from triton.testing import do_bench

    fn()
    return do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")


def measure_ceilings() -> dict[str, Any]:
    """Roofs for the day: 8192^3 bf16 and fp8 matmuls (TFLOP/s) and a 1 GiB copy (GB/s, read+write)."""
    import torch

    n = 8192
    result: dict[str, Any] = {"errors": {}}

    def matmul_bf16():
        a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        return 2 * n ** 3 / _bench_ms(lambda: a @ b) / 1e9

    def matmul_fp8():
        a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()  # _scaled_mm wants b column-major
        one = torch.ones((), device="cuda", dtype=torch.float32)
        return 2 * n ** 3 / _bench_ms(
            lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)) / 1e9

    def copy_1gib():
        src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        return 2 * src.numel() / _bench_ms(lambda: dst.copy_(src)) / 1e6  # bytes read + written

    for key, fn in (("matmul_bf16_tflops", matmul_bf16), ("matmul_fp8_tflops", matmul_fp8),
                    ("copy_gbps", copy_1gib)):
        try:
            result[key] = round(fn(), 1)
        except Exception as exc:
            result[key] = None
            result["errors"][key] = _reason(exc, [])
        torch.cuda.empty_cache()
    return result


def _guard(fn: Callable) -> Any:
    try:
        return fn()
    except Exception:
        return None


def _nvidia_smi(field: str) -> str | None:
    out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return out.strip().splitlines()[0].strip()


def _version(module: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(module)
    except Exception:
        return _guard(lambda: __import__(module).__version__)


def environment() -> dict[str, Any]:
    """Header for the results; every probe guarded so a missing one leaves a None, never a crash."""
    import platform

    import torch

    cap = _guard(lambda: torch.cuda.get_device_capability())
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "gpu": _guard(lambda: torch.cuda.get_device_name()),
        "arch": f"sm_{cap[0]}{cap[1]}" if cap else None,
        "driver": _guard(lambda: _nvidia_smi("driver_version")),
        "cuda": torch.version.cuda,
        "cuda_driver_api": _guard(lambda: torch._C._cuda_getDriverVersion()),
        "cudnn": _guard(lambda: torch.backends.cudnn.version()),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "fa2dispatch": _version("fa2dispatch"),
        "python": platform.python_version(),
        "command": " ".join(["python", "tools/bench.py", *sys.argv[1:]]),
    }


# ----------------------------------------------------------------------------- rows + output


def make_row(case: Case, providers: list[str], ms: dict, errors: dict, check: dict) -> dict[str, Any]:
    tflops = {p: (None if ms[p] is None else case.flops / (ms[p] * 1e-3) / 1e12) for p in providers}
    ratio = {}
    if "ours" in providers:
        ratio = {p: (tflops["ours"] / tflops[p] if tflops["ours"] and tflops[p] else None)
                 for p in providers if p != "ours"}
    return {**case.key(), "flops": case.flops, "ms": ms, "tflops": tflops, "ratio": ratio,
            "errors": errors, "check": check}


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table_columns(providers: list[str]) -> list[str]:
    cols = ["mode", "dtype", "causal", "D", "seqlen", *providers]
    if "ours" in providers:
        cols += [f"x {PEER_SHORT[p]}" for p in providers if p != "ours"] + ["ok"]
    return cols


def table_cells(row: dict, providers: list[str]) -> list[str]:
    cells = [row["mode"], row["dtype"], str(row["causal"]), str(row["D"]), str(row["Mq"])]
    cells += [_fmt(row["tflops"][p], ".1f") for p in providers]
    if "ours" in providers:
        cells += [_fmt(row["ratio"][p], ".2f") for p in providers if p != "ours"]
        cells.append(row["check"].get("status", "-"))
    return cells


def header_lines(header: dict) -> list[str]:
    env, ceil = header["env"], header["ceilings"]
    return [
        f"Date {env['date']} · GPU {env['gpu']} ({env['arch']}) · driver {env['driver']} · "
        f"CUDA {env['cuda']} · torch {env['torch']} · triton {env['triton']}",
        f"Ceilings: bf16 matmul 8192³ {_fmt(ceil.get('matmul_bf16_tflops'), '.1f')} TFLOP/s · "
        f"fp8 matmul {_fmt(ceil.get('matmul_fp8_tflops'), '.1f')} TFLOP/s · "
        f"1 GiB copy {_fmt(ceil.get('copy_gbps'), '.1f')} GB/s",
        "Cells: TFLOP/s (forward 4·B·H·Mq·Mkv·D, halved when causal; backward 2.5x forward); "
        "x peer = ours / peer; 16k tokens per batch, hidden 2048.",
        f"Command: `{env['command']}`",
    ]


def failure_lines(rows: list[dict]) -> list[str]:
    """Empty cells grouped by provider and reason, so a wall of '-' still says why."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for row in rows:
        where = f"{row['mode']}/{'causal' if row['causal'] else 'full'}/D{row['D']}/{row['Mq']}"
        for p, reason in row["errors"].items():
            groups[(p, reason)].append(where)
    return [f"{p}: {reason} ({len(ws)} cells, e.g. {ws[0]})" for (p, reason), ws in groups.items()]


def render_markdown(header: dict, rows: list[dict], providers: list[str]) -> str:
    cols = table_columns(providers)
    lines = [*(f"{x}  " for x in header_lines(header)), "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(table_cells(r, providers)) + " |" for r in rows]
    fails = failure_lines(rows)
    if fails:
        lines += ["", "Empty cells:", "", *(f"- {x}" for x in fails)]
    return "\n".join(lines) + "\n"


def _write_atomic(path: str, text: str) -> None:
    # Written after every case: a run cut short (time limit, lost context) still leaves its rows.
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_outputs(args: argparse.Namespace, header: dict, rows: list[dict]) -> None:
    _write_atomic(args.json, json.dumps({**header, "rows": rows}, indent=1) + "\n")
    if args.markdown:
        _write_atomic(args.markdown, render_markdown(header, rows, args.providers))


def print_table(header: dict, rows: list[dict], providers: list[str]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is a dependency, but the numbers matter more than the frame
        print(render_markdown(header, rows, providers))
        return
    # Piped into a log (gpu_check.sh tees it) rich would assume 80 columns and elide the numbers.
    console = Console() if sys.stdout.isatty() else Console(width=250)
    for line in header_lines(header):
        console.print(line, highlight=False, markup=False)
    table = Table(title="attention TFLOP/s")
    for col in table_columns(providers):
        table.add_column(col, justify="left" if col in ("mode", "dtype", "causal", "ok") else "right")
    for row in rows:
        cells = table_cells(row, providers)
        style = "bold red" if row["check"].get("status") == "MISMATCH" else None
        table.add_row(*cells, style=style)
    console.print(table)
    for line in failure_lines(rows):
        console.print(f"[dim]- {line}[/dim]", highlight=False)


# ----------------------------------------------------------------------------- main


def run_case(case: Case, providers: dict[str, Provider], seed: int) -> dict[str, Any]:
    """Check ours once, then time every provider on the same inputs; frees memory before returning."""
    import torch

    tensors = make_inputs(case, seed)
    ms: dict[str, float | None] = {}
    errors: dict[str, str] = {}
    check: dict[str, Any] = {"status": "-"}
    host: dict[str, float] = {}
    try:
        if "ours" in providers:
            check = check_ours(providers["ours"], case, tensors)
            if check["status"] == "error":  # timing would only raise the same error again
                ms["ours"], errors["ours"] = None, check["reason"]
        for name, provider in providers.items():
            if name in ms:
                continue
            ms[name], reason = measure(provider, case, tensors)
            if reason:
                errors[name] = reason
            for t in tensors[:3]:
                t.grad = None
            if ms[name] is not None and name in ("ours", "cudnn"):
                try:
                    host[name] = host_us(provider, case, *tensors)
                except Exception:  # noqa: BLE001 - it timed a moment ago; the column is informative only
                    pass
    finally:
        del tensors
        torch.cuda.empty_cache()
    row = make_row(case, list(providers), {p: ms.get(p) for p in providers}, errors, check)
    row["host_us"] = host
    return row


def run_overhead(args: argparse.Namespace) -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import overhead

    rows = overhead.measure()
    table = overhead.markdown(rows)
    print(table, flush=True)
    _write_atomic(args.json, json.dumps({"env": environment(), "overhead": rows}, indent=2))
    if args.markdown:
        _write_atomic(args.markdown, table + "\n")
    worst = max((r["overhead_us"] for r in rows if "overhead_us" in r), default=None)
    print(f"largest overhead: {worst:+.1f} us per call" if worst is not None else "nothing measured", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print(f"{NO_GPU_MESSAGE.split(' (')[0]} (torch is not installed)", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(NO_GPU_MESSAGE, file=sys.stderr)
        return 2

    if args.overhead:
        return run_overhead(args)

    header: dict[str, Any] = {"env": environment(), "protocol": {
        "tokens": TOKENS, "hidden": HIDDEN, "warmup_ms": WARMUP_MS, "rep_ms": REP_MS,
        "return_mode": "median", "backend": args.backend, "seed": args.seed}}
    print(header_lines({**header, "ceilings": {}})[0], flush=True)
    header["ceilings"] = measure_ceilings()
    print(header_lines(header)[1], flush=True)

    providers = build_providers(args.providers, args.backend)
    cases = build_cases(args)
    rows: list[dict] = []
    status = 0
    for i, case in enumerate(cases, 1):
        try:
            row = run_case(case, providers, args.seed)
        except CudaContextLost as exc:
            print(f"CUDA context lost during {case.label}: {exc}; stopping (rows so far are written)",
                  file=sys.stderr, flush=True)
            status = 3
            break
        rows.append(row)
        cells = "  ".join(f"{p} {_fmt(row['tflops'][p], '.1f')}" for p in args.providers)
        host = "  ".join(f"{p} {us:.0f}" for p, us in row["host_us"].items())
        print(f"[{i}/{len(cases)}] {case.label}: {cells}  check={row['check']['status']}"
              + (f"  host us: {host}" if host else ""), flush=True)
        write_outputs(args, header, rows)

    write_outputs(args, header, rows)
    print_table(header, rows, args.providers)
    print(f"rows written to {args.json}" + (f" and {args.markdown}" if args.markdown else ""), flush=True)
    if args.plot:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_plot

        png = bench_plot.default_path(args.json)
        why = bench_plot.plot({**header, "rows": rows}, png)
        print(f"plot not written: {why}" if why else f"plot written to {png}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
