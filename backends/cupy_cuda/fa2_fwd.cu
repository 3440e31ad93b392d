// FlashAttention-2 forward: out = softmax(scale Q K^T) V and lse = logsumexp per row.
//
// One CTA per (query block of BLOCK_M rows, batch x head), a 1-D grid (gridDim.y would cap
// B x H at 65535). NUM_WARPS warps split the query rows: warp w owns MT = BLOCK_M / (16
// NUM_WARPS) consecutive 16-row slabs and its rows' softmax state, so no shared-memory
// reduction is ever needed (ALGORITHM.md, "work partitioning").
//
// Pipeline (one K and one V buffer, as FA2's sm80 kernel): while S = Q K[n]^T runs, V[n] is in
// flight; while softmax and O += P V[n] run, K[n-1] is in flight. Key blocks go from the last
// to the first, so the (few) blocks that need a mask (the causal diagonal, the ragged end of
// the keys) come first and the rest of the loop is mask free.
//
// Epilogue (O_SMEM 1): each warp rounds its rows of O into its own rows of sQ (free once the
// key loop is done: Q is in registers or was last read before the last block's second barrier)
// and stores them from there in 16-byte chunks, a warp instruction writing whole 128-byte
// lines, instead of 4-byte stores from the accumulator fragments (8 rows x 16 bytes each).
//
// Causal work order (GROUP_ORDER 1; runtime argument head_group): CTAs are taken in groups of
// head_group heads, and within a group the longest query blocks of all its heads go first
// (longest processing time first), so the last CTAs to start are the shortest ones and the tail
// wave is light. GROUP_ORDER 0: one head at a time, its blocks longest first (with ~2,000 CTAs
// of 1..2 x S/128 key blocks each, a long block of one of the last heads can start late and
// set the tail). A group of about one wave of CTAs (launch.py: head_group 0) keeps the group's
// K and V in L2; all heads in one group measured 2-5% slower than that on the H100.
//
// Warp skip (WARP_SKIP, causal only; bit 1: S = Q K^T, bit 2: O += P V): a warp whose rows see
// no key of the current block (the first, diagonal blocks of the loop: with 128 x 64 tiles the
// first block is fully masked for the first half of the warps) skips that block's matrix
// products; it still takes part in the loads, barriers and the (all -inf) softmax, so the block
// adds exact zeros (p = 0, alpha = 1) and out / lse stay bit for bit the same. Register
// pressure: NVRTC 13.5 spills 8-28 bytes with both bits and O_SMEM on sm_90; bit 1 without
// GROUP_ORDER left 16 bytes of local memory with the H100's run-time NVRTC (and ran 0-5%
// slower).
//
// Defines (compile.py): FA2_BF16, HEAD_DIM, D_PAD (common.cuh), BLOCK_M, BLOCK_N, NUM_WARPS,
// CAUSAL (bottom-right aligned: query i sees key j iff j <= i + Mkv - Mq), O_SMEM, WARP_SKIP,
// GROUP_ORDER (0: one head at a time, head_group ignored).

#include "common.cuh"

#ifndef O_SMEM
#define O_SMEM 0
#endif
#ifndef WARP_SKIP
#define WARP_SKIP 0
#endif
#ifndef GROUP_ORDER
#define GROUP_ORDER 0
#endif

#define NT (NUM_WARPS * 32)
#define MT (BLOCK_M / (16 * NUM_WARPS))
#define NT8 (BLOCK_N / 8)
// Q's A fragments stay in registers for the whole key loop when they fit (32 registers per
// thread: 16 rows x D=128 or 32 rows x D=64); otherwise they are re-read from smem per block.
#define Q_IN_REGS (MT * D_PAD <= 128)

static_assert(MT >= 1 && MT * 16 * NUM_WARPS == BLOCK_M, "BLOCK_M must be 16 x NUM_WARPS x (1 or 2)");
static_assert(BLOCK_N % 16 == 0 && D_PAD % 16 == 0, "tiles are multiples of 16");

