// Many-row linear layers (prefill chunks, steps of more than 8 rows) on packed weights with
// int8 activations, llama.cpp's scheme for its prefill: x rounded to int8 per 256 columns
// (ggml_quantize_q8, the decode kernel's rounding), each stored code times an activation in
// integers, one fp32 scale per sub-block.
//
//   ggml_gemm_q8:      ggml_linear_i16's contract (ggml_i16.cpp) at any row count, for parts
//                      of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K with K a multiple
//                      of 256.
//   ggml_gemm_q8_fast: 1 where this build has the AVX-512 VNNI loop (else a portable loop of
//                      the same arithmetic, for tests and for correctness anywhere).
//
// How: NT = 32 weight rows of KC columns are unpacked once per call into an L1/L2 panel
// of unsigned codes, 4 columns of one row per 32-bit word with the 32 rows side by side, and
// an fp32 scale sc and offset mn per sub-block of S columns (w = sc * code - mn; signed codes
// take +128 or the type's offset into mn). Then every 4 rows of x run over it: one vpdpbusd
// takes 16 rows' words times 4 broadcast activations (64 u8 x s8 products into 16 int32
// lanes, four times the multiply-adds of an fp32 FMA), each sub-block's int32 sums are
// scaled once, and the sums of the rounded activations per sub-block carry mn. Error: the
// decode kernel's, |y - x W^T| <= sum_k |W[n, k]| dx(k) / 2 plus fp32 rounding of the
// per-sub-block sums; integer sums are exact (a code is < 256, a 32-column sum < 2^20).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "ggml_qblocks.h"  // the K-quant blocks as u8 codes

extern "C" int ggml_quantize_q8(const float* x, int R, int64_t ldx, int K, int8_t* xq, float* dx, int16_t* bs,
                                float* xs);

