// y = x @ W.T + bias for a few rows of x (decode), with W held as 4-bit codes in blocks of 32
// along the input dimension, each block with an fp32 scale and minimum: W = scale * code + min.
//
// Why: a decode step streams every weight once; fp32 weights are 4 bytes each, these are
// 0.75 (16 bytes of codes + 8 of scale/min per 32). The Python side only builds this form
// when it reproduces the fp32 weights bit for bit (GGUF Q4_1 weights do: they were
// dequantized from exactly this), so the product is the fp32 one up to summation order.
//
// Layout: codes [N, K/32, 16] bytes, byte j of a block = code[j] | code[j + 16] << 4;
// scales, mins [N, K/32]. Output rows are split across OpenMP threads. q8_linear below does
// the same for 8-bit codes with a scale only (GGUF Q8_0).

#include <cstdint>
#include <cstring>

#include <omp.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int MAX_ROWS = 16;
#if defined(__AVX512F__)
constexpr int WQ = 16;
#else
constexpr int WQ = 8;
#endif
typedef float qvf __attribute__((vector_size(WQ * 4)));
constexpr int NVB = 32 / WQ;  // vectors per block

inline float hsum(qvf v) {
    float s = 0.0f;
    for (int i = 0; i < WQ; ++i) s += v[i];
    return s;
}

}  // namespace

namespace {
template <int R>
void q4_rows(const float* x, int K, const uint8_t* codes, const float* scales,
             const float* mins, const float* bias, float* y, int N, int threads) {
    const int nb = K / 32;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int n = 0; n < N; ++n) {
        qvf acc[R] = {};  // in registers: R is a compile-time constant
        const uint8_t* cn = codes + static_cast<int64_t>(n) * nb * 16;
        for (int b = 0; b < nb; ++b) {
            const uint8_t* c = cn + b * 16;
            const float d = scales[static_cast<int64_t>(n) * nb + b], m = mins[static_cast<int64_t>(n) * nb + b];
            qvf w[NVB];
#if defined(__AVX512F__)
            const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
            const __m512i lo = _mm512_and_si512(bytes, _mm512_set1_epi32(15));
            const __m512i hi = _mm512_srli_epi32(bytes, 4);
            w[0] = reinterpret_cast<qvf>(_mm512_cvtepi32_ps(lo)) * d + m;
            w[1] = reinterpret_cast<qvf>(_mm512_cvtepi32_ps(hi)) * d + m;
#elif defined(__AVX2__)
            for (int h = 0; h < 2; ++h) {
                const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + 8 * h)));
                const __m256i lo = _mm256_and_si256(bytes, _mm256_set1_epi32(15));
                const __m256i hi = _mm256_srli_epi32(bytes, 4);
                w[h] = reinterpret_cast<qvf>(_mm256_cvtepi32_ps(lo)) * d + m;
                w[2 + h] = reinterpret_cast<qvf>(_mm256_cvtepi32_ps(hi)) * d + m;
            }
#else
            float q[32];
            for (int j = 0; j < 16; ++j) {
                q[j] = static_cast<float>(c[j] & 15);
                q[j + 16] = static_cast<float>(c[j] >> 4);
            }
            for (int i = 0; i < NVB; ++i) {
                std::memcpy(&w[i], q + i * WQ, sizeof(qvf));
                w[i] = w[i] * d + m;
            }
#endif
            for (int r = 0; r < R; ++r) {
                const float* xr = x + static_cast<int64_t>(r) * K + b * 32;
                for (int i = 0; i < NVB; ++i) {
                    qvf xv;
                    std::memcpy(&xv, xr + i * WQ, sizeof(qvf));
                    acc[r] += xv * w[i];
                }
            }
        }
        for (int r = 0; r < R; ++r)
            y[static_cast<int64_t>(r) * N + n] = hsum(acc[r]) + (bias ? bias[n] : 0.0f);
    }
}

// The same for 8-bit codes (GGUF Q8_0): W = scale * code, codes int8 [N, K/32, 32].
template <int R>
void q8_rows(const float* x, int K, const int8_t* codes, const float* scales, const float* bias, float* y,
             int N, int threads) {
    const int nb = K / 32;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int n = 0; n < N; ++n) {
        qvf acc[R] = {};
        const int8_t* cn = codes + static_cast<int64_t>(n) * K;
        for (int b = 0; b < nb; ++b) {
            const int8_t* c = cn + b * 32;
            const float d = scales[static_cast<int64_t>(n) * nb + b];
            qvf w[NVB];
#if defined(__AVX512F__)
            for (int h = 0; h < 2; ++h)
                w[h] = reinterpret_cast<qvf>(_mm512_cvtepi32_ps(
                           _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 16 * h))))) * d;
#elif defined(__AVX2__)
            for (int h = 0; h < 4; ++h)
                w[h] = reinterpret_cast<qvf>(_mm256_cvtepi32_ps(
                           _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + 8 * h))))) * d;
#else
            for (int i = 0; i < NVB; ++i)
                for (int j = 0; j < WQ; ++j) w[i][j] = static_cast<float>(c[i * WQ + j]) * d;
#endif
            for (int r = 0; r < R; ++r) {
                const float* xr = x + static_cast<int64_t>(r) * K + b * 32;
                for (int i = 0; i < NVB; ++i) {
                    qvf xv;
                    std::memcpy(&xv, xr + i * WQ, sizeof(qvf));
                    acc[r] += xv * w[i];
                }
            }
        }
        for (int r = 0; r < R; ++r)
            y[static_cast<int64_t>(r) * N + n] = hsum(acc[r]) + (bias ? bias[n] : 0.0f);
    }
}

}  // namespace

extern "C" int q4_linear(const float* x, int R, int K, const uint8_t* codes, const float* scales,
                         const float* mins, const float* bias, float* y, int N, int threads) {
    if (R <= 0 || R > MAX_ROWS || K % 32 != 0) return -1;
    switch (R) {
#define CASE(r) case r: q4_rows<r>(x, K, codes, scales, mins, bias, y, N, threads); return 0;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
        default:
            // more rows: in groups of 8 (the caller uses the dense path well before this)
            for (int r0 = 0; r0 < R; r0 += 8) {
                const int n = R - r0 < 8 ? R - r0 : 8;
                if (n != 8) return q4_linear(x + static_cast<int64_t>(r0) * K, n, K, codes, scales, mins, bias,
                                             y + static_cast<int64_t>(r0) * N, N, threads);
                q4_rows<8>(x + static_cast<int64_t>(r0) * K, K, codes, scales, mins, bias,
                           y + static_cast<int64_t>(r0) * N, N, threads);
            }
            return 0;
    }
}

extern "C" int q8_linear(const float* x, int R, int K, const int8_t* codes, const float* scales,
                         const float* bias, float* y, int N, int threads) {
    if (R <= 0 || K % 32 != 0) return -1;
    for (int r0 = 0; r0 < R; r0 += 8) {
        const int n = R - r0 < 8 ? R - r0 : 8;
        const float* xr = x + static_cast<int64_t>(r0) * K;
        float* yr = y + static_cast<int64_t>(r0) * N;
        switch (n) {
#define CASE(r) case r: q8_rows<r>(xr, K, codes, scales, bias, yr, N, threads); break;
            CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
        }
    }
    return 0;
}
