// ggml's integer block types decoded to int16 for integer dot products with int16
// activations (ggml_i16.cpp). A block of QK weights is taken 16 at a time, in the natural
// element order, as int16 lanes:
//   B::iprep(blk, st)      the block's scale d, its integer sub-block scales and, where the
//                          type has minimums, its fp32 minimum per MSUB weights m[]
//   B::icode<G>(blk, st)   weights [16G, 16G + 16) as int16 c with w = d * c - m[16G / MSUB]
// c is the stored code times its integer sub-block scale (Q4_K: q * sc, at most 15 * 63), so
// a block's 16-lane integer products need one fp32 multiply by d per block. The largest |c|
// is Q6_K's 32 * 128 = 4096; with activations of at most 2^14 - 1 a lane of int32 sums 32
// products of one 256-weight block, at most 2^31 - 2^17, so no sum overflows.
//
// Fixed 256-bit vectors on every build (AVX2's width; AVX-512 machines run them too, with
// VNNI's vpdpwssd fusing the multiply-add where the CPU has it); the portable build loops.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "ggml_blocks.h"  // f16, unroll, the scale unpacking shared with the fp32 decoders

namespace {

typedef int16_t v16s __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v8f __attribute__((vector_size(32)));

inline v16s splat16(int s) {
#if defined(__AVX2__)
    return reinterpret_cast<v16s>(_mm256_set1_epi16(static_cast<int16_t>(s)));  // a loop gives 16 inserts
#else
    v16s v;
    for (int i = 0; i < 16; ++i) v[i] = static_cast<int16_t>(s);
    return v;
#endif
}

// 16 bytes zero- or sign-extended to int16 lanes.
inline v16s zx16(const uint8_t* p) {
#if defined(__AVX2__)
    return reinterpret_cast<v16s>(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
    v16s v;
    for (int i = 0; i < 16; ++i) v[i] = p[i];
    return v;
#endif
}

inline v16s sx16(const uint8_t* p) {
#if defined(__AVX2__)
    return reinterpret_cast<v16s>(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
    v16s v;
    for (int i = 0; i < 16; ++i) v[i] = static_cast<int8_t>(p[i]);
    return v;
#endif
}

inline v16s ld16(const int16_t* p) {
    v16s v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

inline v8f ld8(const float* p) {
    v8f v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

// acc + pairwise products of a and b (lane i: a[2i] b[2i] + a[2i+1] b[2i+1]).
inline v8i dot_acc(v8i acc, v16s a, v16s b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return reinterpret_cast<v8i>(_mm256_dpwssd_epi32(reinterpret_cast<__m256i>(acc), reinterpret_cast<__m256i>(a),
                                                     reinterpret_cast<__m256i>(b)));
#elif defined(__AVXVNNI__)
    return reinterpret_cast<v8i>(_mm256_dpwssd_avx_epi32(reinterpret_cast<__m256i>(acc),
                                                         reinterpret_cast<__m256i>(a), reinterpret_cast<__m256i>(b)));
#elif defined(__AVX2__)
    return acc + reinterpret_cast<v8i>(_mm256_madd_epi16(reinterpret_cast<__m256i>(a), reinterpret_cast<__m256i>(b)));
#else
    for (int i = 0; i < 8; ++i) acc[i] += a[2 * i] * b[2 * i] + a[2 * i + 1] * b[2 * i + 1];
    return acc;
#endif
}

// Lane t: bit t of `bits` (the low 16 used) as `value`, else 0.
inline v16s bit_lanes(uint32_t bits, int16_t value) {
    v16s lanes;
    for (int i = 0; i < 16; ++i) lanes[i] = static_cast<int16_t>(1 << i);
    return ((splat16(static_cast<int16_t>(bits)) & lanes) != 0) & splat16(value);
}

// d, the integer sub-block scales (NSC of them, as the type stores them), and the fp32
// minimums, one per MSUB weights (NMIN of them; none without minimums).
template <int NSC, int NMIN>
struct IState {
    float d;
    int16_t sc[NSC > 0 ? NSC : 1];
    float m[NMIN > 0 ? NMIN : 1];
    v16s sv[NSC > 8 ? 2 : 1];  // on AVX2: scales [8i, 8i + 8) in each 128-bit half of sv[i]
};

// sv from the sub-block scales as int16 (n = 8 or 16), for sub_splat.
template <class S>
inline void spread_scales(S& s, int n) {
#if defined(__AVX2__)
    for (int i = 0; i < n / 8; ++i)
        s.sv[i] = reinterpret_cast<v16s>(_mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s.sc + 8 * i))));
#else
    (void)s, (void)n;
#endif
}

// Lanes all equal to sub-block scale j: one in-lane byte shuffle of spread scales (a
// broadcast from the scalar took 3 instructions; a third of Q4_K's single-core time).
template <int j, class S>
inline v16s sub_splat(const S& s) {
#if defined(__AVX2__)
    constexpr int k = j % 8;
    return reinterpret_cast<v16s>(_mm256_shuffle_epi8(reinterpret_cast<__m256i>(s.sv[j / 8]),
                                                      _mm256_set1_epi16(static_cast<int16_t>((2 * k + 1) << 8 | 2 * k))));
#else
    return splat16(s.sc[j]);
#endif
}

// 32-weight types: no sub-block scale.
template <bool MIN_>
struct IBlock32 {
    static constexpr int QK = 32, NG = 2, MSUB = 32, NMIN = MIN_ ? 1 : 0;
    static constexpr bool MIN = MIN_;
    using IState = ::IState<0, NMIN>;
};

struct IBlockQ4_0 : IBlock32<false> {  // d, 16 bytes of nibbles: w = d (q - 8)
    static constexpr int BYTES = 18;
    static void iprep(const uint8_t* b, IState& s) { s.d = f16(b); }
    template <int G>
    static v16s icode(const uint8_t* b, const IState&) { return (G ? zx16(b + 2) >> 4 : zx16(b + 2) & 15) - 8; }
};

struct IBlockQ4_1 : IBlock32<true> {  // d, m, nibbles: w = d q + m
    static constexpr int BYTES = 20;
    static void iprep(const uint8_t* b, IState& s) { s.d = f16(b); s.m[0] = -f16(b + 2); }
    template <int G>
    static v16s icode(const uint8_t* b, const IState&) { return G ? zx16(b + 4) >> 4 : zx16(b + 4) & 15; }
};

inline uint32_t word(const uint8_t* p) {
    uint32_t h;
    std::memcpy(&h, p, 4);
    return h;
}

struct IBlockQ5_0 : IBlock32<false> {  // d, 32 fifth bits, nibbles: w = d (q - 16)
    static constexpr int BYTES = 22;
    static void iprep(const uint8_t* b, IState& s) { s.d = f16(b); }
    template <int G>
    static v16s icode(const uint8_t* b, const IState&) {
        const v16s q = G ? zx16(b + 6) >> 4 : zx16(b + 6) & 15;
        return (q | bit_lanes(word(b + 2) >> (16 * G), 16)) - 16;
    }
};

struct IBlockQ5_1 : IBlock32<true> {  // d, m, 32 fifth bits, nibbles: w = d q + m
    static constexpr int BYTES = 24;
    static void iprep(const uint8_t* b, IState& s) { s.d = f16(b); s.m[0] = -f16(b + 2); }
    template <int G>
    static v16s icode(const uint8_t* b, const IState&) {
        const v16s q = G ? zx16(b + 8) >> 4 : zx16(b + 8) & 15;
        return q | bit_lanes(word(b + 4) >> (16 * G), 16);
    }
};

struct IBlockQ8_0 : IBlock32<false> {  // d, 32 int8: w = d q
    static constexpr int BYTES = 34;
    static void iprep(const uint8_t* b, IState& s) { s.d = f16(b); }
    template <int G>
    static v16s icode(const uint8_t* b, const IState&) { return sx16(b + 2 + 16 * G); }
};

struct IBlockMXFP4 : IBlock32<false> {  // e8m0 exponent, 32 e2m1 nibbles: w = 2^(e - 128) v(q)
    static constexpr int BYTES = 17;
    static void iprep(const uint8_t* b, IState& s) { s.d = e8m0_half(b[0]); }
    template <int G>
    static v16s icode(const uint8_t* b, const IState&) {
#if defined(__AVX2__)
        // the nibbles' doubled e2m1 values by one byte shuffle, then widened
        const __m128i lut = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 1));
        const __m128i q = _mm_and_si128(G ? _mm_srli_epi16(raw, 4) : raw, _mm_set1_epi8(15));
        return reinterpret_cast<v16s>(_mm256_cvtepi8_epi16(_mm_shuffle_epi8(lut, q)));
#else
        static constexpr int8_t lut[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
        v16s v;
        for (int i = 0; i < 16; ++i) v[i] = lut[(G ? b[1 + i] >> 4 : b[1 + i]) & 15];
        return v;
#endif
    }
};

// 256-weight super-blocks; element layouts as in ggml_blocks.h.
struct IBlock256 {
    static constexpr int QK = 256, NG = 16;
};

struct IBlockQ2_K : IBlock256 {  // scales[16] (scale | min << 4), qs[64], d, dmin
    static constexpr int BYTES = 84, MSUB = 16, NMIN = 16;
    static constexpr bool MIN = true;
    using IState = ::IState<16, NMIN>;
    static void iprep(const uint8_t* b, IState& s) {
        s.d = f16(b + 80);
        const float dmin = f16(b + 82);
        for (int g = 0; g < 16; ++g) s.sc[g] = b[g] & 15;
        for (int g = 0; g < 16; ++g) s.m[g] = dmin * static_cast<float>(b[g] >> 4);
        spread_scales(s, 16);
    }
    template <int G>
    static v16s icode(const uint8_t* b, const IState& s) {  // G = 8 h + 2 j + p
        constexpr int h = G / 8, j = G % 8 / 2, p = G % 2;
        return (zx16(b + 16 + 32 * h + 16 * p) >> (2 * j) & 3) * sub_splat<G>(s);
    }
};

struct IBlockQ3_K : IBlock256 {  // hmask[32], qs[64], scales[12] (6-bit, biased by 32), d
    static constexpr int BYTES = 110, MSUB = 16, NMIN = 0;
    static constexpr bool MIN = false;
    using IState = ::IState<16, 0>;
    static void iprep(const uint8_t* b, IState& s) {
        s.d = f16(b + 108);
        int8_t sc[16];
        BlockQ3_K::scales(b + 96, sc);
        for (int g = 0; g < 16; ++g) s.sc[g] = sc[g];
        spread_scales(s, 16);
    }
    template <int G>
    static v16s icode(const uint8_t* b, const IState& s) {  // G = 8 h + 2 j + p
        constexpr int h = G / 8, j = G % 8 / 2, p = G % 2;
        const v16s q = zx16(b + 32 + 32 * h + 16 * p) >> (2 * j) & 3;
        const v16s hi = zx16(b + 16 * p) >> (4 * h + j) & 1;
        return (q - 4 + (hi << 2)) * sub_splat<G>(s);
    }
};

// The 8 six-bit scales and mins of a Q4_K/Q5_K super-block (12 bytes), four per 32-bit
// word; the mins as fp32 (dmin * min) by one vector convert.
template <class S>
inline void iprep_k4(const uint8_t* b, S& s) {
    s.d = f16(b);
    const float dmin = f16(b + 2);
    uint8_t sc8[8], mn8[8];
    unpack_k4(b + 4, sc8, mn8);
    for (int j = 0; j < 8; ++j) s.sc[j] = sc8[j];
    spread_scales(s, 8);
#if defined(__AVX2__)
    uint64_t m64;
    std::memcpy(&m64, mn8, 8);
    const __m256 mv = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(m64)))),
                                    _mm256_set1_ps(dmin));
    _mm256_storeu_ps(s.m, mv);
