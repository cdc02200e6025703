// y = x @ W.T + bias for many rows of x (prefill chunks, decodes that carry drafts) with W
// held as small integer codes per block of 32 along K and a scale and minimum per block:
//   W[n, k] = d[n, b] * c[n, k] + m[n, b]   (GGUF Q4_1: c in 0..15; Q8_0: c in -127..127, m = 0)
//
// Each row of x is quantized per block of 32 to 16-bit integers against the block's largest
// magnitude: x = s * xq + e with |e| <= s / 2 = max|x| / 65534. Block b then contributes
//   d * s * sum(c * xq) + m * sum(x)
// where the integer dot product is exact and sum(x) is the fp32 sum. The weights are exactly
// the checkpoint's; only x carries the 16-bit rounding (256x finer than bf16's).
//
// Why: at more than a few rows the linears are compute-bound, and AVX512-VNNI's vpdpwssd does
// 32 multiply-adds per instruction where an fp32 FMA does 16. The Python side uses this only
// where i16_gemm_fast() says that instruction is compiled in; the portable loop below keeps
// the same arithmetic for tests elsewhere.
//
// Layout (prepacked once by the Python side, N padded to a multiple of 16):
//   codes  [N/16][K/2][16][2] int16: for 16 output columns, the code pairs (k, k+1) per column
//   scales [N/16][K/32][16] fp32, mins likewise (null: all zero)

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
#include <immintrin.h>
#define I16_FAST 1
#else
#define I16_FAST 0
#endif

namespace {

constexpr int BK = 32;       // block along K (scales and activation quantization)
constexpr int LANES = 16;    // output columns per code group
// A tile is ROWS rows x GC code groups (48 columns): 12 integer accumulators and the 3 weight
// vectors in registers, the float sums in memory (touched once per block). Measured with
// bench_i16_gemm.py against 4 x 2, 6 x 2, 8 x 2, 4 x 4 and 3 x 4 with the float sums in
// registers, and 8 x 2, 6 x 3, 8 x 3 and 6 x 4 as here: 4 x 3 was fastest or level everywhere.
constexpr int ROWS = 4;      // rows of x per register tile
constexpr int GC = 3;        // code groups (of 16 columns) per work item
constexpr int ROW_CHUNK = 64;  // rows per work item (the weight tile stays in cache across it)

struct Quantized {
    std::vector<int16_t> q;  // [M][K]
    std::vector<float> s, sum;  // [M][K/32]
};

void quantize(const float* x, int M, int K, Quantized& out, int threads) {
    const int nb = K / BK;
    // Grown, never shrunk: a fresh allocation per call would fault its pages in each time.
    if (out.q.size() < static_cast<size_t>(M) * K) out.q.resize(static_cast<size_t>(M) * K);
    if (out.s.size() < static_cast<size_t>(M) * nb) {
        out.s.resize(static_cast<size_t>(M) * nb);
        out.sum.resize(static_cast<size_t>(M) * nb);
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int r = 0; r < M; ++r)
        for (int b = 0; b < nb; ++b) {
            const float* xb = x + static_cast<int64_t>(r) * K + b * BK;
            // The largest |x| as bits: an integer max also sees inf and NaN, which -ffast-math
            // float compares may not.
            uint32_t abits = 0;
            float sum = 0.0f;
            for (int i = 0; i < BK; ++i) {
                uint32_t u;
                std::memcpy(&u, xb + i, 4);
                abits = std::max(abits, u & 0x7fffffffu);
                sum += xb[i];
            }
            float amax, scale;
            std::memcpy(&amax, &abits, 4);
            const bool finite = abits < 0x7f800000u;
            const float inv = finite && abits ? 32767.0f / amax : 0.0f;
            int16_t* qb = out.q.data() + static_cast<int64_t>(r) * K + b * BK;
            for (int i = 0; i < BK; ++i) qb[i] = static_cast<int16_t>(std::nearbyint(xb[i] * inv));
            if (finite) {
                scale = amax / 32767.0f;
            } else {  // a NaN scale makes the row's outputs NaN, as the fp32 product's would be
                const uint32_t nan = 0x7fc00000u;
                std::memcpy(&scale, &nan, 4);
            }
            out.s[static_cast<size_t>(r) * nb + b] = scale;
            out.sum[static_cast<size_t>(r) * nb + b] = sum;
        }
}

struct Args {
    const Quantized* xq;
    int M, K, N;
    const int16_t* codes;
    const float* scales;
    const float* mins;
    const float* bias;
    float* y;
};

#if I16_FAST
// Rows [r0, r0 + R) x columns of code groups [g0, g0 + C).
template <int R, int C>
void tile(const Args& a, int r0, int g0) {
    const int K = a.K, nb = K / BK, KP = K / 2;
    const int16_t* xq = a.xq->q.data() + static_cast<int64_t>(r0) * K;
    const float* xs = a.xq->s.data() + static_cast<int64_t>(r0) * nb;
    const float* xsum = a.xq->sum.data() + static_cast<int64_t>(r0) * nb;
    // Float sums live in memory, touched once per block; the registers hold the integer
    // accumulators and the weight vectors, so each weight vector is loaded once per k pair
    // for all R rows (as memory operands of vpdpwssd it was loaded R times: load-bound).
    alignas(64) float acc[R][C][LANES] = {};
    for (int b = 0; b < nb; ++b) {
        __m512i dot[R][C];
        for (int r = 0; r < R; ++r)
            for (int c = 0; c < C; ++c) dot[r][c] = _mm512_setzero_si512();
        const int16_t* w = a.codes + (static_cast<int64_t>(g0) * KP + b * (BK / 2)) * 2 * LANES;
        for (int kp = 0; kp < BK / 2; ++kp) {
            __m512i wv[C];
            for (int c = 0; c < C; ++c) {
                wv[c] = _mm512_loadu_si512(w + (static_cast<int64_t>(c) * KP + kp) * 2 * LANES);
                asm("" : "+v"(wv[c]));  // keep it in a register: gcc re-loads it per row otherwise
            }
            for (int r = 0; r < R; ++r) {
                int32_t pair;
                std::memcpy(&pair, xq + static_cast<int64_t>(r) * K + b * BK + 2 * kp, 4);
                const __m512i xb = _mm512_set1_epi32(pair);
                for (int c = 0; c < C; ++c) dot[r][c] = _mm512_dpwssd_epi32(dot[r][c], xb, wv[c]);
            }
        }
        for (int c = 0; c < C; ++c) {
            const int64_t sb = (static_cast<int64_t>(g0 + c) * nb + b) * LANES;
            const __m512 d = _mm512_loadu_ps(a.scales + sb);
            const __m512 m = a.mins ? _mm512_loadu_ps(a.mins + sb) : _mm512_setzero_ps();
            for (int r = 0; r < R; ++r) {
                const __m512 ds = _mm512_mul_ps(d, _mm512_set1_ps(xs[r * nb + b]));
                __m512 s = _mm512_load_ps(acc[r][c]);
                s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][c]), ds, s);
                s = _mm512_fmadd_ps(m, _mm512_set1_ps(xsum[r * nb + b]), s);
                _mm512_store_ps(acc[r][c], s);
            }
        }
    }
    for (int c = 0; c < C; ++c) {
        const int n0 = (g0 + c) * LANES;
        const int valid = std::min(LANES, a.N - n0);
        const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
        const __m512 bias = a.bias ? _mm512_maskz_loadu_ps(mask, a.bias + n0) : _mm512_setzero_ps();
        for (int r = 0; r < R; ++r)
            _mm512_mask_storeu_ps(a.y + static_cast<int64_t>(r0 + r) * a.N + n0, mask,
                                  _mm512_add_ps(_mm512_load_ps(acc[r][c]), bias));
    }
}

