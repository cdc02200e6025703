// Decode-step linear layers on packed K-quant weights with 8-bit activations, llama.cpp's
// scheme (its Q8_K): x rounded to int8 per 256 columns, each 32 stored codes (unsigned) times
// 32 activations in one u8 x s8 multiply-add, the block's integer sub-block scales in a
// second.
//
//   ggml_quantize_q8: x rows to int8 per 256 columns (scale max|x| / 127, rounded to nearest),
//                     with each 16 columns' sum of the rounded values.
//   ggml_linear_q8:   ggml_linear_i16's contract (ggml_i16.cpp) for parts of the types that
//                     have a kernel here (Q4_K, Q5_K, Q6_K).
//
// Why: the int16 kernel takes 16 codes per vpdpwssd after widening them; vpmaddubsw takes 32
// as stored bytes, and a vpdpwssd (AVX-512 VNNI / AVX-VNNI; vpmaddwd + vpaddd on AVX2) then
// applies the sub-block scale to 16 pair sums. That halves the multiply-adds and drops the
// widening, which is where the int16 kernel spends its time on K-quants (docs/benchmarks.md).
// The price is the coarser rounding: |y - x W^T| <= sum_k |W[n, k]| dx(k) / 2 with dx(k) =
// max|x| / 127 of k's 256 columns, 129x the int16 bound; tests/test_ggml.py holds the kernel to
// it. The integer sums are exact: a u8 x s8 pair is at most 2 * 63 * 127 < 2^15 (no
// saturation), and a block's int32 lanes stay below 2^25.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <omp.h>

#include "ggml_qblocks.h"  // the K-quant blocks as u8 codes

namespace {

constexpr int XB = 256;  // activation columns per scale (one K-quant super-block)
constexpr int QMAX = 127;
constexpr int MAX_ROWS = 8;

// acc + sum over lane pairs of (u[2i] x[2i] + u[2i+1] x[2i+1]) * s[i] for unsigned codes u
// (< 64), signed activations x and int16 scales s: 32 products into 8 int32 lanes.
inline v8i dot_u8(v8i acc, v32b u, v32b x, v16s s) {
#if defined(__AVX2__)
    const v16s p = reinterpret_cast<v16s>(_mm256_maddubs_epi16(reinterpret_cast<__m256i>(u), reinterpret_cast<__m256i>(x)));
    return dot_acc(acc, p, s);
#else
    for (int i = 0; i < 8; ++i) {
        int a = 0;
        for (int t = 0; t < 4; ++t)
            a += static_cast<uint8_t>(u[4 * i + t]) * x[4 * i + t] * s[2 * i + t / 2];
        acc[i] += a;
    }
    return acc;
#endif
}

template <class F>
bool with_qblock(int type, F&& f) {
    switch (type) {
        case 12: f(QBlockQ4_K{}); return true;
        case 13: f(QBlockQ5_K{}); return true;
        case 14: f(QBlockQ6_K{}); return true;
        default: return false;
    }
}

inline float hsum8(v8f v) {
    float s = 0.0f;
    for (int i = 0; i < 8; ++i) s += v[i];
    return s;
}

inline v8f splatf(float s) { return v8f{} + s; }

// Output rows [0, N) for R rows of x quantized by ggml_quantize_q8: xq int8 [R][K], dx
// [R][K / 256], bs int16 [R][K / 16] (sums of xq), xs fp32 [R][K / 32] (dx times the 32-column
// sums, for the minimums).
template <int R, class B>
void qgemv(const int8_t* xq, const float* dx, const int16_t* bs, const float* xs, int K, const uint8_t* w,
           int64_t ws, int n0, int n1, const float* bias, float* y, int64_t ldy) {
    const int nb = K / XB;
    for (int n = n0; n < n1; ++n) {
        const uint8_t* row = w + n * ws;
        v8f tot[R] = {}, mins[R] = {};
        for (int b = 0; b < nb; ++b) {
            const uint8_t* blk = row + static_cast<int64_t>(b) * B::BYTES;
            typename B::IState st;
            B::prep(blk, st);
            prefetch_ahead<B::BYTES>(blk);  // ggml_blocks.h: the page-boundary stalls
            // A accumulators per row: vpdpwssd's latency chains the 8 products of a block into
            // one dependency; with few rows, split chains keep the multiply-add ports busy.
            constexpr int A = R == 1 ? 4 : R < 4 ? 2 : 1;
            v8i part[R][A] = {};
            const int8_t* xb = xq + static_cast<int64_t>(b) * XB;
            unroll<0, 8>([&](auto gc) {
                constexpr int G = decltype(gc)::value;
                const v32b c = B::template codes<G>(blk, st);
                const v16s s = B::template scale<G>(st);
                for (int r = 0; r < R; ++r)
                    part[r][G % A] = dot_u8(part[r][G % A], c, ld32(xb + static_cast<int64_t>(r) * K + 32 * G), s);
            });
            v8i acc[R];
            for (int r = 0; r < R; ++r) {
                acc[r] = part[r][0];
                for (int a = 1; a < A; ++a) acc[r] += part[r][a];
            }
            if constexpr (!B::MIN) {  // Q6_K: minus 32 * sum_g scale_g * (column sum of xq over g's 16)
                const v16s sc = ld16(st.sc);
                for (int r = 0; r < R; ++r) {
                    const v8i off = dot_acc(v8i{}, sc, ld16(bs + static_cast<int64_t>(r) * (K / 16) + 16 * b));
                    acc[r] -= off << 5;
                }
            }
            for (int r = 0; r < R; ++r) {
                tot[r] += __builtin_convertvector(acc[r], v8f) * splatf(st.d * dx[r * nb + b]);
                if constexpr (B::MIN) mins[r] += ld8(st.m) * ld8(xs + static_cast<int64_t>(r) * (K / 32) + 8 * b);
            }
        }
        const float bn = bias ? bias[n] : 0.0f;
        for (int r = 0; r < R; ++r) y[r * ldy + n] = hsum8(tot[r]) - hsum8(mins[r]) + bn;
    }
}

}  // namespace

