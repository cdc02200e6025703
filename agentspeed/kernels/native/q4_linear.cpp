// y = x @ W.T + bias for a few rows of x (decode), with W held in blocks of 32 along the
// input dimension:
//   q4_linear: 4-bit codes, an fp32 scale and minimum per block: W = scale * code + min
//              (GGUF Q4_1); codes [N, K/32, 16] bytes, byte j = code[j] | code[j + 16] << 4;
//   q8_linear: int8 codes and a scale per block: W = scale * code (GGUF Q8_0); codes [N, K].
// scales (and mins) are [N, K/32]. Output rows are split across OpenMP threads.
//
// Why: a decode step streams every weight once; fp32 weights are 4 bytes each, these are
// 0.75 / 1.125. The Python side only builds these forms when they reproduce the fp32 weights
// bit for bit (GGUF weights do: they were dequantized from exactly this), so the product is
// the fp32 one up to summation order.

#include <cstdint>
#include <cstring>

#include <omp.h>

#include "vec.h"
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int NVB = 32 / W;  // vectors per block
constexpr int PAIR = W == 16 ? 2 : 1;  // weight rows per pass (register budget: see block_rows)

inline float hsum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < W; ++i) s += v[i];
    return s;
}

// The row loop both formats share. decode(n, b, w) writes block b of weight row n as NVB
// fp32 vectors; R (rows of x) is a compile-time constant so the accumulators stay in registers.
// With 32 vector registers (AVX-512) two weight rows are done together, so each x vector
// loaded feeds two FMAs (measured 3.50 -> 3.19 ms at 8 rows, bench_q4_linear.py; equal at
// 1-2 rows).
template <int R, int NN, class Decode>
void block_rows(const float* x, int K, const float* bias, float* y, int N, int threads, Decode decode) {
    const int nb = K / 32;
    const int groups = (N + NN - 1) / NN;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int gi = 0; gi < groups; ++gi) {
        const int n0 = gi * NN;
        const int nn = N - n0 < NN ? N - n0 : NN;  // the last group may be short
        vf acc[NN][R] = {};
        for (int b = 0; b < nb; ++b) {
            vf w[NN][NVB];
            for (int u = 0; u < NN; ++u) decode(n0 + (u < nn ? u : 0), b, w[u]);
            for (int r = 0; r < R; ++r) {
                const float* xr = x + static_cast<int64_t>(r) * K + b * 32;
                for (int i = 0; i < NVB; ++i) {
                    vf xv;
                    std::memcpy(&xv, xr + i * W, sizeof(vf));
                    for (int u = 0; u < NN; ++u) acc[u][r] += xv * w[u][i];
                }
            }
        }
        for (int u = 0; u < nn; ++u)
            for (int r = 0; r < R; ++r)
                y[static_cast<int64_t>(r) * N + n0 + u] = hsum(acc[u][r]) + (bias ? bias[n0 + u] : 0.0f);
    }
}

// Runs block_rows on groups of up to 8 rows of x.
template <class Decode>
int all_rows(const float* x, int R, int K, const float* bias, float* y, int N, int threads, Decode decode) {
    if (R <= 0 || K % 32 != 0) return -1;
    for (int r0 = 0; r0 < R; r0 += 8) {
        const int n = R - r0 < 8 ? R - r0 : 8;
        const float* xr = x + static_cast<int64_t>(r0) * K;
        float* yr = y + static_cast<int64_t>(r0) * N;
        switch (n) {
#define CASE(r) case r: block_rows<r, PAIR>(xr, K, bias, yr, N, threads, decode); break;
            CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
        }
    }
    return 0;
}

}  // namespace

extern "C" int q4_linear(const float* x, int R, int K, const uint8_t* codes, const float* scales,
                         const float* mins, const float* bias, float* y, int N, int threads) {
    const int nb = K / 32;
    return all_rows(x, R, K, bias, y, N, threads, [=](int n, int b, vf* w) {
        const int64_t blk = static_cast<int64_t>(n) * nb + b;
        const uint8_t* c = codes + blk * 16;
        const float d = scales[blk], m = mins[blk];
#if defined(__AVX512F__)
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
        w[0] = reinterpret_cast<vf>(_mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)))) * d + m;
        w[1] = reinterpret_cast<vf>(_mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4))) * d + m;
#elif defined(__AVX2__)
        for (int h = 0; h < 2; ++h) {
            const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + 8 * h)));
            w[h] = reinterpret_cast<vf>(_mm256_cvtepi32_ps(_mm256_and_si256(bytes, _mm256_set1_epi32(15)))) * d + m;
            w[2 + h] = reinterpret_cast<vf>(_mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4))) * d + m;
        }
#else
        for (int i = 0; i < NVB; ++i)
            for (int j = 0; j < W; ++j) {
                const int e = i * W + j;  // element of the block
                w[i][j] = static_cast<float>(e < 16 ? c[e] & 15 : c[e - 16] >> 4) * d + m;
            }
#endif
    });
}

extern "C" int q8_linear(const float* x, int R, int K, const int8_t* codes, const float* scales,
                         const float* bias, float* y, int N, int threads) {
    const int nb = K / 32;
    return all_rows(x, R, K, bias, y, N, threads, [=](int n, int b, vf* w) {
        const int64_t blk = static_cast<int64_t>(n) * nb + b;
        const int8_t* c = codes + blk * 32;
        const float d = scales[blk];
#if defined(__AVX512F__)
        for (int h = 0; h < 2; ++h)
            w[h] = reinterpret_cast<vf>(_mm512_cvtepi32_ps(
                       _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 16 * h))))) * d;
#elif defined(__AVX2__)
        for (int h = 0; h < 4; ++h)
            w[h] = reinterpret_cast<vf>(_mm256_cvtepi32_ps(
                       _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + 8 * h))))) * d;
#else
        for (int i = 0; i < NVB; ++i)
            for (int j = 0; j < W; ++j) w[i][j] = static_cast<float>(c[i * W + j]) * d;
#endif
    });
}
