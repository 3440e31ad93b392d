"""KV-cache decode as Triton kernels: append, split-KV attention (flash-decoding), LSE combine.

Plain pointer arithmetic (no ``tl.make_block_ptr``), so the source compiles for sm_80+ and
AMD and runs under ``TRITON_INTERPRET=1``.

Conventions:
- GQA packing: one program owns one key/value head and a block of BLOCK_M *rows*, row
  ``r = i * GROUP + g`` being query position i of query head ``hkv * GROUP + g``. The GROUP
  query heads that share a key/value head are scored against one load of K and V, so the
  cache is read once per key/value head, not once per query head (decode is bound by those
  reads: for Mq = 1 and GROUP = 8 a block of 16 rows holds the whole group, at 2x wasted MMA
  width that the memory-bound loop does not notice).
- Split-KV: grid axis 1 splits the visible key range of each sequence into num_splits parts of
  whole key blocks. With one split the program writes the final output; otherwise each writes
  a float32 partial output (normalised by its own row sum) and its lse, and
  ``decode_combine`` weights the parts by ``exp(lse_s - lse)``. The split count is a run-time
  argument (only whether there is more than one is compiled in), so the heuristic's choice,
  which changes with the batch size, never costs a recompilation.
- Per sequence b the key length is ``L = cache_seqlens[b] + n_new`` and ``shift = L - Mq``
  (bottom-right, ``fa2dispatch.features``): causal keeps ``j <= i + shift``, a window keeps
  ``i + shift - left <= j <= i + shift + right``; softcap and ALiBi change the scores first.
  Scores then move to base 2 (``exp2``); the stored lse is in natural log.
- Paged caches: key position p of sequence b is row ``p % PAGE_SIZE`` of page
  ``block_table[b, p // PAGE_SIZE]``. When PAGE_SIZE is a multiple of BLOCK_N each key block
  lies in one page (one table read per block); otherwise each key row looks its page up.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .kernels import _tanh

LOG2E = tl.constexpr(1.4426950408889634)  # 1/ln(2)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2)


@triton.jit
def kv_append(Knew, Vnew, Kc, Vc, Seqlens, BlockTable, n_new,
              stride_nb, stride_nm, stride_nh, stride_nd,
              stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_btb,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """Copy rows of the new keys/values of (batch, head) into the cache at cache_seqlens[b] + row.
    Grid: (cdiv(n_new, BLOCK_M), Hkv, B). k_new and v_new share their strides (same shape)."""
    off_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    rows = off_m < n_new
    mask = rows[:, None] & (offs_d[None, :] < HEAD_DIM)
    src = off_b * stride_nb + off_m[:, None].to(tl.int64) * stride_nm + off_h * stride_nh + offs_d[None, :] * stride_nd
    k = tl.load(Knew + src, mask=mask)
    v = tl.load(Vnew + src, mask=mask)
    pos = tl.load(Seqlens + off_b) + off_m
    if PAGE_SIZE > 0:
        page = tl.load(BlockTable + off_b * stride_btb + pos // PAGE_SIZE, mask=rows, other=0).to(tl.int64)
        k_row = page * stride_kb + (pos % PAGE_SIZE) * stride_kn
        v_row = page * stride_vb + (pos % PAGE_SIZE) * stride_vn
    else:
        k_row = off_b * stride_kb + pos.to(tl.int64) * stride_kn
        v_row = off_b * stride_vb + pos.to(tl.int64) * stride_vn
    tl.store(Kc + k_row[:, None] + off_h * stride_kh + offs_d[None, :], k, mask=mask)
    tl.store(Vc + v_row[:, None] + off_h * stride_vh + offs_d[None, :], v, mask=mask)


@triton.jit
def _key_rows(BlockTable, off_b, stride_btb, offs_n, start_n, keep_n, stride_b, stride_n,
              PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """int64 offsets of key rows ``offs_n`` of sequence off_b in a (possibly paged) cache."""
    if PAGE_SIZE == 0:
        rows = off_b * stride_b + offs_n.to(tl.int64) * stride_n
    elif PAGE_SIZE % BLOCK_N == 0:  # the block lies in one page (start_n is a multiple of BLOCK_N)
        page = tl.load(BlockTable + off_b * stride_btb + start_n // PAGE_SIZE).to(tl.int64)
        rows = page * stride_b + (offs_n % PAGE_SIZE).to(tl.int64) * stride_n
    else:
        page = tl.load(BlockTable + off_b * stride_btb + offs_n // PAGE_SIZE, mask=keep_n, other=0).to(tl.int64)
        rows = page * stride_b + (offs_n % PAGE_SIZE).to(tl.int64) * stride_n
    return rows


@triton.jit
def decode_fwd(Q, Kc, Vc, Seqlens, BlockTable, Slopes, Out, Lse, OutPart, LsePart, Arrivals,
               sm_scale, softcap, n_new, window_left, window_right,
               stride_qb, stride_qm, stride_qh, stride_qd,
               stride_kb, stride_kn, stride_kh, stride_kd,
               stride_vb, stride_vn, stride_vh, stride_vd,
               stride_ob, stride_om, stride_oh, stride_od,
               stride_btb, stride_slb,
               H, Hkv, Mq, num_splits,
               GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, SPLIT: tl.constexpr,
               CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
               SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr,
               PDL: tl.constexpr = False, FUSED_COMBINE: tl.constexpr = False, BLOCK_S: tl.constexpr = 1):
    """Grid (B * Hkv * row blocks, num_splits): one key/value head, BLOCK_M packed rows, one split.
    SPLIT (num_splits > 1) writes float32 partials for decode_combine instead of the output.
    PDL (sm_90+, decode_combine launched as a programmatic dependent): let the combine grid
    launch now; its programs wait (griddepcontrol.wait) until this grid is complete and its
    writes are visible, so only the combine's own work follows this kernel, not its launch.
    Safe at any grid size: the dependent launches only once every program here has started.
    FUSED_COMBINE (with SPLIT; BLOCK_S a power of two >= num_splits): no decode_combine launch.
    Each program counts its arrival in Arrivals[pid] (int32, zero on entry) after storing its
    partial; the program that arrives last combines its row block's partials and sets the
    counter back to zero, so the same buffer serves the next launch on the stream
    (decode_launch._arrival_counters)."""
    if PDL:
        gdc_launch_dependents()
    n_rows = Mq * GROUP
    row_blocks = tl.cdiv(n_rows, BLOCK_M)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    start_r = (pid % row_blocks) * BLOCK_M
    off_bh = pid // row_blocks
    off_b = (off_bh // Hkv).to(tl.int64)
    off_hkv = (off_bh % Hkv).to(tl.int64)

    offs_r = start_r + tl.arange(0, BLOCK_M)
    offs_i = offs_r // GROUP  # query position of each row
    offs_h = off_hkv * GROUP + (offs_r % GROUP)  # query head of each row
    row_ok = offs_r < n_rows
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + off_b * stride_qb + offs_i[:, None].to(tl.int64) * stride_qm + offs_h[:, None] * stride_qh
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    length = tl.load(Seqlens + off_b) + n_new
    shift = length - Mq
    # The keys any row of this block can see: [lo, hi).
    first_i = start_r // GROUP
    last_i = (tl.minimum(start_r + BLOCK_M, n_rows) - 1) // GROUP
    hi = length
    if CAUSAL:
        hi = tl.minimum(hi, last_i + shift + 1)
    if WINDOW_RIGHT:
        hi = tl.minimum(hi, last_i + shift + window_right + 1)
    lo = 0
    if WINDOW_LEFT:
        lo = tl.maximum(first_i + shift - window_left, 0)
    lo = (lo // BLOCK_N) * BLOCK_N  # key blocks start on multiples of BLOCK_N (one page each)
    n_blocks = tl.maximum(tl.cdiv(hi - lo, BLOCK_N), 0)
    per_split = tl.cdiv(n_blocks, num_splits) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, hi)

    if ALIBI:
        slope = tl.load(Slopes + off_b * stride_slb + offs_h, mask=row_ok, other=0.0)
    qk_scale = sm_scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag = offs_i[:, None] + shift  # each row's own position among the keys
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        keep_n = offs_n < end
        k_rows = _key_rows(BlockTable, off_b, stride_btb, offs_n, start_n, keep_n, stride_kb, stride_kn,
                           PAGE_SIZE, BLOCK_N)
        k = tl.load(Kc + k_rows[:, None] + off_hkv * stride_kh + offs_d[None, :] * stride_kd,
                    mask=keep_n[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if SOFTCAP or ALIBI:
            s = s * sm_scale
            if SOFTCAP:  # the prefill kernels' tanh: float32 takes its series for small arguments
                s = softcap * _tanh(s / softcap, q.dtype == tl.float32)
            if ALIBI:
                s = s - slope[:, None] * tl.abs(diag - offs_n[None, :]).to(tl.float32)
            s = s * LOG2E
        else:
            s = s * qk_scale
        keep = keep_n[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= diag)
        if WINDOW_LEFT:
            keep = keep & (offs_n[None, :] >= diag - window_left)
        if WINDOW_RIGHT:
            keep = keep & (offs_n[None, :] <= diag + window_right)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key so far keeps m = -inf; subtract 0 so exp2 gives 0, not NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_rows = _key_rows(BlockTable, off_b, stride_btb, offs_n, start_n, keep_n, stride_vb, stride_vn,
                           PAGE_SIZE, BLOCK_N)
        v = tl.load(Vc + v_rows[:, None] + off_hkv * stride_vh + offs_d[None, :] * stride_vd,
                    mask=keep_n[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    # l == 0 only for rows that saw no key (in this split): output 0 and lse -inf, never NaN.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    # lse rows are (b, h, i) in (B, H, Mq) order; partials add the split as the last index
    lse_row = (off_b * H + offs_h) * Mq + offs_i
    if not SPLIT:
        tl.store(Out + off_b * stride_ob + offs_i[:, None].to(tl.int64) * stride_om + offs_h[:, None] * stride_oh
                 + offs_d[None, :] * stride_od, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(Lse + lse_row, lse, mask=row_ok)
    else:
        part = lse_row * num_splits + split
        tl.store(OutPart + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LsePart + part, lse, mask=row_ok)
        if FUSED_COMBINE:
            # Every thread's partial stores come before the arrival (bar.sync), and the arrival
            # is one thread's gpu-scope acq_rel atomic: it releases this program's partials and,
            # for the last to arrive, acquires everyone else's.
            tl.debug_barrier()
            ticket = tl.atomic_add(Arrivals + pid, 1, sem="acq_rel", scope="gpu")
            if ticket == num_splits - 1:
                tl.store(Arrivals + pid, 0)  # no program of this launch counts here any more
                _combine_block(OutPart, LsePart, Out, Lse, lse_row, row_ok, offs_d, d_ok,
                               Out + off_b * stride_ob + offs_i[:, None].to(tl.int64) * stride_om
                               + offs_h[:, None] * stride_oh + offs_d[None, :] * stride_od,
                               num_splits, BLOCK_M, BLOCK_S, BLOCK_D, HEAD_DIM)


@triton.jit
def _combine_block(OutPart, LsePart, Out, Lse, lse_row, row_ok, offs_d, d_ok, out_ptrs, num_splits,
                   BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """decode_combine's sum for BLOCK_M rows at once (decode_fwd's FUSED_COMBINE): the rows' lse
    of every split in one load, then each split's partial rows (the split loop is unrolled, so
    the loads are independent and issue together). Loads skip L1 (.cg): the partials were
    written by other SMs. The sum runs over the splits in index order whichever program
    arrived last, so the result does not depend on the arrival order."""
    offs_s = tl.arange(0, BLOCK_S)
    lse_s = tl.load(LsePart + lse_row[:, None] * num_splits + offs_s[None, :],
                    mask=row_ok[:, None] & (offs_s[None, :] < num_splits), other=float("-inf"), cache_modifier=".cg")
    m = tl.max(lse_s, 1)
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2((lse_s - m_sub[:, None]) * LOG2E)  # a split that saw no key: weight 0
    total = tl.sum(w, 1)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in tl.static_range(BLOCK_S):  # masked, not branched: splits past num_splits load nothing
        w_s = tl.sum(tl.where(offs_s[None, :] == s, w, 0.0), 1)
        part = tl.load(OutPart + (lse_row * num_splits + s)[:, None] * HEAD_DIM + offs_d[None, :],
                       mask=(row_ok & (s < num_splits))[:, None] & d_ok[None, :], other=0.0, cache_modifier=".cg")
        acc += part * w_s[:, None]
    empty = total == 0.0
    total_safe = tl.where(empty, 1.0, total)
    tl.store(out_ptrs, (acc / total_safe[:, None]).to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + lse_row, tl.where(empty, float("-inf"), m_sub + tl.log(total_safe)), mask=row_ok)


@triton.jit
def decode_combine(OutPart, LsePart, Out, Lse,
                   stride_ob, stride_om, stride_oh, stride_od,
                   H, Mq, num_splits,
                   BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   PDL: tl.constexpr = False):
    """One program per (b, h, i) row: out = sum_s exp(lse_s - lse) * out_s, lse = logsumexp_s lse_s.
    A split that saw no key has lse_s = -inf and weight 0; a row no split saw gives 0 and -inf.
    PDL: launched as a programmatic dependent of decode_fwd: wait for its writes first."""
    if PDL:
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    off_b = row // (H * Mq)
    off_h = (row // Mq) % H
    off_i = row % Mq
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    lse_s = tl.load(LsePart + row * num_splits + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2((lse_s - m_sub) * LOG2E)
    total = tl.sum(w, 0)
    parts = tl.load(OutPart + (row * num_splits + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                    mask=s_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    empty = total == 0.0
    total_safe = tl.where(empty, 1.0, total)
    out = tl.sum(parts * w[:, None], 0) / total_safe
    lse = tl.where(empty, float("-inf"), m_sub + tl.log(total_safe))
    tl.store(Out + off_b * stride_ob + off_i * stride_om + off_h * stride_oh + offs_d * stride_od,
             out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)
    tl.store(Lse + row, lse)


@triton.jit
def kv_check(Seqlens, BlockTable, Flags, n_new, max_len, n_blocks, stride_btb,
             CHECK_LEN: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_T: tl.constexpr):
    """The value checks of one call as one launch (grid (B,)): Flags[b] gets bit 0 when
    cache_seqlens[b] is outside 0..max_len (max_len = capacity - n_new), bit 1 when a page of
    sequence b that holds one of its keys has an id outside 0..n_blocks - 1. The host reads
    Flags once (fa2dispatch.kvcache._check_values) and raises the error naming the argument."""
    b = tl.program_id(0).to(tl.int64)
    s = tl.load(Seqlens + b)
    flag = 0
    if CHECK_LEN:
        flag = tl.where((s < 0) | (s > max_len), 1, 0)
    if PAGE_SIZE > 0:
        # pages in use: those holding keys 0 .. L_b - 1 (an out-of-range length is clamped: its
        # own error comes first)
        used = (tl.minimum(tl.maximum(s, 0), max_len) + n_new + PAGE_SIZE - 1) // PAGE_SIZE
        bad = 0
        for c0 in range(0, used, BLOCK_T):
            cols = c0 + tl.arange(0, BLOCK_T)
            ok = cols < used
            ids = tl.load(BlockTable + b * stride_btb + cols, mask=ok, other=0)
            bad += tl.sum((((ids < 0) | (ids >= n_blocks)) & ok).to(tl.int32), 0)
        flag = flag + tl.where(bad > 0, 2, 0)
    tl.store(Flags + b, flag)
