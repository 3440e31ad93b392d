"""FP8 (e4m3) attention forward as a Triton kernel (sm_89 / sm_90; the CPU interpreter for tests).

Same algorithm and conventions as ``triton_fa2/kernels.py`` (whose helpers it reuses): one
program per (query block, batch*head), scores in base 2, bottom-right causal masking, the
key loop split into a mask-free bulk and a masked band. What fp8 changes:

- Q, K and V are e4m3 with float32 descale factors. ``softmax_scale * q_descale * k_descale *
  log2(e)`` is one multiplier (computed per program from the head's descales), and
  ``v_descale`` multiplies the output once at the end.
- P is scaled by ``2**P_SHIFT`` (256) before its cast to e4m3, so probabilities down to
  2^-17 survive as e4m3 subnormals instead of being flushed (e4m3's smallest subnormal is
  2^-9). The scale costs nothing: it is folded into the exponent (``exp2(s - m + 8)``), the
  row sum l is taken over the same scaled float32 P and so compensates exactly, and the LSE
  subtracts it again.
- V arrives transposed, (D, Mkv) per head with Mkv contiguous: Hopper's fp8 wgmma takes its B
  operand K-major only, and for P @ V the reduction runs over keys. ``tl.trans`` of the
  (BLOCK_D, BLOCK_N) tile is then a K-major view in shared memory, not a data movement.
- USE_TMA: on sm_90 the tiles of Q, K and V^T come through tensor descriptors (TMA) over 2-D
  views the launcher builds (``launch.py``); rows a descriptor reads past a head's last key
  belong to the next batch or head and are masked like any ragged block. Otherwise plain
  pointer loads with masks (sm_89, strided inputs, the interpreter's pointer tests).

Speed (H100, tools/bench_fp8.py, S=16k non-causal, FA2 FLOP convention): 793-801 TFLOP/s at
D=128 (1.52x our bf16 forward, 0.55-0.61x the fp8 matmul ceiling of that run), 897-902 at
D=256, 561-582 at D=64. What bounds it: at D=128 one 64 x 128 block needs as many MUFU.EX2
cycles (8192 exp2 at 16/clk/SM) as tensor-core cycles (2 x 1M fp8 MACs at ~4096/clk/SM), and
Triton 3.6 emits ``wgmma.wait_group 0`` right after each Q K^T (checked in the PTX, also when
the next block's Q K^T is issued before this block's softmax by hand), so exp2 and MMAs of one
program do not overlap; two programs per SM overlap only partly. ``tl.range(...,
warp_specialize=True)`` compiled to the same code on sm_90 (687.5 against 687.7 TFLOP/s) and
``ex2.approx.f16x2`` to the same MUFU count. FA3's ping-pong of two warpgroups would need
explicit warp specialization (Gluon), not plain Triton.
"""

import triton
import triton.language as tl

from ..triton_fa2.kernels import _block_and_head, _kv_ranges, _load_rows, _store_rows

LN2 = tl.constexpr(0.6931471805599453)  # ln(2)
P_SHIFT = tl.constexpr(8.0)  # P is scaled by 2**8 before its fp8 cast


@triton.jit
def _load_k(K, k_base, k_row, k_col, start_n, offs_n, stride_kn, stride_kd, offs_d, Mkv,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr, USE_TMA: tl.constexpr):
    if USE_TMA:
        k = K.load([k_row + start_n, k_col])
    else:
        k = _load_rows(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                       offs_n, Mkv, offs_d, HEAD_DIM, BLOCK_D, CHECK_ROWS)
    return k


@triton.jit
def _softmax_pv(acc, l_i, m_i, s, VT, vt_base, vt_row, start_n, offs_n, stride_vd, stride_vn,
                offs_m, offs_d, Mkv, diag, qk_scale,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, POS_SCALE: tl.constexpr,
                HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):
    """Online softmax of one block of raw scores ``s`` and its P @ V into ``acc``."""
    if MASKED:
        keep = offs_n[None, :] < Mkv
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag)
        s = tl.where(keep, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key so far keeps m = -inf; subtract 0 so exp2 gives 0.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - (m_sub[:, None] - P_SHIFT))
    else:
        if POS_SCALE:  # max(s) * scale = max(s * scale): one FMA per score below
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        else:
            m_new = tl.maximum(m_i, tl.max(s * qk_scale, 1))
        m_sub = m_new
        p = tl.math.exp2(s * qk_scale - (m_sub[:, None] - P_SHIFT))
    # FA2: rescale the unnormalised accumulator only by exp(m_old - m_new); divide by l once at the end.
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if USE_TMA:
        vt = VT.load([vt_row, start_n])
    else:
        vt = tl.load(vt_base + offs_d[:, None] * stride_vd + offs_n[None, :] * stride_vn,
                     mask=(offs_d[:, None] < HEAD_DIM) & (offs_n[None, :] < Mkv), other=0.0)
    acc = tl.dot(p.to(tl.float8e4nv), tl.trans(vt), acc)
    return acc, l_i, m_new


