"""Launch configurations of the fp8 forward kernel, with per-device-family defaults.

Every launch parameter lives here so the autotuner can reach all of them. The sm_90 defaults
are the fastest of ``config_space`` at S=16k per head dim on the H100 (tools/bench_fp8.py
--sweep; the numbers are in BENCHMARKS.md). sm_89 parts (RTX 4090, L4: ~99 KB of shared memory, no
TMA, no wgmma) take smaller tiles through plain loads; not measured here (no such GPU lent).
"""

from __future__ import annotations

from dataclasses import dataclass

from fa2dispatch.hardware import DeviceInfo
from fa2dispatch.problem import AttentionProblem

from ..base import Config


@dataclass(frozen=True)
class FP8Config(Config):
    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 3
    tma: bool = True  # tensor descriptors (TMA) where the inputs allow it (sm_90+, see launch.py)

    def launch_options(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


def block_d(head_dim: int) -> int:
    """Padded head dim: a power of two, at least 32 (the K of an fp8 MMA)."""
    return max(32, 1 << (head_dim - 1).bit_length())


def _hopper(device: DeviceInfo) -> bool:
    return device.vendor == "nvidia" and device.capability is not None and device.capability >= (9, 0)


def default_config(problem: AttentionProblem, device: DeviceInfo) -> FP8Config:
    bd = block_d(problem.D)
    if device.vendor != "nvidia":
        # The interpreter runs each program in numpy: small blocks, BLOCK_M != BLOCK_N to
        # exercise the causal band arithmetic with unequal blocks; TMA off (launch.py tests both).
        return FP8Config(block_m=16, block_n=32, num_warps=4, num_stages=1, tma=False)
    if not _hopper(device):
        small_smem = device.smem_per_block < 160 * 1024
        if bd >= 256:
            return FP8Config(block_m=64, block_n=32, num_warps=4, num_stages=1 if small_smem else 2, tma=False)
        return FP8Config(block_m=128, block_n=64, num_warps=4 if bd <= 64 else 8, num_stages=2, tma=False)
    if bd >= 256:
        # Fastest of config_space at D=256, S=16k (tools/bench_fp8.py --sweep, H100): 902 TFLOP/s
        # against 860 with TMA and 730 for 2 stages. 8 warps: two warpgroups of 64 rows.
        return FP8Config(block_m=128, block_n=64, num_warps=8, num_stages=3, tma=False)
    # D <= 128: one warpgroup per program and ~105 KB of shared memory, so two programs share an
    # SM and one's softmax can overlap the other's MMAs (Triton 3.6 waits for each Q K^T wgmma
    # before the softmax: a lone program leaves the tensor cores idle during its exp2s).
    # Measured at S=16k (H100, tools/bench_fp8.py --sweep, two runs): D=128 776-801 TFLOP/s
    # against 692-751 for 128 x 128 blocks at 8 warps; D=64 568 (best of the space 580, within
    # run-to-run noise). Descriptors (TMA) and plain loads time alike; TMA compiles without
    # the register spills plain loads show in the SASS, so it is the default where it applies.
    return FP8Config(block_m=64, block_n=128, num_warps=4, num_stages=3, tma=True)


def config_space(problem: AttentionProblem, device: DeviceInfo) -> list[FP8Config]:
    """What the autotuner (and tools/bench_fp8.py --sweep) may try on this device."""
    default = default_config(problem, device)
    if device.vendor != "nvidia":
        return [default]
    bd = block_d(problem.D)
    hopper = _hopper(device)
    space = []
    for block_m in (64, 128):
        for block_n in (64, 128) if bd <= 128 else (32, 64):
            for num_stages in (2, 3, 4):
                for tma in (True, False) if hopper else (False,):
                    for num_warps in (4, 8) if block_m == 64 and hopper else (4 if block_m == 64 else 8,):
                        space.append(FP8Config(block_m=block_m, block_n=block_n, num_warps=num_warps,
                                               num_stages=num_stages, tma=tma))
    return [default] + [c for c in space if c != default]
