"""Launch configurations of the CuPy CUDA kernels, the shared memory and register budget each
needs, per-device defaults and the handful of candidates the autotuner tries.

Every launch parameter lives here (tile sizes, warps, the backward's pipeline depth) and each
is a compile-time constant of the kernel it shapes, so one config is one compiled module per
(dtype, head dim, causal). Warps split rows only (ALGORITHM.md): each warp owns 16 rows (two
16-row slabs in the forward when ``block_m = 32 x num_warps``), so the backward's warp counts
follow from its blocks: ``dkdv_block_n / 16`` and ``dq_block_m / 16``.
"""

from __future__ import annotations

from dataclasses import dataclass

from fa2dispatch.hardware import DeviceInfo
from fa2dispatch.problem import AttentionProblem

from ..base import Config


@dataclass(frozen=True)
class CupyConfig(Config):
    # forward: BLOCK_M query rows per CTA (16 or 32 per warp), BLOCK_N keys per step
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 4
    # forward epilogue: O through shared memory and 16-byte stores (fa2_fwd.cu, O_SMEM) instead
    # of 4-byte stores from the accumulator fragments; None: for causal problems only (measured
    # on the H100: +1-3% causal at 2k-4k, -1-3% non-causal; docs/CUPY_BACKEND.md)
    o_smem: bool | None = None
    # causal forward: warps whose rows see no key of a (diagonal) block skip its matrix products
    # (fa2_fwd.cu, WARP_SKIP): bit 1 S = Q K^T, bit 2 O += P V (0..3); no effect when not causal
    warp_skip: int = 0
    # causal forward work order (fa2_fwd.cu, head_group): CTAs in groups of this many heads, the
    # longest query blocks of the whole group first; 1: one head at a time (its longest blocks
    # first); 0: auto, groups of about one wave (2 CTAs per SM) of CTAs; clamped to B x H
    head_group: int = 1
    # backward dK/dV kernel: dkdv_block_n keys per CTA (16 per warp), dkdv_block_m queries per step
    dkdv_block_m: int = 64
    dkdv_block_n: int = 64
    # backward dQ kernel: dq_block_m queries per CTA (16 per warp), dq_block_n keys per step
    dq_block_m: int = 64
    dq_block_n: int = 64
    # backward pipeline depth: 2 = next Q/dO (dK/dV) or K/V (dQ) block in flight during compute
    bwd_stages: int = 2
    # forward kernel: "mma" (fa2_fwd.cu: mma.sync, every NVIDIA GPU from sm_80) or "wgmma"
    # (fa2_fwd_sm90.cu: warpgroup MMAs, sm_90 only, head dims 64 and 128; block_m = 64 per
    # warpgroup, num_warps = block_m / 16; o_smem, warp_skip and head_group do not apply)
    fwd_kernel: str = "mma"
    # wgmma forward: key blocks of K and V in the shared-memory ring (>= 3: block j - 1 is read by
    # P V while block j + 1 loads)
    fwd_stages: int = 3


