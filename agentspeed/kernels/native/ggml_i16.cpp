// Linear layers on packed ggml integer weights with int16 activations: the decode-step
// product (1-8 rows of x), integer multiply-adds of the stored codes (ggml_iblocks.h).
//
//   ggml_quantize_x: x rows to int16 per 256 columns (scale max|x| / 16383, rounded to
//                    nearest), with each 16 columns' sum of the rounded values.
//   ggml_linear_i16: y[r, n] = sum_k xhat[r, k] * W[n, k] + bias[n] for R <= 8 rows of x
//                    (quantized by the above) and the parts W of a merged projection.
//
// Why int16: the fp32 kernel (ggml_gemv) spends ~4 instructions per 8 weights converting
// codes to fp32 and was compute-bound below the memory's speed (Q4_K 1536 x 8960: 7.4 G
// weights/s on one core, docs/benchmarks.md); here a 16-lane vpmaddwd takes codes as
// decoded, and the fp32 work is once per block. The error is the activations' rounding
// only: |y - x W^T| <= sum_k |W[n, k]| dx(k) / 2 with dx(k) the scale of k's 256 columns
// (2^-15 of their largest |x|), plus fp32 rounding of the per-block sums; tests/test_ggml.py
// holds the kernel to that bound. The products of the stored weights with these activations
// are exact integers up to the per-block fp32 multiply.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <omp.h>

#include "ggml_iblocks.h"

namespace {

constexpr int XB = 256;       // activation columns per scale
constexpr int QMAX = 16383;   // the largest |int16 activation| (see ggml_iblocks.h: no overflow)
constexpr int MAX_ROWS = 8;

inline float hsum8(v8f v) {
    float s = 0.0f;
    for (int i = 0; i < 8; ++i) s += v[i];
    return s;
}

inline v8f splatf(float s) { return v8f{} + s; }

inline v8f tof8(v8i v) { return __builtin_convertvector(v, v8f); }

// Output rows [0, N) of one weight for R rows of quantized x. Per block: the int32 sums of
// code * x over its 16-lane groups, one multiply by the block's d; per 256 columns: one by
// the activations' scale; minimums as m[g] * (sum of x over group g), from ggml_quantize_x.
template <int R, class B>
void igemv(const int16_t* xq, const float* dx, const float* xg, const float* xs, int K, const uint8_t* w, int64_t ws,
           int n0, int n1, const float* bias, float* y, int64_t ldy) {
    const int nb = K / B::QK, nxb = (K + XB - 1) / XB;
    constexpr int NG = B::NG, BPX = XB / B::QK;  // groups per block, blocks per activation scale
    for (int n = n0; n < n1; ++n) {
        const uint8_t* row = w + n * ws;
        v8f tot[R] = {}, part[R] = {}, mins[R] = {};
        float mins1[R] = {};
        for (int b = 0; b < nb; ++b) {
            const uint8_t* blk = row + static_cast<int64_t>(b) * B::BYTES;
            typename B::IState st;
            B::iprep(blk, st);
            prefetch_ahead<B::BYTES>(blk);  // ggml_blocks.h: the page-boundary stalls
            v8i acc[R] = {};
            const int16_t* xb = xq + b * B::QK;
            if constexpr (R <= 2) {  // decoded into registers, used at once
                unroll<0, NG>([&](auto gc) {
                    constexpr int G = decltype(gc)::value;
                    const v16s c = B::template icode<G>(blk, st);
                    for (int r = 0; r < R; ++r) acc[r] = dot_acc(acc[r], c, ld16(xb + static_cast<int64_t>(r) * K + 16 * G));
                });
            } else {  // decoded once into L1, then one row at a time (R accumulators spilled: 3x slower)
                v16s c[NG];
                unroll<0, NG>([&](auto gc) { c[decltype(gc)::value] = B::template icode<decltype(gc)::value>(blk, st); });
                for (int r = 0; r < R; ++r) {
                    const int16_t* xr = xb + static_cast<int64_t>(r) * K;
                    v8i a0 = {}, a1 = {};
                    unroll<0, NG / 2>([&](auto gc) {
                        constexpr int G = 2 * decltype(gc)::value;
                        a0 = dot_acc(a0, c[G], ld16(xr + 16 * G));
                        a1 = dot_acc(a1, c[G + 1], ld16(xr + 16 * G + 16));
                    });
                    acc[r] = a0 + a1;
                }
            }
            if constexpr (BPX == 1) {
                for (int r = 0; r < R; ++r) tot[r] += tof8(acc[r]) * splatf(st.d * dx[r * nxb + b]);
            } else {
                const v8f d = splatf(st.d);
                for (int r = 0; r < R; ++r) part[r] += tof8(acc[r]) * d;
                if ((b + 1) % BPX == 0 || b + 1 == nb)
                    for (int r = 0; r < R; ++r) {
                        tot[r] += part[r] * splatf(dx[r * nxb + b / BPX]);
                        part[r] = v8f{};
                    }
            }
            if constexpr (B::MIN) {  // sum_j m[j] * (x's sum over min j's MSUB columns)
                const float* xm = (B::MSUB == 16 ? xg : xs) + b * B::NMIN;
                const int ldm = K / B::MSUB;
                for (int r = 0; r < R; ++r) {
                    if constexpr (B::NMIN >= 8) {
                        for (int i = 0; i < B::NMIN; i += 8) mins[r] += ld8(st.m + i) * ld8(xm + r * ldm + i);
                    } else {
                        for (int i = 0; i < B::NMIN; ++i) mins1[r] += st.m[i] * xm[r * ldm + i];
                    }
                }
            }
        }
        const float bn = bias ? bias[n] : 0.0f;
        for (int r = 0; r < R; ++r) y[r * ldy + n] = hsum8(tot[r]) - hsum8(mins[r]) - mins1[r] + bn;
    }
}

}  // namespace

