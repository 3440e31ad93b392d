"""The FlashAttention-2 backward's dK/dV pass for Hopper in Gluon (session 12; branch
``s12-gluon-dkdv``, compiled for sm_90 but never run on a GPU yet).

What it replaces: ``kernels.attn_bwd_dkdv`` (plain Triton), the larger share of the backward,
which ran at 0.74-0.97x cuDNN's whole backward in session 11 and 12. Plain Triton waits on
every ``tl.dot`` before the next starts; here the five products of a step are explicit async
wgmmas, and Q and dO stream in by TMA while the previous step computes.

One CTA per (key block of BLOCK_N = 16 x num_warps keys, batch x kv head); K and V stay in
shared memory, dK and dV in registers (float32), summed over every query head of the group
and every query block: no atomics, deterministic, as the plain kernel. Per step (one query
block of BLOCK_M rows of one head), on transposed scores (keys x queries), as the plain kernel:

- S^T = K Q^T and dP^T = V dO^T, issued together;
- P^T = exp2(S^T * qk_scale - lse * log2 e) (masked causal entries 0; rows that see no key
  have lse -inf and get P = 0, never NaN);
- dV += P^T dO, issued; dS^T = P^T (dP^T - delta); dK += dS^T Q, issued; both waited for
  before the step's Q and dO buffer is refilled with step + STAGES.

Conventions: lse (B, H, Mq) natural log; delta (B, H, Mq) = rowsum(dO * O) (minus dlse),
from the preprocess or the DELTA_ONLY pass; dK leaves multiplied by the softmax scale.
16-bit, dense, D 64 or 128, Mq a multiple of BLOCK_M and Mkv of BLOCK_N (TMA over the
(rows, cols) views, where rows past a head's end belong to the next head), bottom-right causal
or none; no window, softcap, ALiBi, dropout or varlen (those keep the plain kernel).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

LOG2E: gl.constexpr = gl.constexpr(1.4426950408889634)


@gluon.jit
def _load_step(q_desc, do_desc, q_smem, do_smem, bars, buf, t, n_steps_h, lo_blk, q_rows_z, q_rows_h, q_cols_h,
               do_rows_z, do_rows_h, do_cols_h, z, hkv, GROUP, pred, BLOCK_M: gl.constexpr):
    """TMA of step t's Q and dO blocks into buffer ``buf`` (step t: head hkv * GROUP + t //
    n_steps_h, query block lo_blk + t % n_steps_h)."""
    h = hkv * GROUP + t // n_steps_h
    start_m = (lo_blk + t % n_steps_h) * BLOCK_M
    bar = bars.index(buf)
    mbarrier.expect(bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(q_desc, [z * q_rows_z + h * q_rows_h + start_m, h * q_cols_h], bar,
                                    q_smem.index(buf), pred=pred)
    tma.async_copy_global_to_shared(do_desc, [z * do_rows_z + h * do_rows_h + start_m, h * do_cols_h], bar,
                                    do_smem.index(buf), pred=pred)


@gluon.jit
def attn_bwd_dkdv_gluon(q_desc, k_desc, v_desc, do_desc, Lse, Delta, DK, DV, qk_scale, softmax_scale,
                        q_rows_z, q_rows_h, q_cols_h, k_rows_z, k_rows_h, k_cols_h, do_rows_z, do_rows_h, do_cols_h,
                        stride_dkz, stride_dkh, stride_dkn, stride_dvz, stride_dvh, stride_dvn,
                        H, Hkv, GROUP, Mq, Mkv,
                        CAUSAL: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    BLOCK_D: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    dtype: gl.constexpr = q_desc.dtype
    BITS: gl.constexpr = dtype.primitive_bitwidth

    # S^T and dP^T: (keys, queries); dK and dV: (keys, D); P^T and dS^T as register A operands
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, BLOCK_M, 256 // BITS])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BLOCK_D, 256 // BITS])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=32 // BITS)
    row_st: gl.constexpr = gl.SliceLayout(1, st_layout)
    col_st: gl.constexpr = gl.SliceLayout(0, st_layout)
    row_acc: gl.constexpr = gl.SliceLayout(1, acc_layout)
    col_acc: gl.constexpr = gl.SliceLayout(0, acc_layout)

    pid = gl.program_id(0)
    n_nb = Mkv // BLOCK_N
    nb = pid % n_nb
    bhkv = pid // n_nb
    z = bhkv // Hkv
    hkv = bhkv % Hkv
    start_n = nb * BLOCK_N
    diag = Mkv - Mq  # bottom-right: query row i sees keys <= i + diag
    n_mq = Mq // BLOCK_M
    if CAUSAL:  # query blocks whose rows all end before this key block see none of it
        lo_blk = gl.minimum(gl.maximum(start_n - diag, 0) // BLOCK_M, n_mq)
    else:
        lo_blk = 0
    n_steps_h = n_mq - lo_blk
    n_steps = GROUP * n_steps_h

    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_D], v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_D], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_D], do_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)

    k_row = z * k_rows_z + hkv * k_rows_h + start_n
    k_col = hkv * k_cols_h
    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [k_row, k_col], kv_bar, k_smem)
    tma.async_copy_global_to_shared(v_desc, [k_row, k_col], kv_bar, v_smem)
    for i in gl.static_range(STAGES):
        _load_step(q_desc, do_desc, q_smem, do_smem, bars, i, i, n_steps_h, lo_blk, q_rows_z, q_rows_h, q_cols_h,
                   do_rows_z, do_rows_h, do_cols_h, z, hkv, GROUP, i < n_steps, BLOCK_M)

    offs_n = start_n + gl.arange(0, BLOCK_N, layout=row_st)
    offs_m0 = gl.arange(0, BLOCK_M, layout=col_st)
    dk = gl.zeros([BLOCK_N, BLOCK_D], gl.float32, acc_layout)
    dv = gl.zeros([BLOCK_N, BLOCK_D], gl.float32, acc_layout)
    zero_st = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, st_layout)
    mbarrier.wait(kv_bar, 0)

    for t in range(n_steps):
        buf = t % STAGES
        h = hkv * GROUP + t // n_steps_h
        start_m = (lo_blk + t % n_steps_h) * BLOCK_M
        offs_m = start_m + offs_m0
        row = (z * H + h).to(gl.int64) * Mq
        lse2 = gl.load(Lse + row + offs_m) * LOG2E
        delta = gl.load(Delta + row + offs_m)
        mbarrier.wait(bars.index(buf), (t // STAGES) & 1)
        q_buf = q_smem.index(buf)
        do_buf = do_smem.index(buf)
        s_tok = warpgroup_mma(k_smem, q_buf.permute((1, 0)), zero_st, use_acc=False, is_async=True)
        dp_tok = warpgroup_mma(v_smem, do_buf.permute((1, 0)), zero_st, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=[s_tok])
        s = s * qk_scale
        if CAUSAL:
            s = gl.where(offs_n[:, None] <= offs_m[None, :] + diag, s, float("-inf"))
            p = gl.where(s == float("-inf"), 0.0, gl.exp2(s - lse2[None, :]))
        else:
            p = gl.exp2(s - lse2[None, :])
        p_op = gl.convert_layout(p.to(dtype), a_layout)
        dp = warpgroup_mma_wait(num_outstanding=0, deps=[dp_tok])
        dv_tok = warpgroup_mma(p_op, do_buf, dv, is_async=True)
        ds = p * (dp - delta[None, :])
        ds_op = gl.convert_layout(ds.to(dtype), a_layout)
        dk_tok = warpgroup_mma(ds_op, q_buf, dk, is_async=True)
        # P^T and dS^T are register operands of the async wgmmas: kept alive (deps) until they complete
        dv, dk, p_op, ds_op = warpgroup_mma_wait(num_outstanding=0, deps=[dv_tok, dk_tok, p_op, ds_op])
        if num_warps > 4:
            gl.thread_barrier()  # the other warpgroup's wgmmas on this buffer have completed too
        # every wgmma reading this step's buffer has completed: refill it with step t + STAGES
        _load_step(q_desc, do_desc, q_smem, do_smem, bars, buf, t + STAGES, n_steps_h, lo_blk, q_rows_z, q_rows_h,
                   q_cols_h, do_rows_z, do_rows_h, do_cols_h, z, hkv, GROUP, t + STAGES < n_steps, BLOCK_M)

    mbarrier.invalidate(kv_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))

    rows = (start_n + gl.arange(0, BLOCK_N, layout=row_acc)).to(gl.int64)
    cols = gl.arange(0, BLOCK_D, layout=col_acc)
    zz = z.to(gl.int64)
    hh = hkv.to(gl.int64)
    dk_ptrs = DK + zz * stride_dkz + hh * stride_dkh + rows[:, None] * stride_dkn + cols[None, :]
    dv_ptrs = DV + zz * stride_dvz + hh * stride_dvh + rows[:, None] * stride_dvn + cols[None, :]
    gl.store(dk_ptrs, (dk * softmax_scale).to(DK.dtype.element_ty))
    gl.store(dv_ptrs, dv.to(DV.dtype.element_ty))