namespace {

constexpr int XB = 256;  // activation columns per scale
constexpr int NT = 32;   // weight rows per panel: two 16-lane vectors
constexpr int KCB = 4;   // super-blocks per panel: 32 KB of codes
constexpr int MR = 4;    // rows of x per register tile

// 256 weights as w[k] = sc[k / S] * q[k] - mn[k / S] with unsigned codes q.
struct Unpacked {
    uint8_t q[XB];
    float sc[16], mn[16];
};

template <class B>  // a K-quant super-block (ggml_qblocks.h)
struct UnpackK {
    static constexpr int BYTES = B::BYTES, S = B::MIN ? 32 : 16;
    static void unpack(const uint8_t* b, Unpacked& u) {
        typename B::IState st;
        B::prep(b, st);
        unroll<0, 8>([&](auto gc) {
            constexpr int G = decltype(gc)::value;
            const v32b c = B::template codes<G>(b, st);
            std::memcpy(u.q + 32 * G, &c, 32);
        });
        for (int j = 0; j < XB / S; ++j) {
            u.sc[j] = st.d * st.sc[j];
            u.mn[j] = B::MIN ? st.m[j] : 32.0f * u.sc[j];  // Q6_K: w = sc (q - 32)
        }
    }
};

// Eight 32-weight blocks of the legacy types as one 256-column unit: d (and m), then the
// codes; HI: the fifth bits (32 of them after d/m), OFF: the code offset (w = d (q - OFF)),
// MINF: a stored m (w = d q + m). Q8_0's signed bytes flip to q + 128.
typedef uint8_t v16u __attribute__((vector_size(16)));

inline v16u ld16u(const uint8_t* p) {
    v16u v;
    std::memcpy(&v, p, 16);
    return v;
}

// Byte l of the result: bit l of the 16 bits at h, as 16 (a Q5 code's fifth bit).
inline v16u fifth(const uint8_t* h) {
    const v16u sel = {h[0], h[0], h[0], h[0], h[0], h[0], h[0], h[0], h[1], h[1], h[1], h[1], h[1], h[1], h[1], h[1]};
    const v16u bit = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    return reinterpret_cast<v16u>((sel & bit) != 0) & 16;
}

template <int BYTES1, int OFF, bool MINF, bool HI, bool Q8 = false>
struct Unpack32 {
    static constexpr int BYTES = 8 * BYTES1, S = 32;
    static void unpack(const uint8_t* b, Unpacked& u) {
        for (int j = 0; j < 8; ++j) {
            const uint8_t* blk = b + j * BYTES1;
            const float d = f16(blk);
            u.sc[j] = d;
            u.mn[j] = MINF ? -f16(blk + 2) : OFF * d;
            uint8_t* q = u.q + 32 * j;
            v16u lo, hi;
            if constexpr (Q8) {
                lo = ld16u(blk + 2) ^ 0x80;
                hi = ld16u(blk + 18) ^ 0x80;
            } else {
                const v16u qs = ld16u(blk + 2 + 2 * MINF + 4 * HI);
                lo = qs & 15;
                hi = qs >> 4;
                if constexpr (HI) {
                    lo |= fifth(blk + 2 + 2 * MINF);
                    hi |= fifth(blk + 4 + 2 * MINF);
                }
            }
            std::memcpy(q, &lo, 16);
            std::memcpy(q + 16, &hi, 16);
        }
    }
};

template <class F>
bool with_unpack(int type, F&& f) {
    switch (type) {
        case 2: f(Unpack32<18, 8, false, false>{}); return true;         // Q4_0
        case 3: f(Unpack32<20, 0, true, false>{}); return true;          // Q4_1
        case 6: f(Unpack32<22, 16, false, true>{}); return true;         // Q5_0
        case 7: f(Unpack32<24, 0, true, true>{}); return true;           // Q5_1
        case 8: f(Unpack32<34, 128, false, false, true>{}); return true;  // Q8_0
        case 12: f(UnpackK<QBlockQ4_K>{}); return true;
        case 13: f(UnpackK<QBlockQ5_K>{}); return true;
        case 14: f(UnpackK<QBlockQ6_K>{}); return true;
        default: return false;
    }
}

// NT rows x KCB super-blocks: codes as words [block][64 column quads][NT], sc and mn as
// [block][sub-block][NT].
struct Panel {
    uint32_t codes[KCB * 64 * NT];
    float sc[KCB * 16 * NT], mn[KCB * 16 * NT];
};

template <class U>
void fill(const uint8_t* w, int64_t ws, int rows, int nb, Panel& p) {
    if (rows < NT) std::memset(&p, 0, sizeof p);  // absent rows: zero codes and scales
    Unpacked u;
    for (int i = 0; i < rows; ++i)
        for (int b = 0; b < nb; ++b) {
            U::unpack(w + i * ws + b * U::BYTES, u);
            uint32_t* c = p.codes + b * 64 * NT + i;
            for (int g = 0; g < 64; ++g) std::memcpy(c + g * NT, u.q + 4 * g, 4);
            for (int j = 0; j < XB / U::S; ++j) {
                p.sc[(b * 16 + j) * NT + i] = u.sc[j];
                p.mn[(b * 16 + j) * NT + i] = u.mn[j];
            }
        }
}

// The activations as the tiles read them: int8 codes [R][K], scales [R][K / 256], and the
// sums of the codes per S columns as fp32 [R][K / S].
struct XQ {
    const int8_t* q;
    const float* dx;
    const float* sum;
    int64_t K;
};

// y[m][0, NT) += x rows [m0, m0 + M) times the panel's nb super-blocks from super-block kb.
template <int M, int S>
void tile(const Panel& p, int nb, const XQ& x, int kb, int m0, float* y, int64_t ldy, int rows) {
    constexpr int J = XB / S, KG = S / 4;
    const int64_t nsub = x.K / S, nxb = x.K / XB;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    const __mmask16 k0 = static_cast<__mmask16>(rows >= 16 ? 0xffff : (1u << rows) - 1);
    const __mmask16 k1 = static_cast<__mmask16>(rows >= NT ? 0xffff : rows <= 16 ? 0 : (1u << (rows - 16)) - 1);
    for (int b = 0; b < nb; ++b) {
        __m512 blk[M][2];
        for (int m = 0; m < M; ++m) blk[m][0] = blk[m][1] = _mm512_setzero_ps();
        for (int j = 0; j < J; ++j) {
            __m512i acc[M][2];
            for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
            const uint32_t* c = p.codes + (b * 64 + j * KG) * NT;
            const int8_t* xb = x.q + (static_cast<int64_t>(m0) * x.K + (kb + b) * XB + j * S);
            for (int g = 0; g < KG; ++g) {
                const __m512i w0 = _mm512_loadu_si512(c + g * NT), w1 = _mm512_loadu_si512(c + g * NT + 16);
                for (int m = 0; m < M; ++m) {
                    int32_t q4;
                    std::memcpy(&q4, xb + m * x.K + 4 * g, 4);
                    const __m512i xv = _mm512_set1_epi32(q4);
                    acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], w0, xv);
                    acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], w1, xv);
                }
            }
            const float* sc = p.sc + (b * 16 + j) * NT;
            const float* mn = p.mn + (b * 16 + j) * NT;
            const __m512 s0 = _mm512_loadu_ps(sc), s1 = _mm512_loadu_ps(sc + 16);
            const __m512 n0 = _mm512_loadu_ps(mn), n1 = _mm512_loadu_ps(mn + 16);
            for (int m = 0; m < M; ++m) {
                const __m512 xs = _mm512_set1_ps(x.sum[(m0 + m) * nsub + (kb + b) * J + j]);
                blk[m][0] = _mm512_fnmadd_ps(n0, xs, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][0]), s0, blk[m][0]));
                blk[m][1] = _mm512_fnmadd_ps(n1, xs, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][1]), s1, blk[m][1]));
            }
        }
        for (int m = 0; m < M; ++m) {
            const __m512 d = _mm512_set1_ps(x.dx[(m0 + m) * nxb + kb + b]);
            float* yr = y + (m0 + m) * ldy;
            _mm512_mask_storeu_ps(yr, k0, _mm512_fmadd_ps(blk[m][0], d, _mm512_maskz_loadu_ps(k0, yr)));
            _mm512_mask_storeu_ps(yr + 16, k1, _mm512_fmadd_ps(blk[m][1], d, _mm512_maskz_loadu_ps(k1, yr + 16)));
        }
    }
