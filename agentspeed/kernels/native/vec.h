// The float vector type the native kernels compute with: W floats, 16 where the compiler
// targets AVX-512, else 8 (AVX2), and the few vector helpers they share. GCC/Clang vector
// extensions, so arithmetic is plain C++.
#pragma once

#include <cstdint>
#include <cstring>

namespace {

// AGENTSPEED_FORCE_W16 builds 16-lane vectors without AVX-512 (the compiler splits them), so
// an AVX2 machine can test the AVX-512 build's indexing (tests/test_ggml.py builds
// ggml_linear.cpp alone that way; the other kernels' intrinsics assume the native width).
#if defined(__AVX512F__) || defined(AGENTSPEED_FORCE_W16)
constexpr int W = 16;
#else
constexpr int W = 8;
#endif
typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));

inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// 2^x for x <= 0 (scores minus their running max); 0 below -126. Degree-6 Taylor
// polynomial of 2^f on |f| <= 0.5 (relative error ~1e-7) times 2^n put into the exponent
// bits. n = -trunc(0.5 - x) rounds x to nearest (the add-and-subtract-a-magic-number trick
// would be folded away under -ffast-math).
inline vf vexp2(vf x) {
    const vf lo = vf{} - 126.0f;
    vf xc = x < lo ? lo : x;
    vi ni = -__builtin_convertvector(0.5f - xc, vi);
    vf f = xc - __builtin_convertvector(ni, vf);
    vf p = vf{} + 1.5403530393381606e-4f;
    p = p * f + 1.3333558146428443e-3f;
    p = p * f + 9.6181291076284772e-3f;
    p = p * f + 5.5504108664821580e-2f;
    p = p * f + 2.4022650695910072e-1f;
    p = p * f + 6.9314718055994531e-1f;
    p = p * f + 1.0f;
    vf r = reinterpret_cast<vf>(reinterpret_cast<vi>(p) + (ni << 23));
    return x < lo ? vf{} : r;
}

inline vf ld(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof(vf));
    return v;
}

inline void st(float* p, vf v) { std::memcpy(p, &v, sizeof(vf)); }

}  // namespace
