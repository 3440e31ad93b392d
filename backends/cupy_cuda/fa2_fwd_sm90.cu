// FlashAttention-2 forward for Hopper (sm_90a): the matrix products on wgmma, the warpgroup
// MMA that mma.sync (fa2_fwd.cu) cannot reach on the H100. Same arguments, grid and results as
// fa2_fwd.cu: out = softmax(scale Q K^T) V and lse per row.
//
// One CTA per (query block of BLOCK_M = 64 x WG rows, batch x head), a 1-D grid; each of its WG
// warpgroups (128 threads) owns 64 query rows and their softmax state. All threads load; the
// warpgroups share the K and V tiles.
//
// Shared memory, all tiles in the 128-byte-swizzled layout wgmma reads: a tile of ROWS rows x
// D_PAD columns is D_PAD / 64 "atoms" of ROWS x 128 bytes (64 columns each), the 16-byte chunk c
// of row r stored at chunk c ^ (r % 8) (atoms 1024-byte aligned). Q is the A operand of S = Q K^T
// (K-major); K is its B operand (K-major too); V is the B operand of O += P V read transposed
// (MN-major: keys are its K dimension). P stays in registers: the S accumulator layout of a
// warp (mma.sync's m16n8 C fragments side by side) is the A register layout of the next wgmma
// after rounding to 16 bits, as in fa2_fwd.cu.
//
// Pipeline: K and V of STAGES key blocks in a ring (cp.async, one commit group per block,
// issued STAGES - 1 blocks ahead). Per key block j: issue S_j = Q K_j^T, then O += P_{j-1}
// V_{j-1}; wait for S_j only, so block j's softmax runs while the tensor cores do P V; then wait
// for P V, rescale O and round P_j. With two or three CTAs per SM, one CTA's softmax also
// overlaps another's products.
//
// Defines (compile.py): FA2_BF16, HEAD_DIM = D_PAD (64 or 128), CAUSAL (bottom-right aligned:
// query i sees key j iff j <= i + Mkv - Mq), BLOCK_N (64 or 128), WG (1 or 2), STAGES (>= 3).
// Compiled for sm_90a only (wgmma is not in sm_90's forward-compatible subset).

#include "common.cuh"

typedef unsigned long long u64;

#define NT (128 * WG)
#define BLOCK_M (64 * WG)
#define NS (BLOCK_N / 2)  // fp32 registers of S per thread
#define NO (D_PAD / 2)    // fp32 registers of O per thread
#define KV_TILE (BLOCK_N * D_PAD * 2)
#define STAGE_BYTES (2 * KV_TILE)

static_assert(HEAD_DIM == D_PAD && (D_PAD == 64 || D_PAD == 128), "the wgmma forward takes head dims 64 and 128");
static_assert(BLOCK_N == 64 || BLOCK_N == 128, "BLOCK_N is 64 or 128");
static_assert(WG == 1 || WG == 2, "one or two warpgroups");
static_assert(STAGES >= 3, "the ring keeps block j - 1 (read by P V) while block j + 1 loads");

// D[64 x 64] (+)= A[64 x 16] B[16 x 64]: A and B K-major tiles in smem (descriptors).
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[32], u64 da, u64 db, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." MMA_TYPE "." MMA_TYPE " "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(accumulate));
}

// D[64 x 64] += A[64 x 16] B[16 x 64]: A in registers (a0..a3 as mma.sync's m16n8k16 A per
// warp), B an MN-major tile in smem (descriptor, transposed read).
__device__ __forceinline__ void wgmma_rs_n64(float (&d)[32], const u32 (&a)[4], u64 db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." MMA_TYPE "." MMA_TYPE " "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

// D[64 x 128] (+)= A[64 x 16] B[16 x 128]: A and B K-major tiles in smem (descriptors).
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[64], u64 da, u64 db, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." MMA_TYPE "." MMA_TYPE " "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(accumulate));
}

