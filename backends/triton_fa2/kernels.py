"""FlashAttention-2 forward and backward as Triton kernels (one source for NVIDIA and AMD).

Plain pointer arithmetic only (no ``tl.make_block_ptr``, which Triton 3.9 removed), so the
same source compiles for sm_80+, gfx90a/gfx942 and runs under ``TRITON_INTERPRET=1``.

Conventions:
- Tensors are addressed as (batch z, head h, row m/n, dim d) through four strides each, so
  both layouts (bshd, bhsd) and non-contiguous inputs need no copy.
- Scores live in base 2: ``qk_scale = softmax_scale * log2(e)`` is folded into one multiply
  and ``exp2`` replaces ``exp``. LSE is stored in natural log, (B, H, Mq) float32.
- Causal masking is bottom-right aligned: query i sees key j iff j <= i + DIAG with
  DIAG = Mkv - Mq. Each loop over blocks is split so that only blocks on the diagonal band
  or at a ragged edge (``MASKED=True``) pay for a mask; the bulk runs mask-free.
- HEAD_DIM is the real head dim, BLOCK_D the next power of two >= 16 (tl.dot's minimum);
  the padding columns are loaded as 0 and never stored.
"""

import triton
import triton.language as tl

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
def _block_and_head(n_rows, BLOCK: tl.constexpr):
    """Split the 1-D program id into (first row of this block, batch*head index).

    Blocks of one head are consecutive programs, so they run close in time and share that
    head's K/V (forward, dQ) or Q/dO (dK/dV) in L2. A 1-D grid has no 65535 limit on the
    number of heads, as gridDim.y would."""
    n_blocks = tl.cdiv(n_rows, BLOCK)
    pid = tl.program_id(0)
    return (pid % n_blocks) * BLOCK, pid // n_blocks


@triton.jit
def _kv_ranges(start_m, Mq, Mkv, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key ranges of one query block: [0, full_hi) needs no mask, [full_hi, hi) does."""
    diag = Mkv - Mq
    even_hi = (Mkv // BLOCK_N) * BLOCK_N  # key blocks past this one are ragged
    if CAUSAL:
        # The last row of the block sees keys < start_m + BLOCK_M + diag; the first row
        # sees every key < start_m + diag + 1, so blocks below that are mask-free.
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + diag, 0), Mkv)
        full_hi = (tl.maximum(start_m + diag + 1, 0) // BLOCK_N) * BLOCK_N
        full_hi = tl.minimum(full_hi, even_hi)
    else:
        hi = Mkv
        full_hi = even_hi
    return full_hi, hi


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
               offs_m, offs_d, lo, hi, Mkv, diag, qk_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_rows(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                       offs_n, Mkv, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            keep = offs_n[None, :] < Mkv
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag)
            s = tl.where(keep, s, float("-inf"))
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
        v = _load_rows(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                       offs_n, Mkv, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attn_fwd(Q, K, V, Out, Lse, qk_scale,
             stride_qz, stride_qh, stride_qm, stride_qd,
             stride_kz, stride_kh, stride_kn, stride_kd,
             stride_vz, stride_vh, stride_vn, stride_vd,
             stride_oz, stride_oh, stride_om, stride_od,
             H, GROUP, Mq, Mkv,
             CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program per (query block, batch*head); q stays on chip throughout."""
    start_m, off_bh = _block_and_head(Mq, BLOCK_M)
    off_z = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    off_hkv = off_h // GROUP
    q_base = Q + off_z * stride_qz + off_h * stride_qh
    k_base = K + off_z * stride_kz + off_hkv * stride_kh
    v_base = V + off_z * stride_vz + off_hkv * stride_vh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                   offs_m, Mq, offs_d, HEAD_DIM, BLOCK_D, True)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag = Mkv - Mq
    full_hi, hi = _kv_ranges(start_m, Mq, Mkv, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                               offs_m, offs_d, 0, full_hi, Mkv, diag, qk_scale,
                               False, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                               offs_m, offs_d, full_hi, hi, Mkv, diag, qk_scale,
                               True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)

    # l == 0 only for rows that saw no key: output 0 and lse -inf, never NaN.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    o_base = Out + off_z * stride_oz + off_h * stride_oh
    _store_rows(o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                out.to(Out.dtype.element_ty), offs_m, Mq, offs_d, HEAD_DIM, BLOCK_D)
    tl.store(Lse + off_bh.to(tl.int64) * Mq + offs_m, lse, mask=offs_m < Mq)


