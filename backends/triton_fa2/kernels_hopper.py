"""FlashAttention-2 forward for Hopper (sm_90) in Triton 3.6: tensor descriptors (TMA) and tile order.

Same algorithm and conventions as ``kernels.py`` (no imports from it: a copy of ``_kv_ranges``): scores in
base 2, LSE stored in natural log (B, H, Mq) float32, bottom-right causal masking, the key loop
split into a mask-free bulk and a masked band. What changes, and why:

- Q, K, V and O move through rank-4 tensor descriptors over (B, heads, rows, dim) with the
  tensor's own strides (any layout whose last stride is 1 and whose other strides are 16-byte
  multiples): on sm_90 each tile is one bulk tensor copy (TMA) into swizzled shared memory,
  completing on an mbarrier, instead of 128-256 threads computing addresses and masks. The
  descriptor knows the head's true extent, so rows past Mq/Mkv and columns past D read as 0
  and are never written (no cross-head reads, padded head dims work): the only masks left are
  the ragged key block's and the causal band's.
- Softmax in FMA form: the row max is taken on raw scores and scaled once per row
  (``max(s) * c == max(s * c)`` for c > 0, POS_SCALE), so ``s * c - m`` is one FFMA per score
  instead of an FMUL and an FADD (the Triton tutorial's form).
- Tile order (ORDER): 0 = the blocks of one head consecutive (kernels.py's order, K/V of a
  head shared in L2 by neighbours); 1 = query-block major, heaviest first under causal (the
  last query blocks see the most keys, so launching them first leaves short tiles for the
  ragged end: longest-processing-time-first scheduling).
- PERSISTENT: ``grid = min(tiles, programs that fit)`` programs loop over tiles with stride
  ``num_programs``: one launch-and-prologue per SM slot instead of per tile.
- ``attn_fwd_hopper_ws``: the same over 2-D descriptors with ``tl.range(...,
  warp_specialize=True)``, which Triton 3.6 routes through its Hopper warp-specialization pass
  (a producer warpgroup for the TMA loads, two consumer warpgroups). It compiles, but hung on
  the H100 (docs/HOPPER_ATTEMPTS.md, attempt 5): the launcher refuses it unless asked.

The kernel runs under ``TRITON_INTERPRET=1`` too (the interpreter emulates descriptors).
"""

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)  # ln(2)


