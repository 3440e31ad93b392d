"""Launcher of the Gluon dK/dV kernel (``kernels_gluon_bwd.attn_bwd_dkdv_gluon``; session 12,
branch ``s12-gluon-dkdv``, never run on a GPU yet). ``launch.backward`` runs it for configs
with ``bwd_kernel="gluon"`` (tuner candidates on sm_90, not a default) when ``problem_reasons``
and ``tensor_reasons`` allow, else the plain kernel with the same blocks. ``dkdv`` (checked)
takes what ``launch.backward`` has computed before its dK/dV launch (lse, delta), so a test or
a sweep can put the two kernels side by side; ``tools/sweep_gluon_bwd.py`` times them."""

from __future__ import annotations

import torch
import triton

from .launch_gluon import _desc, _gl_desc, _shapes
from .launch_hopper import _tma_view

LOG2E = 1.4426950408889634
_KERNELS: dict = {}


def tensor_reasons(q, k, v, dout, layout: str) -> list[str]:
    """The tensors' strides: each needs a descriptor view (``launch_hopper._tma_view``)."""
    return [f"{name}: strides {tuple(t.stride())} (a tensor descriptor needs a 16-byte aligned base, last "
            "stride 1 and rows of one (batch, head) consecutive)"
            for name, t in (("q", q), ("k", k), ("v", v), ("dout", dout)) if _tma_view(t, layout) is None]


def dkdv_reasons(q, k, v, dout, causal: bool, softmax_scale: float, layout: str, block_m: int,
                 num_warps: int) -> list[str]:
    """Why the Gluon dK/dV kernel cannot take this call (empty: it can)."""
    why = []
    if q.dtype not in (torch.float16, torch.bfloat16) or any(t.dtype != q.dtype for t in (k, v, dout)):
        why.append(f"dtype {q.dtype} (supported: float16, bfloat16, all four tensors alike)")
    D = q.shape[-1]
    if D not in (64, 128):
        why.append(f"D={D} (supported: 64, 128)")
    if block_m not in (32, 64) or num_warps not in (4, 8):
        why.append(f"block_m={block_m} num_warps={num_warps} (supported: block_m 32 or 64, num_warps 4 or 8)")
    _, _, _, Mq, Mkv = _shapes(q, k, layout)
    if Mq % block_m or Mkv % (16 * num_warps):
        why.append(f"Mq={Mq} Mkv={Mkv} (supported: Mq a multiple of block_m={block_m}, Mkv of "
                   f"{16 * num_warps} keys)")
    if not softmax_scale > 0:
        why.append(f"softmax_scale={softmax_scale} (supported: > 0)")
    return why + tensor_reasons(q, k, v, dout, layout)


def problem_reasons(problem, config, device) -> list[str]:
    """Why ``config`` (bwd_kernel "gluon") cannot run this problem's dK/dV through the Gluon
    kernel; ``launch.backward`` then runs the plain kernel with the same blocks."""
    why = []
    if device.vendor != "nvidia" or device.capability != (9, 0):
        why.append("the Gluon dK/dV kernel is sm_90 code")
    if problem.dtype not in (torch.float16, torch.bfloat16) or problem.D not in (64, 128):
        why.append(f"dtype={problem.dtype} D={problem.D} (supported: float16/bfloat16, D 64 or 128)")
    if problem.feature_names:
        why.append(f"features {', '.join(problem.feature_names)} (supported: none)")
    m, w = config.dkdv_block_m, config.dkdv_num_warps or config.bwd_num_warps
    if m not in (32, 64) or w not in (4, 8) or config.dkdv_block_n != 16 * w:
        why.append(f"dkdv_block_m={m} dkdv_block_n={config.dkdv_block_n} warps={w} (supported: block_m 32 or "
                   "64, 4 or 8 warps, dkdv_block_n = 16 x warps)")
    elif problem.Mq % m or problem.Mkv % config.dkdv_block_n:
        why.append(f"Mq={problem.Mq} Mkv={problem.Mkv} (supported: multiples of {m} and {config.dkdv_block_n})")
    if not problem.softmax_scale > 0:
        why.append(f"softmax_scale={problem.softmax_scale} (supported: > 0)")
    if problem.B * problem.H * max(problem.Mq, problem.Mkv) >= 2**31:
        why.append("more than 2^31 rows (tensor-descriptor coordinates are 32-bit)")
    return why