extern "C" __global__ void __launch_bounds__(NT, 1) fa2_fwd(
    const elem_t* __restrict__ q, const elem_t* __restrict__ k, const elem_t* __restrict__ v,
    elem_t* __restrict__ o, float* __restrict__ lse,
    i64 sqb, i64 sqh, i64 sqm, i64 skb, i64 skh, i64 skm, i64 svb, i64 svh, i64 svm,
    i64 sob, i64 soh, i64 som,
    int H, int group, int Mq, int Mkv, int num_m_blocks, float scale_log2, int head_group) {
    extern __shared__ __align__(128) unsigned char smem[];
    const u32 sQ = smem_u32(smem);
    const u32 sK = sQ + BLOCK_M * SROW * 2;
    const u32 sV = sK + BLOCK_N * SROW * 2;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gr = lane >> 2, t = lane & 3;
    // Consecutive CTAs share a head (its K and V stay in L2); causal takes the longest query
    // blocks of each group of head_group heads first (1 <= head_group <= B x H, launch.py).
#if CAUSAL
    unsigned x = blockIdx.x;  // as (head, query block counted from the last) in head-major order
#if GROUP_ORDER
    // (Compiled only where asked for: the remap alone makes ptxas spill 4 bytes on sm_80.)
    {
        const unsigned hg = head_group, nmb = num_m_blocks, per = hg * nmb;
        const unsigned g = x / per, w = x - g * per;
        const unsigned gsize = min(hg, gridDim.x / nmb - g * hg);
        x = (g * hg + w % gsize) * nmb + w / gsize;
    }
#endif
    const int bh = x / num_m_blocks;
    const int mb = num_m_blocks - 1 - x % num_m_blocks;
#else
    const int bh = blockIdx.x / num_m_blocks;
    int mb = blockIdx.x % num_m_blocks;
#endif
    const int b = bh / H, h = bh % H, hk = h / group;
    const int m0 = mb * BLOCK_M;
    const int off = Mkv - Mq;

    const elem_t* qp = q + b * sqb + h * sqh + m0 * sqm;
    const elem_t* kp = k + b * skb + hk * skh;
    const elem_t* vp = v + b * svb + hk * svh;

    int n_end = (Mkv + BLOCK_N - 1) / BLOCK_N;
#if CAUSAL
    {
        const int last_key = m0 + BLOCK_M - 1 + off;  // largest key any row of the block sees
        n_end = last_key < 0 ? 0 : min(n_end, last_key / BLOCK_N + 1);
    }
#endif

    float acc[MT][D_PAD / 8][4];
    zero(acc);
    float row_max[MT][2], row_sum[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) row_max[mt][r] = NEG_INF, row_sum[mt][r] = 0.f;

    const int wrow = warp * MT * 16;  // first row of this warp in the block
    if (n_end > 0) {
        load_tile<BLOCK_M, NT>(sQ, qp, sqm, Mq - m0, tid);
        load_tile<BLOCK_N, NT>(sK, kp + (i64)(n_end - 1) * BLOCK_N * skm, skm, Mkv - (n_end - 1) * BLOCK_N, tid);
        cp_async_commit();
    }
#if Q_IN_REGS
    u32 qf[MT][D_PAD / 16][4];
    if (n_end > 0) {
        cp_async_wait<0>();
        __syncthreads();
        load_a_frags<MT, D_PAD>(qf, sQ + wrow * SROW * 2, lane);
    }
#endif

    for (int nb = n_end - 1; nb >= 0; --nb) {
        const int n0 = nb * BLOCK_N;
        cp_async_wait<0>();
        __syncthreads();  // K[nb] landed; every warp is done with V[nb+1]
        load_tile<BLOCK_N, NT>(sV, vp + (i64)n0 * svm, svm, Mkv - n0, tid);
        cp_async_commit();

#if CAUSAL && WARP_SKIP
        // Does any row of this warp see a key of this block? (Warp-uniform.)
        const bool live = n0 <= m0 + wrow + MT * 16 - 1 + off;
#else
        constexpr bool live = true;
#endif
        float s[MT][NT8][4];
        zero(s);
        if (!(WARP_SKIP & 1) || live) {
#if Q_IN_REGS
            gemm_abt_ra<MT, NT8, D_PAD>(s, qf, sK, lane);
#else
            gemm_abt<MT, NT8, D_PAD>(s, sQ + wrow * SROW * 2, sK, lane);
#endif
        }

        bool need_mask = n0 + BLOCK_N > Mkv;
#if CAUSAL
        need_mask = need_mask || n0 + BLOCK_N - 1 > m0 + off;
#endif
        if (need_mask) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int j = 0; j < NT8; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int col = n0 + j * 8 + 2 * t + (e & 1);
                        bool masked = col >= Mkv;
#if CAUSAL
                        const int row = m0 + wrow + mt * 16 + gr + (e >> 1) * 8;
                        masked = masked || col > row + off;
#endif
                        if (masked) s[mt][j][e] = NEG_INF;
                    }
        }

        cp_async_wait<0>();
        __syncthreads();  // V[nb] landed; every warp is done with K[nb]
        if (nb > 0) {
            load_tile<BLOCK_N, NT>(sK, kp + (i64)(n0 - BLOCK_N) * skm, skm, Mkv - (n0 - BLOCK_N), tid);
            cp_async_commit();
        }

        // Online softmax in base 2 with the scale folded in: p = 2^(s scale_log2 - m scale_log2).
        // The accumulator is only rescaled by 2^(m_old - m_new), never divided inside the loop,
        // and not at all when no row max of the warp moved (alpha == 1 everywhere: most key
        // blocks once the first few have set the maxima).
        float alpha[MT][2];
        bool moved = false;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mx = row_max[mt][r];
