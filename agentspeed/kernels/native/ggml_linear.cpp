// Linear layers and embedding lookups on weights kept in their GGUF storage type
// (ggml_blocks.h). A weight is N rows of K/QK blocks; row n starts at w + n * row_stride bytes
// (a column slice of a wider tensor, as tensor parallelism takes, is a pointer offset and the
// wider stride).
//
//   ggml_gemv:    y[r, n] = sum_k x[r, k] * W[n, k] + bias[n] for one or two rows of x (a
//                 decode step of one sequence), decoding in registers: the weights are
//                 streamed once at their stored size (0.56 bytes per weight for Q4_K)
//                 instead of 4 for an fp32 copy.
//   ggml_gemm:    the same for any number of rows (batched decode, drafts, prefill): weight
//                 rows decoded to an L2-sized fp32 buffer once per call, multiplied in
//                 register tiles.
//   ggml_dequant: rows [0, N) of W as fp32.
//   ggml_get_rows: the rows `ids` of W as fp32 (embedding lookups).
// Outputs are written at a row stride (ldy) so parts of a merged projection (q|k|v stored as
// different types) land side by side.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "ggml_blocks.h"
#include "vec.h"

namespace {

inline float hsum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < W; ++i) s += v[i];
    return s;
}

// One or two rows of x (a single decoding sequence) against output rows [0, N). Decoding is
// the work here, so the scales are taken out of the inner loop: per sub-block,
// acc += d * sum(code * x), and the minimums once per row as the sum over sub-blocks of
// m * sum(x), from per-sub-block sums of x made once per call (Q4_K: 1.17 -> 0.82 ms for a
// 1536 x 8960 product; docs/benchmarks.md). It is still an fp32 accumulation of the stored
// values; its error bound is in tests/test_ggml.py. Two accumulators per row and two partial
// sums per sub-block keep independent FMA chains (one chain waited on the FMA latency).
template <int R, class B>
void gemv(const float* x, int64_t ldx, int K, const uint8_t* w, int64_t ws, int N, const float* bias,
          float* y, int64_t ldy, int threads) {
    const int nb = K / B::QK;
    constexpr int NSUB = B::QK / B::SUB, VSUB = B::SUB / W;  // sub-blocks per block, vectors per sub-block
    static_assert(R <= 2, "more rows take ggml_gemm");
    static thread_local std::vector<float> xsum;  // [R][K / SUB], for types with minimums
    if constexpr (B::MIN) {
        xsum.resize(static_cast<size_t>(R) * (K / B::SUB));
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < K / B::SUB; ++j) {
                float t = 0.0f;
                for (int i = 0; i < B::SUB; ++i) t += x[r * ldx + j * B::SUB + i];
                xsum[r * (K / B::SUB) + j] = t;
            }
    }
    const float* xs = xsum.data();
    // Blocks per step: 32-weight types take 4 at a time, so each step has 4 sub-blocks whose
    // sums feed two accumulators (the FMA latency, not the decoding, bounded one long chain).
    constexpr int G = B::QK >= 128 ? 1 : 128 / B::QK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int n = 0; n < N; ++n) {
        const uint8_t* row = w + n * ws;
        vf acc[R][2] = {};
        float macc[R] = {};
        auto step = [&](int b, auto gc) {  // blocks [b, b + g)
            constexpr int g = decltype(gc)::value;
            unroll<0, g>([&](auto kc) {
                constexpr int k = decltype(kc)::value;
                const uint8_t* blk = row + static_cast<int64_t>(b + k) * B::BYTES;
                typename B::State st;
                B::prep(blk, st);
                const float* xb = x + (b + k) * B::QK;
                unroll<0, NSUB>([&](auto sc) {
                    constexpr int j = decltype(sc)::value;
                    vf t[R][2] = {};
                    unroll<0, VSUB>([&](auto vc) {
                        constexpr int v = decltype(vc)::value, i = j * VSUB + v;
                        const vf c = B::template code<i>(blk);
                        for (int r = 0; r < R; ++r) t[r][v % 2] += ld(xb + r * ldx + i * W) * c;
                    });
                    for (int r = 0; r < R; ++r) {
                        const vf tt = t[r][0] + t[r][1];
                        if constexpr (B::SCALED) acc[r][(k * NSUB + j) % 2] += tt * st.d[j];
                        else acc[r][(k * NSUB + j) % 2] += tt;
                    }
                });
                if constexpr (B::MIN)
                    for (int r = 0; r < R; ++r)
                        for (int j = 0; j < NSUB; ++j) macc[r] += st.m[j] * xs[r * (K / B::SUB) + (b + k) * NSUB + j];
            });
        };
        int b = 0;
        for (; b + G <= nb; b += G) step(b, std::integral_constant<int, G>{});
        for (; b < nb; ++b) step(b, std::integral_constant<int, 1>{});
        const float bn = bias ? bias[n] : 0.0f;
        for (int r = 0; r < R; ++r) y[r * ldy + n] = hsum(acc[r][0] + acc[r][1]) - macc[r] + bn;
    }
}