@triton.jit
def _kv_ranges(start_m, Mq, Mkv, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key ranges of one query block: [0, full_hi) needs no mask, [full_hi, hi) does.

    Our own copy of kernels.py's (as of 2026-11-24, before windows): that helper's signature
    moves with features this kernel does not take, and a shared helper broke this one once."""
    diag = Mkv - Mq
    even_hi = (Mkv // BLOCK_N) * BLOCK_N  # key blocks past this one are ragged
    if CAUSAL:
        # The last row sees keys < start_m + BLOCK_M + diag; the first every key < start_m + diag + 1.
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + diag, 0), Mkv)
        full_hi = (tl.maximum(start_m + diag + 1, 0) // BLOCK_N) * BLOCK_N
        full_hi = tl.minimum(full_hi, even_hi)
    else:
        hi = Mkv
        full_hi = even_hi
    return full_hi, hi


@triton.jit
def _tile(tile, n_mblocks, n_bh, CAUSAL: tl.constexpr, ORDER: tl.constexpr):
    """(query block index, batch*head index) of a linear tile id."""
    if ORDER == 1:
        mb = tile // n_bh
        bh = tile % n_bh
        if CAUSAL:
            mb = n_mblocks - 1 - mb  # the last query blocks see the most keys: run them first
    else:
        mb = tile % n_mblocks
        bh = tile // n_mblocks
    return mb, bh


@triton.jit
def _hopper_inner(acc, l_i, m_i, q, KDesc, VDesc, off_z, off_hkv, offs_m, lo, hi, Mkv, diag, qk_scale,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, POS_SCALE: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks [lo, hi) of one query block, online softmax (FA2: the accumulator is only
    rescaled by exp(m_old - m_new); the division by l happens once, in the epilogue)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        k = KDesc.load([off_z, off_hkv, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k))  # raw scores, float32
        if MASKED:
            offs_n = start_n + offs_n0
            keep = offs_n[None, :] < Mkv  # rows past Mkv came in as zeros: mask them out
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag)
            s = tl.where(keep, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with no visible key so far keeps m = -inf; subtract 0 so exp2 gives 0.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_sub[:, None])
        else:
            if POS_SCALE:
                m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            else:
                m_new = tl.maximum(m_i, tl.max(s * qk_scale, 1))
            m_sub = m_new
            p = tl.math.exp2(s * qk_scale - m_sub[:, None])  # one FFMA per score
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = VDesc.load([off_z, off_hkv, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _hopper_tile(QDesc, KDesc, VDesc, ODesc, Lse, qk_scale, mb, bh, H, GROUP, Mq, Mkv,
                 CAUSAL: tl.constexpr, POS_SCALE: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (query block, batch*head) tile: q stays on chip, K/V stream through TMA."""
    start_m = mb * BLOCK_M
    off_z = bh // H
    off_h = bh % H
    off_hkv = off_h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = QDesc.load([off_z, off_h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag = Mkv - Mq
    full_hi, hi = _kv_ranges(start_m, Mq, Mkv, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _hopper_inner(acc, l_i, m_i, q, KDesc, VDesc, off_z, off_hkv, offs_m, 0, full_hi, Mkv, diag,
                                  qk_scale, False, CAUSAL, POS_SCALE, BLOCK_D, BLOCK_N)
    acc, l_i, m_i = _hopper_inner(acc, l_i, m_i, q, KDesc, VDesc, off_z, off_hkv, offs_m, full_hi, hi, Mkv, diag,
                                  qk_scale, True, CAUSAL, POS_SCALE, BLOCK_D, BLOCK_N)

    # l == 0 only for rows that saw no key: output 0 and lse -inf, never NaN.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    lse = tl.where(m_i == float("inf"), float("inf"), lse)  # a +inf score: l is NaN, the lse +inf
    # The descriptor clips rows >= Mq and columns >= HEAD_DIM: no mask needed.
    ODesc.store([off_z, off_h, start_m, 0], out.to(q.dtype).reshape(1, 1, BLOCK_M, BLOCK_D))
    tl.store(Lse + bh.to(tl.int64) * Mq + offs_m, lse, mask=offs_m < Mq)


@triton.jit
def attn_fwd_hopper(QDesc, KDesc, VDesc, ODesc, Lse, qk_scale, H, GROUP, Mq, Mkv, n_bh,
                    CAUSAL: tl.constexpr, POS_SCALE: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ORDER: tl.constexpr,
                    PERSISTENT: tl.constexpr):
    """One tile per program, or (PERSISTENT) tiles pid, pid + num_programs, ... per program.

    QDesc/ODesc: (B, H, Mq, D) descriptors with blocks (1, 1, BLOCK_M, BLOCK_D); KDesc/VDesc:
    (B, Hkv, Mkv, D) with blocks (1, 1, BLOCK_N, BLOCK_D). Query head h reads kv head h // GROUP."""
    n_mblocks = tl.cdiv(Mq, BLOCK_M)
    if PERSISTENT:
        n_tiles = n_mblocks * n_bh
        for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            mb, bh = _tile(tile, n_mblocks, n_bh, CAUSAL, ORDER)
            _hopper_tile(QDesc, KDesc, VDesc, ODesc, Lse, qk_scale, mb, bh, H, GROUP, Mq, Mkv,
                         CAUSAL, POS_SCALE, BLOCK_D, BLOCK_M, BLOCK_N)
    else:
        mb, bh = _tile(tl.program_id(0), n_mblocks, n_bh, CAUSAL, ORDER)
        _hopper_tile(QDesc, KDesc, VDesc, ODesc, Lse, qk_scale, mb, bh, H, GROUP, Mq, Mkv,
                     CAUSAL, POS_SCALE, BLOCK_D, BLOCK_M, BLOCK_N)


# ------------------------------------------------------------ warp-specialized (2-D descriptors)


@triton.jit
def _ws_inner(acc, l_i, m_i, q, KDesc, VDesc, k_row, k_col, offs_m, lo, hi, Mkv, diag, qk_scale,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, POS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr):
    """``_hopper_inner`` over 2-D descriptors, with ``warp_specialize=True``: Triton 3.6's Hopper
    pass gives the TMA loads a producer warpgroup and splits the query rows over two consumer
    warpgroups (num_warps=4 per group: 12 warps in all, setmaxnreg between them). Its data
    partitioning rejects the rank-4 descriptors' reshape, hence the 2-D views."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=True):
        k = KDesc.load([k_row + start_n, k_col])
        s = tl.dot(q, tl.trans(k))
        if MASKED:
            offs_n = start_n + offs_n0
            keep = offs_n[None, :] < Mkv  # rows past Mkv belong to the next head: mask them out
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag)
            s = tl.where(keep, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_sub[:, None])
        else:
            if POS_SCALE:
                m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            else:
                m_new = tl.maximum(m_i, tl.max(s * qk_scale, 1))
            m_sub = m_new
            p = tl.math.exp2(s * qk_scale - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = VDesc.load([k_row + start_n, k_col])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attn_fwd_hopper_ws(QDesc, KDesc, VDesc, Out, Lse, qk_scale,
                       stride_oz, stride_oh, stride_om, stride_od,
                       q_rows_z, q_rows_h, q_cols_h, k_rows_z, k_rows_h, k_cols_h,
                       H, GROUP, Mq, Mkv, n_bh,
                       CAUSAL: tl.constexpr, POS_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ORDER: tl.constexpr,
                       NEED_MASK: tl.constexpr):
    """One tile per program. QDesc/KDesc/VDesc are 2-D descriptors over (rows, cols) views
    (``launch_hopper._tma_view``): q row ``z * q_rows_z + h * q_rows_h + m``, column
    ``h * q_cols_h`` (likewise k, v). Query rows a block reads past Mq belong to the next head:
    computed, never stored. The output goes through masked pointer stores."""
    n_mblocks = tl.cdiv(Mq, BLOCK_M)
    mb, bh = _tile(tl.program_id(0), n_mblocks, n_bh, CAUSAL, ORDER)
    start_m = mb * BLOCK_M
    off_z = bh // H
    off_h = bh % H
    off_hkv = off_h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = QDesc.load([off_z * q_rows_z + off_h * q_rows_h + start_m, off_h * q_cols_h])
    k_row = off_z * k_rows_z + off_hkv * k_rows_h
    k_col = off_hkv * k_cols_h

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag = Mkv - Mq
    _, hi = _kv_ranges(start_m, Mq, Mkv, CAUSAL, BLOCK_M, BLOCK_N)
    # One key loop (the Hopper warp-specialization pass of Triton 3.6 fails on kernels with two:
    # a dominance assertion); masks are applied in every block when any block needs them.
    acc, l_i, m_i = _ws_inner(acc, l_i, m_i, q, KDesc, VDesc, k_row, k_col, offs_m, 0, hi, Mkv, diag,
                              qk_scale, NEED_MASK, CAUSAL, POS_SCALE, BLOCK_N)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    o_base = Out + off_z.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh
    o_mask = offs_m[:, None] < Mq
    if BLOCK_D != HEAD_DIM:
        o_mask = o_mask & (offs_d[None, :] < HEAD_DIM)
    tl.store(o_base + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :] * stride_od,
             out.to(q.dtype), mask=o_mask)
    tl.store(Lse + bh.to(tl.int64) * Mq + offs_m, lse, mask=offs_m < Mq)
