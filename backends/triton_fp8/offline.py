"""Compile the fp8 kernel for a GPU target on any machine (no GPU needed).

``python -m fa2dispatch.backends.triton_fp8.offline --target sm_90 --head-dim 128`` prints, per
(head dim, path), the shared memory the kernel needs, whether the PTX has fp8 warpgroup MMAs
(``wgmma.mma_async ... e4m3``) or fp8 ``mma.sync``, and the config. Must run with
``TRITON_INTERPRET`` unset or 0 (an interpreted kernel cannot be compiled).
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import torch

from fa2dispatch.hardware import PROFILES
from fa2dispatch.problem import AttentionProblem

from ..triton_fa2.offline import TARGETS as FA2_TARGETS
from ..triton_fa2.offline import _gpu_target
from .config import FP8Config, block_d, default_config

TARGETS = {"sm_89": PROFILES["rtx4090"], "sm_90": FA2_TARGETS["sm_90"]}
_POINTERS_FP8 = {"Q", "K", "VT"}
_FP32_POINTERS = {"Lse", "QDesc", "KDesc", "VDesc"}


def _signature(fn, constexprs: dict, use_tma: bool, config: FP8Config, head_dim: int, out_dtype: str) -> dict:
    bd = block_d(head_dim)
    blocks = {"Q": [config.block_m, bd], "K": [config.block_n, bd], "VT": [bd, config.block_n]}
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _POINTERS_FP8:
            sig[name] = f"tensordesc<fp8e4nv[{blocks[name][0]}, {blocks[name][1]}]>" if use_tma else "*fp8e4nv"
        elif name == "Out":
            sig[name] = f"*{out_dtype}"
        elif name in _FP32_POINTERS:
            sig[name] = "*fp32"
        elif name == "softmax_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_report(target: str, head_dim: int, causal: bool = False, config: FP8Config | None = None,
                   out_dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Compile the fp8 forward for ``target`` (TMA and pointer paths where the target has TMA)."""
    import triton
    from triton.compiler import ASTSource

    from . import kernels

    if type(kernels.attn_fwd_fp8).__name__ == "InterpretedFunction":
        raise RuntimeError("offline compilation needs TRITON_INTERPRET unset or 0")
    device = TARGETS[target]
    problem = AttentionProblem(B=1, H=8, Hkv=2, Mq=4096, Mkv=4096, D=head_dim, dtype=torch.float8_e4m3fn,
                               device=torch.device("cpu"), layout="bshd", causal=causal, softmax_scale=1.0)
    config = config or default_config(problem, device)
    paths = [False]
    if config.tma and device.capability >= (9, 0) and block_d(head_dim) == head_dim:
        paths = [True, False]
    out_name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[out_dtype]
    rows = []
    for use_tma in paths:
        constexprs = {"CAUSAL": causal, "POS_SCALE": True, "HEAD_DIM": head_dim, "BLOCK_D": block_d(head_dim),
                      "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "USE_TMA": use_tma}
        fn = kernels.attn_fwd_fp8
        src = ASTSource(fn, _signature(fn, constexprs, use_tma, config, head_dim, out_name), constexprs)
        compiled = triton.compile(src, target=_gpu_target(device), options=config.launch_options())
        ptx = compiled.asm.get("ptx") or ""
        wgmma = re.findall(r"wgmma\.mma_async\S*", ptx)
        mma = re.findall(r"mma\.sync\S*", ptx)
        rows.append({
            "target": target, "head_dim": head_dim, "causal": causal, "tma": use_tma,
            "shared_bytes": compiled.metadata.shared, "smem_limit": device.smem_per_block,
            "wgmma_fp8": sorted({w for w in wgmma if "e4m3" in w}), "mma_fp8": sorted({m for m in mma if "e4m3" in m}),
            "other_mma": sorted({m for m in wgmma + mma if "e4m3" not in m}),
            "wgmma_waits": sorted(set(re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx))),
            "config": config.short(),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=sorted(TARGETS), action="append", required=True)
    parser.add_argument("--head-dim", type=int, action="append", required=True)
    parser.add_argument("--causal", choices=["true", "false"], default="false")
    parser.add_argument("--config", default=None, help="JSON FP8Config fields, e.g. '{\"block_n\": 64}'")
    args = parser.parse_args(argv)
    rows = []
    for target in args.target:
        for d in args.head_dim:
            config = None
            if args.config:
                problem = AttentionProblem(B=1, H=8, Hkv=2, Mq=4096, Mkv=4096, D=d, dtype=torch.float8_e4m3fn,
                                           device=torch.device("cpu"), layout="bshd", causal=False,
                                           softmax_scale=1.0)
                base = default_config(problem, TARGETS[target]).as_dict()
                config = FP8Config(**{**base, **json.loads(args.config)})
            rows += compile_report(target, d, args.causal == "true", config)
    json.dump(rows, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
