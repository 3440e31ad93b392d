"""Launcher of the Hopper forward (``kernels_hopper.attn_fwd_hopper``): descriptors, grid, options.

Same contract as ``launch.forward``: returns (out, lse), out in q's shape, layout and dtype,
lse (B, H, Mq) float32 in natural log; bottom-right causal; GQA/MQA. ``reasons(problem,
config, device)`` lists what the variant cannot take (the dispatcher's style: short fragments
naming the argument); ``tensor_reasons(q, k, v, layout)`` the stride/alignment conditions that
only the tensors can tell. ``forward`` runs the plain kernel (``launch.forward``) for calls
whose tensors a descriptor cannot address, so it is correct on every call it is given.

Variant options come from the config when it has them (so TritonConfig can grow the fields
and nothing else changes), else from ``HopperOptions``'s defaults:
``fwd_order`` (0 head-major, 1 query-block-major heaviest-first), ``fwd_persistent``,
``fwd_programs_per_sm`` (persistent grid = SMs x this), ``fwd_warp_specialize``,
``fwd_maxnreg`` (register cap). ``measured_choice`` gives the blocks and options that measured
fastest on the H100 per head dim, causality and length (docs/HOPPER_ATTEMPTS.md).
Kernels are imported lazily so that ``TRITON_INTERPRET`` is read when the first call needs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from fa2dispatch.hardware import DeviceInfo
from fa2dispatch.problem import AttentionProblem

from .config import block_d

LOG2E = 1.4426950408889634  # 1/ln(2)
MAX_PROGRAMS = 2**31 - 1  # gridDim.x; the program id is a 32-bit int


def _strides(t: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """(batch, head, row, dim) strides of a tensor in either layout (as launch.py's)."""
    s = t.stride()
    return (s[0], s[2], s[1], s[3]) if layout == "bshd" else (s[0], s[1], s[2], s[3])


def _tma_view(t: torch.Tensor, layout: str):
    """A 2-D (rows, cols) view of q, k or v for a descriptor, and the (rows per batch, rows per
    head, cols per head) that locate a head's first row; None when the strides allow none
    (the fp8 launcher, ``triton_fp8.launch``, imports it from here)."""
    B, H, M, D = (t.shape[0], t.shape[2], t.shape[1], t.shape[3]) if layout == "bshd" else t.shape
    sz, sh, sm, sd = _strides(t, layout)
    if sd != 1 or (t.data_ptr() % TMA_ALIGN) != 0:
        return None
    if layout == "bshd" and sh == D and sm == H * D and sz == M * sm:
        return (B * M, H * D), (H * D, 1), M, 0, D  # rows (b, m), columns (h, d)
    if sm == D and sh == M * D and sz == H * sh:
        return (B * H * M, D), (D, 1), H * M, M, 0  # rows (b, h, m), columns d
    return None


TMA_ALIGN = 16  # bytes: TMA wants 16-byte aligned base addresses and strides
DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class HopperOptions:
    """The variant's own knobs (block sizes, warps and stages come from the TritonConfig)."""

    order: int = 0  # 0: blocks of one head consecutive; 1: query-block major, heaviest first (causal)
    persistent: bool = False
    programs_per_sm: int = 2  # persistent grid: this many programs per SM
    warp_specialize: bool = False
    maxnreg: int = 0  # 0: the compiler's choice; else a register cap (e.g. 128: two 8-warp programs per SM)

    @staticmethod
    def from_config(config) -> HopperOptions:
        d = HopperOptions()
        return HopperOptions(order=getattr(config, "fwd_order", d.order),
                             persistent=getattr(config, "fwd_persistent", d.persistent),
                             programs_per_sm=getattr(config, "fwd_programs_per_sm", d.programs_per_sm),
                             warp_specialize=getattr(config, "fwd_warp_specialize", d.warp_specialize),
                             maxnreg=getattr(config, "fwd_maxnreg", d.maxnreg))


def measured_choice(problem: AttentionProblem, base):
    """(config, options) that measured fastest on the H100 for this kind of call: ``base`` (a
    TritonConfig) with the forward's blocks replaced, and the HopperOptions. From
    tools/sweep_hopper.py, 2026-11-24 (table in docs/HOPPER_ATTEMPTS.md):

    - 8 warps capped at 128 registers (no spills) so that two programs share an SM and one's
      softmax overlaps the other's wgmma: D=128 on 128 x 64 tiles, D<=64 on 128 x 128;
    - heaviest-first order for causal D>=128 from 4k keys (+2-7% over the same tiles in head order);
    - D<=64 up to 1k keys: 128 x 64 tiles, 4 warps capped at 168 registers (three per SM).
    Head dims between 64 and 128 (not measured) take the D=128 choice (compiles without spills
    at D=96). None for D > 128: the 128-register cap cannot hold a 128 x 256 accumulator
    (ptxas C7602), and nothing else was measured there: keep the plain kernel."""
    from dataclasses import replace

    if problem.D > 128:
        return None
    long = max(problem.Mq, problem.Mkv) >= 4096
    if problem.D <= 64 and not long:
        return replace(base, block_m=128, block_n=64, num_warps=4, num_stages=3), HopperOptions(maxnreg=168)
    if problem.D <= 64:
        return replace(base, block_m=128, block_n=128, num_warps=8, num_stages=2), HopperOptions(maxnreg=128)
    order = 1 if problem.causal and long else 0
    return (replace(base, block_m=128, block_n=64, num_warps=8, num_stages=2),
            HopperOptions(order=order, maxnreg=128))


WS_ENV = "FA2DISPATCH_HOPPER_WS"  # set to 1 to launch the warp-specialized kernel on a GPU anyway


def _ws_refused(opts: HopperOptions, device: DeviceInfo | None) -> bool:
    """The warp-specialized kernel compiles for sm_90 but never finished on the H100 (Triton
    3.6.0, driver 580.159.04, 2026-11-24: a sweep child and the GPU test both killed after
    35-42 s on 512-token calls that take microseconds): treat it as a hang until re-checked."""
    import os

    return opts.warp_specialize and device is not None and device.vendor == "nvidia" and os.environ.get(WS_ENV) != "1"


def reasons(problem: AttentionProblem, config, device: DeviceInfo | None = None) -> list[str]:
    """Why this variant cannot run ``problem`` with ``config`` (empty: it can)."""
    out = []
    if _ws_refused(HopperOptions.from_config(config), device):
        out.append(f"fwd_warp_specialize=True: hung on the H100 with Triton 3.6 (set {WS_ENV}=1 to try)")
    if problem.dtype not in DTYPES:
        out.append(f"dtype={problem.dtype} (supported: float16, bfloat16)")
    if problem.D % 8 or not 8 <= problem.D <= 256:
        out.append(f"head dim D={problem.D} (supported: a multiple of 8 from 8 to 256)")
    unsupported = []
    if problem.window != (-1, -1):
        unsupported.append(f"window={problem.window}")
    if problem.softcap:
        unsupported.append(f"softcap={problem.softcap}")
    if problem.alibi is not None:
        unsupported.append(f"alibi={problem.alibi!r}")
    if problem.dropout_p:
        unsupported.append(f"dropout_p={problem.dropout_p}")
    if problem.causal and problem.causal_alignment != "bottom_right":
        unsupported.append(f"causal_alignment={problem.causal_alignment!r}")
    if problem.varlen or problem.kvcache:
        unsupported.append("varlen/kvcache")
    if unsupported:
        out.append("not implemented in the Hopper forward: " + ", ".join(unsupported))
    if device is not None and not (device.vendor == "cpu" or (device.vendor == "nvidia" and device.capability
                                                               and device.capability >= (9, 0))):
        out.append(f"device {device.arch} (supported: NVIDIA sm_90+, tensor descriptors; or the CPU interpreter)")
    bm, bn = config.block_m, config.block_n
    for name, b in (("block_m", bm), ("block_n", bn)):
        if b & (b - 1) or not 16 <= b <= 256:
            out.append(f"{name}={b} (supported: a power of two from 16 to 256, a TMA box dimension)")
    tiles = triton.cdiv(problem.Mq, bm) * problem.B * problem.H
    if tiles > MAX_PROGRAMS:
        out.append(f"B={problem.B} x H={problem.H} x Mq={problem.Mq} needs {tiles} tiles (supported: at most "
                   f"{MAX_PROGRAMS})")
    return out


def _tma_strides(t: torch.Tensor, layout: str) -> tuple[int, int, int, int] | None:
    """(batch, head, row, dim) strides when a descriptor can address ``t``, else None."""
    s = _strides(t, layout)
    size = t.element_size()
    if s[3] != 1 and t.shape[-1] > 1:
        return None
    if any((x * size) % TMA_ALIGN for x in s[:3]) or t.data_ptr() % TMA_ALIGN:
        return None
    return s[0], s[1], s[2], 1


def tensor_reasons(q, k, v, layout: str) -> list[str]:
    """Stride and alignment conditions of the descriptors (the problem cannot tell them)."""
    bad = [name for name, t in (("q", q), ("k", k), ("v", v)) if _tma_strides(t, layout) is None]
    return [(f"{', '.join(bad)}: a tensor descriptor needs a 16-byte aligned base, last stride 1 and the "
             f"other strides multiples of 16 bytes")] if bad else []


def _desc(t: torch.Tensor, layout: str, block_rows: int, bd: int):
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, H, M, D = (t.shape[0], t.shape[2], t.shape[1], t.shape[3]) if layout == "bshd" else tuple(t.shape)
    return TensorDescriptor(t, [B, H, M, D], list(_tma_strides(t, layout)), [1, 1, block_rows, bd])


def _reg_cap(opts: HopperOptions, device: DeviceInfo) -> dict:
    return {"maxnreg": opts.maxnreg} if opts.maxnreg and device.vendor == "nvidia" else {}


def forward(problem: AttentionProblem, q, k, v, config, device: DeviceInfo, options: HopperOptions | None = None,
            checked: bool = False):
    """(out, lse) of one forward call through the Hopper kernel; ``launch.forward`` for tensors
    that no descriptor can address (``tensor_reasons``). Raises ValueError for calls that
    ``reasons`` refuses (``checked``: the caller already asked ``reasons``)."""
    why = [] if checked else reasons(problem, config, device)
    if why:
        raise ValueError("the Hopper forward cannot run this call: " + "; ".join(why))
    if tensor_reasons(q, k, v, problem.layout):
        from .launch import forward as plain_forward

        return plain_forward(problem, q, k, v, config, device)
    from . import kernels_hopper

    opts = options or HopperOptions.from_config(config)
    if _ws_refused(opts, device):
        raise ValueError(f"warp_specialize=True: the warp-specialized kernel hung on the H100 with Triton 3.6 "
                         f"(set {WS_ENV}=1 to launch it anyway)")
    if opts.warp_specialize:
        ws = _forward_ws(problem, q, k, v, config, opts)
        if ws is not None:
            return ws
    B, H, Mq = problem.B, problem.H, problem.Mq
    bd = block_d(problem.D)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, D % 8 == 0: addressable
    lse = torch.empty((B, H, Mq), dtype=torch.float32, device=q.device)
    bm, bn = config.block_m, config.block_n
    tiles = triton.cdiv(Mq, bm) * B * H
    if opts.persistent and device.vendor == "nvidia":
        grid = (min(tiles, max(1, device.multiprocessors * opts.programs_per_sm)),)
    elif opts.persistent:  # the interpreter: a few programs, each looping over several tiles
        grid = (min(tiles, 3),)
    else:
        grid = (tiles,)
    kernels_hopper.attn_fwd_hopper[grid](
        _desc(q, problem.layout, bm, bd), _desc(k, problem.layout, bn, bd), _desc(v, problem.layout, bn, bd),
        _desc(out, problem.layout, bm, bd), lse, problem.softmax_scale * LOG2E,
        H, problem.group, Mq, problem.Mkv, B * H,
        CAUSAL=problem.causal, POS_SCALE=problem.softmax_scale > 0, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn,
        ORDER=opts.order, PERSISTENT=opts.persistent,
        num_warps=config.num_warps, num_stages=config.num_stages, **_reg_cap(opts, device),
    )
    return out, lse


def _forward_ws(problem: AttentionProblem, q, k, v, config, opts: HopperOptions):
    """The warp-specialized kernel over 2-D descriptor views, or None where the views do not
    exist (then the rank-4 kernel runs): q, k, v each one (rows, cols) view
    (``_tma_view``), and in bshd D a power of two (a padded tile would read
    the next head's columns). Runs with num_warps=4 per warpgroup (Triton adds the producer and
    the second consumer group: 12 warps)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from . import kernels_hopper

    bd = block_d(problem.D)
    views = [_tma_view(t, problem.layout) for t in (q, k, v)]
    if any(x is None for x in views) or (views[0][1][0] != problem.D and bd != problem.D):
        return None
    qv, kv, vv = views
    if kv[2:] != vv[2:]:
        return None
    bm, bn = config.block_m, config.block_n
    B, H, Mq = problem.B, problem.H, problem.Mq
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Mq), dtype=torch.float32, device=q.device)
    kernels_hopper.attn_fwd_hopper_ws[(triton.cdiv(Mq, bm) * B * H,)](
        TensorDescriptor(q, list(qv[0]), list(qv[1]), [bm, bd]), TensorDescriptor(k, list(kv[0]), list(kv[1]), [bn, bd]),
        TensorDescriptor(v, list(vv[0]), list(vv[1]), [bn, bd]), out, lse, problem.softmax_scale * LOG2E,
        *_strides(out, problem.layout), *qv[2:], *kv[2:],
        H, problem.group, Mq, problem.Mkv, B * H,
        CAUSAL=problem.causal, POS_SCALE=problem.softmax_scale > 0, HEAD_DIM=problem.D, BLOCK_D=bd,
        BLOCK_M=bm, BLOCK_N=bn, ORDER=opts.order, NEED_MASK=problem.causal or problem.Mkv % bn != 0,
        num_warps=4, num_stages=config.num_stages,
    )
    return out, lse


def compile_sm90(dtype: torch.dtype, head_dim: int, causal: bool, config, options: HopperOptions | None = None,
                 capability: int = 90) -> dict:
    """Compile the Hopper forward offline (no GPU; needs TRITON_INTERPRET unset or 0) for
    GPUTarget("cuda", capability, 32). Returns registers, spills, shared memory, and whether the
    PTX holds wgmma and bulk tensor copies (TMA); ``asm`` carries the PTX and the cubin."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import kernels_hopper

    opts = options or HopperOptions.from_config(config)
    if opts.warp_specialize:
        return _compile_ws(dtype, head_dim, causal, config, opts, capability)
    fn = kernels_hopper.attn_fwd_hopper
    if type(fn).__name__ == "InterpretedFunction":
        raise RuntimeError("offline compilation needs TRITON_INTERPRET unset or 0")
    ty = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    bd = block_d(head_dim)
    bm, bn = config.block_m, config.block_n
    constexprs = {"CAUSAL": causal, "POS_SCALE": True, "BLOCK_D": bd, "BLOCK_M": bm, "BLOCK_N": bn, "ORDER": opts.order,
                      "PERSISTENT": opts.persistent}
    sig = {"QDesc": f"tensordesc<{ty}[1, 1, {bm}, {bd}]>", "KDesc": f"tensordesc<{ty}[1, 1, {bn}, {bd}]>",
           "VDesc": f"tensordesc<{ty}[1, 1, {bn}, {bd}]>", "ODesc": f"tensordesc<{ty}[1, 1, {bm}, {bd}]>",
           "Lse": "*fp32", "qk_scale": "fp32", "H": "i32", "GROUP": "i32", "Mq": "i32", "Mkv": "i32", "n_bh": "i32"}
    sig.update({name: "constexpr" for name in constexprs})
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if opts.maxnreg:
        options["maxnreg"] = opts.maxnreg
    compiled = triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", capability, 32),
                              options=options)
    ptx = compiled.asm.get("ptx", "")
    return dict(_cubin_usage(compiled.asm["cubin"]), shared_bytes=compiled.metadata.shared,
                wgmma="wgmma.mma_async" in ptx, tma="cp.async.bulk.tensor" in ptx,
                warps=compiled.metadata.num_warps, asm=compiled.asm)