extern "C" {

// xq[R][K] int16, dx[R][ceil(K / 256)] fp32, xg[R][K / 16] and xs[R][K / 32] fp32 (dx times
// each 16 and 32 columns' sum of xq). Returns 0; -1 when K is not a multiple of 32.
int ggml_quantize_x(const float* x, int R, int64_t ldx, int K, int16_t* xq, float* dx, float* xg, float* xs) {
    if (K % 32) return -1;
    const int nxb = (K + XB - 1) / XB;
    for (int r = 0; r < R; ++r) {
        const float* xr = x + r * ldx;
        int16_t* qr = xq + static_cast<int64_t>(r) * K;
        for (int b = 0; b < nxb; ++b) {
            const int k0 = b * XB, k1 = std::min(K, k0 + XB);
            float amax = 0.0f;
            for (int k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(xr[k]));
            const float d = amax / QMAX, id = amax > 0.0f ? QMAX / amax : 0.0f;
            dx[r * nxb + b] = d;
            for (int g = k0; g < k1; g += 16) {
                int sum = 0;
                for (int k = g; k < g + 16; ++k) {
                    const int q = std::clamp(static_cast<int>(std::nearbyint(xr[k] * id)), -QMAX, QMAX);
                    qr[k] = static_cast<int16_t>(q);
                    sum += q;
                }
                xg[r * (K / 16) + g / 16] = d * static_cast<float>(sum);
                if (g % 32) xs[r * (K / 32) + g / 32] = xg[r * (K / 16) + g / 16 - 1] + xg[r * (K / 16) + g / 16];
            }
        }
    }
    return 0;
}

// y[:, offs[p] + n] = xhat @ W_p[n].T + bias for the parts p of a merged projection (each a
// weight of rows[p] rows of an integer type at ws[p], row stride strides[p]), for R <= 8 rows
// of x (unit column stride) quantized here: one call and one parallel region per layer
// projection (per part, the fork/join and the small parts' imbalance cost ~10 us each).
// Returns 0; -1 for a part without an int16 decoder or K not whole blocks; -2 for R outside
// [1, 8]; -3 for K not a multiple of 32.
int ggml_linear_i16(const float* x, int R, int64_t ldx, int K, int nparts, const int* types,
                    const uint8_t* const* ws, const int64_t* strides, const int* rows, const int* offs,
                    const float* bias, float* y, int64_t ldy, int threads) {
    if (R < 1 || R > MAX_ROWS) return -2;
    if (K % 32) return -3;
    int total = 0;
    for (int p = 0; p < nparts; ++p) {
        bool ok = false;
        with_iblock(types[p], [&](auto blk) { ok = K % decltype(blk)::QK == 0; });
        if (!ok) return -1;
        total += rows[p];
    }
    const int nxb = (K + XB - 1) / XB;
    static thread_local std::vector<int16_t> xq;
    static thread_local std::vector<float> xf;
    xq.resize(static_cast<size_t>(R) * K);
    xf.resize(static_cast<size_t>(R) * (nxb + K / 16 + K / 32));
    float* dx = xf.data();
    float* xg = dx + R * nxb;
    float* xs = xg + R * (K / 16);
    ggml_quantize_x(x, R, ldx, K, xq.data(), dx, xg, xs);
    const int16_t* q = xq.data();
#pragma omp parallel num_threads(threads)
    {
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int lo = static_cast<int>(static_cast<int64_t>(total) * t / nt);
        const int hi = static_cast<int>(static_cast<int64_t>(total) * (t + 1) / nt);
        int base = 0;  // first flattened row of part p
        for (int p = 0; p < nparts; base += rows[p], ++p) {
            const int n0 = std::max(lo - base, 0), n1 = std::min(hi - base, rows[p]);
            if (n0 >= n1) continue;
            const float* bp = bias ? bias + offs[p] : nullptr;
            float* yp = y + offs[p];
            with_iblock(types[p], [&](auto blk) {
                using B = decltype(blk);
                switch (R) {
#define CASE(r) case r: igemv<r, B>(q, dx, xg, xs, K, ws[p], strides[p], n0, n1, bp, yp, ldy); break;
                    CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
                }
            });
        }
    }
    return 0;
}

// 1 where `type` has an int16 decoder.
int ggml_has_i16(int type) {
    return with_iblock(type, [](auto) {}) ? 1 : 0;
}

}  // extern "C"