template <int C>
void rows_tile(const Args& a, int r0, int rows, int g0) {
    switch (rows) {
        case 1: tile<1, C>(a, r0, g0); break;
        case 2: tile<2, C>(a, r0, g0); break;
        case 3: tile<3, C>(a, r0, g0); break;
        default: tile<ROWS, C>(a, r0, g0); break;
    }
}
#else
// The same arithmetic, one (row, column) at a time.
void portable(const Args& a, int r0, int rows, int g0, int groups) {
    const int K = a.K, nb = K / BK, KP = K / 2;
    for (int r = r0; r < r0 + rows; ++r)
        for (int g = g0; g < g0 + groups; ++g)
            for (int lane = 0; lane < LANES; ++lane) {
                const int n = g * LANES + lane;
                if (n >= a.N) break;
                float acc = 0.0f;
                for (int b = 0; b < nb; ++b) {
                    int32_t dot = 0;
                    for (int k = b * BK; k < b * BK + BK; ++k)
                        dot += static_cast<int32_t>(a.codes[((static_cast<int64_t>(g) * KP + k / 2) * LANES + lane) * 2 + k % 2])
                             * a.xq->q[static_cast<int64_t>(r) * K + k];
                    const int64_t sb = (static_cast<int64_t>(g) * nb + b) * LANES + lane;
                    acc += static_cast<float>(dot) * (a.scales[sb] * a.xq->s[static_cast<int64_t>(r) * nb + b]);
                    if (a.mins) acc += a.mins[sb] * a.xq->sum[static_cast<int64_t>(r) * nb + b];
                }
                a.y[static_cast<int64_t>(r) * a.N + n] = acc + (a.bias ? a.bias[n] : 0.0f);
            }
}
#endif

}  // namespace

extern "C" {

// 1 where the vpdpwssd path is compiled in (the only case worth routing rows here), else 0.
int i16_gemm_fast() { return I16_FAST; }

// Returns 0, or -1 for shapes it cannot take (K not a multiple of 32, no rows).
int i16_gemm(const float* x, int M, int K, const int16_t* codes, const float* scales, const float* mins,
             const float* bias, float* y, int N, int threads) {
    if (M <= 0 || N <= 0 || K <= 0 || K % BK != 0) return -1;
    static thread_local Quantized xq;  // the caller's thread's scratch
    quantize(x, M, K, xq, threads);
    const Args a{&xq, M, K, N, codes, scales, mins, bias, y};
    const int groups = (N + LANES - 1) / LANES;
    const int col_items = (groups + GC - 1) / GC;
    const int row_items = (M + ROW_CHUNK - 1) / ROW_CHUNK;
#pragma omp parallel for schedule(static) collapse(2) num_threads(threads)
    for (int ri = 0; ri < row_items; ++ri)
        for (int ci = 0; ci < col_items; ++ci) {
            const int g0 = ci * GC, gn = std::min(GC, groups - g0);
            const int rend = std::min(M, (ri + 1) * ROW_CHUNK);
            for (int r0 = ri * ROW_CHUNK; r0 < rend; r0 += ROWS) {
                const int rows = std::min(ROWS, rend - r0);
#if I16_FAST
                switch (gn) {
                    case 3: rows_tile<3>(a, r0, rows, g0); break;
                    case 2: rows_tile<2>(a, r0, rows, g0); break;
                    default: rows_tile<1>(a, r0, rows, g0); break;
                }
#else
                portable(a, r0, rows, g0, gn);
#endif
            }
        }
    return 0;
}

}  // extern "C"