// A block as QK fp32 values.
template <class B>
inline void decode(const uint8_t* blk, float* out) {
    typename B::State s;
    B::prep(blk, s);
    unroll<0, B::QK / W>([&](auto i) { st(out + decltype(i)::value * W, weights<B, decltype(i)::value>(blk, s)); });
}

// A row of nb blocks as fp32.
template <class B>
inline void decode_row(const uint8_t* row, int nb, float* out) {
    for (int b = 0; b < nb; ++b) decode<B>(row + static_cast<int64_t>(b) * B::BYTES, out + b * B::QK);
}

// y[MR x NR] (+ bias) = x rows [MR][K] . decoded weight rows wb [NR][K]: the register tile of
// ggml_gemm. 4 x 3 holds 12 accumulators, 3 weight vectors and one x vector: the 16 AVX2
// registers; per W columns of K, 7 loads feed 12 FMAs, so it is FMA-bound from L1/L2.
template <int MR, int NR>
void tile(const float* x, int64_t ldx, const float* wb, int K, const float* bias, float* y, int64_t ldy) {
    vf acc[MR][NR] = {};
    for (int k = 0; k < K; k += W) {
        vf wv[NR];
        for (int j = 0; j < NR; ++j) {
            wv[j] = ld(wb + static_cast<int64_t>(j) * K + k);
#if defined(__AVX512F__) || (defined(__AVX__) && !defined(AGENTSPEED_FORCE_W16))  // vf fits one register
            asm("" : "+v"(wv[j]));  // keep it in a register: gcc re-loads it per row of x otherwise
#endif
        }
        for (int i = 0; i < MR; ++i) {
            const vf xv = ld(x + i * ldx + k);
            for (int j = 0; j < NR; ++j) acc[i][j] += xv * wv[j];
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) y[i * ldy + j] = hsum(acc[i][j]) + (bias ? bias[j] : 0.0f);
}

template <int NR>
void tile_rows(int mr, const float* x, int64_t ldx, const float* wb, int K, const float* bias, float* y, int64_t ldy) {
    switch (mr) {
        case 1: tile<1, NR>(x, ldx, wb, K, bias, y, ldy); break;
        case 2: tile<2, NR>(x, ldx, wb, K, bias, y, ldy); break;
        case 3: tile<3, NR>(x, ldx, wb, K, bias, y, ldy); break;
        default: tile<4, NR>(x, ldx, wb, K, bias, y, ldy); break;
    }
}

constexpr int TM = 4, TN = 3;  // the register tile

}  // namespace

