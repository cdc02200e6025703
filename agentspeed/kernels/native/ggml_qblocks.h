// ggml's K-quant super-blocks (Q4_K, Q5_K, Q6_K) as unsigned 8-bit codes for u8 x s8 integer
// products with int8 activations (ggml_q8.cpp: decode steps; ggml_gemm_q8.cpp: many rows):
//   B::prep(blk, st)        the block's d, integer sub-block scales and fp32 minimums (IState)
//   B::codes<G>(blk, st)    the unsigned codes of weights [32G, 32G + 32), natural order
//   B::scale<G>(st)         their int16 scale lanes, for dot_u8's pair sums
// w = d * scale * code - m (Q4_K, Q5_K: m per 32 weights) or d * scale * (code - 32) (Q6_K).
#pragma once

#include <cstdint>
#include <cstring>

#include "ggml_iblocks.h"  // IState, scale unpacking, sub_splat, f16

namespace {
typedef int8_t v32b __attribute__((vector_size(32)));

inline v32b ld32(const void* p) {
    v32b v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

inline v32b srl4(v32b v) {  // each byte's high nibble (the bytes are treated as unsigned)
    typedef uint8_t u32b __attribute__((vector_size(32)));
    return reinterpret_cast<v32b>(reinterpret_cast<u32b>(v) >> 4);
}

inline v32b splat8(int8_t c) { return v32b{} + c; }

// Lanes 0-7 (the first 16 weights) scale j, lanes 8-15 scale j + 1 (Q6_K's 16-weight
// sub-blocks under one 32-weight product).
template <int j, class S>
inline v16s pair_splat(const S& s) {
#if defined(__AVX2__)
    constexpr int k = j % 8;
    const __m256i ctl = _mm256_setr_epi8(2 * k, 2 * k + 1, 2 * k, 2 * k + 1, 2 * k, 2 * k + 1, 2 * k, 2 * k + 1,
                                         2 * k, 2 * k + 1, 2 * k, 2 * k + 1, 2 * k, 2 * k + 1, 2 * k, 2 * k + 1,
                                         2 * k + 2, 2 * k + 3, 2 * k + 2, 2 * k + 3, 2 * k + 2, 2 * k + 3, 2 * k + 2, 2 * k + 3,
                                         2 * k + 2, 2 * k + 3, 2 * k + 2, 2 * k + 3, 2 * k + 2, 2 * k + 3, 2 * k + 2, 2 * k + 3);
    return reinterpret_cast<v16s>(_mm256_shuffle_epi8(reinterpret_cast<__m256i>(s.sv[j / 8]), ctl));
#else
    v16s v;
    for (int i = 0; i < 16; ++i) v[i] = s.sc[j + i / 8];
    return v;
#endif
}

// A block type's 8 products of 32 codes: codes<G>(blk, st) the unsigned codes of weights
// [32G, 32G + 32), scale<G>(st) their int16 scale lanes. w = d * scale * code - m (Q4_K, Q5_K:
// m per 32 weights) or d * scale * (code - 32) (Q6_K: the offset through the 16-column sums).
struct QBlockQ4_K {
    static constexpr int BYTES = 144;
    static constexpr bool MIN = true;
    using IState = ::IState<8, 8>;
    static void prep(const uint8_t* b, IState& s) { iprep_k4(b, s); }
    template <int G>  // element 64 j + 32 h + l: low (h = 0) or high nibble of qs[32 j + l]
    static v32b codes(const uint8_t* b, const IState&) {
        const v32b q = ld32(b + 16 + 32 * (G / 2));
        return G % 2 ? srl4(q) : q & 15;
    }
    template <int G>
    static v16s scale(const IState& s) { return sub_splat<G>(s); }
};

struct QBlockQ5_K {
    static constexpr int BYTES = 176;
    static constexpr bool MIN = true;
    using IState = ::IState<8, 8>;
    static void prep(const uint8_t* b, IState& s) { iprep_k4(b, s); }
    template <int G>  // as Q4_K at qs = b + 48, fifth bit 2 j + h of qh[l] = b[16 + l]
    static v32b codes(const uint8_t* b, const IState&) {
        const v32b q = ld32(b + 48 + 32 * (G / 2));
        typedef uint8_t u32b __attribute__((vector_size(32)));
        const v32b hi = reinterpret_cast<v32b>((reinterpret_cast<u32b>(ld32(b + 16)) >> G & 1) << 4);
        return (G % 2 ? srl4(q) : q & 15) | hi;
    }
    template <int G>
    static v16s scale(const IState& s) { return sub_splat<G>(s); }
};

struct QBlockQ6_K {
    static constexpr int BYTES = 210;
    static constexpr bool MIN = false;
    using IState = ::IState<16, 0>;
    static void prep(const uint8_t* b, IState& s) { IBlockQ6_K::iprep(b, s); }
    template <int G>  // element 128 h + 32 g + l, G = 4 h + g: nibble of ql, bits 2g.. of qh
    static v32b codes(const uint8_t* b, const IState&) {
        constexpr int h = G / 4, g = G % 4;
        const v32b lo = ld32(b + 64 * h + 32 * (g % 2));
        typedef uint8_t u32b __attribute__((vector_size(32)));
        const v32b hi = reinterpret_cast<v32b>((reinterpret_cast<u32b>(ld32(b + 128 + 32 * h)) >> (2 * g) & 3) << 4);
        return (g / 2 ? srl4(lo) : lo & 15) | hi;
    }
    template <int G>
    static v16s scale(const IState& s) { return pair_splat<2 * G>(s); }
};

}  // namespace