# ---------------------------------------------------------------------------- backward


@triton.jit
def attn_bwd_preprocess(Out, DO, Delta,
                        stride_oz, stride_oh, stride_om, stride_od,
                        stride_doz, stride_doh, stride_dom, stride_dod,
                        H, Mq,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d dO_id * O_id (float32), the row term of dS = P * (dP - delta)."""
    start_m, off_bh = _block_and_head(Mq, BLOCK_M)
    off_z = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(Out + off_z * stride_oz + off_h * stride_oh + offs_m[:, None] * stride_om
                   + offs_d[None, :] * stride_od, offs_m, Mq, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO + off_z * stride_doz + off_h * stride_doh + offs_m[:, None] * stride_dom
                    + offs_d[None, :] * stride_dod, offs_m, Mq, offs_d, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + off_bh.to(tl.int64) * Mq + offs_m, delta, mask=offs_m < Mq)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                    stride_qm, stride_qd, stride_dom, stride_dod,
                    offs_n, offs_d, lo, hi, Mq, diag, qk_scale,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [lo, hi). Works on transposed
    scores (keys x queries) so P^T and dS^T feed the dots without a transpose of the result."""
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        q = _load_rows(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                       offs_m, Mq, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        do = _load_rows(do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                        offs_m, Mq, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        if MASKED:
            lse = tl.load(lse_base + offs_m, mask=offs_m < Mq, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=offs_m < Mq, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.math.exp2(s_t - lse[None, :] * LOG2E)
        if MASKED:
            # where(), not a multiply: p_t may be inf for rows whose lse is -inf.
            keep = offs_m[None, :] < Mq
            if CAUSAL:
                keep = keep & (offs_n[:, None] <= offs_m[None, :] + diag)
            p_t = tl.where(keep, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def attn_bwd_dkdv(Q, K, V, DO, Lse, Delta, DK, DV, qk_scale, softmax_scale,
                  stride_qz, stride_qh, stride_qm, stride_qd,
                  stride_kz, stride_kh, stride_kn, stride_kd,
                  stride_vz, stride_vh, stride_vn, stride_vd,
                  stride_doz, stride_doh, stride_dom, stride_dod,
                  stride_dkz, stride_dkh, stride_dkn, stride_dkd,
                  stride_dvz, stride_dvh, stride_dvn, stride_dvd,
                  H, HKV, GROUP, Mq, Mkv,
                  CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program per (key block, batch*kv head): K and V stay on chip while the program
    loops over every query head of its group and every query block, so dK and dV are summed
    on chip (GQA included) with no atomics: deterministic."""
    start_n, off_bhkv = _block_and_head(Mkv, BLOCK_N)
    off_z = (off_bhkv // HKV).to(tl.int64)
    off_hkv = (off_bhkv % HKV).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + off_z * stride_kz + off_hkv * stride_kh + offs_n[:, None] * stride_kn
                   + offs_d[None, :] * stride_kd, offs_n, Mkv, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(V + off_z * stride_vz + off_hkv * stride_vh + offs_n[:, None] * stride_vn
                   + offs_d[None, :] * stride_vd, offs_n, Mkv, offs_d, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    diag = Mkv - Mq
    q_blocks_end = tl.cdiv(Mq, BLOCK_M) * BLOCK_M
    even_end = (Mq // BLOCK_M) * BLOCK_M  # query blocks past this one are ragged
    if CAUSAL:
        # Rows < start_n - diag see none of this block; rows >= start_n + BLOCK_N - diag see all of it.
        lo = (tl.maximum(start_n - diag, 0) // BLOCK_M) * BLOCK_M
        mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - diag, 0), BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.maximum(mid, lo), q_blocks_end)
    else:
        lo = 0
        mid = 0
    tail = tl.maximum(mid, even_end)

    for g in range(0, GROUP):
        off_h = off_hkv * GROUP + g
        q_base = Q + off_z * stride_qz + off_h * stride_qh
        do_base = DO + off_z * stride_doz + off_h * stride_doh
        row_base = (off_z * H + off_h) * Mq
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, Lse + row_base, Delta + row_base,
                                 stride_qm, stride_qd, stride_dom, stride_dod, offs_n, offs_d,
                                 lo, mid, Mq, diag, qk_scale,
                                 True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, Lse + row_base, Delta + row_base,
                                 stride_qm, stride_qd, stride_dom, stride_dod, offs_n, offs_d,
                                 mid, even_end, Mq, diag, qk_scale,
                                 False, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, Lse + row_base, Delta + row_base,
                                 stride_qm, stride_qd, stride_dom, stride_dod, offs_n, offs_d,
                                 tail, Mq, Mq, diag, qk_scale,
                                 True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION)

    dk = dk * softmax_scale
    _store_rows(DK + off_z * stride_dkz + off_hkv * stride_dkh + offs_n[:, None] * stride_dkn
                + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), offs_n, Mkv, offs_d, HEAD_DIM, BLOCK_D)
    _store_rows(DV + off_z * stride_dvz + off_hkv * stride_dvh + offs_n[:, None] * stride_dvn
                + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), offs_n, Mkv, offs_d, HEAD_DIM, BLOCK_D)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                  offs_m, offs_d, lo, hi, Mkv, diag, qk_scale,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_rows(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                       offs_n, Mkv, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        v = _load_rows(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                       offs_n, Mkv, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            keep = offs_n[None, :] < Mkv
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def attn_bwd_dq(Q, K, V, DO, Lse, Delta, DQ, qk_scale, softmax_scale,
                stride_qz, stride_qh, stride_qm, stride_qd,
                stride_kz, stride_kh, stride_kn, stride_kd,
                stride_vz, stride_vh, stride_vn, stride_vd,
                stride_doz, stride_doh, stride_dom, stride_dod,
                stride_dqz, stride_dqh, stride_dqm, stride_dqd,
                H, GROUP, Mq, Mkv,
                CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program per (query block, batch*head), parallel over queries like the forward;
    dQ is summed on chip over key blocks: no atomics, deterministic."""
    start_m, off_bh = _block_and_head(Mq, BLOCK_M)
    off_z = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    off_hkv = off_h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + off_z * stride_qz + off_h * stride_qh + offs_m[:, None] * stride_qm
                   + offs_d[None, :] * stride_qd, offs_m, Mq, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO + off_z * stride_doz + off_h * stride_doh + offs_m[:, None] * stride_dom
                    + offs_d[None, :] * stride_dod, offs_m, Mq, offs_d, HEAD_DIM, BLOCK_D, True)
    row_base = off_bh.to(tl.int64) * Mq
    lse2 = tl.load(Lse + row_base + offs_m, mask=offs_m < Mq, other=0.0) * LOG2E
    delta = tl.load(Delta + row_base + offs_m, mask=offs_m < Mq, other=0.0)
    k_base = K + off_z * stride_kz + off_hkv * stride_kh
    v_base = V + off_z * stride_vz + off_hkv * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag = Mkv - Mq
    full_hi, hi = _kv_ranges(start_m, Mq, Mkv, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                       offs_m, offs_d, 0, full_hi, Mkv, diag, qk_scale,
                       False, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                       offs_m, offs_d, full_hi, hi, Mkv, diag, qk_scale,
                       True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    dq = dq * softmax_scale
    _store_rows(DQ + off_z * stride_dqz + off_h * stride_dqh + offs_m[:, None] * stride_dqm
                + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), offs_m, Mq, offs_d, HEAD_DIM, BLOCK_D)
