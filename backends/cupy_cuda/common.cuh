// Shared device helpers of the CuPy FlashAttention-2 kernels (fa2_fwd.cu, fa2_bwd.cu).
//
// No headers: 16-bit values travel as raw bits (unsigned short / packed in unsigned int) and
// every conversion, matrix load and copy is one PTX instruction, so the sources compile with
// bare NVRTC (no cuda_fp16.h / cuda_bf16.h on the include path) for sm_80 and newer.
//
// Compile-time parameters (set by compile.py as -D defines):
//   FA2_BF16   1 for bfloat16, 0 for float16
//   HEAD_DIM   the real head dim D (multiple of 8)
//   D_PAD      D rounded up to a multiple of 16 (the MMA's K); columns D..D_PAD are zero in smem
//
// Shared-memory tiles are row-major [rows][SROW] 16-bit elements with SROW = D_PAD + 8: a row
// is (D_PAD/8 + 1) 16-byte chunks, an odd number, so the 8 row addresses of one ldmatrix 8x8
// matrix fall in 8 different 16-byte bank groups (conflict free) at every head dim, where an
// XOR swizzle needs D_PAD to be a multiple of 64. It costs 16 bytes per row.

#pragma once

typedef unsigned short elem_t;  // one fp16 / bf16 value, as bits
typedef unsigned int u32;
typedef long long i64;

#define SROW (D_PAD + 8)
#define NEG_INF __int_as_float(0xff800000)
#define POS_INF __int_as_float(0x7f800000)

#if FA2_BF16
#define MMA_TYPE "bf16"
#else
#define MMA_TYPE "f16"
#endif

// Two floats to one register of two 16-bit values, round to nearest; lo in the low half.
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
#if FA2_BF16
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}

// One 16-bit value (as bits) to float.
__device__ __forceinline__ float to_float(unsigned short x) {
#if FA2_BF16
    return __uint_as_float(((u32)x) << 16);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
#endif
}

// 2^x; ex2.approx of -inf is +0, which masked scores rely on.
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}

