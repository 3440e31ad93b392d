"""A warp-specialized FlashAttention-2 forward for Hopper in Gluon (branch ``s9-gluon-ws``;
never run on a GPU yet: docs/PENDING_GLUON_WS.md).

``kernels_gluon.attn_fwd_gluon`` with its loads moved to a producer partition
(``gl.warp_specialize``), as FlashAttention-3 does:

- **producer** (one warpgroup, few registers): Q once, then K_j and V_j into rings of K_STAGES
  and V_STAGES buffers by TMA; before refilling a buffer it waits for that buffer's *empty*
  barrier, which the consumers arrive on once the wgmma reading it has completed;
- **consumers** (the default partition, ``num_warps`` warps = num_warps / 4 warpgroups sharing
  every K and V tile): the same loop as ``attn_fwd_gluon`` (S_j and P_{j-1} V_{j-1} in flight
  together, wait for S_j only, block j's softmax under P V), waiting on each buffer's *full*
  barrier and arriving on its *empty* one instead of issuing the TMA copies themselves;
- the epilogue (lse, O through shared memory and TMA) runs after the partitions join.

Barrier protocol: every barrier counts one arrival per phase. A full barrier's arrival is the
producer's ``expect`` (with the TMA's transaction bytes); an empty barrier's is the consumer
partition's ``mbarrier.arrive`` (Gluon: one thread, after a barrier of the whole partition, so
both consumer warpgroups are past their wgmma wait). The producer's first wait on each empty
barrier asks for parity 1, which a fresh barrier reports as complete.

What it is for: two consumer warpgroups share each K/V tile (half the shared-memory traffic per
row of the one-warpgroup kernel), and the consumers never issue loads. Not yet: FA3's
ping-pong ordering of the two warpgroups' softmax against each other's GEMMs, fp8, varlen.
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

from .kernels_gluon import LN2, _load_v, _softmax_step, _stage_p, _v_operand


@gluon.jit
def _ws_producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_full, k_empty, v_full, v_empty,
                 q_row, q_col, k_row, k_col, n_blocks, K_STAGES: gl.constexpr, V_STAGES: gl.constexpr):
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, q_col], q_bar, q_smem)
    _ws_producer_kv(k_desc, v_desc, k_smem, v_smem, k_full, k_empty, v_full, v_empty, k_row, k_col, 0, n_blocks,
                    K_STAGES, V_STAGES, False)


@gluon.jit
def _ws_consumer(q_smem, k_smem, v_smem, q_bar, k_full, k_empty, v_full, v_empty, qk_scale, start_m, Mkv, diag,
                 full_hi, n_blocks, CAUSAL: gl.constexpr, K_STAGES: gl.constexpr, V_STAGES: gl.constexpr,
                 num_warps: gl.constexpr):
    BLOCK_M: gl.constexpr = q_smem.shape[0]
    BLOCK_D: gl.constexpr = q_smem.shape[1]
    BLOCK_N: gl.constexpr = k_smem.shape[1]
    dtype: gl.constexpr = q_smem.dtype
    BITS: gl.constexpr = dtype.primitive_bitwidth
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 256 // BITS])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_D, 256 // BITS])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=32 // BITS)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    offs_m = start_m + gl.arange(0, BLOCK_M, layout=row_s)
    offs_n0 = gl.arange(0, BLOCK_N, layout=col_s)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, row_s)
    acc = gl.zeros([BLOCK_M, BLOCK_D], gl.float32, o_layout)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    mbarrier.wait(q_bar, 0)
    if n_blocks > 0:
        mbarrier.wait(k_full.index(0), 0)
        s_tok = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok])
        mbarrier.arrive(k_empty.index(0), count=1)  # K_0 read: the producer may refill it
        p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, qk_scale, offs_m, offs_n0,
                                           Mkv, diag, BLOCK_N > full_hi, CAUSAL, 0.0)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        for j in range(1, n_blocks):
            st = j % K_STAGES
            pst = (j - 1) % V_STAGES
            mbarrier.wait(k_full.index(st), (j // K_STAGES) & 1)
            s_tok = warpgroup_mma(q_smem, k_smem.index(st).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            mbarrier.wait(v_full.index(pst), ((j - 1) // V_STAGES) & 1)
            o_tok = warpgroup_mma(p_op, v_smem.index(pst), acc, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=1, deps=[s_tok])
            mbarrier.arrive(k_empty.index(st), count=1)
            offs_n = j * BLOCK_N + offs_n0
            p, m_new, l_i, alpha = _softmax_step(s, m_i, l_i, qk_scale, offs_m, offs_n,
                                                 Mkv, diag, (j + 1) * BLOCK_N > full_hi, CAUSAL, 0.0)
            acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok, p_op])
            mbarrier.arrive(v_empty.index(pst), count=1)  # V_{j-1} read
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            m_i = m_new
        last = n_blocks - 1
        mbarrier.wait(v_full.index(last % V_STAGES), (last // V_STAGES) & 1)
        o_tok = warpgroup_mma(p_op, v_smem.index(last % V_STAGES), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok])
    return acc, m_i, l_i


@gluon.jit
def attn_fwd_gluon_ws(q_desc, k_desc, v_desc, o_desc, Lse, qk_scale, H, GROUP, Mq, Mkv,
                      q_rows_z, q_rows_h, q_cols_h, k_rows_z, k_rows_h, k_cols_h,
                      CAUSAL: gl.constexpr, K_STAGES: gl.constexpr, V_STAGES: gl.constexpr,
                      PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """16-bit only; arguments as ``attn_fwd_gluon``'s dense ones. num_warps: the consumers'
    (4 or 8: 64 or 128 query rows, 16 per warp); the producer warpgroup comes on top."""
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    BLOCK_D: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    dtype: gl.constexpr = q_desc.dtype
    BITS: gl.constexpr = dtype.primitive_bitwidth
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 256 // BITS])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_D, 256 // BITS])
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    pid = gl.program_id(0)
    n_mb = gl.cdiv(Mq, BLOCK_M)
    mb = pid % n_mb
    if CAUSAL:
        mb = n_mb - 1 - mb
    bh = pid // n_mb
    _, _, _, start_m, q_row, q_col, k_row, k_col, diag, full_hi, n_blocks = _tile_coords(
        bh, mb, H, GROUP, Mq, Mkv, q_rows_z, q_rows_h, q_cols_h, k_rows_z, k_rows_h, k_cols_h, BLOCK_M, BLOCK_N,
        CAUSAL)

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [K_STAGES, BLOCK_N, BLOCK_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [V_STAGES, BLOCK_N, BLOCK_D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_full = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
    v_full = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(K_STAGES):
        mbarrier.init(k_full.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=1)
    for i in gl.static_range(V_STAGES):
        mbarrier.init(v_full.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=1)
    fence_async_shared()  # the initialised barriers, before the other partition (and the TMA unit) use them

    acc, m_i, l_i = gl.warp_specialize(
        [(_ws_consumer, (q_smem, k_smem, v_smem, q_bar, k_full, k_empty, v_full, v_empty, qk_scale, start_m, Mkv,
                         diag, full_hi, n_blocks, CAUSAL, K_STAGES, V_STAGES, num_warps)),
         (_ws_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_full, k_empty, v_full, v_empty,
                         q_row, q_col, k_row, k_col, n_blocks, K_STAGES, V_STAGES))],
        [4], [PRODUCER_REGS])

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(K_STAGES):
        mbarrier.invalidate(k_full.index(i))
        mbarrier.invalidate(k_empty.index(i))
    for i in gl.static_range(V_STAGES):
        mbarrier.invalidate(v_full.index(i))
        mbarrier.invalidate(v_empty.index(i))

    offs_m = start_m + gl.arange(0, BLOCK_M, layout=row_s)
    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    out = acc * gl.convert_layout(1.0 / l_safe, row_o)[:, None]
    lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe)) * LN2)
    gl.store(Lse + bh.to(gl.int64) * Mq + offs_m, lse, mask=offs_m < Mq)
    q_smem.store(out.to(dtype))  # Q is no longer read (the consumers are done): it stages O for TMA
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [q_row, q_col], q_smem)
    tma.store_wait(pendings=0)


# ----------------------------------------------------------------------------- ping-pong (FA3)


@gluon.jit
def _pp_rounds(n_tiles, CAUSAL: gl.constexpr):
    """How many tiles this CTA runs: one per round of ``grid`` tiles (``_pp_tile_at``), the last
    round partial."""
    pid = gl.program_id(0)
    grid = gl.num_programs(0)
    full = n_tiles // grid
    last = pid
    if CAUSAL:  # the snake's position in the last round
        last = pid + (full & 1) * (grid - 1 - 2 * pid)
    return full + gl.where(last < n_tiles % grid, 1, 0)


@gluon.jit
def _pp_tile_at(r, CAUSAL: gl.constexpr):
    """The tile this CTA runs in round r. Non-causal: r * grid + pid (every tile costs the same).
    Causal: a snake, pid in even rounds and grid - 1 - pid in odd ones. Causal tiles are
    ordered longest first (``_pp_tile``), so a CTA that took one of a round's longer tiles
    takes one of the next round's shorter ones, and the CTAs' totals stay within about a
    tile of each other. A plain stride gave some CTAs twice the work of others (session 12:
    0.77x cuDNN at S=1k, 0.76x at S=16k)."""
    pid = gl.program_id(0)
    grid = gl.num_programs(0)
    if CAUSAL:
        pid = pid + (r & 1) * (grid - 1 - 2 * pid)
    return r * grid + pid


@gluon.jit
def _tile_coords(bh, mb, H, GROUP, Mq, Mkv, q_rows_z, q_rows_h, q_cols_h, k_rows_z, k_rows_h, k_cols_h,
                 BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """Row block mb of (batch x head) bh: its batch, head and kv head, first row, descriptor
    coordinates, the causal offset diag, the keys below which no block needs a mask (full_hi),
    and the number of key blocks it sees."""
    z = bh // H
    h = bh % H
    hkv = h // GROUP
    start_m = mb * BLOCK_M
    q_row = z * q_rows_z + h * q_rows_h + start_m
    q_col = h * q_cols_h
    k_row = z * k_rows_z + hkv * k_rows_h
    k_col = hkv * k_cols_h
    diag = Mkv - Mq
    if CAUSAL:
        hi = gl.minimum(gl.maximum(start_m + BLOCK_M + diag, 0), Mkv)
        full_hi = (gl.maximum(start_m + diag + 1, 0) // BLOCK_N) * BLOCK_N
    else:
        hi = Mkv
        full_hi = (Mkv // BLOCK_N) * BLOCK_N
    return z, h, hkv, start_m, q_row, q_col, k_row, k_col, diag, full_hi, gl.cdiv(hi, BLOCK_N)


@gluon.jit
def _pp_tile(tile, n_mb, H, GROUP, Mq, Mkv, q_rows_z, q_rows_h, q_cols_h, k_rows_z, k_rows_h, k_cols_h,
             n_tiles, sec, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """Where tile ``tile`` lies (``_tile_coords`` of its (batch x head, row block)). Non-causal:
    consecutive tiles walk one head's row blocks, then the next (batch, head), so the CTAs
    running at once share a few heads' K and V in L2. Causal: in sections of ``sec`` (batch x
    head)s (the last one may be narrower), longest first inside each: a section's first tiles
    are its heads' last row blocks, and so on. Longest first across all heads (sec = B * H)
    balances as well but keeps every head's K and V in flight at once, past L2 at D=128
    (session 13: 0.93x cuDNN at S=1k and 4k against 0.98x and 1.02x in sections of two)."""
    if CAUSAL:
        n_bh = n_tiles // n_mb
        s = tile // (sec * n_mb)
        u = tile - s * (sec * n_mb)
        width = gl.minimum(sec, n_bh - s * sec)
        mb = n_mb - 1 - u // width
        bh = s * sec + u % width
    else:
        mb = tile % n_mb
        bh = tile // n_mb
    z, h, hkv, start_m, q_row, q_col, k_row, k_col, diag, full_hi, n_blocks = _tile_coords(
        bh, mb, H, GROUP, Mq, Mkv, q_rows_z, q_rows_h, q_cols_h, k_rows_z, k_rows_h, k_cols_h, BLOCK_M, BLOCK_N,
        CAUSAL)
    return z, h, hkv, bh, start_m, q_row, q_col, k_row, k_col, diag, full_hi, n_blocks


@gluon.jit
def _pp_producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, q_empty, k_full, k_empty, v_full, v_empty,
                 n_tiles, sec, n_mb, H, GROUP, Mq, Mkv, q_rows_z, q_rows_h, q_cols_h, k_rows_z, k_rows_h, k_cols_h,
                 Hkv, CAUSAL: gl.constexpr, K_STAGES: gl.constexpr, V_STAGES: gl.constexpr, FP8: gl.constexpr):
    """_ws_producer over the CTA's tiles, with Q as two tiles of BLOCK_M_WG rows, one per
    consumer warpgroup (and, for fp8, V^T's columns: v_row is the kv head's first row of V^T).
    A tile's Q is loaded once both consumers have released the previous one (q_empty, after
    their last S GEMM), so it arrives under the previous tile's last P V and epilogue; the K/V
    rings run on across tiles."""
    BLOCK_M_WG: gl.constexpr = q_desc.block_type.shape[0]
    BLOCK_D: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    kv = 0  # key blocks loaded so far: the rings' position
    i = 0
    for r in range(_pp_rounds(n_tiles, CAUSAL)):
        tile = _pp_tile_at(r, CAUSAL)
        z, _h, hkv, _bh, _start_m, q_row, q_col, k_row, k_col, _diag, _full_hi, n_blocks = _pp_tile(
            tile, n_mb, H, GROUP, Mq, Mkv, q_rows_z, q_rows_h, q_cols_h, k_rows_z, k_rows_h, k_cols_h,
            n_tiles, sec, 2 * BLOCK_M_WG, BLOCK_N, CAUSAL)
        v_row = (z * Hkv + hkv) * BLOCK_D  # fp8: V^T rows of this kv head
        mbarrier.wait(q_empty, (i & 1) ^ 1)
        mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_row, q_col], q_bar, q_smem.index(0))
        tma.async_copy_global_to_shared(q_desc, [q_row + BLOCK_M_WG, q_col], q_bar, q_smem.index(1))
        _ws_producer_kv(k_desc, v_desc, k_smem, v_smem, k_full, k_empty, v_full, v_empty, k_row, k_col, v_row,
                        n_blocks, K_STAGES, V_STAGES, FP8, kv)
        kv += n_blocks
        i += 1


@gluon.jit
def _ws_producer_kv(k_desc, v_desc, k_smem, v_smem, k_full, k_empty, v_full, v_empty, k_row, k_col, v_row, n_blocks,
                    K_STAGES: gl.constexpr, V_STAGES: gl.constexpr, FP8: gl.constexpr, base=0):
    """K_j and V_j (fp8: V^T's block j) into their rings: each buffer refilled once its empty
    barrier completes. ``base``: the blocks loaded before this tile (persistent kernels), where
    the rings stand."""
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    for j in range(n_blocks):
        r = base + j
        ks = r % K_STAGES
        mbarrier.wait(k_empty.index(ks), ((r // K_STAGES) & 1) ^ 1)
        mbarrier.expect(k_full.index(ks), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [k_row + j * BLOCK_N, k_col], k_full.index(ks), k_smem.index(ks))
        vs = r % V_STAGES
        mbarrier.wait(v_empty.index(vs), ((r // V_STAGES) & 1) ^ 1)
        _load_v(v_desc, v_full, v_smem, vs, j, k_row, k_col, v_row, True, BLOCK_N, FP8)


@gluon.jit
def _pp_consumer(q_smem, k_smem, v_smem, p_smem, o_smem, q_bar, q_empty, k_full, k_empty, v_full, v_empty, turn,
                 o_desc, Lse, qk_scale0, n_tiles, sec, n_mb, H, GROUP, Mq, Mkv, q_rows_z, q_rows_h, q_cols_h, k_rows_z,
                 k_rows_h, k_cols_h, QDs, KDs, VDs, stride_qdz, stride_qdh, stride_kdz, stride_kdh, stride_vdz,
                 stride_vdh, QD_GROUP, CAUSAL: gl.constexpr, K_STAGES: gl.constexpr, V_STAGES: gl.constexpr,
                 FP8: gl.constexpr, WG: gl.constexpr, WG_WARPS: gl.constexpr):
    """One consumer warpgroup: rows [start_m + WG * BLOCK_M_WG, + BLOCK_M_WG) of each of the CTA's
    tiles, the loop of _ws_consumer, then its own epilogue (lse, O through its o_smem buffer and TMA).

    Ping-pong: before issuing its GEMMs for key block j (S_j and P_{j-1} V_{j-1}) a warpgroup
    waits for its turn barrier, and right after issuing them it arrives on the other's. So the
    two take turns at the tensor cores, and one's softmax runs under the other's GEMMs
    (FlashAttention-3). Turn waits: warpgroup 0's first passes (parity 1 on a fresh barrier),
    its j-th waits for warpgroup 1's (j-1)-th issue; warpgroup 1's j-th waits for warpgroup 0's
    j-th. Neither gets two phases ahead of the other's waits. Both run n_blocks + 1 issues
    (the last P V is the extra one), so every wait has its arrival.

    FP8 (e4m3 q, k and V^T, as attn_fwd_gluon's FP8): qk_scale carries the q and k descales,
    v_scale the v descale; P goes through this warpgroup's p_smem buffer scaled by 2^SHIFT;
    O leaves through o_smem (the output dtype). 16-bit: P stays in registers (p_smem is not read).

    Persistent: the warpgroup runs the CTA's tiles in turn. The turn count and the rings'
    positions run on across tiles (both warpgroups issue n_blocks + 1 GEMM pairs per tile, so
    the alternation holds); each tile's Q is released (q_empty) once its last S GEMM has
    completed, and its O store is waited for only before the next tile's store reuses o_smem."""
    BLOCK_M: gl.constexpr = q_smem.shape[1]
    BLOCK_D: gl.constexpr = q_smem.shape[2]
    BLOCK_N: gl.constexpr = k_smem.shape[1]
    dtype: gl.constexpr = q_smem.dtype
    BITS: gl.constexpr = dtype.primitive_bitwidth
    SHIFT: gl.constexpr = 8.0 if FP8 else 0.0
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WG_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 256 // BITS])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WG_WARPS, 1],
                                                       instr_shape=[16, BLOCK_D, 256 // BITS])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=32 // BITS)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    my_turn = turn.index(WG)
    their_turn = turn.index(1 - WG)
    q_op = q_smem.index(WG)
    o_buf = o_smem.index(WG)
    offs_n0 = gl.arange(0, BLOCK_N, layout=col_s)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    kv = 0  # key blocks consumed so far: the rings' position
    c = 0  # GEMM issues so far: the turn barriers' position
    i = 0
    for r in range(_pp_rounds(n_tiles, CAUSAL)):
        tile = _pp_tile_at(r, CAUSAL)
        z, h, hkv, bh, start_m, q_row, q_col, _k_row, _k_col, diag, full_hi, n_blocks = _pp_tile(
            tile, n_mb, H, GROUP, Mq, Mkv, q_rows_z, q_rows_h, q_cols_h, k_rows_z, k_rows_h, k_cols_h,
            n_tiles, sec, 2 * BLOCK_M, BLOCK_N, CAUSAL)
        qk_scale = qk_scale0
        v_scale = 1.0
        if FP8:  # the head's descales: one multiplier of the raw scores, one of the output
            zz = z.to(gl.int64)
            qk_scale = qk_scale * gl.load(QDs + zz * stride_qdz + (h // QD_GROUP) * stride_qdh) \
                * gl.load(KDs + zz * stride_kdz + hkv * stride_kdh)
            v_scale = gl.load(VDs + zz * stride_vdz + hkv * stride_vdh)
        offs_m = start_m + WG * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_s)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([BLOCK_M], gl.float32, row_s)
        acc = gl.zeros([BLOCK_M, BLOCK_D], gl.float32, o_layout)
        mbarrier.wait(q_bar, i & 1)
        if n_blocks > 0:
            mbarrier.wait(my_turn, (c + 1 - WG) & 1)
            mbarrier.wait(k_full.index(kv % K_STAGES), (kv // K_STAGES) & 1)
            s_tok = warpgroup_mma(q_op, k_smem.index(kv % K_STAGES).permute((1, 0)), zero_s, use_acc=False,
                                  is_async=True)
            mbarrier.arrive(their_turn, count=1)
            s = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok])
            mbarrier.arrive(k_empty.index(kv % K_STAGES), count=1)  # this warpgroup's read of K_0 is done
            p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, qk_scale, offs_m, offs_n0,
                                               Mkv, diag, BLOCK_N > full_hi, CAUSAL, SHIFT)
            if FP8:
                p_op = _stage_p(p_smem.index(WG), p, dtype)
            else:
                p_op = gl.convert_layout(p.to(dtype), p_layout)
            for j in range(1, n_blocks):
                r = kv + j
                st = r % K_STAGES
                pst = (r - 1) % V_STAGES
                mbarrier.wait(my_turn, (c + j + 1 - WG) & 1)
                mbarrier.wait(k_full.index(st), (r // K_STAGES) & 1)
                s_tok = warpgroup_mma(q_op, k_smem.index(st).permute((1, 0)), zero_s, use_acc=False, is_async=True)
                mbarrier.wait(v_full.index(pst), ((r - 1) // V_STAGES) & 1)
                o_tok = warpgroup_mma(p_op, _v_operand(v_smem, pst, FP8), acc, is_async=True)
                mbarrier.arrive(their_turn, count=1)
                s = warpgroup_mma_wait(num_outstanding=1, deps=[s_tok])
                mbarrier.arrive(k_empty.index(st), count=1)
                offs_n = j * BLOCK_N + offs_n0
                p, m_new, l_i, alpha = _softmax_step(s, m_i, l_i, qk_scale, offs_m, offs_n,
                                                     Mkv, diag, (j + 1) * BLOCK_N > full_hi, CAUSAL, SHIFT)
                if FP8:
                    acc = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok])
                else:
                    acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok, p_op])
                mbarrier.arrive(v_empty.index(pst), count=1)
                acc = acc * gl.convert_layout(alpha, row_o)[:, None]
                if FP8:
                    p_op = _stage_p(p_smem.index(WG), p, dtype)
                else:
                    p_op = gl.convert_layout(p.to(dtype), p_layout)
                m_i = m_new
            mbarrier.arrive(q_empty, count=1)  # every S GEMM of the tile has completed: Q may be refilled
            last = kv + n_blocks - 1
            mbarrier.wait(my_turn, (c + n_blocks + 1 - WG) & 1)
            mbarrier.wait(v_full.index(last % V_STAGES), (last // V_STAGES) & 1)
            o_tok = warpgroup_mma(p_op, _v_operand(v_smem, last % V_STAGES, FP8), acc, is_async=True)
            mbarrier.arrive(their_turn, count=1)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok])
            mbarrier.arrive(v_empty.index(last % V_STAGES), count=1)
            c += n_blocks + 1
        else:
            mbarrier.arrive(q_empty, count=1)
        kv += n_blocks
        i += 1

        empty = l_i == 0.0
        l_safe = gl.where(empty, 1.0, l_i)
        out = acc * gl.convert_layout(v_scale / l_safe, row_o)[:, None]
        lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe) - SHIFT) * LN2)
        gl.store(Lse + bh.to(gl.int64) * Mq + offs_m, lse, mask=offs_m < Mq)
        tma.store_wait(pendings=0)  # the previous tile's O has left o_buf
        o_buf.store(out.to(o_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [q_row + WG * BLOCK_M, q_col], o_buf)
    tma.store_wait(pendings=0)


@gluon.jit
def attn_fwd_gluon_pp(q_desc, k_desc, v_desc, o_desc, Lse, qk_scale, H, GROUP, Mq, Mkv,
                      q_rows_z, q_rows_h, q_cols_h, k_rows_z, k_rows_h, k_cols_h,
                      QDs, KDs, VDs, stride_qdz, stride_qdh, stride_kdz, stride_kdh, stride_vdz, stride_vdh,
                      QD_GROUP, Hkv, n_tiles, sec,
                      CAUSAL: gl.constexpr, K_STAGES: gl.constexpr, V_STAGES: gl.constexpr,
                      PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr, FP8: gl.constexpr,
                      num_warps: gl.constexpr):
    """The ping-pong forward, persistent: CTA ``pid`` runs one tile per round of ``grid`` tiles
    (``_pp_tile_at``: pid's; causal, a snake over tiles ordered longest first) of the
    ``n_tiles`` = B x H x (Mq / 128) tiles of 2 x BLOCK_M_WG query rows (q_desc's and o_desc's
    block is one warpgroup's BLOCK_M_WG rows). A grid of one CTA per tile runs each tile once, as
    a plain grid would. Consumer warpgroup 0 in the default partition (num_warps = 4), consumer
    warpgroup 1 and the producer in workers (CONSUMER_REGS, PRODUCER_REGS registers). K and V
    buffers are freed when both consumers have read them (empty barriers count 2), Q when both
    have finished the tile's S GEMMs (q_empty counts 2). Dense; the arguments are
    attn_fwd_gluon's dense ones, FP8 included (e4m3 q, k, v_desc over V^T, float32 descales;
    o_desc 16-bit). ``sec``: the causal order's sections, in (batch x head)s (``_pp_tile``)."""
    BLOCK_M_WG: gl.constexpr = q_desc.block_type.shape[0]
    BLOCK_D: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    dtype: gl.constexpr = q_desc.dtype
    n_mb = gl.cdiv(Mq, 2 * BLOCK_M_WG)

    q_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M_WG, BLOCK_D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [K_STAGES, BLOCK_N, BLOCK_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [V_STAGES] + v_desc.block_type.shape, v_desc.layout)
    # O out, per warpgroup: its own buffers, since the next tile's Q may already be arriving in Q's
    o_smem = gl.allocate_shared_memory(o_desc.dtype, [2, BLOCK_M_WG, BLOCK_D], o_desc.layout)
    if FP8:  # per warpgroup: P for P V (an 8-bit register A operand cannot cross an async wgmma)
        p_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M_WG, BLOCK_N],
                                           gl.NVMMASharedLayout.get_default_for([BLOCK_M_WG, BLOCK_N], dtype))
    else:
        p_smem = q_smem  # not read
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_full = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
    v_full = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    mbarrier.init(q_empty, count=2)  # one arrival per consumer warpgroup
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    for i in gl.static_range(K_STAGES):
        mbarrier.init(k_full.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
    for i in gl.static_range(V_STAGES):
        mbarrier.init(v_full.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=2)
    fence_async_shared()

    gl.warp_specialize(
        [(_pp_consumer, (q_smem, k_smem, v_smem, p_smem, o_smem, q_bar, q_empty, k_full, k_empty, v_full, v_empty,
                         turn, o_desc, Lse, qk_scale, n_tiles, sec, n_mb, H, GROUP, Mq, Mkv, q_rows_z, q_rows_h, q_cols_h,
                         k_rows_z, k_rows_h, k_cols_h, QDs, KDs, VDs, stride_qdz, stride_qdh, stride_kdz, stride_kdh,
                         stride_vdz, stride_vdh, QD_GROUP, CAUSAL, K_STAGES, V_STAGES, FP8, 0, num_warps)),
         (_pp_consumer, (q_smem, k_smem, v_smem, p_smem, o_smem, q_bar, q_empty, k_full, k_empty, v_full, v_empty,
                         turn, o_desc, Lse, qk_scale, n_tiles, sec, n_mb, H, GROUP, Mq, Mkv, q_rows_z, q_rows_h, q_cols_h,
                         k_rows_z, k_rows_h, k_cols_h, QDs, KDs, VDs, stride_qdz, stride_qdh, stride_kdz, stride_kdh,
                         stride_vdz, stride_vdh, QD_GROUP, CAUSAL, K_STAGES, V_STAGES, FP8, 1, 4)),
         (_pp_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, q_empty, k_full, k_empty, v_full,
                         v_empty, n_tiles, sec, n_mb, H, GROUP, Mq, Mkv, q_rows_z, q_rows_h, q_cols_h, k_rows_z, k_rows_h,
                         k_cols_h, Hkv, CAUSAL, K_STAGES, V_STAGES, FP8))],
        [4, 4], [CONSUMER_REGS, PRODUCER_REGS])

    mbarrier.invalidate(q_bar)
    mbarrier.invalidate(q_empty)
    for i in gl.static_range(2):
        mbarrier.invalidate(turn.index(i))
    for i in gl.static_range(K_STAGES):
        mbarrier.invalidate(k_full.index(i))
        mbarrier.invalidate(k_empty.index(i))
    for i in gl.static_range(V_STAGES):
        mbarrier.invalidate(v_full.index(i))
        mbarrier.invalidate(v_empty.index(i))
