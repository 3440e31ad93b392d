"""Launch configurations of the Triton FlashAttention-2 kernels, with per-device-family defaults.

Every launch parameter lives here so the autotuner can reach all of them. The defaults are
starting points from the Triton tutorial's choices for sm_80/sm_90 and AMD's published
CDNA tuning guidance; the H100 autotune cache replaces them where it has a winner.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fa2dispatch.hardware import DeviceInfo
from fa2dispatch.problem import AttentionProblem

from ..base import Config


@dataclass(frozen=True)
class TritonConfig(Config):
    # forward: query block x key block, one program per query block
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    # backward dK/dV kernel: key block kept on chip (dkdv_block_n), query blocks streamed
    dkdv_block_m: int = 32
    dkdv_block_n: int = 64
    # backward dQ kernel: query block kept on chip (dq_block_m), key blocks streamed
    dq_block_m: int = 64
    dq_block_n: int = 32
    bwd_num_warps: int = 4
    bwd_num_stages: int = 2
    # warps of the dK/dV kernel alone (0 = bwd_num_warps). At D=128 its 64x64 tile needs more
    # registers than 4 warps have (255 and 64-120 bytes of spills, docs/PERF_NOTES.md §8),
    # while the dQ kernel holds less and may keep 4.
    dkdv_num_warps: int = 0
    # AMD only (0 = leave to the compiler): occupancy hint, MFMA shape, operand packing
    waves_per_eu: int = 0
    matrix_instr_nonkdim: int = 0
    kpack: int = 0
    # KV-cache decode (decode.py; 0 = decode_launch.py's heuristic): keys per block, warps and
    # pipeline stages of the split-KV kernel, and the number of splits of the key range
    decode_block_n: int = 0
    decode_num_warps: int = 0
    decode_num_stages: int = 0
    num_splits: int = 0
    # forward kernel: "" the plain kernel (kernels.py, every feature); "hopper" the sm_90 kernel
    # with tensor descriptors (kernels_hopper.py; plain calls only, others take the plain kernel
    # with the same blocks). fwd_order 1: heaviest query blocks first (causal); fwd_maxnreg: a
    # register cap (128: two 8-warp programs per SM), 0 the compiler's choice
    fwd_kernel: str = ""
    fwd_order: int = 0
    fwd_maxnreg: int = 0
    # fwd_kernel "gluon" (sm_90, kernels_gluon.py; fp16/bf16 plain calls, D 64 or 128, Mq a
    # multiple of block_m, else the "hopper" kernel): block_m = 16 x num_warps query rows,
    # num_stages K buffers and fwd_v_stages V buffers (0: num_stages)
    fwd_v_stages: int = 0
    # fwd_kernel "gluon-pp" (sm_90, kernels_gluon_ws.attn_fwd_gluon_pp, the ping-pong kernel;
    # fp16/bf16 dense plain calls, D 64 or 128, Mq a multiple of 128, else the "gluon" default):
    # block_m 128 (two consumer warpgroups of 64 rows), num_warps 12 (with the producer
    # warpgroup), num_stages K and fwd_v_stages V buffers, fwd_maxnreg the consumers' registers
    # (240 or 232; launch_gluon.pp_producer_regs gives the producer's); fwd_tile_grid 1 launches
    # one CTA per 128-row tile, 2 one CTA per SM walking the tiles (persistent), 0 lets the
    # launcher choose (launch_gluon.pp_per_tile: persistent but for long causal calls)
    # backward dK/dV kernel: "" the plain kernel; "gluon" (sm_90, kernels_gluon_bwd.py; fp16/bf16
    # dense plain calls, D 64 or 128, Mq a multiple of dkdv_block_m and Mkv of dkdv_block_n, else
    # the plain kernel with the same blocks): dkdv_block_m query rows per step (32 or 64),
    # dkdv_block_n = 16 x dkdv_num_warps keys per CTA, bwd_num_stages Q/dO buffers
    bwd_kernel: str = ""
    fwd_tile_grid: int = 0

    def launch_options(self, vendor: str, backward: bool = False, dkdv: bool = False) -> dict:
        """Keyword arguments for a kernel launch on this vendor (``dkdv``: the dK/dV kernel's)."""
        warps = self.bwd_num_warps if backward else self.num_warps
        if backward and dkdv and self.dkdv_num_warps:
            warps = self.dkdv_num_warps
        opts = {
            "num_warps": warps,
            "num_stages": self.bwd_num_stages if backward else self.num_stages,
        }
        if vendor == "amd":
            for key in ("waves_per_eu", "matrix_instr_nonkdim", "kpack"):
                if getattr(self, key):
                    opts[key] = getattr(self, key)
        return opts


# Gluon forward defaults per head dim: (block_m, block_n, K buffers, V buffers). D=128: 64 x 64
# with one V buffer is 66 KB (three programs per SM); D=64: 64 x 128 with two of each.
GLUON_DEFAULTS = {128: (64, 64, 2, 1), 64: (64, 128, 2, 2)}


def block_d(head_dim: int) -> int:
    """Padded head dim: a power of two, at least 16 (tl.dot's smallest K)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def default_config(problem: AttentionProblem, device: DeviceInfo, hopper: bool = True) -> TritonConfig:
    """Per-device-family default; small blocks under the CPU interpreter (fewer wasted rows)."""
    bd = block_d(problem.D)
    wide = problem.dtype == torch.float32  # 4-byte tiles: half the rows fit on chip
    if device.vendor == "cpu":
        # The interpreter runs each program in numpy; BLOCK_M != BLOCK_N exercises the
        # causal band arithmetic with unequal blocks.
        return TritonConfig(block_m=32, block_n=16, num_warps=4, num_stages=1,
                            dkdv_block_m=16, dkdv_block_n=32, dq_block_m=32, dq_block_n=16,
                            bwd_num_warps=4, bwd_num_stages=1)
    if device.vendor == "amd":
        big = bd >= 256 or wide
        return TritonConfig(block_m=64 if big else 128, block_n=32 if big else 64, num_warps=4, num_stages=1,
                            dkdv_block_m=16 if big else 32, dkdv_block_n=64, dq_block_m=64, dq_block_n=16 if big else 32,
                            bwd_num_warps=4, bwd_num_stages=1,
                            waves_per_eu=2, matrix_instr_nonkdim=16, kpack=1 if big else 2)
    # NVIDIA
    small_smem = device.smem_per_block < 160 * 1024  # sm_86/sm_89 consumer parts: ~99 KB
    if bd >= 256 or (wide and bd >= 128):
        return TritonConfig(block_m=64, block_n=32, num_warps=4, num_stages=1 if small_smem else 2,
                            dkdv_block_m=16, dkdv_block_n=32, dq_block_m=32, dq_block_n=16,
                            bwd_num_warps=4, bwd_num_stages=1)
    if wide:
        return TritonConfig(block_m=64, block_n=32, num_warps=4, num_stages=2,
                            dkdv_block_m=16, dkdv_block_n=64, dq_block_m=64, dq_block_n=16,
                            bwd_num_warps=4, bwd_num_stages=1)
    # Backward blocks: 64 x 64 for both kernels, 4 warps, 2 stages measured fastest or within
    # 0.5% of it at D=64 and D=128 (tools/sweep_bwd.py, H100, fp16, S 4k/16k, causal and not:
    # geomean 322 and 363 TFLOP/s against 240 and 274 for the first guess of 32 x 128 / 128 x 32;
    # docs/PERF_NOTES.md). ~100 KB of shared memory at D=128, so parts with ~99 KB take smaller.
    if small_smem:
        bwd = dict(dkdv_block_m=32, dkdv_block_n=64, dq_block_m=64, dq_block_n=32, bwd_num_warps=4, bwd_num_stages=1)
    else:
        bwd = dict(dkdv_block_m=64, dkdv_block_n=64, dq_block_m=64, dq_block_n=64, bwd_num_warps=4, bwd_num_stages=2)
    if bd >= 128:
        sm90 = hopper and _hopper_default(problem, device, TritonConfig(block_m=128, block_n=128, num_warps=8,
                                                                        num_stages=2 if small_smem else 3, **bwd))
        if sm90:
            return sm90
        # 128-key blocks were faster in every measured case at D=128 on the H100 (geomean 462
        # against 438 TFLOP/s, tools/sweep_configs.py --mode fwd; 64 KB of shared memory as
        # compiled). Measured on Hopper only: other parts keep 64-key blocks until tuned there.
        hopper = device.capability is not None and device.capability >= (9, 0)
        return TritonConfig(block_m=128, block_n=128 if hopper else 64, num_warps=8,
                            num_stages=2 if small_smem else 3, **bwd)
    plain = TritonConfig(block_m=128, block_n=64, num_warps=4, num_stages=3, **bwd)
    return (hopper and _hopper_default(problem, device, plain)) or plain


def _hopper_default(problem: AttentionProblem, device: DeviceInfo, base: TritonConfig) -> TritonConfig | None:
    """On sm_90, plain fp16/bf16 calls with D <= 128 default to the Hopper forward (tensor
    descriptors, a 128-register cap so two programs share an SM) with the tiles measured
    fastest for their kind (launch_hopper.measured_choice: +4-31% over the plain kernel's
    default in every BENCH_PROTOCOL case, docs/HOPPER_ATTEMPTS.md). None elsewhere."""
    hopper = device.vendor == "nvidia" and device.capability is not None and device.capability >= (9, 0)
    varlen_only = problem.feature_names == ("varlen",)  # packed sequences: the Gluon forward takes them
    if not hopper or (problem.feature_names and not varlen_only) or problem.dtype not in (torch.float16, torch.bfloat16):
        return None
    if device.capability < (10, 0) and problem.D in GLUON_DEFAULTS:
        # The Gluon forward (kernels_gluon.py): faster than the tuned Hopper kernel in every
        # BENCH_PROTOCOL cell at D=128 (+4-20%) and D=64 (+1-7%) on the H100 (2026-11-25,
        # tools/sweep_gluon.py, docs/HOPPER_ATTEMPTS.md attempt 6); calls it cannot take
        # (Mq not a multiple of 64, strided tensors) run the Hopper kernel (__init__.py).
        if problem.D == 128 and not varlen_only and problem.Mq % 128 == 0:
            # The ping-pong kernel (kernels_gluon_ws.py): at or above the one-warpgroup kernel in
            # every measured D=128 cell on the H100 (2026-11-25, tools/sweep_gluon.py, fp16, S 1k/4k/16k,
            # causal and not): 0.82-1.07x cuDNN against 0.80-0.93x (docs/HOPPER_ATTEMPTS.md attempt 8).
            return replace(base, block_m=128, block_n=128, num_warps=12, num_stages=2, fwd_v_stages=2,
                           fwd_kernel="gluon-pp", fwd_maxnreg=240)
        m, n, k_stages, v_stages = GLUON_DEFAULTS[problem.D]
        return replace(base, block_m=m, block_n=n, num_warps=m // 16, num_stages=k_stages, fwd_v_stages=v_stages,
                       fwd_kernel="gluon")
    if varlen_only:  # the Hopper kernel has no varlen
        return None
    try:
        from .launch_hopper import measured_choice
    except ImportError:  # no triton: nothing runs here anyway (the backend says why)
        return None
    choice = measured_choice(problem, base)
    if choice is None:
        return None
    config, options = choice
    return replace(config, fwd_kernel="hopper", fwd_order=options.order, fwd_maxnreg=options.maxnreg)