// D[16x8] += A[16x16] (row) * B[16x8] (col), fp32 accumulators.
// Lane l, g = l/4, t = l%4 holds: A a0 (row g, cols 2t,2t+1), a1 (row g+8, same cols),
// a2 (row g, cols 2t+8,+9), a3 (row g+8, cols 2t+8,+9); B b0 (k 2t,2t+1, n g), b1 (k 2t+8,+9, n g);
// C c0,c1 (row g, cols 2t,2t+1), c2,c3 (row g+8, cols 2t,2t+1).
__device__ __forceinline__ void mma16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPE "." MMA_TYPE ".f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i receives
// matrix i with lane l holding row l/4, elements 2(l%4), 2(l%4)+1 (transposed with .trans).
__device__ __forceinline__ void ldsm_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_t(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// 16-byte global -> shared copy; src_bytes 0 writes 16 zero bytes (src must still be valid).
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// ROWS x D_PAD tile from global (row stride in elements, last stride 1) into smem at sdst;
// rows >= valid_rows and columns >= HEAD_DIM are zero-filled. 16-byte chunks, NT threads.
// When NT is a multiple of the chunks per row (every D_PAD that is a power of two), a thread
// always copies the same column and walks rows with one running pointer: the loop-invariant
// per-chunk offsets the generic form leaves would otherwise pin 2 registers per chunk for the
// whole key loop.
template <int ROWS, int NT>
__device__ __forceinline__ void load_tile(u32 sdst, const elem_t* __restrict__ g, i64 row_stride, int valid_rows,
                                          int tid) {
    constexpr int CH = D_PAD / 8;
    if constexpr (NT % CH == 0) {
        constexpr int RSTEP = NT / CH;
        const int c = tid % CH, r0 = tid / CH;
        const bool col_ok = c * 8 < HEAD_DIM;
        const elem_t* src = g + r0 * row_stride + c * 8;
        const u32 dst = sdst + (u32)(r0 * SROW + c * 8) * 2u;
#pragma unroll
        for (int j = 0; j < (ROWS + RSTEP - 1) / RSTEP; ++j) {
            const int r = r0 + j * RSTEP;
            if (ROWS % RSTEP == 0 || r < ROWS) {
                const bool ok = col_ok && r < valid_rows;
                cp_async16(dst + (u32)(j * RSTEP * SROW) * 2u, ok ? src : g, ok ? 16 : 0);
            }
            src += RSTEP * row_stride;
        }
    } else {
#pragma unroll
        for (int i = tid; i < ROWS * CH; i += NT) {
            const int r = i / CH, c = i % CH;
            const bool ok = r < valid_rows && c * 8 < HEAD_DIM;
            const elem_t* src = ok ? g + r * row_stride + c * 8 : g;
            cp_async16(sdst + (u32)(r * SROW + c * 8) * 2u, src, ok ? 16 : 0);
        }
    }
}

// acc[mt][n] += A[mt] * B^T over K = KD columns, for MT 16-row slabs of A (rows sA + 16 mt)
// and NT8 8-row groups of B, both row-major [row][k] tiles in smem (stride SROW).
// Used for S = Q K^T (A = Q, B = K) and dP = dO V^T and their transposes in the backward.
template <int MT, int NT8, int KD>
__device__ __forceinline__ void gemm_abt(float (&acc)[MT][NT8][4], u32 sA, u32 sB, int lane) {
    static_assert(NT8 % 2 == 0, "B rows must be a multiple of 16");
    const u32 a_off = (u32)((lane & 15) * SROW + (lane >> 4) * 8) * 2u;
    const u32 b_off = (u32)(((lane >> 4) * 8 + (lane & 7)) * SROW + ((lane >> 3) & 1) * 8) * 2u;
#pragma unroll
    for (int kk = 0; kk < KD / 16; ++kk) {
        u32 a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) ldsm_x4(a[mt], sA + a_off + (u32)(mt * 16 * SROW + kk * 16) * 2u);
#pragma unroll
        for (int np = 0; np < NT8 / 2; ++np) {
            u32 b[4];
            ldsm_x4(b, sB + b_off + (u32)(np * 16 * SROW + kk * 16) * 2u);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma16816(acc[mt][2 * np], a[mt], b[0], b[1]);
                mma16816(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

// The m16n8 accumulators of two adjacent n8 tiles (j = 2 kk, 2 kk + 1) are exactly one m16k16
// A fragment: rows g / g+8, columns 2t, 2t+1 of the first tile, then of the second.
template <int MT, int NT8>
__device__ __forceinline__ void a_frag(u32 (&p)[4], const float (&s)[MT][NT8][4], int mt, int kk) {
    p[0] = pack2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
    p[1] = pack2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
    p[2] = pack2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
    p[3] = pack2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
}

// acc[mt][n] += P[mt] * B with P the fp32 accumulators s (K = 8 NT8 columns), rounded to 16
// bits one k16 slice at a time (fewer live registers than converting all of P first), and
// B a row-major [k][n] tile in smem (rows = k) read with ldmatrix.trans; ND8 output 8-column
// groups. Used for O += P V, dV += P^T dO, dK += dS^T Q, dQ += dS K.
template <int MT, int NT8, int ND8>
__device__ __forceinline__ void gemm_sb(float (&acc)[MT][ND8][4], const float (&s)[MT][NT8][4], u32 sB, int lane) {
    static_assert(ND8 % 2 == 0 && NT8 % 2 == 0, "tiles must be multiples of 16");
    const u32 b_off = (u32)((((lane >> 3) & 1) * 8 + (lane & 7)) * SROW + (lane >> 4) * 8) * 2u;
#pragma unroll
    for (int kk = 0; kk < NT8 / 2; ++kk) {
        u32 p[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) a_frag(p[mt], s, mt, kk);
#pragma unroll
        for (int dp = 0; dp < ND8 / 2; ++dp) {
            u32 b[4];
            ldsm_x4_t(b, sB + b_off + (u32)(kk * 16 * SROW + dp * 16) * 2u);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma16816(acc[mt][2 * dp], p[mt], b[0], b[1]);
                mma16816(acc[mt][2 * dp + 1], p[mt], b[2], b[3]);
            }
        }
    }
}

// A fragments of MT 16-row slabs x KD columns of a row-major smem tile, for keeping Q in
// registers across the whole key loop.
template <int MT, int KD>
__device__ __forceinline__ void load_a_frags(u32 (&a)[MT][KD / 16][4], u32 sA, int lane) {
    const u32 a_off = (u32)((lane & 15) * SROW + (lane >> 4) * 8) * 2u;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int kk = 0; kk < KD / 16; ++kk) ldsm_x4(a[mt][kk], sA + a_off + (u32)(mt * 16 * SROW + kk * 16) * 2u);
}

// gemm_abt with A already in registers (load_a_frags).
template <int MT, int NT8, int KD>
__device__ __forceinline__ void gemm_abt_ra(float (&acc)[MT][NT8][4], const u32 (&a)[MT][KD / 16][4], u32 sB,
                                            int lane) {
    const u32 b_off = (u32)(((lane >> 4) * 8 + (lane & 7)) * SROW + ((lane >> 3) & 1) * 8) * 2u;
#pragma unroll
    for (int kk = 0; kk < KD / 16; ++kk) {
#pragma unroll
        for (int np = 0; np < NT8 / 2; ++np) {
            u32 b[4];
            ldsm_x4(b, sB + b_off + (u32)(np * 16 * SROW + kk * 16) * 2u);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma16816(acc[mt][2 * np], a[mt][kk], b[0], b[1]);
                mma16816(acc[mt][2 * np + 1], a[mt][kk], b[2], b[3]);
            }
        }
    }
}

template <int MT, int N8>
__device__ __forceinline__ void zero(float (&acc)[MT][N8][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < N8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][j][e] = 0.f;
}

// Store a warp's MT x 16-row accumulator slab (times `mul` per row half) to global rows
// row0 + 16 mt + g (+8), columns col0 + 8 j + 2t; only rows < valid_rows, columns < HEAD_DIM.
template <int MT, int N8>
__device__ __forceinline__ void store_rows(elem_t* __restrict__ g, i64 row_stride, int row0, int valid_rows,
                                           int col0, const float (&acc)[MT][N8][4], const float (&mul)[MT][2],
                                           int lane) {
    const int gr = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int r = row0 + mt * 16 + gr + half * 8;
            if (r >= valid_rows) continue;
            elem_t* row = g + r * row_stride;
#pragma unroll
            for (int j = 0; j < N8; ++j) {
                const int c = col0 + j * 8 + 2 * t;
                if (c < HEAD_DIM)
                    *reinterpret_cast<u32*>(row + c) =
                        pack2(acc[mt][j][2 * half] * mul[mt][half], acc[mt][j][2 * half + 1] * mul[mt][half]);
            }
        }
    }
}