extern "C" {

// y = x @ W.T + bias for any number of rows of x. Each thread decodes a chunk of weight rows
// (as many as fit in about 256 KB as fp32: L2) and multiplies it with x, TM rows of x at a
// time (in L1) against each TN rows of the chunk, in TM x TN register tiles; x is streamed
// once per chunk, not once per tile (1.6x at 512 rows). Exact fp32 products of the stored
// weights (the decoded values are ggml's). Returns 0, or -1 for a type without a decoder or K
// not whole blocks.
int ggml_gemm(int type, const float* x, int M, int64_t ldx, int K, const uint8_t* w, int64_t ws, int N,
              const float* bias, float* y, int64_t ldy, int threads) {
    int rc = -1;
    with_block(type, [&](auto blk) {
        using B = decltype(blk);
        if (K % B::QK || M < 1) return;
        const int nb = K / B::QK;
        int nc = (256 << 10) / (4 * K) / TN * TN;
        const int share = (N + 4 * threads - 1) / (4 * threads);  // >= 4 chunks per thread
        nc = std::max(TN, std::min(nc, (share + TN - 1) / TN * TN));
        const int chunks = (N + nc - 1) / nc;
#pragma omp parallel num_threads(threads)
        {
            static thread_local std::vector<float> wb;
            if (wb.size() < static_cast<size_t>(nc) * K) wb.resize(static_cast<size_t>(nc) * K);
#pragma omp for schedule(static)
            for (int c = 0; c < chunks; ++c) {
                const int n0 = c * nc, rows = std::min(nc, N - n0);
                for (int j = 0; j < rows; ++j)
                    decode_row<B>(w + (n0 + j) * ws, nb, wb.data() + static_cast<int64_t>(j) * K);
                for (int m0 = 0; m0 < M; m0 += TM) {
                    const int mr = M - m0 < TM ? M - m0 : TM;
                    for (int j0 = 0; j0 < rows; j0 += TN) {
                        const int nr = std::min(TN, rows - j0);
                        const float* wt = wb.data() + static_cast<int64_t>(j0) * K;
                        const float* bn = bias ? bias + n0 + j0 : nullptr;
                        const float* xm = x + m0 * ldx;
                        float* ym = y + m0 * ldy + n0 + j0;
                        switch (nr) {
                            case 1: tile_rows<1>(mr, xm, ldx, wt, K, bn, ym, ldy); break;
                            case 2: tile_rows<2>(mr, xm, ldx, wt, K, bn, ym, ldy); break;
                            default: tile_rows<3>(mr, xm, ldx, wt, K, bn, ym, ldy); break;
                        }
                    }
                }
            }
        }
        rc = 0;
    });
    return rc;
}

// Returns 0; -1 for a type without a decoder or K not a whole number of its blocks; -2 for
// more than 2 rows (those take ggml_gemm).
int ggml_gemv(int type, const float* x, int R, int64_t ldx, int K, const uint8_t* w, int64_t ws, int N,
              const float* bias, float* y, int64_t ldy, int threads) {
    if (R < 1 || R > 2) return -2;
    int rc = -1;
    with_block(type, [&](auto blk) {
        using B = decltype(blk);
        if (K % B::QK) return;
        switch (R) {
#define CASE(r) case r: gemv<r, B>(x, ldx, K, w, ws, N, bias, y, ldy, threads); break;
            CASE(1) CASE(2)
#undef CASE
        }
        rc = 0;
    });
    return rc;
}

int ggml_dequant(int type, const uint8_t* w, int64_t ws, int N, int K, float* out, int64_t ldo, int threads) {
    int rc = -1;
    with_block(type, [&](auto blk) {
        using B = decltype(blk);
        if (K % B::QK) return;
        const int nb = K / B::QK;
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int n = 0; n < N; ++n) decode_row<B>(w + n * ws, nb, out + n * ldo);
        rc = 0;
    });
    return rc;
}

// ids outside [0, N) give zero rows (a vocabulary shard's lookups of other shards' tokens).
int ggml_get_rows(int type, const uint8_t* w, int64_t ws, int N, int K, const int64_t* ids, int n_ids,
                  float* out, int threads) {
    int rc = -1;
    with_block(type, [&](auto blk) {
        using B = decltype(blk);
        if (K % B::QK) return;
        const int nb = K / B::QK;
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int i = 0; i < n_ids; ++i) {
            float* o = out + static_cast<int64_t>(i) * K;
            const int64_t id = ids[i];
            if (id < 0 || id >= N) {
                std::memset(o, 0, sizeof(float) * K);
                continue;
            }
            decode_row<B>(w + id * ws, nb, o);
        }
        rc = 0;
    });
    return rc;
}

}  // extern "C"