def dkdv(q, k, v, dout, lse, delta, causal: bool, softmax_scale: float, layout: str, block_m: int = 64,
         num_warps: int = 4, stages: int = 2):
    """(dk, dv) of a dense 16-bit call: lse (B, H, Mq) natural log, delta (B, H, Mq) as
    ``launch.backward`` computes it. Checked (``dkdv_reasons``)."""
    why = dkdv_reasons(q, k, v, dout, causal, softmax_scale, layout, block_m, num_warps)
    if why:
        raise ValueError("the Gluon dK/dV kernel cannot run this call: " + "; ".join(why))
    return run_dkdv(q, k, v, dout, lse, delta, causal, softmax_scale, layout, block_m, num_warps, stages)


def run_dkdv(q, k, v, dout, lse, delta, causal: bool, softmax_scale: float, layout: str, block_m: int,
             num_warps: int, stages: int):
    """``dkdv`` without its checks (``launch.backward`` has asked ``problem_reasons`` and
    ``tensor_reasons``), through fast_launch."""
    from . import fast_launch, kernels_gluon_bwd

    B, H, Hkv, Mq, Mkv = _shapes(q, k, layout)
    block_n = 16 * num_warps
    qd, q_rows = _desc(q, layout, block_m)
    dod, do_rows = _desc(dout, layout, block_m)
    kd, k_rows = _desc(k, layout, block_n)
    vd, _ = _desc(v, layout, block_n)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)

    def rows(t):  # (batch, head, row) strides, the last dimension contiguous
        s = t.stride()
        return (s[0], s[2], s[1]) if layout == "bshd" else (s[0], s[1], s[2])

    meta = {"CAUSAL": causal, "STAGES": stages, "num_warps": num_warps}
    fast_launch.launch(kernels_gluon_bwd.attn_bwd_dkdv_gluon, (Mkv // block_n * B * Hkv,),
                       (qd, kd, vd, dod, lse, delta, dk, dv, softmax_scale * LOG2E, softmax_scale,
                        *q_rows, *k_rows, *do_rows, *rows(dk), *rows(dv), H, Hkv, H // Hkv, Mq, Mkv), meta, _KERNELS)
    return dk, dv


def compile_dkdv_sm90(dtype: torch.dtype, head_dim: int, causal: bool, block_m: int = 64, num_warps: int = 4,
                      stages: int = 2) -> dict:
    """Compile the kernel for sm_90 without a GPU and report its resources (registers, spills,
    shared memory, wgmma count), as ``launch_gluon.compile_sm90`` does for the forward."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    from . import kernels_gluon_bwd
    from .launch_hopper import _cubin_usage

    fn = kernels_gluon_bwd.attn_bwd_dkdv_gluon
    block_n = 16 * num_warps

    def desc(block):
        t = torch.zeros((256, 256), dtype=dtype)  # metadata only: never read
        return mangle_type(_gl_desc(t, [256, 256], [256, 1], block))

    elem = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    sig = {"q_desc": desc([block_m, head_dim]), "k_desc": desc([block_n, head_dim]),
           "v_desc": desc([block_n, head_dim]), "do_desc": desc([block_m, head_dim]),
           "Lse": "*fp32", "Delta": "*fp32", "DK": "*" + elem, "DV": "*" + elem,
           "qk_scale": "fp32", "softmax_scale": "fp32"}
    for name in fn.arg_names:
        sig.setdefault(name, "i32")
    constexprs = {"CAUSAL": causal, "STAGES": stages, "num_warps": num_warps}
    sig.update({name: "constexpr" for name in constexprs})
    kernel = triton.compile(GluonASTSource(fn, sig, constexprs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps})
    usage = _cubin_usage(kernel.asm["cubin"])
    usage.update(smem=kernel.metadata.shared, wgmma=kernel.asm["ptx"].count("wgmma.mma_async"))
    return usage