#pragma unroll
                for (int j = 0; j < NT8; ++j) mx = fmaxf(mx, fmaxf(s[mt][j][2 * r], s[mt][j][2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
                // A row with no visible key yet keeps max -inf: subtract 0 so exp2 gives 0, not NaN.
                const float base = mx == NEG_INF ? 0.f : mx * scale_log2;
                alpha[mt][r] = ex2(row_max[mt][r] * scale_log2 - base);
                moved = moved || mx != row_max[mt][r];
                row_max[mt][r] = mx;
                float sum = 0.f;
#pragma unroll
                for (int j = 0; j < NT8; ++j) {
                    s[mt][j][2 * r] = ex2(fmaf(s[mt][j][2 * r], scale_log2, -base));
                    s[mt][j][2 * r + 1] = ex2(fmaf(s[mt][j][2 * r + 1], scale_log2, -base));
                    sum += s[mt][j][2 * r] + s[mt][j][2 * r + 1];
                }
                row_sum[mt][r] = row_sum[mt][r] * alpha[mt][r] + sum;  // this thread's part of the row
            }
        }
        if (__any_sync(0xffffffff, moved)) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int j = 0; j < D_PAD / 8; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[mt][j][e] *= alpha[mt][e >> 1];
        }

        if (!(WARP_SKIP & 2) || live) gemm_sb<MT, NT8, D_PAD / 8>(acc, s, sV, lane);
    }

    // Epilogue: out = acc / l (0 for a row with no visible key), lse = m scale + ln l (-inf there).
    float inv[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = row_sum[mt][r];
            l += __shfl_xor_sync(0xffffffff, l, 1);
            l += __shfl_xor_sync(0xffffffff, l, 2);
            inv[mt][r] = l > 0.f ? 1.f / l : 0.f;
            const int row = m0 + wrow + mt * 16 + gr + r * 8;
            if (t == 0 && row < Mq)
                lse[(i64)bh * Mq + row] = l > 0.f ? (row_max[mt][r] * scale_log2 + log2f(l)) * 0.6931471805599453f
                                                  : NEG_INF;
        }
    }
#if O_SMEM
    store_rows_via_smem<MT, D_PAD / 8>(o + b * sob + h * soh + m0 * som, som, wrow, Mq - m0, acc, inv,
                                       sQ + wrow * SROW * 2, lane);
#else
    store_rows<MT, D_PAD / 8>(o + b * sob + h * soh + m0 * som, som, wrow, Mq - m0, 0, acc, inv, lane);
#endif
}