#else
    for (int j = 0; j < 8; ++j) s.m[j] = dmin * static_cast<float>(mn8[j]);
#endif
}

struct IBlockQ4_K : IBlock256 {  // d, dmin, scales[12], qs[128]; element 64 j + 32 h + l
    static constexpr int BYTES = 144, MSUB = 32, NMIN = 8;
    static constexpr bool MIN = true;
    using IState = ::IState<8, NMIN>;
    static void iprep(const uint8_t* b, IState& s) { iprep_k4(b, s); }
    template <int G>
    static v16s icode(const uint8_t* b, const IState& s) {
        constexpr int j = G / 4, h = G / 2 % 2, l = 16 * (G % 2);
        const v16s q = zx16(b + 16 + 32 * j + l);
        return (h ? q >> 4 : q & 15) * sub_splat<G / 2>(s);
    }
};

struct IBlockQ5_K : IBlock256 {  // d, dmin, scales[12], qh[32], qs[128]
    static constexpr int BYTES = 176, MSUB = 32, NMIN = 8;
    static constexpr bool MIN = true;
    using IState = ::IState<8, NMIN>;
    static void iprep(const uint8_t* b, IState& s) { iprep_k4(b, s); }
    template <int G>
    static v16s icode(const uint8_t* b, const IState& s) {
        constexpr int j = G / 4, h = G / 2 % 2, l = 16 * (G % 2);
        const v16s q = zx16(b + 48 + 32 * j + l);
        const v16s hi = (zx16(b + 16 + l) >> (2 * j + h) & 1) << 4;
        return ((h ? q >> 4 : q & 15) | hi) * sub_splat<G / 2>(s);
    }
};