#else
    const uint8_t* codes = reinterpret_cast<const uint8_t*>(p.codes);
    for (int b = 0; b < nb; ++b)
        for (int m = 0; m < M; ++m) {
            float blk[NT] = {};
            const int8_t* xr = x.q + (m0 + m) * x.K + (kb + b) * XB;
            for (int j = 0; j < J; ++j) {
                const float xs = x.sum[(m0 + m) * nsub + (kb + b) * J + j];
                for (int n = 0; n < NT; ++n) {
                    int32_t acc = 0;
                    for (int g = j * KG; g < (j + 1) * KG; ++g)
                        for (int t = 0; t < 4; ++t) acc += codes[((b * 64 + g) * NT + n) * 4 + t] * xr[4 * g + t];
                    const int s = (b * 16 + j) * NT + n;
                    blk[n] += static_cast<float>(acc) * p.sc[s] - p.mn[s] * xs;
                }
            }
            const float d = x.dx[(m0 + m) * nxb + kb + b];
            for (int n = 0; n < std::min(rows, NT); ++n) y[(m0 + m) * ldy + n] += blk[n] * d;
        }
#endif
}

template <class U>
void run_panel_rows(const Panel& p, int nb, const XQ& x, int kb, int R, float* y, int64_t ldy, int rows) {
    int m0 = 0;
    for (; m0 + MR <= R; m0 += MR) tile<MR, U::S>(p, nb, x, kb, m0, y, ldy, rows);
    switch (R - m0) {
        case 1: tile<1, U::S>(p, nb, x, kb, m0, y, ldy, rows); break;
        case 2: tile<2, U::S>(p, nb, x, kb, m0, y, ldy, rows); break;
        case 3: tile<3, U::S>(p, nb, x, kb, m0, y, ldy, rows); break;
        default: break;
    }
}

}  // namespace

