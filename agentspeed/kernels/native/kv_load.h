// Reading one vector of W stored K/V values as fp32, for every cache storage type the
// kernels take (fp32, bf16, fp16, fp8 e4m3 with per-token scales). Shared by the decode and
// prefill attention kernels so both convert identically.
#pragma once

#include <cstdint>
#include <cstring>

#include "vec.h"
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

enum Dtype : int { F32 = 0, BF16 = 1, F16 = 2, FP8_E4M3 = 3 };

typedef uint16_t vu16 __attribute__((vector_size(W * 2)));
typedef uint32_t vu32 __attribute__((vector_size(W * 4)));
typedef _Float16 vh __attribute__((vector_size(W * 2)));
typedef uint8_t vu8 __attribute__((vector_size(W)));

// e4m3 bits placed into an fp16 (sign to bit 15, exponent+mantissa to bits 13..7) read as
// the e4m3 value times 2^-8, subnormals included (fp16's exponent bias is 8 more than
// e4m3's); the vectorised path converts this way and multiplies the 2^8 into the per-token
// scale. (e4m3's NaN pattern is never stored: quantize_fp8 scales into range.)
constexpr float FP8_VIA_F16 = 256.0f;

template <int DT>
inline vf loadw(const void* base, int64_t elem) {
    vf f;
    if constexpr (DT == F32) {
        std::memcpy(&f, static_cast<const float*>(base) + elem, sizeof(vf));
    } else if constexpr (DT == BF16) {
#if defined(__AVX512F__)
        // one widening load + shift (the generic form compiles to two 256-bit halves)
        __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + elem));
        return reinterpret_cast<vf>(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)));
#else
        vu16 raw;
        std::memcpy(&raw, static_cast<const uint16_t*>(base) + elem, sizeof(vu16));
        vu32 w = __builtin_convertvector(raw, vu32) << 16;
        std::memcpy(&f, &w, sizeof(vf));
#endif
    } else if constexpr (DT == F16) {
        const void* p = static_cast<const uint16_t*>(base) + elem;
#if defined(__AVX512F__)
        return reinterpret_cast<vf>(_mm512_cvtph_ps(_mm256_loadu_si256(static_cast<const __m256i*>(p))));
#elif defined(__F16C__)
        return reinterpret_cast<vf>(_mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(p))));
#else
        vh h;
        std::memcpy(&h, p, sizeof(vh));
        f = __builtin_convertvector(h, vf);
#endif
    } else {
        const void* p = static_cast<const uint8_t*>(base) + elem;
#if defined(__AVX512F__)
        __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(static_cast<const __m128i*>(p)));
        __m256i bits = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x80)), 8),
                                       _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x7f)), 7));
        return reinterpret_cast<vf>(_mm512_cvtph_ps(bits));
#elif defined(__F16C__)
        __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64(static_cast<const __m128i*>(p)));
        __m128i bits = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x80)), 8),
                                    _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x7f)), 7));
        return reinterpret_cast<vf>(_mm256_cvtph_ps(bits));
#else
        vu8 raw;
        std::memcpy(&raw, p, sizeof(vu8));
        vu16 w = __builtin_convertvector(raw, vu16);
        vu16 bits = ((w & 0x80) << 8) | ((w & 0x7f) << 7);
        vh h;
        std::memcpy(&h, &bits, sizeof(vh));
        f = __builtin_convertvector(h, vf);
#endif
    }
    return f;
}

}  // namespace