struct IBlockQ6_K : IBlock256 {  // ql[128], qh[64], scales[16] (int8), d; element 128 h + 32 g + l
    static constexpr int BYTES = 210, MSUB = 16, NMIN = 0;
    static constexpr bool MIN = false;
    using IState = ::IState<16, 0>;
    static void iprep(const uint8_t* b, IState& s) {
        s.d = f16(b + 208);
        for (int g = 0; g < 16; ++g) s.sc[g] = static_cast<int8_t>(b[192 + g]);
        spread_scales(s, 16);
    }
    template <int G>
    static v16s icode(const uint8_t* b, const IState& s) {
        constexpr int h = G / 8, g = G % 8 / 2, l = 16 * (G % 2);
        const v16s lo = zx16(b + 64 * h + 32 * (g % 2) + l), qh = zx16(b + 128 + 32 * h + l);
        const v16s hi = (g < 2 ? qh << (4 - 2 * g) : qh >> (2 * g - 4)) & 0x30;  // bits 2g, 2g+1 as 16, 32
        return (((g / 2 ? lo >> 4 : lo & 15) | hi) - 32) * sub_splat<G>(s);
    }
};

// Calls f(IBlock{}) for the int16 decoder of `type` (GgmlType numbers); false for a type
// without one (F16 and BF16 keep fp32 products).
template <class F>
bool with_iblock(int type, F&& f) {
    switch (type) {
        case 2: f(IBlockQ4_0{}); return true;
        case 3: f(IBlockQ4_1{}); return true;
        case 6: f(IBlockQ5_0{}); return true;
        case 7: f(IBlockQ5_1{}); return true;
        case 8: f(IBlockQ8_0{}); return true;
        case 10: f(IBlockQ2_K{}); return true;
        case 11: f(IBlockQ3_K{}); return true;
        case 12: f(IBlockQ4_K{}); return true;
        case 13: f(IBlockQ5_K{}); return true;
        case 14: f(IBlockQ6_K{}); return true;
        case 39: f(IBlockMXFP4{}); return true;
        default: return false;
    }
}

}  // namespace