// D[64 x 128] += A[64 x 16] B[16 x 128]: A in registers (a0..a3 as mma.sync's m16n8k16 A per
// warp), B an MN-major tile in smem (descriptor, transposed read).
__device__ __forceinline__ void wgmma_rs_n128(float (&d)[64], const u32 (&a)[4], u64 db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." MMA_TYPE "." MMA_TYPE " "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Generic-proxy writes to shared memory (cp.async) made visible to the async proxy (wgmma).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// Keeps the compiler from moving accesses of accumulator registers across a wgmma wait.
template <int N>
__device__ __forceinline__ void pin(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

template <int A, int B>
__device__ __forceinline__ void pin_u32(u32 (&r)[A][B]) {
#pragma unroll
    for (int i = 0; i < A; ++i)
#pragma unroll
        for (int j = 0; j < B; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}

// Shared-memory matrix descriptor, 128-byte swizzle: start address, leading and stride byte
// offsets, all in 16-byte units.
__device__ __forceinline__ u64 desc_sw128(u32 addr, u32 lbo, u32 sbo) {
    return (u64)((addr & 0x3ffff) >> 4) | ((u64)((lbo & 0x3ffff) >> 4) << 16) | ((u64)((sbo & 0x3ffff) >> 4) << 32) |
           (1ull << 62);
}

// ROWS x D_PAD tile into the swizzled layout; rows >= valid_rows are zero-filled. A thread
// copies one 16-byte column chunk c of rows r0, r0 + RSTEP, ...: RSTEP is a multiple of 8, so
// the swizzled chunk and the address step are the same for all its rows.
template <int ROWS>
__device__ __forceinline__ void load_tile_sw(u32 sdst, const elem_t* __restrict__ g, i64 row_stride, int valid_rows,
                                             int tid) {
    constexpr int CH = D_PAD / 8;
    constexpr int RSTEP = NT / CH;
    static_assert(RSTEP % 8 == 0 && ROWS % RSTEP == 0, "rows per pass");
    const int c = tid % CH, r0 = tid / CH;
    const u32 dst = sdst + (u32)((c >> 3) * (ROWS * 128) + r0 * 128 + (((c & 7) ^ (r0 & 7)) << 4));
    const elem_t* src = g + r0 * row_stride + c * 8;
#pragma unroll
    for (int j = 0; j < ROWS / RSTEP; ++j) {
        const bool ok = r0 + j * RSTEP < valid_rows;
        cp_async16(dst + (u32)(j * RSTEP * 128), ok ? src : g, ok ? 16 : 0);
        src += RSTEP * row_stride;
    }
}

// S[64 x BLOCK_N] = Q[64 x D] K^T: D / 16 wgmmas, K steps of 16 columns (32 bytes inside an
// atom, the next atom every 4).
__device__ __forceinline__ void issue_s(float (&s)[NS], u32 sq, u32 sk) {
#pragma unroll
    for (int kk = 0; kk < D_PAD / 16; ++kk) {
        const u64 da = desc_sw128(sq + (kk >> 2) * (BLOCK_M * 128) + (kk & 3) * 32, 16, 1024);
        const u64 db = desc_sw128(sk + (kk >> 2) * (BLOCK_N * 128) + (kk & 3) * 32, 16, 1024);
#if BLOCK_N == 64
        wgmma_ss_n64(s, da, db, kk > 0);
#else
        wgmma_ss_n128(s, da, db, kk > 0);
#endif
    }
}

// O[64 x D] += P[64 x BLOCK_N] V: BLOCK_N / 16 wgmmas over 16 keys each (16 rows of 128 bytes
// = 2048 bytes); V read MN-major: the leading offset steps between 64-column atoms, the stride
// offset between 8-key groups.
__device__ __forceinline__ void issue_pv(float (&o)[NO], const u32 (&p)[BLOCK_N / 16][4], u32 sv) {
#pragma unroll
    for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
        const u64 db = desc_sw128(sv + kk * 2048, BLOCK_N * 128, 1024);
#if D_PAD == 64
        wgmma_rs_n64(o, p[kk], db);
#else
        wgmma_rs_n128(o, p[kk], db);
#endif
    }
}

extern "C" __global__ void __launch_bounds__(NT, 1) fa2_fwd_sm90(
    const elem_t* __restrict__ q, const elem_t* __restrict__ k, const elem_t* __restrict__ v,
    elem_t* __restrict__ o, float* __restrict__ lse,
    i64 sqb, i64 sqh, i64 sqm, i64 skb, i64 skh, i64 skm, i64 svb, i64 svh, i64 svm,
    i64 sob, i64 soh, i64 som,
    int H, int group, int Mq, int Mkv, int num_m_blocks, float scale_log2, int head_group) {
    extern __shared__ __align__(128) unsigned char smem[];
    const u32 sQ = (smem_u32(smem) + 1023u) & ~1023u;  // swizzle atoms are 1024-byte aligned
    const u32 sKV = sQ + BLOCK_M * D_PAD * 2;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = tid >> 7;
    const int gr = lane >> 2, t = lane & 3;
#if CAUSAL
    const int bh = blockIdx.x / num_m_blocks;
    const int mb = num_m_blocks - 1 - blockIdx.x % num_m_blocks;  // longest query blocks first
#else
    const int bh = blockIdx.x / num_m_blocks;
    const int mb = blockIdx.x % num_m_blocks;
#endif
    const int b = bh / H, h = bh % H, hk = h / group;
    const int m0 = mb * BLOCK_M;
#if CAUSAL
    const int off = Mkv - Mq;
#endif
    const int row0 = m0 + wg * 64 + (warp & 3) * 16 + gr;  // this thread's rows: row0, row0 + 8

    const elem_t* qp = q + b * sqb + h * sqh + m0 * sqm;
    const elem_t* kp = k + b * skb + hk * skh;
    const elem_t* vp = v + b * svb + hk * svh;

    int n_blocks = (Mkv + BLOCK_N - 1) / BLOCK_N;
#if CAUSAL
    {
        const int last_key = m0 + BLOCK_M - 1 + off;  // largest key any row of the block sees
        n_blocks = last_key < 0 ? 0 : min(n_blocks, last_key / BLOCK_N + 1);
    }
#endif

    float acc[NO];
#pragma unroll
    for (int i = 0; i < NO; ++i) acc[i] = 0.f;
    float row_max[2] = {NEG_INF, NEG_INF}, row_sum[2] = {0.f, 0.f};
    u32 p[BLOCK_N / 16][4];

    // Prologue: Q with block 0, then blocks 1 .. STAGES - 2, one commit group each.
    if (n_blocks > 0) load_tile_sw<BLOCK_M>(sQ, qp, sqm, Mq - m0, tid);
#pragma unroll
    for (int j = 0; j < STAGES - 1; ++j) {
        if (j < n_blocks) {
            const u32 st = sKV + j * STAGE_BYTES;
            load_tile_sw<BLOCK_N>(st, kp + (i64)j * BLOCK_N * skm, skm, Mkv - j * BLOCK_N, tid);
            load_tile_sw<BLOCK_N>(st + KV_TILE, vp + (i64)j * BLOCK_N * svm, svm, Mkv - j * BLOCK_N, tid);
        }
        cp_async_commit();
    }
    const u32 sq = sQ + wg * 64 * 128;  // this warpgroup's 64 rows inside each Q atom

    for (int j = 0; j < n_blocks; ++j) {
        const int n0 = j * BLOCK_N;
        const u32 st = sKV + (j % STAGES) * STAGE_BYTES;
        cp_async_wait<STAGES - 2>();  // this thread's copies of block j have landed
        fence_proxy_async();
        __syncthreads();  // everyone's have

        float s[NS];
        wgmma_fence();
        issue_s(s, sq, st);
        wgmma_commit();
        if (j > 0) {
            issue_pv(acc, p, sKV + ((j - 1) % STAGES) * STAGE_BYTES + KV_TILE);
            wgmma_commit();
            wgmma_wait<1>();  // S_j is done; P_{j-1} V_{j-1} may still run
        } else {
            wgmma_wait<0>();
        }
        pin(s);

        bool need_mask = n0 + BLOCK_N > Mkv;
#if CAUSAL
        need_mask = need_mask || n0 + BLOCK_N - 1 > m0 + off;
#endif
        if (need_mask) {
#pragma unroll
            for (int i = 0; i < NS; ++i) {
                const int col = n0 + (i >> 2) * 8 + 2 * t + (i & 1);
                bool masked = col >= Mkv;
#if CAUSAL
                masked = masked || col > row0 + ((i >> 1) & 1) * 8 + off;
#endif
                if (masked) s[i] = NEG_INF;
            }
        }

        // Online softmax in base 2, scale folded in (fa2_fwd.cu): row r of this thread holds
        // s[4c + 2r], s[4c + 2r + 1] for the 8-key chunks c.
        float alpha[2];
        bool moved = false;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = row_max[r];
#pragma unroll
            for (int c = 0; c < BLOCK_N / 8; ++c) mx = fmaxf(mx, fmaxf(s[4 * c + 2 * r], s[4 * c + 2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
            const float base = mx == NEG_INF ? 0.f : mx * scale_log2;  // no visible key yet: p = 0, not NaN
            alpha[r] = ex2(row_max[r] * scale_log2 - base);
            moved = moved || mx != row_max[r];
            row_max[r] = mx;
            float sum = 0.f;
#pragma unroll
            for (int c = 0; c < BLOCK_N / 8; ++c) {
                s[4 * c + 2 * r] = ex2(fmaf(s[4 * c + 2 * r], scale_log2, -base));
                s[4 * c + 2 * r + 1] = ex2(fmaf(s[4 * c + 2 * r + 1], scale_log2, -base));
                sum += s[4 * c + 2 * r] + s[4 * c + 2 * r + 1];
            }
            row_sum[r] = row_sum[r] * alpha[r] + sum;  // this thread's part of the row
        }

        wgmma_wait<0>();  // P_{j-1} V_{j-1} is done: O and P may change
        pin(acc);
        pin_u32(p);
        if (__any_sync(0xffffffff, moved)) {  // alpha is exactly 1 for rows whose max stayed
#pragma unroll
            for (int i = 0; i < NO; ++i) acc[i] *= alpha[(i >> 1) & 1];
        }
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
            p[kk][0] = pack2(s[8 * kk + 0], s[8 * kk + 1]);
            p[kk][1] = pack2(s[8 * kk + 2], s[8 * kk + 3]);
            p[kk][2] = pack2(s[8 * kk + 4], s[8 * kk + 5]);
            p[kk][3] = pack2(s[8 * kk + 6], s[8 * kk + 7]);
        }

        // Block j - 1's slot is free in every warpgroup: load block j + STAGES - 1 into it.
        __syncthreads();
        const int jn = j + STAGES - 1;
        if (jn < n_blocks) {
            const u32 sn = sKV + (jn % STAGES) * STAGE_BYTES;
            load_tile_sw<BLOCK_N>(sn, kp + (i64)jn * BLOCK_N * skm, skm, Mkv - jn * BLOCK_N, tid);
            load_tile_sw<BLOCK_N>(sn + KV_TILE, vp + (i64)jn * BLOCK_N * svm, svm, Mkv - jn * BLOCK_N, tid);
        }
        cp_async_commit();
    }
    if (n_blocks > 0) {
        wgmma_fence();
        issue_pv(acc, p, sKV + ((n_blocks - 1) % STAGES) * STAGE_BYTES + KV_TILE);
        wgmma_commit();
        wgmma_wait<0>();
        pin(acc);
    }

    // Epilogue: out = acc / l (0 for a row with no visible key), lse = m scale + ln l (-inf there).
    elem_t* op = o + b * sob + h * soh;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = row_sum[r];
        l += __shfl_xor_sync(0xffffffff, l, 1);
        l += __shfl_xor_sync(0xffffffff, l, 2);
        const float inv = l > 0.f ? 1.f / l : 0.f;
        const int row = row0 + r * 8;
        if (row < Mq) {
            if (t == 0)
                lse[(i64)bh * Mq + row] = l > 0.f ? (row_max[r] * scale_log2 + log2f(l)) * 0.6931471805599453f : NEG_INF;
            u32* dst = reinterpret_cast<u32*>(op + (i64)row * som + 2 * t);
#pragma unroll
            for (int c = 0; c < D_PAD / 8; ++c) dst[c * 4] = pack2(acc[4 * c + 2 * r] * inv, acc[4 * c + 2 * r + 1] * inv);
        }
    }
}
