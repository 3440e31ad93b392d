// FlashAttention-2 backward, deterministic: no atomics, every gradient element is summed by
// exactly one thread in a fixed order.
//
//   fa2_bwd_pre   delta_i = rowsum(dO_i * O_i) - dlse_i and lse2_i = lse_i log2(e), written to
//                 (B H, Mq_pad) float buffers (Mq_pad a multiple of 128) whose padding rows
//                 hold delta 0 and lse2 +inf (so their recomputed P is exactly 0).
//   fa2_bwd_dkdv  one CTA per (key block of DKDV_BLOCK_N, batch x kv head, column chunk); warp w
//                 owns 16 keys and their dK / dV rows; loops over the GQA group's query heads
//                 and their query blocks (DKDV_BLOCK_M rows, double buffered through cp.async).
//                 S^T = K Q^T, P^T = 2^(S^T scale_log2 - lse2), dV += P^T dO, dP^T = V dO^T,
//                 dS^T = P^T (dP^T - delta), dK += dS^T Q. Head dims > 128 split dK / dV's
//                 columns over DKDV_SPLIT CTAs (each recomputes S and dP) to keep the
//                 accumulators in registers.
//   fa2_bwd_dq    one CTA per (query block of DQ_BLOCK_M, batch x head); warp w owns 16 query
//                 rows; loops over key blocks (DQ_BLOCK_N, double buffered): S, P, dP = dO V^T,
//                 dS, dQ += dS K.
//   fa2_bwd_delta the dQ kernel's loop writing delta = sum P dP / sum P instead (rows that see
//                 one key block at most; launch.py).
//
// A row that sees no key has lse -inf: lse2 becomes +inf, so P = 0 and its gradients are 0.
//
// Defines (compile.py): FA2_BF16, HEAD_DIM, D_PAD, CAUSAL, and per kernel the block sizes
// DKDV_BLOCK_M, DKDV_BLOCK_N, DKDV_SPLIT, DQ_BLOCK_M, DQ_BLOCK_N, BWD_STAGES (1 or 2).

#include "common.cuh"

#define LOG2E 1.4426950408889634f

// One warp per (b h, row) of the padded buffers; lane l reads the 8 elements at 8 l.
extern "C" __global__ void __launch_bounds__(128) fa2_bwd_pre(
    const elem_t* __restrict__ o, const elem_t* __restrict__ dout, const float* __restrict__ lse,
    const float* __restrict__ dlse, float* __restrict__ lse2, float* __restrict__ delta,
    i64 sob, i64 soh, i64 som, i64 sdb, i64 sdh, i64 sdm, int H, int Mq, int Mq_pad, long long rows) {
    const long long row = (long long)blockIdx.x * 4 + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const int bh = (int)(row / Mq_pad), m = (int)(row % Mq_pad);
    const int b = bh / H, h = bh % H;
    float sum = 0.f;
    if (m < Mq && lane * 8 < HEAD_DIM) {
        const uint4 x = *reinterpret_cast<const uint4*>(o + b * sob + h * soh + m * som + lane * 8);
        const uint4 y = *reinterpret_cast<const uint4*>(dout + b * sdb + h * sdh + m * sdm + lane * 8);
        const u32 xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
            sum += to_float(xs[i] & 0xffff) * to_float(ys[i] & 0xffff) + to_float(xs[i] >> 16) * to_float(ys[i] >> 16);
    }
#pragma unroll
    for (int s = 16; s >= 1; s >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, s);
    if (lane == 0) {
        if (m < Mq) {
            const float l = lse[(i64)bh * Mq + m];
            delta[row] = sum - (dlse ? dlse[(i64)bh * Mq + m] : 0.f);
            lse2[row] = l == NEG_INF ? POS_INF : l * LOG2E;
        } else {
            delta[row] = 0.f;
            lse2[row] = POS_INF;
        }
    }
}