extern "C" {

// x [R][K] (row stride ldx) to xq int8 [R][K], dx [R][K / 256], bs int16 [R][K / 16] and xs
// fp32 [R][K / 32] (see qgemv). Returns 0; -1 when K is not a multiple of 256.
int ggml_quantize_q8(const float* x, int R, int64_t ldx, int K, int8_t* xq, float* dx, int16_t* bs, float* xs) {
    if (K % XB) return -1;
    const int nb = K / XB;
    for (int r = 0; r < R; ++r) {
        const float* xr = x + r * ldx;
        int8_t* qr = xq + static_cast<int64_t>(r) * K;
        for (int b = 0; b < nb; ++b) {
            const int k0 = b * XB;
            float amax = 0.0f;
            for (int k = k0; k < k0 + XB; ++k) amax = std::max(amax, std::fabs(xr[k]));
            const float d = amax / QMAX, id = amax > 0.0f ? QMAX / amax : 0.0f;
            dx[r * nb + b] = d;
            for (int g = k0; g < k0 + XB; g += 16) {
                int sum = 0;
                for (int k = g; k < g + 16; ++k) {
                    const int q = std::clamp(static_cast<int>(std::nearbyint(xr[k] * id)), -QMAX, QMAX);
                    qr[k] = static_cast<int8_t>(q);
                    sum += q;
                }
                bs[static_cast<int64_t>(r) * (K / 16) + g / 16] = static_cast<int16_t>(sum);
                if (g % 32) {
                    const int16_t* p = bs + static_cast<int64_t>(r) * (K / 16) + g / 16 - 1;
                    xs[static_cast<int64_t>(r) * (K / 32) + g / 32] = d * static_cast<float>(p[0] + p[1]);
                }
            }
        }
    }
    return 0;
}

// ggml_linear_i16's arguments and results (ggml_i16.cpp), for parts whose types all have a
// kernel here; -1 also for a part of another type, -3 for K not a multiple of 256.
int ggml_linear_q8(const float* x, int R, int64_t ldx, int K, int nparts, const int* types,
                   const uint8_t* const* ws, const int64_t* strides, const int* rows, const int* offs,
                   const float* bias, float* y, int64_t ldy, int threads) {
    if (R < 1 || R > MAX_ROWS) return -2;
    if (K % XB) return -3;
    int total = 0;
    for (int p = 0; p < nparts; ++p) {
        if (!with_qblock(types[p], [](auto) {})) return -1;
        total += rows[p];
    }
    static thread_local std::vector<int8_t> xq;
    static thread_local std::vector<int16_t> bs;
    static thread_local std::vector<float> xf;
    xq.resize(static_cast<size_t>(R) * K);
    bs.resize(static_cast<size_t>(R) * (K / 16));
    xf.resize(static_cast<size_t>(R) * (K / XB + K / 32));
    float* dx = xf.data();
    float* xs = dx + R * (K / XB);
    ggml_quantize_q8(x, R, ldx, K, xq.data(), dx, bs.data(), xs);
    const int8_t* q = xq.data();
    const int16_t* s = bs.data();
#pragma omp parallel num_threads(threads)
    {
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int lo = static_cast<int>(static_cast<int64_t>(total) * t / nt);
        const int hi = static_cast<int>(static_cast<int64_t>(total) * (t + 1) / nt);
        int base = 0;
        for (int p = 0; p < nparts; base += rows[p], ++p) {
            const int n0 = std::max(lo - base, 0), n1 = std::min(hi - base, rows[p]);
            if (n0 >= n1) continue;
            const float* bp = bias ? bias + offs[p] : nullptr;
            float* yp = y + offs[p];
            with_qblock(types[p], [&](auto blk) {
                using B = decltype(blk);
                switch (R) {
#define CASE(r) case r: qgemv<r, B>(q, dx, s, xs, K, ws[p], strides[p], n0, n1, bp, yp, ldy); break;
                    CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
                }
            });
        }
    }
    return 0;
}

// 1 where `type` has a kernel here.
int ggml_has_q8(int type) {
    return with_qblock(type, [](auto) {}) ? 1 : 0;
}

}  // extern "C"
