"""Compile the Triton kernels for a GPU target on any machine (no GPU needed).

``python -m fa2dispatch.backends.triton_fa2.offline --target sm_90 --dtype float16 --head-dim 128``
prints, per kernel, the shared memory it needs and whether the matrix instructions we expect
are in the generated code. Must run with ``TRITON_INTERPRET`` unset or 0: the interpreter
replaces ``@triton.jit`` functions with Python ones that cannot be compiled.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys

import torch

from fa2dispatch.hardware import DeviceInfo
from fa2dispatch.problem import AttentionProblem

from .config import TritonConfig, block_d, default_config

# Profiles of the offline targets: Triton target and the limits that default configs must fit.
TARGETS = {
    "sm_80": DeviceInfo("nvidia", "A100 (offline)", "sm_80", (8, 0), 108, 163 * 1024, 32),
    "sm_90": DeviceInfo("nvidia", "H100 (offline)", "sm_90", (9, 0), 132, 227 * 1024, 32),
    "gfx942": DeviceInfo("amd", "MI300X (offline)", "gfx942", None, 304, 64 * 1024, 64),
}
_POINTERS = {"Q", "K", "V", "Out", "DO", "DK", "DV", "DQ"}
_FP32_POINTERS = {"Lse", "Delta", "Corr", "Slopes"}
_I32_POINTERS = {"CuQ", "CuK"}
_FLOATS = {"qk_scale", "softmax_scale", "cap_a", "cap_b", "p_drop", "rp_drop"}
_I64 = {"seed", "offset"}  # the dropout RNG state: 64-bit values
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _gpu_target(device: DeviceInfo):
    from triton.backends.compiler import GPUTarget

    if device.vendor == "nvidia":
        return GPUTarget("cuda", device.capability[0] * 10 + device.capability[1], 32)
    return GPUTarget("hip", device.arch, 64)


def _signature(fn, constexprs: dict, dtype: str) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _POINTERS:
            sig[name] = f"*{dtype}"
        elif name in _FP32_POINTERS:
            sig[name] = "*fp32"
        elif name in _FLOATS:
            sig[name] = "fp32"
        elif name in _I32_POINTERS:
            sig[name] = "*i32"
        elif name in _I64:
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig


FEATURE_SETS = {
    # what a forward+backward with every FlashAttention-2 feature on compiles to
    "all": dict(HAS_LEFT=True, HAS_RIGHT=False, SOFTCAP=True, ALIBI=True, DROPOUT=True, VARLEN=True),
    "window": dict(HAS_LEFT=True, HAS_RIGHT=True),
}


def kernel_launches(problem: AttentionProblem, config: TritonConfig,
                    features: dict | None = None) -> list[tuple[str, dict, bool]]:
    """(kernel name, constexprs, is_backward) of every kernel a forward+backward call launches;
    ``features``: the feature constexprs (FEATURE_SETS) on top of the plain kernel's. The
    backward's choices are launch.backward's own (``delta_from_dp``, ``renormalize_p``)."""
    from .launch import delta_from_dp, renormalize_p

    common = dict(CAUSAL=problem.causal, HEAD_DIM=problem.D, BLOCK_D=block_d(problem.D), **(features or {}))
    pre = dict(VARLEN=True) if features and features.get("VARLEN") else {}
    precision = "ieee" if problem.dtype == torch.float32 else "tf32"
    renorm = dict(RENORM=True) if renormalize_p(problem) else {}
    dq = dict(common, BLOCK_M=config.dq_block_m, BLOCK_N=config.dq_block_n, DOT_PRECISION=precision, **renorm)
    if (features and features.get("DROPOUT")) or delta_from_dp(problem, config):
        # launch.backward: delta from dP, the dQ kernel's DELTA_ONLY pass (float32: and the row sums)
        delta = ("attn_bwd_dq", dict(dq, DELTA_ONLY=True), True)
    else:
        delta = ("attn_bwd_preprocess", dict(HEAD_DIM=problem.D, BLOCK_D=block_d(problem.D),
                                             BLOCK_M=config.dq_block_m, **pre), True)
    return [
        ("attn_fwd", dict(common, BLOCK_M=config.block_m, BLOCK_N=config.block_n, DOT_PRECISION=precision), False),
        delta,
        ("attn_bwd_dkdv", dict(common, BLOCK_M=config.dkdv_block_m, BLOCK_N=config.dkdv_block_n,
                               DOT_PRECISION=precision, **renorm), True),
        ("attn_bwd_dq", dq, True),
    ]


def _with_defaults(fn, constexprs: dict) -> dict:
    """The kernel's constexpr parameters not given, at their defaults (as a launch that leaves
    them out compiles them): otherwise they would enter the signature as run-time ints."""
    out = dict(constexprs)
    for p in fn.params:
        if p.is_constexpr and p.name not in out and p.default is not inspect.Parameter.empty:
            out[p.name] = p.default
    return out


def compile_report(target: str, dtype: torch.dtype, head_dim: int, causal: bool = True,
                   config: TritonConfig | None = None, features: str | None = None) -> list[dict]:
    """Compile every kernel of one problem kind for ``target``; one dict per kernel."""
    import triton
    from triton.compiler import ASTSource

    from . import kernels

    if type(kernels.attn_fwd).__name__ == "InterpretedFunction":
        raise RuntimeError("offline compilation needs TRITON_INTERPRET unset or 0")
    device = TARGETS[target]
    problem = AttentionProblem(B=1, H=8, Hkv=2, Mq=1024, Mkv=1024, D=head_dim, dtype=dtype,
                               device=torch.device("cpu"), layout="bshd", causal=causal, softmax_scale=1.0)
    config = config or default_config(problem, device)
    if config.fwd_kernel == "gluon-pp":  # Gluon (kernels_gluon_ws.py): the plain kernel runs what it falls back to
        from . import _gluon_default

        config = _gluon_default(problem, config)
    rows = []
    for name, constexprs, backward in kernel_launches(problem, config, FEATURE_SETS.get(features)):
        fn = getattr(kernels, name)
        constexprs = _with_defaults(fn, constexprs)
        src = ASTSource(fn, _signature(fn, constexprs, _TRITON_DTYPE[dtype]), constexprs)
        compiled = triton.compile(src, target=_gpu_target(device), options=config.launch_options(device.vendor, backward, dkdv=name == "attn_bwd_dkdv"))
        code = compiled.asm.get("ptx") or compiled.asm.get("amdgcn") or ""
        rows.append({
            "target": target, "kernel": name, "dtype": str(dtype).removeprefix("torch."), "head_dim": head_dim,
            "shared_bytes": compiled.metadata.shared, "smem_limit": device.smem_per_block,
            "wgmma": "wgmma" in code, "mma": ("mma.sync" in code) or ("wgmma" in code) or ("mfma" in code),
            "config": config.short(), "features": features or "",
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=sorted(TARGETS), action="append", required=True)
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], action="append", required=True)
    parser.add_argument("--head-dim", type=int, action="append", required=True)
    parser.add_argument("--causal", choices=["true", "false"], default="true")
    parser.add_argument("--features", choices=sorted(FEATURE_SETS), default=None,
                        help="compile the kernels with these FlashAttention-2 features switched on")
    args = parser.parse_args(argv)
    rows = []
    for target in args.target:
        for dtype in args.dtype:
            for d in args.head_dim:
                rows += compile_report(target, getattr(torch, dtype), d, args.causal == "true",
                                       features=args.features)
    json.dump(rows, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
