// ggml's weight storage types (the GGUF tensor types), one decoder each. A block of QK
// weights is decoded W weights at a time, straight into a vector register:
//   B::prep(blk, st)         the block's scales as fp32 (once per block)
//   B::get<i>(blk, st)       weights [i*W, (i+1)*W) of the block as fp32, i a constant
// computed as ggml's dequantize_row_* computes them (the same fp32 products; an FMA may
// round once where ggml rounds twice), so a kernel multiplying them with fp32 activations in
// fp32 gives the stored model's product up to summation order. Layouts: ggml-common.h
// (block_q4_0 ... block_q6_K).
//
// Why in registers: a decode step is one pass over the weights, and a decoder that writes
// fp32 to a buffer and reads it back ran at 3.5 GB/s of Q4_K on 2 cores (this one: see
// docs/benchmarks.md, benchmarks/kernels/bench_ggml_linear.py); the bytes are read with
// zero-extending loads (vpmovzxbd) and split into nibbles and bit-planes with integer
// vector ops, with every index a compile-time constant.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "vec.h"
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#ifndef AGENTSPEED_Q8_PF
#define AGENTSPEED_Q8_PF 2048
#endif

namespace {

// Software prefetch distance in bytes of the decode GEMVs' (contiguous) weight stream; 0
// drops it. The hardware prefetcher restarts at every 4 KiB page of the mmapped file.
// Measured on Q4_K 17920x1536 from DRAM, 2 threads (docs/benchmarks.md): none 13.6,
// 512: 16.5, 1024: 19.3, 2048-4096: 23.6 GB/s.
constexpr int PF = AGENTSPEED_Q8_PF;

// Prefetches the lines PF bytes past the block of BYTES bytes at blk (one per 64 bytes; a
// block under 64 bytes still touches every line, as consecutive blocks step by < 64).
template <int BYTES>
inline void prefetch_ahead(const uint8_t* blk) {
    if constexpr (PF > 0)
        for (int o = 0; o < BYTES; o += 64) __builtin_prefetch(blk + PF + o);
}

inline float f16(const uint8_t* p) {
    _Float16 h;
    std::memcpy(&h, p, 2);
    return static_cast<float>(h);
}

// W bytes widened to W int32 lanes (zero- or sign-extended), and W halves to fp32. gcc
// turns __builtin_convertvector of an 8-byte vector into byte extracts, hence intrinsics.
inline vi u8(const uint8_t* p) {
#if defined(__AVX512F__)
    return reinterpret_cast<vi>(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__) && !defined(AGENTSPEED_FORCE_W16)
    return reinterpret_cast<vi>(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
    vi v;
    for (int i = 0; i < W; ++i) v[i] = p[i];
    return v;
#endif
}

inline vi s8(const uint8_t* p) {
#if defined(__AVX512F__)
    return reinterpret_cast<vi>(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__) && !defined(AGENTSPEED_FORCE_W16)
    return reinterpret_cast<vi>(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
    vi v;
    for (int i = 0; i < W; ++i) v[i] = static_cast<int8_t>(p[i]);
    return v;
#endif
}

inline vi u16(const uint8_t* p) {
#if defined(__AVX512F__)
    return reinterpret_cast<vi>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__AVX2__) && !defined(AGENTSPEED_FORCE_W16)
    return reinterpret_cast<vi>(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
    vi v;
    for (int i = 0; i < W; ++i) v[i] = p[2 * i] | (p[2 * i + 1] << 8);
    return v;
#endif
}

inline vf halves(const uint8_t* p) {
#if defined(__AVX512F__)
    return reinterpret_cast<vf>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__F16C__) && !defined(AGENTSPEED_FORCE_W16)
    return reinterpret_cast<vf>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
    vf v;
    for (int i = 0; i < W; ++i) v[i] = f16(p + 2 * i);
    return v;
#endif
}

inline vf tof(vi v) { return __builtin_convertvector(v, vf); }

inline vi lanes() {  // {0, 1, ..., W - 1}
    vi v;
    for (int i = 0; i < W; ++i) v[i] = i;
    return v;
}

// f(std::integral_constant<int, I>) for I in [0, N): the decoders' indices stay constants.
template <int I, int N, class F>
inline __attribute__((always_inline)) void unroll(F&& f) {
    if constexpr (I < N) {
        f(std::integral_constant<int, I>{});
        unroll<I + 1, N>(f);
    }
}

// The GGMLQuantizationType numbers these decoders are for.
enum GgmlType : int {
    F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8,
    Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30, MXFP4 = 39,
};

// Each block type: QK weights in BYTES; weight k = d[k / SUB] * code(k) - m[k / SUB] (m only
// where MIN), with the codes small integers, so a product can also be taken as
// d * sum(code * x) - m * sum(x) per sub-block. prep() fills the fp32 scales, code<I>() gives
// codes [I*W, (I+1)*W) as fp32.
template <int NSUB>
struct Scales { float d[NSUB], m[NSUB]; };

struct BlockF16 {  // F16 rows, taken 32 at a time; the "codes" are the weights
    static constexpr int QK = 32, BYTES = 64, SUB = 32;
    static constexpr bool MIN = false, SCALED = false;
    using State = Scales<1>;
    static void prep(const uint8_t*, State& s) { s.d[0] = 1.0f; }
    template <int I>
    static vf code(const uint8_t* b) { return halves(b + 2 * I * W); }
};

struct BlockBF16 {
    static constexpr int QK = 32, BYTES = 64, SUB = 32;
    static constexpr bool MIN = false, SCALED = false;
    using State = Scales<1>;
    static void prep(const uint8_t*, State& s) { s.d[0] = 1.0f; }
    template <int I>
    static vf code(const uint8_t* b) { return reinterpret_cast<vf>(u16(b + 2 * I * W) << 16); }
};

// Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0: blocks of 32; element e is the low nibble of byte e
// (e < 16) or the high nibble of byte e - 16; Q5 adds bit e of a 32-bit word as 16.
template <int E>
inline vi nibbles(const uint8_t* qs) {
    const vi q = u8(qs + E % 16);
    return E < 16 ? q & 15 : q >> 4;
}

template <int E>
inline vi fifth_bit(const uint8_t* qh) {
    uint32_t h;
    std::memcpy(&h, qh, 4);
    return ((vi{} + static_cast<int32_t>(h >> E)) >> lanes() & 1) << 4;
}

struct Block32 {
    static constexpr int QK = 32, SUB = 32;
    static constexpr bool SCALED = true;
    using State = Scales<1>;
};

struct BlockQ4_0 : Block32 {  // d, 16 bytes of nibbles: w = d * (q - 8)
    static constexpr int BYTES = 18;
    static constexpr bool MIN = false;
    static void prep(const uint8_t* b, State& s) { s.d[0] = f16(b); }
    template <int I>
    static vf code(const uint8_t* b) { return tof(nibbles<I * W>(b + 2) - 8); }
};

struct BlockQ4_1 : Block32 {  // d, m, nibbles: w = d * q + m
    static constexpr int BYTES = 20;
    static constexpr bool MIN = true;
    static void prep(const uint8_t* b, State& s) { s.d[0] = f16(b); s.m[0] = -f16(b + 2); }
    template <int I>
    static vf code(const uint8_t* b) { return tof(nibbles<I * W>(b + 4)); }
};

struct BlockQ5_0 : Block32 {  // d, 32 high bits, nibbles: w = d * (q - 16)
    static constexpr int BYTES = 22;
    static constexpr bool MIN = false;
    static void prep(const uint8_t* b, State& s) { s.d[0] = f16(b); }
    template <int I>
    static vf code(const uint8_t* b) { return tof((nibbles<I * W>(b + 6) | fifth_bit<I * W>(b + 2)) - 16); }
};

struct BlockQ5_1 : Block32 {  // d, m, 32 high bits, nibbles: w = d * q + m
    static constexpr int BYTES = 24;
    static constexpr bool MIN = true;
    static void prep(const uint8_t* b, State& s) { s.d[0] = f16(b); s.m[0] = -f16(b + 2); }
    template <int I>
    static vf code(const uint8_t* b) { return tof(nibbles<I * W>(b + 8) | fifth_bit<I * W>(b + 4)); }
};

struct BlockQ8_0 : Block32 {  // d, 32 int8: w = d * q
    static constexpr int BYTES = 34;
    static constexpr bool MIN = false;
    static void prep(const uint8_t* b, State& s) { s.d[0] = f16(b); }
    template <int I>
    static vf code(const uint8_t* b) { return tof(s8(b + 2 + I * W)); }
};

// MXFP4 (GPT-OSS's experts, llama.cpp's MXFP4_MOE files): an e8m0 exponent byte, then 32 e2m1
// codes as Q4_0's nibbles; w = 2^(e - 128) * v(code), v the e2m1 values doubled (0, 1, 2, 3, 4,
// 6, 8, 12 and their negatives, code bit 3 the sign), as ggml's dequantize_row_mxfp4.
inline float e8m0_half(uint8_t e) {  // 2^(e - 128); e < 2 as ggml gives them, subnormal
    const uint32_t bits = e < 2 ? 0x00200000u << e : static_cast<uint32_t>(e - 1) << 23;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

struct BlockMXFP4 : Block32 {
    static constexpr int BYTES = 17;
    static constexpr bool MIN = false;
    static void prep(const uint8_t* b, State& s) { s.d[0] = e8m0_half(b[0]); }
    template <int I>
    static vf code(const uint8_t* b) {
        const vi c = nibbles<I * W>(b + 1);
        const vi m = c & 7;  // 0..3 as they are; 4..7: (4 or 6) << (m / 2) >> 2 = 4, 6, 8, 12
        const vi mag = m < 4 ? m : (4 + 2 * (m & 1)) << (m >> 1) >> 2;
        return tof((c & 8) != 0 ? -mag : mag);
    }
};

// 256-weight super-blocks ------------------------------------------------------------------

// Q2_K and Q3_K: element e = 128 h + 32 j + 16 p + l sits in bits 2j of byte 32 h + 16 p + l
// (Q3_K: and its third bit in bit 4h + j of hmask[16 p + l]); sub-block (scale) e / 16.
struct BlockQ2_K {  // scales[16] (4-bit scale | 4-bit min), qs[64], d, dmin: w = d sc q - dmin m
    static constexpr int QK = 256, BYTES = 84, SUB = 16;
    static constexpr bool MIN = true, SCALED = true;
    using State = Scales<16>;
    static void prep(const uint8_t* b, State& s) {
        const float d = f16(b + 80), dmin = f16(b + 82);
        for (int i = 0; i < 16; ++i) {
            s.d[i] = d * static_cast<float>(b[i] & 15);
            s.m[i] = dmin * static_cast<float>(b[i] >> 4);
        }
    }
    template <int I>
    static vf code(const uint8_t* b) {
        constexpr int e = I * W, h = e / 128, j = e % 128 / 32, p = e % 32 / 16, l = e % 16;
        return tof(u8(b + 16 + 32 * h + 16 * p + l) >> (2 * j) & 3);
    }
};

struct BlockQ3_K {  // hmask[32], qs[64], scales[12] (16 6-bit, biased by 32), d
    static constexpr int QK = 256, BYTES = 110, SUB = 16;
    static constexpr bool MIN = false, SCALED = true;
    using State = Scales<16>;
    // The 16 six-bit scales packed in 12 bytes at q, unbiased (-32..31).
    static void scales(const uint8_t* q, int8_t sc[16]) {
        uint32_t aux[4];
        std::memcpy(aux, q, 12);
        const uint32_t tmp = aux[2], k1 = 0x03030303u, k2 = 0x0f0f0f0fu;
        aux[2] = ((aux[0] >> 4) & k2) | (((tmp >> 4) & k1) << 4);
        aux[3] = ((aux[1] >> 4) & k2) | (((tmp >> 6) & k1) << 4);
        aux[0] = (aux[0] & k2) | (((tmp >> 0) & k1) << 4);
        aux[1] = (aux[1] & k2) | (((tmp >> 2) & k1) << 4);
        std::memcpy(sc, aux, 16);
        for (int i = 0; i < 16; ++i) sc[i] = static_cast<int8_t>(sc[i] - 32);
    }
    static void prep(const uint8_t* b, State& s) {
        const float d = f16(b + 108);
        int8_t sc[16];
        scales(b + 96, sc);
        for (int i = 0; i < 16; ++i) s.d[i] = d * static_cast<float>(sc[i]);
    }
    template <int I>
    static vf code(const uint8_t* b) {
        constexpr int e = I * W, h = e / 128, j = e % 128 / 32, p = e % 32 / 16, l = e % 16;
        const vi q = u8(b + 32 + 32 * h + 16 * p + l) >> (2 * j) & 3;
        const vi hi = u8(b + 16 * p + l) >> (4 * h + j) & 1;
        return tof(q - 4 + (hi << 2));
    }
};

// The 8 six-bit scales and mins of a Q4_K/Q5_K super-block (12 bytes), four per 32-bit word
// (one at a time they were a third of a Q4_K GEMV row's time).
inline void unpack_k4(const uint8_t* q, uint8_t sc[8], uint8_t mn[8]) {  // the 12 bytes at q
    uint32_t u[3];
    std::memcpy(u, q, 12);
    const uint32_t lo6 = 0x3f3f3f3fu, lo4 = 0x0f0f0f0fu, lo2 = 0x03030303u;
    const uint32_t s[2] = {u[0] & lo6, (u[2] & lo4) | ((u[0] >> 6) & lo2) << 4};
    const uint32_t m[2] = {u[1] & lo6, ((u[2] >> 4) & lo4) | ((u[1] >> 6) & lo2) << 4};
    std::memcpy(sc, s, 8);
    std::memcpy(mn, m, 8);
}

inline void prep_k4(const uint8_t* b, Scales<8>& s) {
    const float d = f16(b), dmin = f16(b + 2);
    uint8_t bytes[2][16] = {};
    unpack_k4(b + 4, bytes[0], bytes[1]);
    const vf dv = tof(u8(bytes[0])) * d, mv = tof(u8(bytes[1])) * dmin;
    for (int j = 0; j < 8; ++j) s.d[j] = dv[j], s.m[j] = mv[j];
}

// Q4_K/Q5_K: element e = 64 j + 32 h + l is nibble h of qs[32 j + l] (Q5_K: plus bit 2j + h
// of qh[l] as 16); sub-block e / 32: w = d sc q - dmin m.
struct BlockQ4_K {  // d, dmin, scales[12], qs[128]
    static constexpr int QK = 256, BYTES = 144, SUB = 32;
    static constexpr bool MIN = true, SCALED = true;
    using State = Scales<8>;
    static void prep(const uint8_t* b, State& s) { prep_k4(b, s); }
    template <int I>
    static vf code(const uint8_t* b) {
        constexpr int e = I * W, j = e / 64, h = e % 64 / 32, l = e % 32;
        const vi q = u8(b + 16 + 32 * j + l);
        return tof(h ? q >> 4 : q & 15);
    }
};

struct BlockQ5_K {  // d, dmin, scales[12], qh[32], qs[128]
    static constexpr int QK = 256, BYTES = 176, SUB = 32;
    static constexpr bool MIN = true, SCALED = true;
    using State = Scales<8>;
    static void prep(const uint8_t* b, State& s) { prep_k4(b, s); }
    template <int I>
    static vf code(const uint8_t* b) {
        constexpr int e = I * W, j = e / 64, h = e % 64 / 32, l = e % 32;
        const vi q = u8(b + 48 + 32 * j + l);
        const vi hi = (u8(b + 16 + l) >> (2 * j + h) & 1) << 4;
        return tof((h ? q >> 4 : q & 15) | hi);
    }
};

// Q6_K: element e = 128 h + 32 g + l: low 4 bits are nibble g / 2 of ql[64 h + 32 (g % 2) + l],
// high 2 bits are bits 2g of qh[32 h + l]; sub-block e / 16 with an int8 scale: w = d sc (q - 32).
struct BlockQ6_K {  // ql[128], qh[64], scales[16], d
    static constexpr int QK = 256, BYTES = 210, SUB = 16;
    static constexpr bool MIN = false, SCALED = true;
    using State = Scales<16>;
    static void prep(const uint8_t* b, State& s) {
        const float d = f16(b + 208);
        for (int i = 0; i < 16; i += W) st(s.d + i, tof(s8(b + 192 + i)) * d);
    }
    template <int I>
    static vf code(const uint8_t* b) {
        constexpr int e = I * W, h = e / 128, g = e % 128 / 32, l = e % 32;
        const vi lo = u8(b + 64 * h + 32 * (g % 2) + l);
        const vi hi = u8(b + 128 + 32 * h + l) >> (2 * g) & 3;
        return tof(((g / 2 ? lo >> 4 : lo & 15) | hi << 4) - 32);
    }
};

// Weights [I*W, (I+1)*W) of a block as fp32, from its codes and prepared scales.
template <class B, int I>
inline vf weights(const uint8_t* b, const typename B::State& s) {
    constexpr int sub = I * W / B::SUB;
    vf w = B::template code<I>(b);
    if constexpr (B::SCALED) w *= s.d[sub];
    if constexpr (B::MIN) w -= s.m[sub];
    return w;
}

// Calls f(Block{}) for the decoder of `type`; returns false for a type with none.
template <class F>
bool with_block(int type, F&& f) {
    switch (type) {
        case F16: f(BlockF16{}); return true;
        case BF16: f(BlockBF16{}); return true;
        case Q4_0: f(BlockQ4_0{}); return true;
        case Q4_1: f(BlockQ4_1{}); return true;
        case Q5_0: f(BlockQ5_0{}); return true;
        case Q5_1: f(BlockQ5_1{}); return true;
        case Q8_0: f(BlockQ8_0{}); return true;
        case MXFP4: f(BlockMXFP4{}); return true;
        case Q2_K: f(BlockQ2_K{}); return true;
        case Q3_K: f(BlockQ3_K{}); return true;
        case Q4_K: f(BlockQ4_K{}); return true;
        case Q5_K: f(BlockQ5_K{}); return true;
        case Q6_K: f(BlockQ6_K{}); return true;
        default: return false;
    }
}

}  // namespace
