"""Search spaces: which configs the autotuner tries, per backend, vendor and level, and the
pruning that drops impossible ones before anything compiles.

Levels: "quick" (a handful per kind, for a first run), "default" (the grid shipped for the
H100), "full" (everything plausible). A pruned config is reported with its reason, never
silently dropped.

Shared memory is bounded from below by the tiles a kernel must stage through it: at least one
block of each streamed operand (K and V in the forward and in the dQ kernel, Q and dO in the
dK/dV kernel). Operands Triton keeps in registers (Q for Hopper's wgmma) and extra pipeline
buffers are not counted: the H100 forward at D=128 with 128 x 128 blocks and 3 stages compiles
to 64 KiB, where counting Q and three K/V buffers would say 224 KiB. So the bound prunes only
configs that cannot fit; those it lets through and that still do not fit fail to compile and
are recorded as such by the tuner. The default config is always kept.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch

from fa2dispatch.dispatch import _reasons as dispatch_reasons
from fa2dispatch.backends import BACKENDS, Config
from fa2dispatch.backends.triton_fa2.config import TritonConfig, block_d
from fa2dispatch.hardware import DeviceInfo
from fa2dispatch.problem import AttentionProblem

LEVELS = ("quick", "default", "full")

# Forward (block_m, block_n, num_warps, num_stages) per level on NVIDIA; measured points from
# tools/sweep_configs.py on the H100 (docs/PERF_NOTES.md) are in "quick".
# "default" is sized so the shipped grid compiles in minutes (compilation, not timing, is
# the cost: each config compiles once per dtype x head dim x causal).
_NV_FWD = {
    "quick": [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    "default": [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3),
                (128, 128, 8, 2), (128, 64, 4, 2)],
    "full": list(itertools.product((32, 64, 128, 256), (32, 64, 128), (4, 8), (1, 2, 3, 4))),
}
# The sm_90 forward with tensor descriptors (kernels_hopper.py): (block_m, block_n, num_warps,
# num_stages, fwd_maxnreg, fwd_order) around the points tools/sweep_hopper.py measured fastest
# (docs/HOPPER_ATTEMPTS.md); fp16/bf16 with D <= 128 only.
_NV_HOPPER_FWD = {
    "quick": [(128, 64, 8, 2, 128, 0), (128, 128, 8, 2, 128, 0)],
    "default": [(128, 64, 8, 2, 128, 0), (128, 64, 8, 2, 128, 1), (128, 128, 8, 2, 128, 0),
                (128, 64, 4, 3, 168, 0), (128, 128, 8, 2, 0, 0)],
    "full": list(itertools.product((64, 128), (64, 128), (4, 8), (2, 3), (0, 128, 168), (0, 1))),
}
# The sm_90 Gluon forward (kernels_gluon.py): (block_m, block_n, K buffers, V buffers), 4 warps
# (one warpgroup of 64 rows); fp16/bf16 with D 64 or 128 only (tools/sweep_gluon.py's points).
_NV_GLUON_FWD = {
    "quick": [(64, 64, 2, 1), (64, 128, 2, 2)],
    "default": [(64, 64, 2, 1), (64, 64, 2, 2), (64, 128, 2, 1), (64, 128, 2, 2)],
    "full": [(64, n, k, v) for n in (64, 128) for k in (2, 3) for v in (1, 2)],
}
# The sm_90 ping-pong Gluon forward (kernels_gluon_ws.attn_fwd_gluon_pp): (block_n, K buffers,
# V buffers, consumer registers); 128 rows and 12 warps per CTA; the points tools/sweep_gluon.py
# measured (H100, 2026-11-25) first.
_NV_GLUON_PP_FWD = {
    "quick": [(128, 2, 2, 240)],
    "default": [(128, 2, 2, 240), (128, 2, 2, 232)],
    "full": [(n, k, v, r) for n in (128, 64) for k in (2, 3) for v in (2, 1) for r in (240, 232)],
}
# The sm_90 Gluon dK/dV kernel (kernels_gluon_bwd.py): (query rows per step, warps = keys / 16,
# Q/dO buffers); the dQ kernel keeps the base's blocks. Offline: no spills at D=128 with 32 rows
# per step (215 registers, two CTAs per SM), at D=64 with 64 (launch_gluon_bwd.compile_dkdv_sm90).
_NV_GLUON_BWD = {
    "quick": [(32, 4, 2)],
    "default": [(32, 4, 2), (64, 4, 2)],
    "full": [(m, w, s) for m in (32, 64) for w in (4, 8) for s in (2, 3)],
}
# Backward (dkdv_block_m, dkdv_block_n, bwd_num_warps, bwd_num_stages[, dkdv_num_warps]); the
# dQ kernel takes the transposed blocks (dq_block_m = dkdv_block_n, dq_block_n = dkdv_block_m),
# as in FA2. (64, 64, 4, 2, 8): dK/dV with 8 warps, spill-free at D=128, dQ with 4
# (docs/PERF_NOTES.md §8).
_NV_BWD = {
    "quick": [(64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2), (64, 64, 4, 2, 8)],
    "default": [(64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2), (32, 128, 4, 2), (64, 64, 8, 2), (64, 64, 4, 3),
                (64, 64, 4, 2, 8), (64, 64, 4, 3, 8)],
    "full": list(itertools.product((16, 32, 64, 128), (32, 64, 128), (4, 8), (1, 2, 3), (0, 8))),
}
# AMD adds the occupancy hint, the MFMA shape and operand packing; num_stages 1-2 (the AMD
# stream pipeliner).
_AMD_FWD = {
    "quick": [(128, 64, 4, 1, 2, 16, 2), (64, 64, 4, 1, 2, 16, 1)],
    "default": list(itertools.product((64, 128), (32, 64), (4,), (1, 2), (1, 2), (16,), (1, 2))),
    "full": list(itertools.product((64, 128, 256), (32, 64, 128), (4, 8), (1, 2), (0, 1, 2, 4), (16, 32), (1, 2))),
}
_AMD_BWD = {
    "quick": [(32, 64, 4, 1), (16, 64, 4, 1)],
    "default": list(itertools.product((16, 32, 64), (64, 128), (4,), (1, 2))),
    "full": list(itertools.product((16, 32, 64), (32, 64, 128), (4, 8), (1, 2))),
}
# Under the interpreter (CPU) a config changes nothing but the block loop: two small ones.
_CPU = [(32, 16, 4, 1), (16, 32, 4, 1)]


@dataclass(frozen=True)
class Candidate:
    backend: str
    config: Config | None

    def label(self) -> str:
        return self.backend if self.config is None else f"{self.backend} {self.config.short()}"


def smem_bytes(problem: AttentionProblem, config: TritonConfig, backward: bool) -> int:
    """Lower bound of the shared memory one program of the largest kernel needs (see above)."""
    row = problem.dtype.itemsize * block_d(problem.D)  # bytes of one padded row
    if not backward:
        return row * 2 * config.block_n
    return row * 2 * max(config.dkdv_block_m, config.dq_block_n)


def triton_prune_reason(problem: AttentionProblem, device: DeviceInfo, config: TritonConfig,
                        backward: bool) -> str | None:
    """Why this Triton config cannot run this kind of problem on this device, or None."""
    blocks = [("block_m", config.block_m), ("block_n", config.block_n)]
    if backward:
        blocks += [("dkdv_block_m", config.dkdv_block_m), ("dkdv_block_n", config.dkdv_block_n),
                   ("dq_block_m", config.dq_block_m), ("dq_block_n", config.dq_block_n)]
    for name, value in blocks:
        if value < 16 or value & (value - 1):
            return f"{name}={value} (supported: a power of two >= 16, tl.dot's smallest tile)"
    # Each warp of the forward owns >= 16 query rows (the MMA's M); fewer leaves warps idle. The
    # ping-pong kernel's 12 warps are 8 consumers (block_m / 16) and a producer warpgroup.
    consumers = config.num_warps - 4 if config.fwd_kernel == "gluon-pp" else config.num_warps
    if not backward and device.vendor == "nvidia" and config.block_m < 16 * consumers:
        kind = "consumer warps" if config.fwd_kernel == "gluon-pp" else "warps"
        return f"{consumers} {kind} need >= {16 * consumers} query rows, got block_m={config.block_m}"
    stages = config.bwd_num_stages if backward else config.num_stages
    if device.vendor == "amd" and stages > 2:
        return f"num_stages={stages} (supported on AMD: 1-2)"
    if device.smem_per_block:
        need = smem_bytes(problem, config, backward)
        if need > device.smem_per_block:
            return f"needs ~{need // 1024} KiB of shared memory (device: {device.smem_per_block // 1024} KiB per block)"
    return None


def _triton_configs(problem: AttentionProblem, device: DeviceInfo, level: str,
                    base: TritonConfig | None) -> list[TritonConfig]:
    default = BACKENDS["triton"].default_config(problem, device)
    base = base or default
    backward = problem.requires_grad
    if device.vendor == "cpu":
        points = [replace(base, block_m=m, block_n=n) if not backward else
                  replace(base, dkdv_block_m=m, dkdv_block_n=n, dq_block_m=n, dq_block_n=m) for m, n, _, _ in _CPU]
        return list(dict.fromkeys(points))
    amd = device.vendor == "amd"
    # The default is always a candidate (first), so the tuned choice is never worse than it;
    # a backward bucket also varies its fields around the tuned forward base.
    out = [default, base]
    if not backward:
        plain = replace(base, fwd_kernel="", fwd_order=0, fwd_maxnreg=0)
        for point in (_AMD_FWD if amd else _NV_FWD)[level]:
            m, n, w, s, *rest = point
            extra = dict(zip(("waves_per_eu", "matrix_instr_nonkdim", "kpack"), rest))
            out.append(replace(plain, block_m=m, block_n=n, num_warps=w, num_stages=s, **extra))
        hopper = (device.vendor == "nvidia" and device.capability is not None and device.capability >= (9, 0)
                  and problem.D <= 128 and problem.dtype in (torch.float16, torch.bfloat16)
                  and not problem.feature_names)
        for m, n, w, s, reg, order in (_NV_HOPPER_FWD[level] if hopper else ()):
            out.append(replace(plain, block_m=m, block_n=n, num_warps=w, num_stages=s, fwd_kernel="hopper",
                               fwd_maxnreg=reg, fwd_order=order))
        gluon = hopper and device.capability < (10, 0) and problem.D in (64, 128)
        for m, n, k_stages, v_stages in (_NV_GLUON_FWD[level] if gluon else ()):
            out.append(replace(plain, block_m=m, block_n=n, num_warps=m // 16, num_stages=k_stages,
                               fwd_v_stages=v_stages, fwd_kernel="gluon"))
        # Causal calls try both grids (launch_gluon.PP_TILE_GRIDS): persistent and one CTA per
        # tile each won some lengths (session 13), the launcher's choice (0) is a rule of thumb.
        for n, k_stages, v_stages, regs in (_NV_GLUON_PP_FWD[level] if gluon and problem.Mq % 128 == 0 else ()):
            for tile_grid in (2, 1) if problem.causal else (0,):
                out.append(replace(plain, block_m=128, block_n=n, num_warps=12, num_stages=k_stages,
                                   fwd_v_stages=v_stages, fwd_kernel="gluon-pp", fwd_maxnreg=regs,
                                   fwd_tile_grid=tile_grid))
    else:
        for m, n, w, s, *dkdv_w in (_AMD_BWD if amd else _NV_BWD)[level]:
            if dkdv_w and dkdv_w[0] == w:
                continue  # the same launch as dkdv_num_warps=0
            out.append(replace(base, dkdv_block_m=m, dkdv_block_n=n, dq_block_m=n, dq_block_n=m,
                               bwd_num_warps=w, bwd_num_stages=s, dkdv_num_warps=dkdv_w[0] if dkdv_w else 0))
        gluon_bwd = (device.vendor == "nvidia" and device.capability == (9, 0) and problem.D in (64, 128)
                     and problem.dtype in (torch.float16, torch.bfloat16) and not problem.feature_names)
        for m, w, s in (_NV_GLUON_BWD[level] if gluon_bwd else ()):
            if problem.Mq % m or problem.Mkv % (16 * w):
                continue  # the backend would run the plain kernel with these blocks instead
            out.append(replace(base, bwd_kernel="gluon", dkdv_block_m=m, dkdv_block_n=16 * w, dkdv_num_warps=w,
                               bwd_num_stages=s))
    return list(dict.fromkeys(out))  # order kept, duplicates (base == default) dropped


def candidates(problem: AttentionProblem, device: DeviceInfo, backends: list[str], level: str = "default",
               triton_base: TritonConfig | None = None) -> tuple[list[Candidate], list[tuple[Candidate, str]]]:
    """(candidates to time, pruned candidates with their reasons) for one bucket's problem.

    Backends that cannot run the problem are left out entirely (the dispatcher would refuse
    them too); backends without a config space (PyTorch SDPA) are one candidate each. For a
    backward bucket only the backward fields vary; ``triton_base`` supplies the forward fields
    (the tuned forward winner of the same shape), else the default's.
    """
    if level not in LEVELS:
        raise ValueError(f"level={level!r} (supported: {', '.join(LEVELS)})")
    keep: list[Candidate] = []
    pruned: list[tuple[Candidate, str]] = []
    for name in backends:
        backend = BACKENDS[name]
        if dispatch_reasons(backend, problem, device):  # guarded: one broken backend never stops a tuning run
            continue
        if name != "triton":
            for config in backend.config_space(problem, device) or [None]:
                keep.append(Candidate(name, config))
            continue
        configs = _triton_configs(problem, device, level, triton_base)
        for config in configs:
            reason = None if config is configs[0] else triton_prune_reason(problem, device, config,
                                                                           problem.requires_grad)
            reason = reason or next(iter(backend.config_reasons(problem, device, config)), None)
            if reason:
                pruned.append((Candidate(name, config), reason))
            else:
                keep.append(Candidate(name, config))
    return keep, pruned