// store_rows through shared memory: the warp writes its MT x 16 rows (times `mul`, rounded to
// 16 bits) to its own rows of a [row][SROW] smem tile at s_rows (conflict free: SROW is an odd
// number of 16-byte chunks), then copies them out in 16-byte chunks (lanes walk a row's chunks
// first, so 8 lanes write 128 contiguous bytes). Rows >= valid_rows and columns >= HEAD_DIM are
// not stored. Only this warp touches those smem rows: __syncwarp orders the two halves.
template <int MT, int N8>
__device__ __forceinline__ void store_rows_via_smem(elem_t* __restrict__ g, i64 row_stride, int row0, int valid_rows,
                                                    const float (&acc)[MT][N8][4], const float (&mul)[MT][2],
                                                    u32 s_rows, int lane) {
    const int gr = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
            for (int j = 0; j < N8; ++j) {
                const u32 addr = s_rows + (u32)((mt * 16 + gr + half * 8) * SROW + j * 8 + 2 * t) * 2u;
                const u32 val = pack2(acc[mt][j][2 * half] * mul[mt][half], acc[mt][j][2 * half + 1] * mul[mt][half]);
                asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(val) : "memory");
            }
    __syncwarp();
    constexpr int CH = N8;  // 16-byte chunks per row (8 elements each)
#pragma unroll
    for (int i = lane; i < MT * 16 * CH; i += 32) {
        const int r = i / CH, c = i % CH;
        if (c * 8 < HEAD_DIM && row0 + r < valid_rows) {
            u32 x0, x1, x2, x3;
            asm volatile("ld.shared.v4.b32 {%0,%1,%2,%3}, [%4];"
                         : "=r"(x0), "=r"(x1), "=r"(x2), "=r"(x3)
                         : "r"(s_rows + (u32)(r * SROW + c * 8) * 2u));
            elem_t* dst = g + (row0 + r) * row_stride + c * 8;
            asm volatile("st.global.v4.b32 [%0], {%1,%2,%3,%4};" ::"l"(dst), "r"(x0), "r"(x1), "r"(x2), "r"(x3)
                         : "memory");
        }
    }
}