extern "C" {

// ggml_linear_i16's arguments and results (ggml_i16.cpp) at any R >= 1; -1 for a part of a
// type without a kernel here, -3 for K not a multiple of 256.
int ggml_gemm_q8(const float* x, int R, int64_t ldx, int K, int nparts, const int* types,
                 const uint8_t* const* ws, const int64_t* strides, const int* rows, const int* offs,
                 const float* bias, float* y, int64_t ldy, int threads) {
    if (R < 1) return -2;
    if (K % XB) return -3;
    std::vector<int> tiles;  // (part, first row) of every NT-row tile
    for (int p = 0; p < nparts; ++p) {
        if (!with_unpack(types[p], [](auto) {})) return -1;
        for (int n = 0; n < rows[p]; n += NT) tiles.insert(tiles.end(), {p, n});
    }
    const int nxb = K / XB;
    std::vector<int8_t> xq(static_cast<size_t>(R) * K);
    std::vector<int16_t> bs(static_cast<size_t>(R) * (K / 16));
    std::vector<float> xf(static_cast<size_t>(R) * (nxb + K / 32 + K / 16 + K / 32));
    float* dx = xf.data();
    float* xs = dx + R * nxb;              // ggml_quantize_q8's dx-scaled 32-column sums (unused here)
    float* sum16 = xs + R * (K / 32);      // the raw code sums, per 16 and per 32 columns
    float* sum32 = sum16 + R * (K / 16);
    const int ntiles = static_cast<int>(tiles.size() / 2);
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int r = 0; r < R; ++r) {
            ggml_quantize_q8(x + r * ldx, 1, ldx, K, xq.data() + static_cast<int64_t>(r) * K, dx + r * nxb,
                             bs.data() + static_cast<int64_t>(r) * (K / 16), xs + r * (K / 32));
            const int16_t* s = bs.data() + static_cast<int64_t>(r) * (K / 16);
            for (int j = 0; j < K / 16; ++j) sum16[r * (K / 16) + j] = s[j];
            for (int j = 0; j < K / 32; ++j) sum32[r * (K / 32) + j] = static_cast<float>(s[2 * j] + s[2 * j + 1]);
        }
        std::vector<Panel> panel(1);
#pragma omp for schedule(static)
        for (int t = 0; t < ntiles; ++t) {
            const int p = tiles[2 * t], n0 = tiles[2 * t + 1], nt = std::min(NT, rows[p] - n0);
            float* yt = y + offs[p] + n0;
            for (int r = 0; r < R; ++r)
                for (int n = 0; n < nt; ++n) yt[r * ldy + n] = bias ? bias[offs[p] + n0 + n] : 0.0f;
            with_unpack(types[p], [&](auto u) {
                using U = decltype(u);
                const XQ xv{xq.data(), dx, U::S == 16 ? sum16 : sum32, K};
                for (int kb = 0; kb < nxb; kb += KCB) {
                    const int nb = std::min(KCB, nxb - kb);
                    fill<U>(ws[p] + n0 * strides[p] + static_cast<int64_t>(kb) * U::BYTES, strides[p], nt, nb, panel[0]);
                    run_panel_rows<U>(panel[0], nb, xv, kb, R, yt, ldy, nt);
                }
            });
        }
    }
    return 0;
}

int ggml_gemm_q8_fast() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return 1;
#else
    return 0;
#endif
}

// 1 where `type` has a kernel here.
int ggml_has_gemm_q8(int type) {
    return with_unpack(type, [](auto) {}) ? 1 : 0;
}

}  // extern "C"