#ifdef DKDV_BLOCK_N
#define NT_KV (DKDV_BLOCK_N / 16 * 32)
#define QB DKDV_BLOCK_M
#define DCH (D_PAD / DKDV_SPLIT)  // output columns per CTA
static_assert(DCH % 16 == 0 && QB % 16 == 0 && 128 % QB == 0, "dK/dV tile shapes");

extern "C" __global__ void __launch_bounds__(NT_KV, 1) fa2_bwd_dkdv(
    const elem_t* __restrict__ q, const elem_t* __restrict__ k, const elem_t* __restrict__ v,
    const elem_t* __restrict__ dout, const float* __restrict__ lse2, const float* __restrict__ delta,
    elem_t* __restrict__ dk, elem_t* __restrict__ dv,
    i64 sqb, i64 sqh, i64 sqm, i64 skb, i64 skh, i64 skm, i64 svb, i64 svh, i64 svm, i64 sdb, i64 sdh, i64 sdm,
    i64 sdkb, i64 sdkh, i64 sdkm, i64 sdvb, i64 sdvh, i64 sdvm,
    int H, int Hkv, int group, int Mq, int Mkv, int Mq_pad, int num_n_blocks, float scale_log2, float scale) {
    extern __shared__ __align__(128) unsigned char smem[];
    const u32 sK = smem_u32(smem);
    const u32 sV = sK + DKDV_BLOCK_N * SROW * 2;
    const u32 sQ0 = sV + DKDV_BLOCK_N * SROW * 2;  // [BWD_STAGES][QB][SROW]
    const u32 sO0 = sQ0 + BWD_STAGES * QB * SROW * 2;  // dO, same shape
    float* sL = reinterpret_cast<float*>(smem + (2 * DKDV_BLOCK_N + 2 * BWD_STAGES * QB) * SROW * 2);
    float* sDl = sL + BWD_STAGES * QB;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gr = lane >> 2, t = lane & 3;
    const int chunk = blockIdx.x % DKDV_SPLIT;
    const int rest = blockIdx.x / DKDV_SPLIT;
    const int bhk = rest / num_n_blocks, nb = rest % num_n_blocks;
    const int b = bhk / Hkv, hk = bhk % Hkv;
    const int n0 = nb * DKDV_BLOCK_N;
    const int off = Mkv - Mq;

    const int nqb = (Mq + QB - 1) / QB;
    int qb_start = 0;
#if CAUSAL
    // The first query that sees key n0 is n0 - off.
    qb_start = n0 - off <= 0 ? 0 : min(nqb, (n0 - off) / QB);
#endif
    const int count = nqb - qb_start;
    const int total = group * count;

    auto issue = [&](int it, int buf) {
        const int h = hk * group + it / count;
        const int m0 = (qb_start + it % count) * QB;
        load_tile<QB, NT_KV>(sQ0 + buf * QB * SROW * 2, q + b * sqb + h * sqh + m0 * sqm, sqm, Mq - m0, tid);
        load_tile<QB, NT_KV>(sO0 + buf * QB * SROW * 2, dout + b * sdb + h * sdh + m0 * sdm, sdm, Mq - m0, tid);
        const i64 lrow = (i64)(b * H + h) * Mq_pad + m0;
        for (int i = tid; i < QB / 4; i += NT_KV) {
            cp_async16(smem_u32(sL + buf * QB + 4 * i), lse2 + lrow + 4 * i, 16);
            cp_async16(smem_u32(sDl + buf * QB + 4 * i), delta + lrow + 4 * i, 16);
        }
    };

    load_tile<DKDV_BLOCK_N, NT_KV>(sK, k + b * skb + hk * skh + n0 * skm, skm, Mkv - n0, tid);
    load_tile<DKDV_BLOCK_N, NT_KV>(sV, v + b * svb + hk * svh + n0 * svm, svm, Mkv - n0, tid);
    if (total > 0) issue(0, 0);
    cp_async_commit();

    float acc_dk[1][DCH / 8][4], acc_dv[1][DCH / 8][4];
    zero(acc_dk);
    zero(acc_dv);
    const u32 sKw = sK + warp * 16 * SROW * 2, sVw = sV + warp * 16 * SROW * 2;
    const int key_row0 = n0 + warp * 16 + gr;  // this thread's keys: key_row0 and key_row0 + 8

    for (int it = 0; it < total; ++it) {
        const int buf = BWD_STAGES == 2 ? (it & 1) : 0;
        const int m0 = (qb_start + it % count) * QB;
        if (BWD_STAGES == 2) {
            __syncthreads();  // every warp is done with the buffer the next load overwrites
            if (it + 1 < total) {
                issue(it + 1, buf ^ 1);
                cp_async_commit();
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const u32 sQ = sQ0 + buf * QB * SROW * 2, sO = sO0 + buf * QB * SROW * 2;
        const float* L = sL + buf * QB;
        const float* Dl = sDl + buf * QB;

        float s[1][QB / 8][4];
        zero(s);
        gemm_abt<1, QB / 8, D_PAD>(s, sKw, sQ, lane);
        bool need_mask = false;
#if CAUSAL
        need_mask = n0 + DKDV_BLOCK_N - 1 > m0 + off;
#endif
#pragma unroll
        for (int j = 0; j < QB / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int qi = j * 8 + 2 * t + (e & 1);
                float p = ex2(fmaf(s[0][j][e], scale_log2, -L[qi]));
                if (need_mask && key_row0 + (e >> 1) * 8 > m0 + qi + off) p = 0.f;
                s[0][j][e] = p;
            }
        gemm_sb<1, QB / 8, DCH / 8>(acc_dv, s, sO + chunk * DCH * 2, lane);

        float dp[1][QB / 8][4];
        zero(dp);
        gemm_abt<1, QB / 8, D_PAD>(dp, sVw, sO, lane);
#pragma unroll
        for (int j = 0; j < QB / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) dp[0][j][e] = s[0][j][e] * (dp[0][j][e] - Dl[j * 8 + 2 * t + (e & 1)]);
        gemm_sb<1, QB / 8, DCH / 8>(acc_dk, dp, sQ + chunk * DCH * 2, lane);

        if (BWD_STAGES == 1 && it + 1 < total) {
            __syncthreads();
            issue(it + 1, 0);
            cp_async_commit();
        }
    }

    const float one[1][2] = {{1.f, 1.f}}, sc[1][2] = {{scale, scale}};
    store_rows<1, DCH / 8>(dk + b * sdkb + hk * sdkh + n0 * sdkm, sdkm, warp * 16, Mkv - n0, chunk * DCH, acc_dk,
                           sc, lane);
    store_rows<1, DCH / 8>(dv + b * sdvb + hk * sdvh + n0 * sdvm, sdvm, warp * 16, Mkv - n0, chunk * DCH, acc_dv,
                           one, lane);
}
#endif  // DKDV_BLOCK_N

#ifdef DQ_BLOCK_M
#define NT_Q (DQ_BLOCK_M / 16 * 32)
#define KB DQ_BLOCK_N
static_assert(KB % 16 == 0, "dQ key block");

// DELTA_ONLY (fa2_bwd_delta): the same loop writes delta_i = sum_j P_ij dP_ij / sum_j P_ij into
// delta_out instead of accumulating dQ, from the very P and dP the gradient kernels compute. For
// rows that see one key block at most (launch.py) this replaces rowsum(dO O) from fa2_bwd_pre:
// there a row with one visible key has P = 1 and dS = dP - delta exactly 0, where dO . O and
// the MMA's dP are two float32 sums of the same products in different orders and left a few
// ulps of gradient (fuzz #614, RELIABILITY.md, session 9; the Triton backend's #223).
template <bool DELTA_ONLY>
__device__ __forceinline__ void dq_body(
    const elem_t* __restrict__ q, const elem_t* __restrict__ k, const elem_t* __restrict__ v,
    const elem_t* __restrict__ dout, const float* __restrict__ lse2, const float* __restrict__ delta,
    float* __restrict__ delta_out, elem_t* __restrict__ dq,
    i64 sqb, i64 sqh, i64 sqm, i64 skb, i64 skh, i64 skm, i64 svb, i64 svh, i64 svm, i64 sdb, i64 sdh, i64 sdm,
    i64 sdqb, i64 sdqh, i64 sdqm,
    int H, int group, int Mq, int Mkv, int Mq_pad, int num_m_blocks, float scale_log2, float scale) {
    extern __shared__ __align__(128) unsigned char smem[];
    const u32 sQ = smem_u32(smem);
    const u32 sO = sQ + DQ_BLOCK_M * SROW * 2;
    const u32 sK0 = sO + DQ_BLOCK_M * SROW * 2;  // [BWD_STAGES][KB][SROW]
    const u32 sV0 = sK0 + BWD_STAGES * KB * SROW * 2;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gr = lane >> 2, t = lane & 3;
    const int bh = blockIdx.x / num_m_blocks;
    int mb = blockIdx.x % num_m_blocks;
#if CAUSAL
    mb = num_m_blocks - 1 - mb;
#endif
    const int b = bh / H, h = bh % H, hk = h / group;
    const int m0 = mb * DQ_BLOCK_M;
    const int off = Mkv - Mq;
    const elem_t* kp = k + b * skb + hk * skh;
    const elem_t* vp = v + b * svb + hk * svh;

    int n_end = (Mkv + KB - 1) / KB;
#if CAUSAL
    {
        const int last_key = m0 + DQ_BLOCK_M - 1 + off;
        n_end = last_key < 0 ? 0 : min(n_end, last_key / KB + 1);
    }
#endif
    const int row0 = m0 + warp * 16 + gr;  // this thread's rows: row0 and row0 + 8
    const i64 lrow = (i64)bh * Mq_pad;
    const float l2[2] = {lse2[lrow + row0], lse2[lrow + row0 + 8]};
    const float dl[2] = {DELTA_ONLY ? 0.f : delta[lrow + row0], DELTA_ONLY ? 0.f : delta[lrow + row0 + 8]};
    float psum[2] = {0.f, 0.f}, pdp[2] = {0.f, 0.f};  // DELTA_ONLY: this thread's parts of the rows

    auto issue = [&](int nb, int buf) {
        const int n0 = nb * KB;
        load_tile<KB, NT_Q>(sK0 + buf * KB * SROW * 2, kp + (i64)n0 * skm, skm, Mkv - n0, tid);
        load_tile<KB, NT_Q>(sV0 + buf * KB * SROW * 2, vp + (i64)n0 * svm, svm, Mkv - n0, tid);
    };

    if (n_end > 0) {
        load_tile<DQ_BLOCK_M, NT_Q>(sQ, q + b * sqb + h * sqh + m0 * sqm, sqm, Mq - m0, tid);
        load_tile<DQ_BLOCK_M, NT_Q>(sO, dout + b * sdb + h * sdh + m0 * sdm, sdm, Mq - m0, tid);
        issue(n_end - 1, 0);
        cp_async_commit();
    }

    float acc[1][D_PAD / 8][4];
    zero(acc);
    const u32 sQw = sQ + warp * 16 * SROW * 2, sOw = sO + warp * 16 * SROW * 2;

    for (int it = 0; it < n_end; ++it) {
        const int nb = n_end - 1 - it;
        const int n0 = nb * KB;
        const int buf = BWD_STAGES == 2 ? (it & 1) : 0;
        if (BWD_STAGES == 2) {
            __syncthreads();
            if (nb > 0) {
                issue(nb - 1, buf ^ 1);
                cp_async_commit();
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const u32 sK = sK0 + buf * KB * SROW * 2, sV = sV0 + buf * KB * SROW * 2;

        float s[1][KB / 8][4];
        zero(s);
        gemm_abt<1, KB / 8, D_PAD>(s, sQw, sK, lane);
        float dp[1][KB / 8][4];
        zero(dp);
        gemm_abt<1, KB / 8, D_PAD>(dp, sOw, sV, lane);

        bool need_mask = n0 + KB > Mkv;
#if CAUSAL
        need_mask = need_mask || n0 + KB - 1 > m0 + off;
#endif
#pragma unroll
        for (int j = 0; j < KB / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1;
                float p = ex2(fmaf(s[0][j][e], scale_log2, -l2[r]));
                if (need_mask) {
                    const int col = n0 + j * 8 + 2 * t + (e & 1);
                    bool masked = col >= Mkv;
#if CAUSAL
                    masked = masked || col > row0 + r * 8 + off;
#endif
                    if (masked) p = 0.f;
                }
                if constexpr (DELTA_ONLY) {
                    psum[r] += p;
                    pdp[r] = fmaf(p, dp[0][j][e], pdp[r]);
                } else {
                    dp[0][j][e] = p * (dp[0][j][e] - dl[r]);
                }
            }
        if constexpr (!DELTA_ONLY) gemm_sb<1, KB / 8, D_PAD / 8>(acc, dp, sK, lane);

        if (BWD_STAGES == 1 && nb > 0) {
            __syncthreads();
            issue(nb - 1, 0);
            cp_async_commit();
        }
    }

    if constexpr (DELTA_ONLY) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float ps = psum[r], pd = pdp[r];
            ps += __shfl_xor_sync(0xffffffff, ps, 1);
            ps += __shfl_xor_sync(0xffffffff, ps, 2);
            pd += __shfl_xor_sync(0xffffffff, pd, 1);
            pd += __shfl_xor_sync(0xffffffff, pd, 2);
            const int row = row0 + r * 8;
            if (t == 0 && row < Mq) delta_out[lrow + row] = ps > 0.f ? pd / ps : 0.f;  // no visible key: P = 0
        }
    } else {
        const float sc[1][2] = {{scale, scale}};
        store_rows<1, D_PAD / 8>(dq + b * sdqb + h * sdqh + m0 * sdqm, sdqm, warp * 16, Mq - m0, 0, acc, sc, lane);
    }
}

extern "C" __global__ void __launch_bounds__(NT_Q, 1) fa2_bwd_dq(
    const elem_t* __restrict__ q, const elem_t* __restrict__ k, const elem_t* __restrict__ v,
    const elem_t* __restrict__ dout, const float* __restrict__ lse2, const float* __restrict__ delta,
    elem_t* __restrict__ dq,
    i64 sqb, i64 sqh, i64 sqm, i64 skb, i64 skh, i64 skm, i64 svb, i64 svh, i64 svm, i64 sdb, i64 sdh, i64 sdm,
    i64 sdqb, i64 sdqh, i64 sdqm,
    int H, int group, int Mq, int Mkv, int Mq_pad, int num_m_blocks, float scale_log2, float scale) {
    dq_body<false>(q, k, v, dout, lse2, delta, nullptr, dq, sqb, sqh, sqm, skb, skh, skm, svb, svh, svm, sdb, sdh, sdm,
                   sdqb, sdqh, sdqm, H, group, Mq, Mkv, Mq_pad, num_m_blocks, scale_log2, scale);
}

// The DELTA_ONLY pass (dq_body): delta (B H, Mq_pad) rows, padded rows left as fa2_bwd_pre wrote them.
extern "C" __global__ void __launch_bounds__(NT_Q, 1) fa2_bwd_delta(
    const elem_t* __restrict__ q, const elem_t* __restrict__ k, const elem_t* __restrict__ v,
    const elem_t* __restrict__ dout, const float* __restrict__ lse2, float* __restrict__ delta,
    i64 sqb, i64 sqh, i64 sqm, i64 skb, i64 skh, i64 skm, i64 svb, i64 svh, i64 svm, i64 sdb, i64 sdh, i64 sdm,
    int H, int group, int Mq, int Mkv, int Mq_pad, int num_m_blocks, float scale_log2) {
    dq_body<true>(q, k, v, dout, lse2, nullptr, delta, nullptr, sqb, sqh, sqm, skb, skh, skm, svb, svh, svm, sdb, sdh,
                  sdm, 0, 0, 0, H, group, Mq, Mkv, Mq_pad, num_m_blocks, scale_log2, 0.f);
}
#endif  // DQ_BLOCK_M
