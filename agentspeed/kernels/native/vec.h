// The float vector type both native kernels compute with: W floats, 16 where the compiler
// targets AVX-512, else 8 (AVX2). GCC/Clang vector extensions, so arithmetic is plain C++.
#pragma once

namespace {

#if defined(__AVX512F__)
constexpr int W = 16;
#else
constexpr int W = 8;
#endif
typedef float vf __attribute__((vector_size(W * 4)));

}  // namespace
