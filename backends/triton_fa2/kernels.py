"""FlashAttention-2 forward and backward as Triton kernels (one source for NVIDIA and AMD).

Plain pointer arithmetic only (no ``tl.make_block_ptr``, which Triton 3.9 removed), so the
same source compiles for sm_80+, gfx90a/gfx942 and runs under ``TRITON_INTERPRET=1``.

Conventions:
- Tensors are addressed as (batch z, head h, row m/n, dim d) through four strides each, so
  both layouts (bshd, bhsd) and non-contiguous inputs need no copy.
- Scores live in base 2: ``qk_scale = softmax_scale * log2(e)`` is folded into one multiply
  and ``exp2`` replaces ``exp``. LSE is stored in natural log, (B, H, Mq) float32. The
  float32 backward (RENORM) scales each row's recomputed P by 1 / sum_j P_ij, which cancels
  what that natural-log round trip costs P (``attn_bwd_dkdv``).
- Visibility follows ``fa2dispatch/features.py`` (the project's one rule): query i sees key j
  iff j <= i + diag (CAUSAL), i + diag - win_left <= j (HAS_LEFT), j <= i + diag + win_right
  (HAS_RIGHT), with diag = Mkv - Mq (bottom-right, FlashAttention-2) or 0 (TOP_LEFT). Each loop
  over blocks is split in three so that only blocks on a band edge or at a ragged edge
  (``MASKED=True``) pay for a mask; the bulk runs mask-free, and blocks outside the band are
  never visited (a sliding window costs O(window), not O(Mkv)).
- Features are constexpr-gated, so a plain call compiles to the plain kernel: SOFTCAP
  (``softcap * tanh(s / softcap)``, tanh from exp2; float32 inputs add a series for small
  arguments, ``_tanh``), ALIBI (``- slope * |i + diag - j|``),
  DROPOUT (Philox mask regenerated from (seed, offset) by ``dropout.py``, never stored),
  VARLEN (sequence b is rows ``cu_seqlens[b]:cu_seqlens[b+1]`` of a packed (total, H, D)
  tensor; lse then is (H, total_q)).
- Offsets: batch and head offsets are 64-bit. A row's offset inside one batch element is a
  32-bit product (row x row stride) unless INT64_ROWS, which the launcher sets only for
  tensors whose rows reach element 2^31 of a batch element: then each block's first row is
  added in 64 bits and only the offsets inside a block are 32-bit (``_row_ptrs``). Ordinary
  sizes keep the 32-bit form, whose address arithmetic is lighter on registers (the 64-bit
  form everywhere cost the backward 4-14% on the H100, docs/PENDING_S5.md).
- HEAD_DIM is the real head dim, BLOCK_D the next power of two >= 16 (tl.dot's minimum);
  the padding columns are loaded as 0 and never stored.
"""

import triton
import triton.language as tl

from .dropout import attention_dropout_keep

LOG2E = tl.constexpr(1.4426950408889634)  # 1/ln(2)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2)


