"""FlashAttention-2 forward for Hopper in Gluon (Triton 3.6's explicit-layout dialect).

The sm_90 default for plain fp16/bf16 forwards at D 64 and 128 (``TritonConfig.fwd_kernel =
"gluon"``, launched by ``launch_gluon.forward``) and for fp8 at D=128 (``FP8Config.kernel``,
``launch_gluon.forward_fp8``); ``tools/sweep_gluon.py`` times its configs next to cuDNN,
FlashAttention-2 and our other forwards (docs/HOPPER_ATTEMPTS.md, attempt 6). What
plain Triton could not express (attempts 1-5 there): Triton 3.6 waits on every Q K^T wgmma
(``wait_group 0``) before the softmax, so one program's exp2s never overlap its own MMAs. Here
the waits are ours to place:

- per key block j: issue S_j = Q K_j^T and O += P_{j-1} V_{j-1} (both async wgmma), wait for
  S_j only (``warpgroup_mma_wait(1)``), run block j's softmax while P_{j-1} V_{j-1} is still
  on the tensor cores, then wait for it, rescale O and hand P_j to the next iteration;
- K and V stream through rings of K_STAGES and V_STAGES shared-memory buffers filled by TMA,
  one mbarrier per buffer; a K buffer is refilled as soon as its S wgmma has completed, a V
  buffer as soon as its P V wgmma has (V is needed one iteration later than K, so one V
  buffer fewer leaves room for a second program per SM with 128-key blocks);
- Q_REGS: Q is loaded once into registers as the A operand of every S wgmma, so Q K^T reads
  only K from shared memory;
- 16 query rows per warp (BLOCK_M = 16 x num_warps): with 4 warps (one warpgroup) a wgmma
  wait covers every reader of a buffer; with 8 (two warpgroups sharing each K/V tile) a CTA
  barrier precedes each refill, since the other warpgroup may still be reading the buffer
  (Gluon's TMA copies are issued by one thread).

Conventions as ``kernels_hopper.py``: scores in base 2 with the scale folded into exp2 (scale
> 0: the row max is taken on raw scores), bottom-right causal mask, lse (B, H, Mq) in natural
log, a row with no visible key gives 0 and lse -inf. Inputs through 2-D descriptors over the
(rows, cols) views of ``launch_hopper._tma_view``; Mq must be a multiple of BLOCK_M (the output
goes back through TMA over the same view, where rows past Mq belong to the next head).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

LN2: gl.constexpr = gl.constexpr(0.6931471805599453)


@gluon.jit
def _softmax_block(s, m_i, l_i, qk_scale, offs_m, offs_n, Mkv, diag, MASK: gl.constexpr, CAUSAL: gl.constexpr,
                   SHIFT: gl.constexpr):
    """Online-softmax step of one block of raw scores: (p float32, new m, new l, alpha). P is
    scaled by 2^SHIFT (fp8: small probabilities survive the e4m3 cast; l carries the same
    factor, so out = acc / l is unchanged and the lse subtracts it)."""
    if MASK:
        keep = offs_n[None, :] < Mkv
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag)
        s = gl.where(keep, s * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: exp2(-inf - 0) = 0
        p = gl.exp2(s - (m_sub - SHIFT)[:, None])
    else:
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        m_sub = m_new
        p = gl.exp2(s * qk_scale - (m_sub - SHIFT)[:, None])
    alpha = gl.exp2(m_i - m_sub)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, m_new, l_i, alpha


@gluon.jit
def _softmax_step(s, m_i, l_i, qk_scale, offs_m, offs_n, Mkv, diag, mask, CAUSAL: gl.constexpr,
                  SHIFT: gl.constexpr):
    """``_softmax_block`` with the mask chosen at run time: ``mask`` for the key blocks that reach
    past Mkv or (causal) past the diagonal; the blocks below it skip the compare and select."""
    if mask:
        p, m_new, l_i, alpha = _softmax_block(s, m_i, l_i, qk_scale, offs_m, offs_n, Mkv, diag, True, CAUSAL, SHIFT)
    else:
        p, m_new, l_i, alpha = _softmax_block(s, m_i, l_i, qk_scale, offs_m, offs_n, Mkv, diag, False, CAUSAL, SHIFT)
    return p, m_new, l_i, alpha


@gluon.jit
def _load_v(v_desc, v_bars, v_smem, buf, block, k_row, k_col, v_row, pred, BLOCK_N: gl.constexpr, FP8: gl.constexpr):
    """TMA of key block ``block`` of V (16-bit: rows of V) or V^T (fp8: columns of V^T) into ``buf``."""
    mbarrier.expect(v_bars.index(buf), v_desc.block_type.nbytes, pred=pred)
    if FP8:
        tma.async_copy_global_to_shared(v_desc, [v_row, block * BLOCK_N], v_bars.index(buf), v_smem.index(buf),
                                        pred=pred)
    else:
        tma.async_copy_global_to_shared(v_desc, [k_row + block * BLOCK_N, k_col], v_bars.index(buf),
                                        v_smem.index(buf), pred=pred)


@gluon.jit
def _v_operand(v_smem, buf, FP8: gl.constexpr):
    """P V's B operand, (keys, D): V's tile as is (16-bit, D-major), or V^T's transposed view (fp8:
    K-major, the only form fp8 wgmma takes)."""
    if FP8:
        return v_smem.index(buf).permute((1, 0))
    else:
        return v_smem.index(buf)


@gluon.jit
def _stage_p(p_smem, p, dtype: gl.constexpr):
    """P (rounded to ``dtype``) into its shared-memory buffer as P V's A operand; the previous
    P V wgmma has completed. Every warp's rows are written before the warpgroup's wgmma reads them."""
    p_smem.store(p.to(dtype))
    fence_async_shared()
    gl.thread_barrier()
    return p_smem


@gluon.jit
def attn_fwd_gluon(q_desc, k_desc, v_desc, o_desc, Lse, qk_scale, H, GROUP, Mq, Mkv,
                   q_rows_z, q_rows_h, q_cols_h, k_rows_z, k_rows_h, k_cols_h,
                   QDs, KDs, VDs, stride_qdz, stride_qdh, stride_kdz, stride_kdh, stride_vdz, stride_vdh,
                   QD_GROUP, Hkv, CuQ, CuK, Out, stride_om, total_q,
                   CAUSAL: gl.constexpr, K_STAGES: gl.constexpr, V_STAGES: gl.constexpr, Q_REGS: gl.constexpr,
                   FP8: gl.constexpr, VARLEN: gl.constexpr, num_warps: gl.constexpr):
    """FP8: q, k e4m3 with float32 descales QDs (B, H or Hkv), KDs, VDs (B, Hkv); v_desc is over
    V^T (B * Hkv * D rows, Mkv columns; Hopper's fp8 wgmma takes P V's B operand K-major only)
    with blocks (D, BLOCK_N); o_desc is bf16 or fp16. Else the descale pointers are not read.

    VARLEN: packed sequences, q (total_q, H, D) and k, v (total_k, Hkv, D) through descriptors
    over their (rows, H x D) views; sequence z is rows CuQ[z]:CuQ[z+1] of q and CuK[z]:CuK[z+1]
    of k and v (int32). Mq and Mkv are the longest lengths (they size the grid); each program
    takes its sequence's own. Keys past the sequence's end (the next sequence's rows in the
    descriptor) are masked as past Mkv; query rows past it are computed and not stored: O goes
    out through masked pointer stores (Out, row stride stride_om) instead of TMA, which would
    write into the next sequence, and lse in the varlen convention (H, total_q)."""
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    BLOCK_D: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    dtype: gl.constexpr = q_desc.dtype
    BITS: gl.constexpr = dtype.primitive_bitwidth
    SHIFT: gl.constexpr = 8.0 if FP8 else 0.0

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 256 // BITS])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_D, 256 // BITS])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=32 // BITS)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    pid = gl.program_id(0)
    n_mb = gl.cdiv(Mq, BLOCK_M)
    mb = pid % n_mb
    if CAUSAL:
        mb = n_mb - 1 - mb  # within a head, the query blocks that see the most keys first
    bh = pid // n_mb
    z = bh // H
    h = bh % H
    hkv = h // GROUP
    start_m = mb * BLOCK_M
    q_start = 0
    if VARLEN:  # this sequence's rows and lengths; a query block past its end has nothing to do
        q_start = gl.load(CuQ + z)
        k_start = gl.load(CuK + z)
        Mq = gl.load(CuQ + z + 1) - q_start
        Mkv = gl.load(CuK + z + 1) - k_start
        if start_m >= Mq:
            return
        q_row = q_start + start_m
        k_row = k_start
    else:
        q_row = z * q_rows_z + h * q_rows_h + start_m
        k_row = z * k_rows_z + hkv * k_rows_h
    q_col = h * q_cols_h
    k_col = hkv * k_cols_h
    v_scale = 1.0
    v_row = 0
    if FP8:  # the head's descales: one multiplier of the raw scores, one of the output
        zz = z.to(gl.int64)
        qk_scale = qk_scale * gl.load(QDs + zz * stride_qdz + (h // QD_GROUP) * stride_qdh) \
            * gl.load(KDs + zz * stride_kdz + hkv * stride_kdh)
        v_scale = gl.load(VDs + zz * stride_vdz + hkv * stride_vdh)
        v_row = (z * Hkv + hkv) * BLOCK_D  # V^T rows of this kv head
    diag = Mkv - Mq
    if CAUSAL:
        hi = gl.minimum(gl.maximum(start_m + BLOCK_M + diag, 0), Mkv)
        full_hi = (gl.maximum(start_m + diag + 1, 0) // BLOCK_N) * BLOCK_N  # blocks below need no mask
    else:
        hi = Mkv
        full_hi = (Mkv // BLOCK_N) * BLOCK_N
    n_blocks = gl.cdiv(hi, BLOCK_N)

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_D], q_desc.layout)
    if FP8:  # P goes to P V through shared memory (an 8-bit register A operand cannot be kept alive
        # across the async wgmma in Triton 3.6: "Unexpected bitwidth in WGMMAWaitGroupOp: 8")
        p_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_N],
                                           gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], dtype))
    else:
        p_smem = q_smem  # not used: 16-bit P stays in registers
    k_smem = gl.allocate_shared_memory(dtype, [K_STAGES, BLOCK_N, BLOCK_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [V_STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(K_STAGES):
        mbarrier.init(k_bars.index(i), count=1)
    for i in gl.static_range(V_STAGES):
        mbarrier.init(v_bars.index(i), count=1)

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, q_col], q_bar, q_smem)
    for i in gl.static_range(K_STAGES):
        ok = i < n_blocks
        mbarrier.expect(k_bars.index(i), k_desc.block_type.nbytes, pred=ok)
        tma.async_copy_global_to_shared(k_desc, [k_row + i * BLOCK_N, k_col], k_bars.index(i), k_smem.index(i), pred=ok)
    for i in gl.static_range(V_STAGES):
        _load_v(v_desc, v_bars, v_smem, i, i, k_row, k_col, v_row, i < n_blocks, BLOCK_N, FP8)

    offs_m = start_m + gl.arange(0, BLOCK_M, layout=row_s)
    offs_n0 = gl.arange(0, BLOCK_N, layout=col_s)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, row_s)
    acc = gl.zeros([BLOCK_M, BLOCK_D], gl.float32, o_layout)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    mbarrier.wait(q_bar, 0)
    if Q_REGS:  # Q as the register A operand of every S wgmma: half the shared-memory reads of Q K^T
        q_op = q_smem.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=32 // BITS))
    else:
        q_op = q_smem

    if n_blocks > 0:
        # block 0: S_0 and its softmax (nothing to overlap yet)
        mbarrier.wait(k_bars.index(0), 0)
        s_tok = warpgroup_mma(q_op, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok])
        if num_warps > 4:
            gl.thread_barrier()  # both warpgroups are done reading K_0
        refill = K_STAGES < n_blocks
        mbarrier.expect(k_bars.index(0), k_desc.block_type.nbytes, pred=refill)
        tma.async_copy_global_to_shared(k_desc, [k_row + K_STAGES * BLOCK_N, k_col], k_bars.index(0),
                                        k_smem.index(0), pred=refill)
        p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, qk_scale, offs_m, offs_n0,
                                           Mkv, diag, BLOCK_N > full_hi, CAUSAL, SHIFT)
        if FP8:
            p_op = _stage_p(p_smem, p, dtype)
        else:
            p_op = gl.convert_layout(p.to(dtype), p_layout)

        for j in range(1, n_blocks):
            st = j % K_STAGES
            pst = (j - 1) % V_STAGES
            # S_j and O += P_{j-1} V_{j-1} in flight together; wait for S_j only
            mbarrier.wait(k_bars.index(st), (j // K_STAGES) & 1)
            s_tok = warpgroup_mma(q_op, k_smem.index(st).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            mbarrier.wait(v_bars.index(pst), ((j - 1) // V_STAGES) & 1)
            o_tok = warpgroup_mma(p_op, _v_operand(v_smem, pst, FP8), acc, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=1, deps=[s_tok])
            if num_warps > 4:
                gl.thread_barrier()
            refill = j + K_STAGES < n_blocks  # K_j's buffer is free: its S wgmma completed
            mbarrier.expect(k_bars.index(st), k_desc.block_type.nbytes, pred=refill)
            tma.async_copy_global_to_shared(k_desc, [k_row + (j + K_STAGES) * BLOCK_N, k_col], k_bars.index(st),
                                            k_smem.index(st), pred=refill)
            offs_n = j * BLOCK_N + offs_n0
            p, m_new, l_i, alpha = _softmax_step(s, m_i, l_i, qk_scale, offs_m, offs_n,
                                                 Mkv, diag, (j + 1) * BLOCK_N > full_hi, CAUSAL, SHIFT)
            if FP8:
                acc = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok])
            else:
                acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok, p_op])
            if num_warps > 4:
                gl.thread_barrier()
            # V_{j-1}'s buffer is free: its P V wgmma completed
            _load_v(v_desc, v_bars, v_smem, pst, j - 1 + V_STAGES, k_row, k_col, v_row,
                    j - 1 + V_STAGES < n_blocks, BLOCK_N, FP8)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            if FP8:
                p_op = _stage_p(p_smem, p, dtype)
            else:
                p_op = gl.convert_layout(p.to(dtype), p_layout)
            m_i = m_new

        last = n_blocks - 1
        mbarrier.wait(v_bars.index(last % V_STAGES), (last // V_STAGES) & 1)
        o_tok = warpgroup_mma(p_op, _v_operand(v_smem, last % V_STAGES, FP8), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok])

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(K_STAGES):
        mbarrier.invalidate(k_bars.index(i))
    for i in gl.static_range(V_STAGES):
        mbarrier.invalidate(v_bars.index(i))

    # l == 0 only for rows that saw no key: output 0 and lse -inf, never NaN.
    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    out = acc * gl.convert_layout(v_scale / l_safe, row_o)[:, None]
    lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe) - SHIFT) * LN2)
    if VARLEN:
        gl.store(Lse + h.to(gl.int64) * total_q + q_start + offs_m, lse, mask=offs_m < Mq)
        col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
        rows = gl.convert_layout(offs_m, row_o)
        cols = gl.arange(0, BLOCK_D, layout=col_o)
        ptrs = Out + (q_start + rows).to(gl.int64)[:, None] * stride_om + (q_col + cols)[None, :]
        gl.store(ptrs, out.to(Out.dtype.element_ty), mask=(rows < Mq)[:, None])
    else:
        gl.store(Lse + bh.to(gl.int64) * Mq + offs_m, lse, mask=offs_m < Mq)
        if FP8:  # a 16-bit output: a buffer of its own
            o_smem = gl.allocate_shared_memory(o_desc.dtype, [BLOCK_M, BLOCK_D], o_desc.layout)
            o_smem.store(out.to(o_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(o_desc, [q_row, q_col], o_smem)
        else:
            q_smem.store(out.to(dtype))  # Q is no longer read: its buffer stages O for the TMA store
            fence_async_shared()
            tma.async_copy_shared_to_global(o_desc, [q_row, q_col], q_smem)
        tma.store_wait(pendings=0)