@triton.jit
def _fp8_inner(acc, l_i, m_i, q, K, VT, k_base, vt_base, k_row, k_col, vt_row,
               stride_kn, stride_kd, stride_vd, stride_vn,
               offs_m, offs_d, lo, hi, Mkv, diag, qk_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, POS_SCALE: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    """Key blocks [lo, hi). On sm_90 the P @ V wgmma of one block stays in flight while the
    next block's K arrives and its Q K^T is issued (Triton waits for it at the next scores)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_k(K, k_base, k_row, k_col, start_n, offs_n, stride_kn, stride_kd, offs_d, Mkv,
                    HEAD_DIM, BLOCK_D, MASKED, USE_TMA)
        s = tl.dot(q, tl.trans(k))  # fp8 x fp8 -> fp32, unscaled
        acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, s, VT, vt_base, vt_row, start_n, offs_n, stride_vd, stride_vn,
                                    offs_m, offs_d, Mkv, diag, qk_scale, MASKED, CAUSAL, POS_SCALE, HEAD_DIM,
                                    USE_TMA)
    return acc, l_i, m_i


@triton.jit
def attn_fwd_fp8(Q, K, VT, Out, Lse, QDesc, KDesc, VDesc, softmax_scale,
                 stride_qz, stride_qh, stride_qm, stride_qd,
                 stride_kz, stride_kh, stride_kn, stride_kd,
                 stride_vz, stride_vh, stride_vd, stride_vn,
                 stride_oz, stride_oh, stride_om, stride_od,
                 stride_qdz, stride_qdh, stride_kdz, stride_kdh, stride_vdz, stride_vdh,
                 q_rows_z, q_rows_h, q_cols_h, k_rows_z, k_rows_h, k_cols_h,
                 H, GROUP, QD_GROUP, Hkv, Mq, Mkv,
                 CAUSAL: tl.constexpr, POS_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    """One program per (query block, batch*head); q stays on chip throughout.

    With USE_TMA, Q/K/VT are tensor descriptors over 2-D views: q row ``z * q_rows_z + h *
    q_rows_h + m``, column ``h * q_cols_h`` (likewise k); V^T row ``(z * Hkv + hkv) * HEAD_DIM``,
    column n. Otherwise they are pointers addressed through the strides."""
    start_m, off_bh = _block_and_head(Mq, BLOCK_M)
    off_z = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    off_hkv = off_h // GROUP

    # log2-domain multiplier of the raw fp8 dot: one per program, from this head's descales
    q_desc = tl.load(QDesc + off_z * stride_qdz + (off_h // QD_GROUP) * stride_qdh)
    k_desc = tl.load(KDesc + off_z * stride_kdz + off_hkv * stride_kdh)
    v_desc = tl.load(VDesc + off_z * stride_vdz + off_hkv * stride_vdh)
    qk_scale = softmax_scale * q_desc * k_desc * 1.4426950408889634  # * 1/ln(2)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K
    vt_base = VT
    k_row = 0
    k_col = 0
    vt_row = 0
    if USE_TMA:
        q = Q.load([(off_z * q_rows_z + off_h * q_rows_h + start_m).to(tl.int32), (off_h * q_cols_h).to(tl.int32)])
        k_row = (off_z * k_rows_z + off_hkv * k_rows_h).to(tl.int32)
        k_col = (off_hkv * k_cols_h).to(tl.int32)
        vt_row = ((off_z * Hkv + off_hkv) * HEAD_DIM).to(tl.int32)
    else:
        q = _load_rows(Q + off_z * stride_qz + off_h * stride_qh + offs_m[:, None] * stride_qm
                       + offs_d[None, :] * stride_qd, offs_m, Mq, offs_d, HEAD_DIM, BLOCK_D, True)
        k_base = K + off_z * stride_kz + off_hkv * stride_kh
        vt_base = VT + off_z * stride_vz + off_hkv * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag = Mkv - Mq
    full_hi, hi = _kv_ranges(start_m, Mq, Mkv, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fp8_inner(acc, l_i, m_i, q, K, VT, k_base, vt_base, k_row, k_col, vt_row,
                               stride_kn, stride_kd, stride_vd, stride_vn,
                               offs_m, offs_d, 0, full_hi, Mkv, diag, qk_scale,
                               False, CAUSAL, POS_SCALE, HEAD_DIM, BLOCK_D, BLOCK_N, USE_TMA)
    acc, l_i, m_i = _fp8_inner(acc, l_i, m_i, q, K, VT, k_base, vt_base, k_row, k_col, vt_row,
                               stride_kn, stride_kd, stride_vd, stride_vn,
                               offs_m, offs_d, full_hi, hi, Mkv, diag, qk_scale,
                               True, CAUSAL, POS_SCALE, HEAD_DIM, BLOCK_D, BLOCK_N, USE_TMA)

    # l == 0 only for rows that saw no key: output 0 and lse -inf, never NaN. l carries the
    # 2**P_SHIFT of P, so acc / l is already normalised; v's descale applies once here.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc * (v_desc / l_safe)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe) - P_SHIFT) * LN2)
    o_base = Out + off_z * stride_oz + off_h * stride_oh
    _store_rows(o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                out.to(Out.dtype.element_ty), offs_m, Mq, offs_d, HEAD_DIM, BLOCK_D)
    tl.store(Lse + off_bh.to(tl.int64) * Mq + offs_m, lse, mask=offs_m < Mq)


@triton.jit
def transpose_rows(X, Y, Hkv, M, D,
                   stride_xb, stride_xh, stride_xm, stride_xd,
                   stride_yb, stride_yh, stride_yd,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Y[b, h, d, m] = X[b, h, m, d] for one (BLOCK_M x BLOCK_D) tile per program, bytes in and
    out (the launcher passes e4m3 tensors as uint8): V^T for the fp8 P @ V. Rows of X are read
    along d and rows of Y written along m, both contiguous, so the whole copy streams at memory
    speed, where torch's permuting copy of 1-byte elements reached ~290 GB/s on the H100."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // Hkv
    h = bh % Hkv
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < M) & (offs_d[None, :] < D)
    x_base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    tile = tl.load(x_base + offs_m[:, None].to(tl.int64) * stride_xm + offs_d[None, :] * stride_xd, mask=mask)
    y_base = Y + b.to(tl.int64) * stride_yb + h.to(tl.int64) * stride_yh
    tl.store(y_base + offs_d[None, :].to(tl.int64) * stride_yd + offs_m[:, None], tile, mask=mask)