@triton.jit
def _load_rows(ptrs, offs_rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """Load a [rows, BLOCK_D] tile; rows >= n_rows (if CHECK_ROWS) and padded dims read 0."""
    if CHECK_ROWS:
        if BLOCK_D == HEAD_DIM:
            tile = tl.load(ptrs, mask=offs_rows[:, None] < n_rows, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(offs_rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def _store_rows(ptrs, tile, offs_rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    if BLOCK_D == HEAD_DIM:
        tl.store(ptrs, tile, mask=offs_rows[:, None] < n_rows)
    else:
        tl.store(ptrs, tile, mask=(offs_rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _row_ptrs(base, start, offs0, stride, INT64_ROWS: tl.constexpr):
    """(rows, 1) pointers to rows ``start + offs0`` of a head whose row 0 is at ``base``: a
    32-bit row x stride product, or (INT64_ROWS) the block's first row added in 64 bits."""
    if INT64_ROWS:
        return base + tl.cast(start, tl.int64) * stride + offs0[:, None] * stride
    else:
        return base + (start + offs0)[:, None] * stride


@triton.jit
def _block_and_head(n_rows, BLOCK: tl.constexpr):
    """Split the 1-D program id into (first row of this block, batch*head index).

    Blocks of one head are consecutive programs, so they run close in time and share that
    head's K/V (forward, dQ) or Q/dO (dK/dV) in L2. A 1-D grid has no 65535 limit on the
    number of heads, as gridDim.y would."""
    n_blocks = tl.cdiv(n_rows, BLOCK)
    pid = tl.program_id(0)
    return (pid % n_blocks) * BLOCK, pid // n_blocks


@triton.jit
def _seq_bounds(CuQ, CuK, off_z, Mq, Mkv, VARLEN: tl.constexpr):
    """(first row, length) of sequence ``off_z`` in q and in k/v: packed sequences for VARLEN,
    else (0, Mq) and (0, Mkv)."""
    if VARLEN:
        q_start = tl.load(CuQ + off_z)
        seq_q = tl.load(CuQ + off_z + 1) - q_start
        k_start = tl.load(CuK + off_z)
        seq_k = tl.load(CuK + off_z + 1) - k_start
        return q_start.to(tl.int64), seq_q, k_start.to(tl.int64), seq_k
    else:
        return (off_z * 0).to(tl.int64), Mq, (off_z * 0).to(tl.int64), Mkv


@triton.jit
def _diag(seq_q, seq_k, TOP_LEFT: tl.constexpr):
    if TOP_LEFT:
        return seq_q * 0
    else:
        return seq_k - seq_q


TANH_SERIES_BELOW = tl.constexpr(0.3)  # |x| where _tanh's PRECISE form switches to the exp2 form


@triton.jit
def _tanh(x, PRECISE: tl.constexpr):
    """tanh from exp2 (portable: NVIDIA, AMD and the interpreter): sign(x) (1 - e) / (1 + e),
    e = exp(-2|x|). Its absolute error is ~1 float32 ulp of 1, so for small |x|, where 1 - e
    cancels, the relative error grows as ulp(1) / (2|x|); softcap * tanh(s / softcap) carries it
    into the score and the lse (fuzz #501 on the H100: float32, softcap 30, |x| ~ 0.04, lse error
    1.31e-6 against a bound of 1.18e-6; at softcap 1000 the error is 5x the bound).

    PRECISE (float32 inputs): below |x| < 0.3 the odd Taylor series instead, x + x^3 q(x^2)
    with q by Horner through the x^13 term; the first term left out (x^15) is < 1e-10 of tanh
    there. From 0.3 up, 1 - e >= 0.45 no longer cancels. Measured against float64 tanh over a
    dense sweep (tests/test_numerics.py::test_precise_tanh_is_within_a_few_float32_ulps, NumPy's
    float32): at most 0.55 float32 ulps on the series, 3.25 on the exp2 form (x = 0.54), where
    the exp2 form alone is off by up to millions of ulps at small |x|. 16-bit inputs keep the
    exp2 form alone: their scores are rounded far coarser than this."""
    e = tl.math.exp2(tl.abs(x) * (-2.0 * LOG2E))
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(x < 0, -t, t)
    if PRECISE:
        x2 = x * x
        # tanh = x - x^3/3 + 2x^5/15 - 17x^7/315 + 62x^9/2835 - 1382x^11/155925 + 21844x^13/6081075
        q = 21844.0 / 6081075.0
        q = q * x2 - 1382.0 / 155925.0
        q = q * x2 + 62.0 / 2835.0
        q = q * x2 - 17.0 / 315.0
        q = q * x2 + 2.0 / 15.0
        q = q * x2 - 1.0 / 3.0
        t = tl.where(tl.abs(x) < TANH_SERIES_BELOW, x + x * (x2 * q), t)
    return t


@triton.jit
def _kv_ranges(start_m, Mq, Mkv, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key ranges of a plain (bottom-right causal or full) query block: [0, full_hi) needs no
    mask, [full_hi, hi) does (the fp8 kernel's form of ``_key_ranges``)."""
    lo, a, b, hi = _key_ranges(start_m, Mkv, Mkv - Mq, 0, 0, CAUSAL, False, False, BLOCK_M, BLOCK_N)
    return b, hi


@triton.jit
def _key_ranges(start_m, seq_k, diag, win_left, win_right, CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr,
               HAS_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key ranges of one query block: [lo, a) and [b, hi) need a mask, [a, b) does not; keys
    outside [lo, hi) are invisible to every row of the block."""
    even_hi = (seq_k // BLOCK_N) * BLOCK_N  # key blocks past this one are ragged
    if CAUSAL or HAS_RIGHT:
        up = diag
        if not CAUSAL:
            up = diag + win_right
        # The last row sees keys < start_m + BLOCK_M + up; the first every key < start_m + up + 1.
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + up, 0), seq_k)
        full_hi = (tl.maximum(start_m + up + 1, 0) // BLOCK_N) * BLOCK_N
        full_hi = tl.minimum(full_hi, even_hi)
    else:
        hi = seq_k
        full_hi = even_hi
    if HAS_LEFT:
        low = diag - win_left
        # The first row sees keys >= start_m + low; the last row keys >= start_m + BLOCK_M - 1 + low.
        lo = (tl.maximum(start_m + low, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(start_m + BLOCK_M - 1 + low, 0), BLOCK_N) * BLOCK_N
    else:
        lo = hi * 0
        full_lo = hi * 0
    a = tl.minimum(tl.maximum(full_lo, lo), hi)
    b = tl.maximum(tl.minimum(full_hi, hi), a)
    return lo, a, b, hi


@triton.jit
def _q_ranges(start_n, seq_q, diag, win_left, win_right, CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr,
              HAS_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query ranges of one key block (the dK/dV loop): [lo, a) and [b, hi) masked, [a, b) not."""
    even_end = (seq_q // BLOCK_M) * BLOCK_M  # query blocks past this one are ragged
    if CAUSAL or HAS_RIGHT:
        up = diag
        if not CAUSAL:
            up = diag + win_right
        # Rows < start_n - up see none of this block; rows >= start_n + BLOCK_N - 1 - up see all of it.
        lo = (tl.maximum(start_n - up, 0) // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - up, 0), BLOCK_M) * BLOCK_M
    else:
        lo = seq_q * 0
        full_lo = seq_q * 0
    if HAS_LEFT:
        low = diag - win_left
        # Rows <= start_n - low see all of it (left side); rows > start_n + BLOCK_N - 1 - low none.
        hi = tl.minimum(tl.maximum(start_n + BLOCK_N - low, 0), seq_q)
        full_hi = (tl.maximum(start_n - low + 1, 0) // BLOCK_M) * BLOCK_M
        full_hi = tl.minimum(full_hi, even_end)
    else:
        hi = seq_q
        full_hi = even_end
    a = tl.minimum(tl.maximum(full_lo, lo), hi)
    b = tl.maximum(tl.minimum(full_hi, hi), a)
    return lo, a, b, hi


@triton.jit
def _scores(q, k, qk_scale, cap_a, cap_b, slope2, offs_m, offs_n, seq_q, seq_k, diag, win_left, win_right,
            MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
            SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Scores of a (rows x keys) tile in base 2, with softcap, ALiBi and (MASKED) the masks.
    Returns (s, t) where t = tanh(softmax_scale * q.k / softcap) for the softcap backward
    (t = s when SOFTCAP is off). float32 operands take ``_tanh``'s PRECISE form (a compile-time
    choice on the operands' dtype, so 16-bit kernels compile as before); the forward and both
    backward kernels get their scores here or in ``_scores_t``, so P and the derivative
    1 - t^2 of the backward use the same t as the forward."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if SOFTCAP:
        t = _tanh(s * cap_a, q.dtype == tl.float32)  # cap_a = softmax_scale / softcap
        s = t * cap_b  # cap_b = softcap * log2(e)
    else:
        s = s * qk_scale
        t = s
    if ALIBI:
        rel = (offs_m[:, None] + diag - offs_n[None, :]).to(tl.float32)
        s = s - slope2 * tl.abs(rel)
    if MASKED:
        keep = offs_n[None, :] < seq_k
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag)
        if HAS_RIGHT:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag + win_right)
        if HAS_LEFT:
            keep = keep & (offs_n[None, :] >= offs_m[:, None] + diag - win_left)
        s = tl.where(keep, s, float("-inf"))
    return s, t


@triton.jit
def _scores_t(k, q, qk_scale, cap_a, cap_b, slope2, offs_m, offs_n, seq_q, seq_k, diag, win_left, win_right,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
              SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``_scores`` transposed: a (keys x queries) tile computed as k q^T, for the dK/dV loop
    (P^T and dS^T then feed the dots without transposing a result). MASKED also masks query
    rows past the sequence."""
    s = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
    if SOFTCAP:
        t = _tanh(s * cap_a, q.dtype == tl.float32)
        s = t * cap_b
    else:
        s = s * qk_scale
        t = s
    if ALIBI:
        rel = (offs_m[None, :] + diag - offs_n[:, None]).to(tl.float32)
        s = s - slope2 * tl.abs(rel)
    if MASKED:
        keep = offs_m[None, :] < seq_q
        if CAUSAL:
            keep = keep & (offs_n[:, None] <= offs_m[None, :] + diag)
        if HAS_RIGHT:
            keep = keep & (offs_n[:, None] <= offs_m[None, :] + diag + win_right)
        if HAS_LEFT:
            keep = keep & (offs_n[:, None] >= offs_m[None, :] + diag - win_left)
        s = tl.where(keep, s, float("-inf"))
    return s, t


@triton.jit
def _acc_dot(a, b, acc, rt_zero, DOT_PRECISION: tl.constexpr):
    """acc + a @ b. float32 operands (exact float32 dots: FMA chains) sum each block's product
    on its own, then add it: a gradient summed over thousands of rows then rounds once per
    block instead of once per row (the float32 backward's error stays within PyTorch's own).
    The block's dot starts from ``rt_zero`` (a run-time 0.0): from a constant zero Triton would
    fold the add back into the dot's accumulator. 16-bit operands accumulate in the tensor-core
    instruction as usual."""
    if a.dtype == tl.float32:
        part = tl.dot(a, b, tl.full(acc.shape, 0.0, tl.float32) + rt_zero, input_precision=DOT_PRECISION)
        return acc + part
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
               offs_m, offs_d, lo, hi, seq_q, seq_k, diag, qk_scale,
               win_left, win_right, cap_a, cap_b, slope2, seed, offset, bh, Mq, Mkv, p_drop,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
               INT64_ROWS: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_rows(_row_ptrs(k_base, start_n, offs_n0, stride_kn, INT64_ROWS) + offs_d[None, :] * stride_kd,
                       offs_n, seq_k, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        s, _ = _scores(q, k, qk_scale, cap_a, cap_b, slope2, offs_m, offs_n, seq_q, seq_k, diag, win_left, win_right,
                       MASKED, CAUSAL, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, DOT_PRECISION)
        if MASKED:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with no visible key so far keeps m = -inf; subtract 0 so exp2 gives 0.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = m_new
        p = tl.math.exp2(s - m_sub[:, None])
        # FA2: rescale the unnormalised accumulator only by exp(m_old - m_new); divide by l once at the end.
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _load_rows(_row_ptrs(v_base, start_n, offs_n0, stride_vn, INT64_ROWS) + offs_d[None, :] * stride_vd,
                       offs_n, seq_k, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        if DROPOUT:  # l keeps the undropped sum (the lse is the softmax's); 1/(1-p) comes at the end
            p = tl.where(attention_dropout_keep(seed, offset, bh, Mq, Mkv, offs_m, offs_n, p_drop), p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seed", "offset"])
def attn_fwd(Q, K, V, Out, Lse, qk_scale,
             stride_qz, stride_qh, stride_qm, stride_qd,
             stride_kz, stride_kh, stride_kn, stride_kd,
             stride_vz, stride_vh, stride_vn, stride_vd,
             stride_oz, stride_oh, stride_om, stride_od,
             stride_lz, stride_lh,
             H, GROUP, Mq, Mkv,
             CuQ, CuK, win_left, win_right, cap_a, cap_b, Slopes, stride_sz, stride_sh,
             seed, offset, p_drop, rp_drop,
             CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
             TOP_LEFT: tl.constexpr = False, HAS_LEFT: tl.constexpr = False, HAS_RIGHT: tl.constexpr = False,
             SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False, DROPOUT: tl.constexpr = False,
             VARLEN: tl.constexpr = False, INT64_ROWS: tl.constexpr = False):
    """One program per (query block, batch*head); q stays on chip throughout."""
    start_m, off_bh = _block_and_head(Mq, BLOCK_M)
    off_z = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    q_start, seq_q, k_start, seq_k = _seq_bounds(CuQ, CuK, off_z, Mq, Mkv, VARLEN)
    if start_m >= seq_q:  # varlen: this sequence is shorter than the longest
        return
    off_hkv = off_h // GROUP
    q_base = Q + off_z * stride_qz + off_h * stride_qh + q_start * stride_qm
    k_base = K + off_z * stride_kz + off_hkv * stride_kh + k_start * stride_kn
    v_base = V + off_z * stride_vz + off_hkv * stride_vh + k_start * stride_vn

    offs_r = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_r
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(_row_ptrs(q_base, start_m, offs_r, stride_qm, INT64_ROWS) + offs_d[None, :] * stride_qd,
                   offs_m, seq_q, offs_d, HEAD_DIM, BLOCK_D, True)
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(Slopes + off_z * stride_sz + off_h * stride_sh) * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag = _diag(seq_q, seq_k, TOP_LEFT)
    lo, a, b, hi = _key_ranges(start_m, seq_k, diag, win_left, win_right, CAUSAL, HAS_LEFT, HAS_RIGHT,
                              BLOCK_M, BLOCK_N)
    if HAS_LEFT:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                   offs_m, offs_d, lo, a, seq_q, seq_k, diag, qk_scale,
                                   win_left, win_right, cap_a, cap_b, slope2, seed, offset, off_bh, Mq, Mkv, p_drop,
                                   True, CAUSAL, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, DROPOUT,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, INT64_ROWS)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                               offs_m, offs_d, a, b, seq_q, seq_k, diag, qk_scale,
                               win_left, win_right, cap_a, cap_b, slope2, seed, offset, off_bh, Mq, Mkv, p_drop,
                               False, CAUSAL, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, DROPOUT,
                               HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, INT64_ROWS)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                               offs_m, offs_d, b, hi, seq_q, seq_k, diag, qk_scale,
                               win_left, win_right, cap_a, cap_b, slope2, seed, offset, off_bh, Mq, Mkv, p_drop,
                               True, CAUSAL, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, DROPOUT,
                               HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, INT64_ROWS)

    # l == 0 only for rows that saw no key: output 0 and lse -inf, never NaN.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    if DROPOUT:
        out = acc * (rp_drop / l_safe)[:, None]
    else:
        out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    # A +inf score makes l = exp2(inf - inf) = NaN; the softmax's lse is +inf (torch.logsumexp).
    lse = tl.where(m_i == float("inf"), float("inf"), lse)
    o_base = Out + off_z * stride_oz + off_h * stride_oh + q_start * stride_om
    _store_rows(_row_ptrs(o_base, start_m, offs_r, stride_om, INT64_ROWS) + offs_d[None, :] * stride_od,
                out.to(Out.dtype.element_ty), offs_m, seq_q, offs_d, HEAD_DIM, BLOCK_D)
    tl.store(Lse + off_z * stride_lz + off_h * stride_lh + q_start + offs_m, lse, mask=offs_m < seq_q)


# ---------------------------------------------------------------------------- backward


@triton.jit
def attn_bwd_preprocess(Out, DO, Delta,
                        stride_oz, stride_oh, stride_om, stride_od,
                        stride_doz, stride_doh, stride_dom, stride_dod,
                        stride_lz, stride_lh,
                        H, Mq, CuQ,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                        VARLEN: tl.constexpr = False, INT64_ROWS: tl.constexpr = False):
    """delta_i = sum_d dO_id * O_id (float32), the row term of dS = P * (dP - delta)."""
    start_m, off_bh = _block_and_head(Mq, BLOCK_M)
    off_z = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    q_start, seq_q, _, _ = _seq_bounds(CuQ, CuQ, off_z, Mq, Mq, VARLEN)
    if start_m >= seq_q:
        return
    offs_r = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_r
    offs_d = tl.arange(0, BLOCK_D)
    o_base = Out + off_z * stride_oz + off_h * stride_oh + q_start * stride_om
    do_base = DO + off_z * stride_doz + off_h * stride_doh + q_start * stride_dom
    o = _load_rows(_row_ptrs(o_base, start_m, offs_r, stride_om, INT64_ROWS) + offs_d[None, :] * stride_od,
                   offs_m, seq_q, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(_row_ptrs(do_base, start_m, offs_r, stride_dom, INT64_ROWS) + offs_d[None, :] * stride_dod,
                    offs_m, seq_q, offs_d, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + off_z * stride_lz + off_h * stride_lh + q_start + offs_m, delta, mask=offs_m < seq_q)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, corr_base,
                    stride_qm, stride_qd, stride_dom, stride_dod,
                    offs_n, offs_d, lo, hi, seq_q, seq_k, diag, qk_scale,
                    win_left, win_right, cap_a, cap_b, slope2, seed, offset, bh, Mq, Mkv, p_drop, rp_drop,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    RENORM: tl.constexpr, INT64_ROWS: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [lo, hi). Works on transposed
    scores (keys x queries) so P^T and dS^T feed the dots without a transpose of the result.
    RENORM: P times the row's 1 / sum_j P_ij from ``corr_base`` (attn_bwd_dkdv says why)."""
    offs_m0 = tl.arange(0, BLOCK_M)
    rt_zero = qk_scale * 0.0  # a run-time zero (_acc_dot)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        q = _load_rows(_row_ptrs(q_base, start_m, offs_m0, stride_qm, INT64_ROWS) + offs_d[None, :] * stride_qd,
                       offs_m, seq_q, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        do = _load_rows(_row_ptrs(do_base, start_m, offs_m0, stride_dom, INT64_ROWS) + offs_d[None, :] * stride_dod,
                        offs_m, seq_q, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        if MASKED:
            lse = tl.load(lse_base + offs_m, mask=offs_m < seq_q, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=offs_m < seq_q, other=0.0)
            if RENORM:
                corr = tl.load(corr_base + offs_m, mask=offs_m < seq_q, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
            if RENORM:
                corr = tl.load(corr_base + offs_m)
        s_t, t_t = _scores_t(k, q, qk_scale, cap_a, cap_b, slope2, offs_m, offs_n, seq_q, seq_k, diag, win_left,
                             win_right, MASKED, CAUSAL, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, DOT_PRECISION)
        p_t = tl.math.exp2(s_t - lse[None, :] * LOG2E)
        if MASKED:
            # where(), not a multiply: p_t is NaN for rows whose lse is -inf (they see no key).
            p_t = tl.where(s_t == float("-inf"), 0.0, p_t)
        if RENORM:
            p_t = p_t * corr[None, :]
        if DROPOUT:  # dV takes the dropped weights; dP is masked and scaled the same way
            keep_t = attention_dropout_keep(seed, offset, bh, Mq, Mkv, offs_m, offs_n, p_drop, TRANSPOSED=True)
            pd_t = tl.where(keep_t, p_t * rp_drop, 0.0)
            dv = _acc_dot(pd_t.to(do.dtype), do, dv, rt_zero, DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            dp_t = tl.where(keep_t, dp_t * rp_drop, 0.0)
        else:
            dv = _acc_dot(p_t.to(do.dtype), do, dv, rt_zero, DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk = _acc_dot(ds_t.to(q.dtype), q, dk, rt_zero, DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["seed", "offset"])
def attn_bwd_dkdv(Q, K, V, DO, Lse, Delta, Corr, DK, DV, qk_scale, softmax_scale,
                  stride_qz, stride_qh, stride_qm, stride_qd,
                  stride_kz, stride_kh, stride_kn, stride_kd,
                  stride_vz, stride_vh, stride_vn, stride_vd,
                  stride_doz, stride_doh, stride_dom, stride_dod,
                  stride_dkz, stride_dkh, stride_dkn, stride_dkd,
                  stride_dvz, stride_dvh, stride_dvn, stride_dvd,
                  stride_lz, stride_lh,
                  H, HKV, GROUP, Mq, Mkv,
                  CuQ, CuK, win_left, win_right, cap_a, cap_b, Slopes, stride_sz, stride_sh,
                  seed, offset, p_drop, rp_drop,
                  CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  TOP_LEFT: tl.constexpr = False, HAS_LEFT: tl.constexpr = False, HAS_RIGHT: tl.constexpr = False,
                  SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False, DROPOUT: tl.constexpr = False,
                  VARLEN: tl.constexpr = False, RENORM: tl.constexpr = False, INT64_ROWS: tl.constexpr = False):
    """One program per (key block, batch*kv head): K and V stay on chip while the program
    loops over every query head of its group and every query block, so dK and dV are summed
    on chip (GQA included) with no atomics: deterministic.

    RENORM (float32 inputs): P = exp2(s - lse2) * corr_i, corr_i = 1 / sum_j exp2(s_ij - lse2_i)
    written by attn_bwd_dq's DELTA_ONLY pass. The lse comes back from its natural-log float32
    store, read in base 2: the round trip leaves every row's P off by one factor
    exp2(error of lse2), an error of ~1 ulp of |lse2| (1.2e-4 relative at |lse| ~ 1700,
    which ALiBi reaches at long positions). Summed over thousands of rows into dV that missed
    the bound ~9x (fuzz #726 on the H100: one key per row, exact P = 1, dv error 5.6e-3
    against 6.3e-4), while PyTorch's float32 softmax subtracts the exact row max and divides
    by its own row sum. Dividing by the row sum of the very P recomputed here cancels the
    factor (to ~1 ulp), and delta = sum P dP / sum P is the same renormalized P's. 16-bit
    inputs skip it: their P is rounded to 16 bits for the dots anyway."""
    start_n, off_bhkv = _block_and_head(Mkv, BLOCK_N)
    off_z = (off_bhkv // HKV).to(tl.int64)
    off_hkv = (off_bhkv % HKV).to(tl.int64)
    q_start, seq_q, k_start, seq_k = _seq_bounds(CuQ, CuK, off_z, Mq, Mkv, VARLEN)
    if start_n >= seq_k:
        return
    offs_r = tl.arange(0, BLOCK_N)
    offs_n = start_n + offs_r
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K + off_z * stride_kz + off_hkv * stride_kh + k_start * stride_kn
    v_base = V + off_z * stride_vz + off_hkv * stride_vh + k_start * stride_vn
    k = _load_rows(_row_ptrs(k_base, start_n, offs_r, stride_kn, INT64_ROWS) + offs_d[None, :] * stride_kd,
                   offs_n, seq_k, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(_row_ptrs(v_base, start_n, offs_r, stride_vn, INT64_ROWS) + offs_d[None, :] * stride_vd,
                   offs_n, seq_k, offs_d, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    diag = _diag(seq_q, seq_k, TOP_LEFT)
    lo, a, b, hi = _q_ranges(start_n, seq_q, diag, win_left, win_right, CAUSAL, HAS_LEFT, HAS_RIGHT,
                             BLOCK_M, BLOCK_N)
    for g in range(0, GROUP):
        off_h = off_hkv * GROUP + g
        q_base = Q + off_z * stride_qz + off_h * stride_qh + q_start * stride_qm
        do_base = DO + off_z * stride_doz + off_h * stride_doh + q_start * stride_dom
        row_base = off_z * stride_lz + off_h * stride_lh + q_start
        bh = off_z * H + off_h
        slope2 = 0.0
        if ALIBI:
            slope2 = tl.load(Slopes + off_z * stride_sz + off_h * stride_sh) * LOG2E
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, Lse + row_base, Delta + row_base, Corr + row_base,
                                 stride_qm, stride_qd, stride_dom, stride_dod, offs_n, offs_d,
                                 lo, a, seq_q, seq_k, diag, qk_scale,
                                 win_left, win_right, cap_a, cap_b, slope2, seed, offset, bh, Mq, Mkv, p_drop, rp_drop,
                                 True, CAUSAL, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, DROPOUT,
                                 HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION, RENORM, INT64_ROWS)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, Lse + row_base, Delta + row_base, Corr + row_base,
                                 stride_qm, stride_qd, stride_dom, stride_dod, offs_n, offs_d,
                                 a, b, seq_q, seq_k, diag, qk_scale,
                                 win_left, win_right, cap_a, cap_b, slope2, seed, offset, bh, Mq, Mkv, p_drop, rp_drop,
                                 False, CAUSAL, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, DROPOUT,
                                 HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION, RENORM, INT64_ROWS)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, Lse + row_base, Delta + row_base, Corr + row_base,
                                 stride_qm, stride_qd, stride_dom, stride_dod, offs_n, offs_d,
                                 b, hi, seq_q, seq_k, diag, qk_scale,
                                 win_left, win_right, cap_a, cap_b, slope2, seed, offset, bh, Mq, Mkv, p_drop, rp_drop,
                                 True, CAUSAL, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, DROPOUT,
                                 HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION, RENORM, INT64_ROWS)

    dk = dk * softmax_scale
    dk_base = DK + off_z * stride_dkz + off_hkv * stride_dkh + k_start * stride_dkn
    dv_base = DV + off_z * stride_dvz + off_hkv * stride_dvh + k_start * stride_dvn
    _store_rows(_row_ptrs(dk_base, start_n, offs_r, stride_dkn, INT64_ROWS) + offs_d[None, :] * stride_dkd,
                dk.to(DK.dtype.element_ty), offs_n, seq_k, offs_d, HEAD_DIM, BLOCK_D)
    _store_rows(_row_ptrs(dv_base, start_n, offs_r, stride_dvn, INT64_ROWS) + offs_d[None, :] * stride_dvd,
                dv.to(DV.dtype.element_ty), offs_n, seq_k, offs_d, HEAD_DIM, BLOCK_D)


@triton.jit
def _bwd_dq_inner(dq, dsum, psum, q, do, lse2, delta, corr, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                  offs_m, offs_d, lo, hi, seq_q, seq_k, diag, qk_scale,
                  win_left, win_right, cap_a, cap_b, slope2, seed, offset, bh, Mq, Mkv, p_drop, rp_drop,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                  SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  DELTA_ONLY: tl.constexpr, RENORM: tl.constexpr, INT64_ROWS: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    rt_zero = qk_scale * 0.0  # a run-time zero (_acc_dot)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_rows(_row_ptrs(k_base, start_n, offs_n0, stride_kn, INT64_ROWS) + offs_d[None, :] * stride_kd,
                       offs_n, seq_k, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        v = _load_rows(_row_ptrs(v_base, start_n, offs_n0, stride_vn, INT64_ROWS) + offs_d[None, :] * stride_vd,
                       offs_n, seq_k, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        s, t = _scores(q, k, qk_scale, cap_a, cap_b, slope2, offs_m, offs_n, seq_q, seq_k, diag, win_left, win_right,
                       MASKED, CAUSAL, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, DOT_PRECISION)
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            p = tl.where(s == float("-inf"), 0.0, p)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = attention_dropout_keep(seed, offset, bh, Mq, Mkv, offs_m, offs_n, p_drop)
            dp = tl.where(keep, dp * rp_drop, 0.0)
        if DELTA_ONLY:  # delta_i = sum_j P_ij dP_ij, from the very P and dP the gradients use
            dsum += tl.sum(p * dp, 1)
            psum += tl.sum(p, 1)
        else:
            if RENORM:  # the row's 1 / sum_j P_ij from the DELTA_ONLY pass (attn_bwd_dkdv says why)
                p = p * corr[:, None]
            ds = p * (dp - delta[:, None])
            if SOFTCAP:
                ds = ds * (1.0 - t * t)
            dq = _acc_dot(ds.to(k.dtype), k, dq, rt_zero, DOT_PRECISION)
    return dq, dsum, psum


@triton.jit(do_not_specialize=["seed", "offset"])
def attn_bwd_dq(Q, K, V, DO, Lse, Delta, Corr, DQ, qk_scale, softmax_scale,
                stride_qz, stride_qh, stride_qm, stride_qd,
                stride_kz, stride_kh, stride_kn, stride_kd,
                stride_vz, stride_vh, stride_vn, stride_vd,
                stride_doz, stride_doh, stride_dom, stride_dod,
                stride_dqz, stride_dqh, stride_dqm, stride_dqd,
                stride_lz, stride_lh,
                H, GROUP, Mq, Mkv,
                CuQ, CuK, win_left, win_right, cap_a, cap_b, Slopes, stride_sz, stride_sh,
                seed, offset, p_drop, rp_drop,
                CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                TOP_LEFT: tl.constexpr = False, HAS_LEFT: tl.constexpr = False, HAS_RIGHT: tl.constexpr = False,
                SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False, DROPOUT: tl.constexpr = False,
                VARLEN: tl.constexpr = False, DELTA_ONLY: tl.constexpr = False, RENORM: tl.constexpr = False,
                INT64_ROWS: tl.constexpr = False):
    """One program per (query block, batch*head), parallel over queries like the forward;
    dQ is summed on chip over key blocks: no atomics, deterministic.

    DELTA_ONLY: the same loop writes delta_i = sum_j P_ij dP_ij / sum_j P_ij into Delta instead
    of dQ (a pass before the gradient kernels, for dropout: there dO . O would use the output
    rounded to its dtype, which is off from the dropped dP by that rounding, and a row that
    sees one key would get dS = P (dP - delta) != 0 where the exact value is 0).

    RENORM (float32 inputs): the DELTA_ONLY pass also writes corr_i = 1 / sum_j P_ij into Corr
    (0 for a row that sees no key), and the gradient pass, like attn_bwd_dkdv, takes
    P = exp2(s - lse2) * corr_i: the P whose rows sum to 1, with the natural-log round trip of
    the lse cancelled (attn_bwd_dkdv's docstring has the numbers)."""
    start_m, off_bh = _block_and_head(Mq, BLOCK_M)
    off_z = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    q_start, seq_q, k_start, seq_k = _seq_bounds(CuQ, CuK, off_z, Mq, Mkv, VARLEN)
    if start_m >= seq_q:
        return
    off_hkv = off_h // GROUP
    offs_r = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_r
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + off_z * stride_qz + off_h * stride_qh + q_start * stride_qm
    do_base = DO + off_z * stride_doz + off_h * stride_doh + q_start * stride_dom
    q = _load_rows(_row_ptrs(q_base, start_m, offs_r, stride_qm, INT64_ROWS) + offs_d[None, :] * stride_qd,
                   offs_m, seq_q, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(_row_ptrs(do_base, start_m, offs_r, stride_dom, INT64_ROWS) + offs_d[None, :] * stride_dod,
                    offs_m, seq_q, offs_d, HEAD_DIM, BLOCK_D, True)
    row_base = off_z * stride_lz + off_h * stride_lh + q_start
    lse2 = tl.load(Lse + row_base + offs_m, mask=offs_m < seq_q, other=0.0) * LOG2E
    delta = tl.load(Delta + row_base + offs_m, mask=offs_m < seq_q, other=0.0)
    corr = delta
    if RENORM and not DELTA_ONLY:
        corr = tl.load(Corr + row_base + offs_m, mask=offs_m < seq_q, other=0.0)
    k_base = K + off_z * stride_kz + off_hkv * stride_kh + k_start * stride_kn
    v_base = V + off_z * stride_vz + off_hkv * stride_vh + k_start * stride_vn
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(Slopes + off_z * stride_sz + off_h * stride_sh) * LOG2E

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    psum = tl.zeros([BLOCK_M], dtype=tl.float32)
    diag = _diag(seq_q, seq_k, TOP_LEFT)
    lo, a, b, hi = _key_ranges(start_m, seq_k, diag, win_left, win_right, CAUSAL, HAS_LEFT, HAS_RIGHT,
                              BLOCK_M, BLOCK_N)
    if HAS_LEFT:
        dq, dsum, psum = _bwd_dq_inner(dq, dsum, psum, q, do, lse2, delta, corr, k_base, v_base,
                                       stride_kn, stride_kd, stride_vn, stride_vd,
                                       offs_m, offs_d, lo, a, seq_q, seq_k, diag, qk_scale,
                                       win_left, win_right, cap_a, cap_b, slope2, seed, offset, off_bh, Mq, Mkv, p_drop, rp_drop,
                                       True, CAUSAL, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, DROPOUT,
                                       HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, DELTA_ONLY, RENORM, INT64_ROWS)
    dq, dsum, psum = _bwd_dq_inner(dq, dsum, psum, q, do, lse2, delta, corr, k_base, v_base,
                                   stride_kn, stride_kd, stride_vn, stride_vd,
                                   offs_m, offs_d, a, b, seq_q, seq_k, diag, qk_scale,
                                   win_left, win_right, cap_a, cap_b, slope2, seed, offset, off_bh, Mq, Mkv, p_drop, rp_drop,
                                   False, CAUSAL, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, DROPOUT,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, DELTA_ONLY, RENORM, INT64_ROWS)
    dq, dsum, psum = _bwd_dq_inner(dq, dsum, psum, q, do, lse2, delta, corr, k_base, v_base,
                                   stride_kn, stride_kd, stride_vn, stride_vd,
                                   offs_m, offs_d, b, hi, seq_q, seq_k, diag, qk_scale,
                                   win_left, win_right, cap_a, cap_b, slope2, seed, offset, off_bh, Mq, Mkv, p_drop, rp_drop,
                                   True, CAUSAL, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, DROPOUT,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, DELTA_ONLY, RENORM, INT64_ROWS)
    if DELTA_ONLY:
        # Divided by sum_j P_ij (1 up to rounding): P carries the rounding of the stored lse
        # (natural log, read back in base 2) as one factor per row, which this cancels, so a
        # row that sees one key gets delta = dP and dS = 0, as the softmax's algebra says.
        delta_exact = tl.where(psum > 0.0, dsum / tl.where(psum > 0.0, psum, 1.0), 0.0)
        tl.store(Delta + row_base + offs_m, delta_exact, mask=offs_m < seq_q)
        if RENORM:  # 1 / sum_j P_ij for the gradient kernels' P; 0 where no key is visible
            tl.store(Corr + row_base + offs_m, tl.where(psum > 0.0, 1.0 / tl.where(psum > 0.0, psum, 1.0), 0.0),
                     mask=offs_m < seq_q)
        return
    dq = dq * softmax_scale
    dq_base = DQ + off_z * stride_dqz + off_h * stride_dqh + q_start * stride_dqm
    _store_rows(_row_ptrs(dq_base, start_m, offs_r, stride_dqm, INT64_ROWS) + offs_d[None, :] * stride_dqd,
                dq.to(DQ.dtype.element_ty), offs_m, seq_q, offs_d, HEAD_DIM, BLOCK_D)
