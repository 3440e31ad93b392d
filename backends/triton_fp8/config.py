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
    # "gluon": triton_fa2/kernels_gluon.py (sm_90: explicit async wgmma, P V overlapping the next
    # block's softmax; num_stages K buffers and v_stages V buffers, num_warps = block_m / 16);
    # calls it cannot take run the Triton kernel with these fields (launch.py, gluon_reasons).
    # "gluon-pp": the ping-pong kernel (kernels_gluon_ws.attn_fwd_gluon_pp; block_m 128, 12 warps:
    # two consumer warpgroups and a producer); calls it cannot take run "gluon" with 64 rows.
    # tile_grid: the ping-pong kernel's grid, as TritonConfig.fwd_tile_grid (1 one CTA per
    # 128-row tile, 2 one per SM, 0 the launcher's choice: launch_gluon.pp_per_tile)
    kernel: str = "triton"
    v_stages: int = 2
    tile_grid: int = 0

    def launch_options(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


GLUON_MIN_FLOPS = 6.4e10  # FA2-convention FLOPs from which the sm_90 default is the Gluon kernel


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
    flops = 4.0 * problem.B * problem.H * problem.Mq * problem.Mkv * problem.D / (2 if problem.causal else 1)
    if bd == 128 and device.capability < (10, 0) and flops >= GLUON_MIN_FLOPS:
        # The Gluon kernel (kernels_gluon.py): 64 x 128 blocks, one warpgroup, two K buffers and
        # one V buffer (66 KB: three programs per SM). H100, 2026-11-25 (tools/sweep_gluon.py
        # --fp8, docs/HOPPER_ATTEMPTS.md attempt 6): D=128 S=16k 796 TFLOP/s non-causal and 781
        # causal against 766 / 645 for the Triton kernel below; S=4k 809 / 715 against 763 / 664.
        # Smaller calls keep the Triton kernel: at S=1k (34 GFLOP) the Gluon call measured 339 TFLOP/s,
        # bound by its host side (then ~100 us per call, mostly descriptor layouts, now cached).
        return FP8Config(block_m=64, block_n=128, num_warps=4, num_stages=2, tma=True, kernel="gluon", v_stages=1)
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
    if hopper and bd in (64, 128) and device.capability < (10, 0):
        for block_m, block_n, k_stages, v_stages in ((64, 128, 2, 1), (64, 128, 2, 2), (64, 64, 2, 2), (64, 64, 2, 1)):
            space.append(FP8Config(block_m=block_m, block_n=block_n, num_warps=block_m // 16, num_stages=k_stages,
                                   tma=True, kernel="gluon", v_stages=v_stages))
        # The ping-pong kernel (kernels_gluon_ws.attn_fwd_gluon_pp): 128 rows, 12 warps per CTA. H100,
        # 2026-11-25 (tools/sweep_gluon.py --fp8, D=128): S=16k 831 / 811 TFLOP/s (causal) against
        # 817 / 760 for the default above (one V buffer); S=4k 774 / 647 against 878 / 723. A tuner
        # candidate, not the default.
        if problem.Mq % 128 == 0:
            # Persistent (one CTA per SM) or one CTA per tile: the persistent fp8 kernel measured
            # 4% slower at S=4k/16k (sessions 11 and 12, single sweeps), so the tuner decides.
            for block_n, k_stages, v_stages in ((128, 2, 2), (64, 2, 2)):
                for tile_grid in (2, 1):
                    space.append(FP8Config(block_m=128, block_n=block_n, num_warps=12, num_stages=k_stages, tma=True,
                                           kernel="gluon-pp", v_stages=v_stages, tile_grid=tile_grid))
    return [default] + [c for c in space if c != default]