def d_pad(head_dim: int, multiple: int = 16) -> int:
    """Head dim as the kernels tile it: a multiple of the MMA's K (16)."""
    return -(-head_dim // multiple) * multiple


def dkdv_split(head_dim: int) -> int:
    """Column chunks of dK/dV per key block: 2 above 128 so each chunk's two fp32 accumulators
    (dK and dV, 16 x 128 per warp) stay at 128 registers per thread."""
    return 1 if d_pad(head_dim) <= 128 else 2


def dkdv_d_pad(head_dim: int) -> int:
    return d_pad(head_dim, 16 * dkdv_split(head_dim))


def _row_bytes(dp: int) -> int:
    return 2 * (dp + 8)  # SROW = D_PAD + 8 elements of 2 bytes (common.cuh)


def smem_forward(head_dim: int, cfg: CupyConfig) -> int:
    if cfg.fwd_kernel == "wgmma":  # swizzled tiles without padding, plus 1 KiB to align them to 1024 bytes
        return (cfg.block_m + 2 * cfg.fwd_stages * cfg.block_n) * d_pad(head_dim) * 2 + 1024
    return (cfg.block_m + 2 * cfg.block_n) * _row_bytes(d_pad(head_dim))


FWD_KERNELS = ("mma", "wgmma")
# The sm_90 forward default at head dims 64 and 128 (one warpgroup of 64 rows, 64-key blocks, a
# ring of 3). H100, 2026-11-25 (tools/sweep_cupy.py, docs/CUPY_BACKEND.md "Session 9"): D=128
# 1.23-1.39x FlashAttention-2 at S 2k-16k, causal and not, where the mma.sync kernel was
# 0.99-1.10x; two warpgroups per CTA measured slower everywhere, 128-key blocks slower at D=128
# and faster at D=64, S=16k only (the tuner times both).
WGMMA_DEFAULT = {"fwd_kernel": "wgmma", "block_m": 64, "block_n": 64, "num_warps": 4, "fwd_stages": 3,
                 "o_smem": None, "warp_skip": 0, "head_group": 1}  # the last three: mma.sync kernel only
WGMMA_CAPABILITY = (9, 0)  # sm_90a code: wgmma is not in the forward-compatible sm_90 subset


def wgmma_reasons(head_dim: int, cfg: CupyConfig, capability: tuple[int, int] | None) -> list[str]:
    """Why the wgmma forward (fa2_fwd_sm90.cu) cannot run this config on a device of this
    compute capability (None: unknown, not checked); empty when it can."""
    reasons = []
    if capability is not None and tuple(capability) != WGMMA_CAPABILITY:
        reasons.append(f"fwd_kernel='wgmma' needs an sm_90 GPU (this one: sm_{capability[0]}{capability[1]})")
    if head_dim not in (64, 128):
        reasons.append(f"fwd_kernel='wgmma' at head_dim={head_dim} (supported: 64 and 128)")
    if cfg.block_m not in (64, 128) or cfg.num_warps != cfg.block_m // 16:
        reasons.append(f"fwd_kernel='wgmma' with block_m={cfg.block_m} num_warps={cfg.num_warps} "
                       "(supported: block_m 64 or 128, one warpgroup of 4 warps per 64 rows)")
    if cfg.block_n not in (64, 128):
        reasons.append(f"fwd_kernel='wgmma' with block_n={cfg.block_n} (supported: 64 or 128)")
    if not 3 <= cfg.fwd_stages <= 4:
        reasons.append(f"fwd_stages={cfg.fwd_stages} (supported: 3 or 4)")
    for name, value, default in (("o_smem", cfg.o_smem, None), ("warp_skip", cfg.warp_skip, 0),
                                 ("head_group", cfg.head_group, 1)):
        if value != default:
            reasons.append(f"{name}={value} with fwd_kernel='wgmma' (a setting of the mma.sync forward only; "
                           f"leave it at {default})")
    return reasons


def smem_dkdv(head_dim: int, cfg: CupyConfig) -> int:
    tiles = 2 * cfg.dkdv_block_n + 2 * cfg.bwd_stages * cfg.dkdv_block_m
    return tiles * _row_bytes(dkdv_d_pad(head_dim)) + 2 * cfg.bwd_stages * cfg.dkdv_block_m * 4


def smem_dq(head_dim: int, cfg: CupyConfig) -> int:
    return (2 * cfg.dq_block_m + 2 * cfg.bwd_stages * cfg.dq_block_n) * _row_bytes(d_pad(head_dim))


# fp32 accumulator registers per thread allowed in one kernel (output tiles + score tiles, plus
# Q's fragments where the forward keeps them in registers). Measured offline with nvrtc_check
# (NVRTC 13.5, sm_80 and sm_90): 192 compiles without spills at 255 registers (forward D=128
# with 32 rows per warp and 64-key blocks; dK/dV D=128 with 64-query steps), 224 spills (forward
# D=64 with 128-key blocks: 44-220 bytes).
MAX_ACC_REGS = 192


def forward_acc_regs(head_dim: int, cfg: CupyConfig) -> int:
    """fp32 accumulators (O and S) plus Q's registers (fa2_fwd.cu: Q_IN_REGS) per thread."""
    dp, mt = d_pad(head_dim), cfg.block_m // (16 * cfg.num_warps)
    q_regs = mt * dp // 4 if mt * dp <= 128 else 0
    return mt * (dp + cfg.block_n) // 2 + q_regs


def default_o_smem(cfg: CupyConfig, causal: bool) -> bool:
    """Whether the forward stores O through shared memory (``o_smem``; None: when causal)."""
    return causal if cfg.o_smem is None else cfg.o_smem


def config_reasons(head_dim: int, cfg: CupyConfig, smem_limit: int | None, backward: bool,
                   capability: tuple[int, int] | None = None) -> list[str]:
    """Why this config cannot run a problem of this head dim on a device with ``smem_limit``
    bytes of shared memory per block and this compute capability (None: unknown, not checked)."""
    reasons = []
    dp = d_pad(head_dim)
    mt, rem = divmod(cfg.block_m, 16 * cfg.num_warps) if cfg.num_warps > 0 else (0, 1)
    if cfg.fwd_kernel not in FWD_KERNELS:
        reasons.append(f"fwd_kernel={cfg.fwd_kernel!r} (supported: {', '.join(map(repr, FWD_KERNELS))})")
    elif cfg.fwd_kernel == "wgmma":
        reasons += wgmma_reasons(head_dim, cfg, capability)
    if rem or mt not in (1, 2):
        reasons.append(f"block_m={cfg.block_m} (supported: 16 or 32 rows per warp x num_warps={cfg.num_warps})")
    if cfg.block_n % 16 or cfg.block_n <= 0:
        reasons.append(f"block_n={cfg.block_n} (supported: a multiple of 16)")
    elif cfg.fwd_kernel == "mma" and mt in (1, 2) and forward_acc_regs(head_dim, cfg) > MAX_ACC_REGS:
        reasons.append(f"block_m={cfg.block_m} block_n={cfg.block_n} at head_dim={head_dim} needs "
                       f"{forward_acc_regs(head_dim, cfg)} accumulator registers per thread (max {MAX_ACC_REGS})")
    if cfg.warp_skip not in (0, 1, 2, 3):
        reasons.append(f"warp_skip={cfg.warp_skip} (supported: 0..3, bit 1 S, bit 2 P V)")
    if cfg.head_group < 0:
        reasons.append(f"head_group={cfg.head_group} (supported: 0 = auto, or a number of heads >= 1)")
    need = [("forward", smem_forward(head_dim, cfg))]
    if backward:
        for name, value in (("dkdv_block_n", cfg.dkdv_block_n), ("dq_block_m", cfg.dq_block_m)):
            if value not in (16, 32, 64, 128):
                reasons.append(f"{name}={value} (supported: 16, 32, 64 or 128; 16 rows per warp)")
        for name, value in (("dkdv_block_m", cfg.dkdv_block_m), ("dq_block_n", cfg.dq_block_n)):
            if value not in (16, 32, 64, 128):
                reasons.append(f"{name}={value} (supported: 16, 32, 64 or 128)")
        if cfg.bwd_stages not in (1, 2):
            reasons.append(f"bwd_stages={cfg.bwd_stages} (supported: 1 or 2)")
        dch = dkdv_d_pad(head_dim) // dkdv_split(head_dim)
        if dch + cfg.dkdv_block_m > MAX_ACC_REGS:
            reasons.append(f"dkdv_block_m={cfg.dkdv_block_m} at head_dim={head_dim} needs {dch + cfg.dkdv_block_m} "
                           f"accumulator registers per thread (max {MAX_ACC_REGS})")
        if dp // 2 + cfg.dq_block_n > MAX_ACC_REGS:
            reasons.append(f"dq_block_n={cfg.dq_block_n} at head_dim={head_dim} needs {dp // 2 + cfg.dq_block_n} "
                           f"accumulator registers per thread (max {MAX_ACC_REGS})")
        need += [("dK/dV", smem_dkdv(head_dim, cfg)), ("dQ", smem_dq(head_dim, cfg))]
    if smem_limit:
        for kernel, nbytes in need:
            if nbytes > smem_limit:
                reasons.append(f"{kernel} kernel needs {nbytes // 1024} KiB of shared memory "
                               f"(device: {smem_limit // 1024} KiB per block)")
    return reasons


def default_config(head_dim: int, device: DeviceInfo, wgmma: bool = True) -> CupyConfig:
    """Per-device default. sm_90 at head dims 64 and 128: the wgmma forward (``WGMMA_DEFAULT``;
    ``wgmma=False``: the mma.sync kernel's default there). Otherwise the large-smem parts (sm_80,
    sm_90: 163/227 KiB per block) take FA2's sm80 tiles; the ~99 KiB parts (sm_86, sm_89) take
    smaller key / query steps. The backward's fields are the same either way."""
    small = 0 < device.smem_per_block < 160 * 1024
    dp = d_pad(head_dim)
    sm90 = WGMMA_DEFAULT if wgmma and head_dim in (64, 128) and device.capability == WGMMA_CAPABILITY else {}
    if dp <= 64:
        fwd = {"block_m": 128, "block_n": 64, "num_warps": 4}
        bwd = {"dkdv_block_m": 64, "dkdv_block_n": 64, "dq_block_m": 64, "dq_block_n": 64, "bwd_stages": 2}
    elif dp <= 128:
        # FA2's own sm80 tiles at D=128 (32 rows per warp, 64-key blocks).
        fwd = {"block_m": 128, "block_n": 64, "num_warps": 4}
        if dp == 128 and device.capability and device.capability >= (9, 0):
            # Causal: longest query blocks first over groups of about one wave of CTAs, and warps
            # skip S for key blocks none of their rows sees. H100, 2026-11-25, two runs
            # (tools/sweep_cupy.py, docs/CUPY_BACKEND.md): 1.05-1.10x FA2 at S 2k-16k where
            # head_group=1, warp_skip=0 gave 1.00-1.04x. Not the default elsewhere: unmeasured
            # (D=64: one short run, docs/CUPY_BACKEND.md), and on sm_80 the reordering alone makes NVRTC 13.5
            # spill 4 bytes.
            fwd.update(head_group=0, warp_skip=1)
        if dp == 112:
            # Head dims 97..112: NVRTC 13.5's ptxas spills at 255 registers with 64-query dK/dV
            # steps (24-32 bytes, sm_80 and sm_90) and in the causal forward with O through shared
            # memory (8 bytes, sm_90), though not at D_PAD 96 or 128; 32-query steps and the
            # register epilogue compile clean (tests/test_cupy_compile.py covers every head dim).
            fwd["o_smem"] = False
            bwd = {"dkdv_block_m": 32, "dkdv_block_n": 64, "dq_block_m": 64, "dq_block_n": 32, "bwd_stages": 2}
        elif small:
            bwd = {"dkdv_block_m": 32, "dkdv_block_n": 64, "dq_block_m": 64, "dq_block_n": 32, "bwd_stages": 2}
        else:
            # 64 x 64 in both kernels: 201/178/207/205 TFLOP/s (S 4k/4k causal/16k/16k causal, H100,
            # fp16, tools/cupy_smoke.py) against 191/175/198/201 for 32-query dK/dV steps.
            bwd = {"dkdv_block_m": 64, "dkdv_block_n": 64, "dq_block_m": 64, "dq_block_n": 64, "bwd_stages": 2}
    else:
        fwd = {"block_m": 64, "block_n": 32 if small else 64, "num_warps": 4}
        if small:
            bwd = {"dkdv_block_m": 16, "dkdv_block_n": 32, "dq_block_m": 32, "dq_block_n": 16, "bwd_stages": 2}
        else:
            bwd = {"dkdv_block_m": 32, "dkdv_block_n": 64, "dq_block_m": 64, "dq_block_n": 32, "bwd_stages": 2}
    return CupyConfig(**{**fwd, **sm90}, **bwd)


def config_space(problem: AttentionProblem, device: DeviceInfo, wgmma: bool = True) -> list[CupyConfig]:
    """The default first, then a few neighbours; the forward or the backward fields vary
    (whichever the bucket times), and configs that cannot fit are dropped. ``wgmma=False``: no
    wgmma forward (default_config)."""
    from dataclasses import replace

    base = default_config(problem.D, device, wgmma)
    mma = default_config(problem.D, device, wgmma=False)  # the mma.sync forward's points start here
    if problem.requires_grad:
        points = [{"dkdv_block_m": m, "dkdv_block_n": n, "dq_block_m": n, "dq_block_n": m, "bwd_stages": s}
                  for m, n, s in ((64, 64, 2), (32, 64, 2), (64, 128, 2), (32, 128, 2), (64, 64, 1), (16, 64, 2))]
    else:
        points = [{"o_smem": not problem.causal}]  # the other epilogue (default_o_smem)
        if problem.causal:
            # the causal work order and warp skip (fa2_fwd.cu: GROUP_ORDER, WARP_SKIP): the other
            # settings that measured well on the H100 (head_group=0 alone was best at 4k-16k,
            # with warp_skip=1 at 2k) and the plain kernel; no effect when not causal
            points += [{"head_group": 0, "warp_skip": 0}, {"head_group": 0, "warp_skip": 1},
                       {"head_group": 1, "warp_skip": 0}]
        points += [{"block_m": m, "block_n": n, "num_warps": w}
                   for m, n, w in ((128, 64, 4), (128, 128, 4), (128, 32, 4), (64, 64, 4), (64, 128, 4),
                                   (128, 64, 8), (256, 64, 8))]
        if base.fwd_kernel == "wgmma":  # the sm_90 forward's other tiles and ring depth
            points = [{}, *points]  # the mma.sync default itself
            points += [{**WGMMA_DEFAULT, "block_m": m, "block_n": n, "num_warps": m // 16, "fwd_stages": st}
                       for m, n, st in ((64, 64, 4), (64, 128, 3), (128, 64, 3))]
    out = [base]
    limit = device.smem_per_block or None
    for point in points:
        # backward points keep the default forward; forward points start from the mma.sync default
        # (the wgmma ones name all their fields)
        cfg = replace(base if problem.requires_grad else mma, **point)
        if cfg not in out and not config_reasons(problem.D, cfg, limit, problem.requires_grad, device.capability):
            out.append(cfg)
    return out