def _cubin_usage(cubin: bytes) -> dict:
    """Registers, spill bytes and stack frame of a cubin (cuobjdump -res-usage, the binary Triton
    ships), and the SASS tensor-core instruction counts (nvdisasm): HGMMA is Hopper's wgmma,
    LDL/STL local-memory traffic."""
    import os
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia import compiler as nv

    tools = os.path.join(os.path.dirname(nv.__file__), "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        res = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-hex", f.name], capture_output=True,
                              text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    num = lambda key: int(m.group(1)) if (m := re.search(key + r"[:=]\s*(\d+)", res)) else -1
    return {"registers": num("REG"), "stack": num("STACK"), "hgmma": len(re.findall(r"\bHGMMA\.", sass)),
            "ldl_stl": len(re.findall(r"\b(?:LDL|STL)\b", sass)), "mufu_ex2": len(re.findall(r"MUFU\.EX2", sass))}


def _compile_ws(dtype, head_dim, causal, config, opts, capability) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import kernels_hopper

    fn = kernels_hopper.attn_fwd_hopper_ws
    ty = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    bd = block_d(head_dim)
    bm, bn = config.block_m, config.block_n
    constexprs = {"CAUSAL": causal, "POS_SCALE": True, "HEAD_DIM": head_dim, "BLOCK_D": bd, "BLOCK_M": bm, "BLOCK_N": bn,
                      "ORDER": opts.order, "NEED_MASK": causal}
    sig = {name: "i32" for name in fn.arg_names}
    sig.update({"QDesc": f"tensordesc<{ty}[{bm}, {bd}]>", "KDesc": f"tensordesc<{ty}[{bn}, {bd}]>",
                "VDesc": f"tensordesc<{ty}[{bn}, {bd}]>", "Out": f"*{ty}", "Lse": "*fp32", "qk_scale": "fp32"})
    sig.update({name: "constexpr" for name in constexprs})
    compiled = triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    ptx = compiled.asm.get("ptx", "")
    return dict(_cubin_usage(compiled.asm["cubin"]), shared_bytes=compiled.metadata.shared,
                wgmma="wgmma.mma_async" in ptx, tma="cp.async.bulk.tensor" in ptx,
                warps=compiled.metadata.num_warps, setmaxnreg="setmaxnreg" in ptx, asm=compiled.asm)
