// Element-wise ops of a transformer block, each one pass over its rows:
//   silu_and_mul: out[t, i] = silu(x[t, i]) * x[t, d + i]
//   rms_norm:     out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight
//   rope_neox:    NeoX rotary embedding of q and k rows (the first `rot` dims of each head;
//                 the rest copied), reading strided views (q and k are column slices of the
//                 fused qkv output) and writing contiguous outputs.
//
// Why native: torch runs these as several ops with temporaries, and its silu over the
// strided half of a [T, 2d] tensor is slow on this CPU: SmolLM2's silu_and_mul measured
// 1.07 ms at 300 rows and 7.4 ms at 2,000 (30 layers: a quarter of a 2,000-token prefill's
// linear time), rope 4.1 ms at 2,000 rows.
//
// Rows are split across OpenMP threads only when there are enough of them to pay for the
// fork/join (a decode step has a handful of rows).

#include <cmath>
#include <cstdint>

#include <omp.h>

#include "vec.h"

namespace {

constexpr float LOG2E = 1.4426950408889634f;
constexpr int64_t PARALLEL_ELEMS = 1 << 15;  // below this, one thread

// silu(x) = x * sigmoid(x), with e = exp(-|x|) <= 1 so nothing overflows:
// sigmoid(x) = 1 / (1 + e) for x >= 0, e / (1 + e) otherwise.
inline vf vsilu(vf x) {
    const vf ax = x < 0.0f ? -x : x;
    const vf e = vexp2(ax * -LOG2E);
    const vf sig = (x < 0.0f ? e : vf{} + 1.0f) / (1.0f + e);
    return x * sig;
}

inline float silu1(float x) {
    const float e = std::exp(-std::fabs(x));
    return x * (x < 0.0f ? e : 1.0f) / (1.0f + e);
}

}  // namespace

extern "C" {

// x [T, 2d] with row stride x_stride (elements); out [T, d] with row stride out_stride. out may
// be x itself (its gate half): each output element reads only its own gate and up values.
int silu_and_mul(const float* x, int64_t x_stride, int64_t T, int64_t d, float* out, int64_t out_stride,
                 int threads) {
    if (T < 0 || d <= 0 || x_stride < 2 * d || out_stride < d) return -1;
    const int nt = T * d >= PARALLEL_ELEMS ? threads : 1;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t t = 0; t < T; ++t) {
        const float* a = x + t * x_stride;
        const float* b = a + d;
        float* o = out + t * out_stride;
        int64_t i = 0;
        for (; i + W <= d; i += W) st(o + i, vsilu(ld(a + i)) * ld(b + i));
        for (; i < d; ++i) o[i] = silu1(a[i]) * b[i];
    }
    return 0;
}

// x [T, n] with row stride x_stride; weight [n]; out [T, n] contiguous.
int rms_norm(const float* x, int64_t x_stride, int64_t T, int64_t n, const float* weight, float eps,
             float* out, int threads) {
    if (T < 0 || n <= 0 || x_stride < n) return -1;
    const int nt = T * n >= PARALLEL_ELEMS ? threads : 1;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t t = 0; t < T; ++t) {
        const float* a = x + t * x_stride;
        float* o = out + t * n;
        vf acc = vf{};
        int64_t i = 0;
        for (; i + W <= n; i += W) {
            const vf v = ld(a + i);
            acc += v * v;
        }
        float ss = 0.0f;
        for (int j = 0; j < W; ++j) ss += acc[j];
        for (; i < n; ++i) ss += a[i] * a[i];
        const float r = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
        i = 0;
        for (; i + W <= n; i += W) st(o + i, ld(a + i) * r * ld(weight + i));
        for (; i < n; ++i) o[i] = a[i] * r * weight[i];
    }
    return 0;
}

// q [T, H, D] with token stride q_stride and head stride D; k [T, KVH, D] likewise;
// cos_sin [T, rot] = cos | sin (rot/2 each), rot <= D and even. Outputs contiguous.
int rope_neox(const float* q, int64_t q_stride, const float* k, int64_t k_stride, const float* cos_sin,
              int64_t T, int H, int KVH, int D, int rot, float* q_out, float* k_out, int threads) {
    if (T < 0 || H <= 0 || KVH < 0 || D <= 0 || rot <= 0 || rot > D || rot % 2) return -1;
    const int half = rot / 2;
    const int nt = T * (H + KVH) * D >= PARALLEL_ELEMS ? threads : 1;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t t = 0; t < T; ++t) {
        const float* c = cos_sin + t * rot;
        const float* s = c + half;
        for (int h = 0; h < H + KVH; ++h) {
            const float* x = h < H ? q + t * q_stride + h * D : k + t * k_stride + (h - H) * D;
            float* o = h < H ? q_out + (t * H + h) * D : k_out + (t * KVH + h - H) * D;
            int i = 0;
            for (; i + W <= half; i += W) {
                const vf x1 = ld(x + i), x2 = ld(x + half + i), cv = ld(c + i), sv = ld(s + i);
                st(o + i, x1 * cv - x2 * sv);
                st(o + half + i, x2 * cv + x1 * sv);
            }
            for (; i < half; ++i) {
                o[i] = x[i] * c[i] - x[half + i] * s[i];
                o[half + i] = x[half + i] * c[i] + x[i] * s[i];
            }
            for (int j = rot; j < D; ++j) o[j] = x[j];
        }
    }
    return 0;
}

}  // extern "C"
