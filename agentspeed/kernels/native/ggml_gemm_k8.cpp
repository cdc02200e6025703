// Many-row linear layers on K-quant weights (Q4_K, Q5_K, Q6_K) with int8 activations where
// the CPU has no AVX-512 VNNI: ggml_gemm_q8's contract and rounding (x to int8 per 256 columns
// by ggml_quantize_q8, the decode steps' rounding), with the sub-block scales applied in
// integers.
//
//   ggml_gemm_k8:      ggml_gemm_q8's arguments and results for parts of Q4_K, Q5_K, Q6_K.
//   ggml_gemm_k8_fast: 1 where this build has the AVX2 loop (else a portable loop of the same
//                      integer arithmetic, for tests).
//
// Why not ggml_gemm_q8's loop on AVX2: without VNNI a u8 x s8 product is vpmaddubsw (pair sums
// in int16) then vpmaddwd to int32, and its fp32 sub-block scales cost a convert and two FMAs
// per sub-block and output. Here the vpmaddwd that widens the pair sums multiplies them by the
// integer sub-block scale (as llama.cpp's AVX2 dot products do), several vpmaddubsw are first
// summed in int16 (as many as the codes' range allows: Q4_K 8, Q5_K 4, Q6_K 2), and each
// super-block's int32 sums turn into fp32 once.
//
//   y[m, n] += dx[m, b] * (d[n] * sum_j sc[n, j] sum_{k in j} q[n, k] x[m, k]
//                          - dm[n] * sum_j mn[n, j] xsum[m, j])
//
// per super-block b, j its sub-blocks of S columns: Q4_K/Q5_K sc, mn their 6-bit scales and
// mins, dm = dmin (w = d sc q - dmin mn); Q6_K sc its int8 scales, mn = 32 sc, dm = d
// (w = d sc (q - 32)). Every integer is exact: an int16 lane sums at most 2 RUN products of
// QMAX * 127 (< 2^15, static_assert below), an int32 lane 256 products times a scale (< 2^29),
// so the error is the activations' rounding, the bound of ggml_gemm_q8 (tests/test_ggml.py).
//
// Blocking: NT = 16 weight rows (two 8-lane vectors) of KCB super-blocks are unpacked into a
// panel (codes as 32-bit words of 4 columns of one row, [block][64][NT]; the scales twice per
// word for vpmaddwd, [block][16][NT]; two sub-blocks' mins per word, [block][8][NT]; fp32 d
// and dm, [block][NT]) once per MC rows of x, which then run over it MR at a time.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "ggml_qblocks.h"  // the K-quant blocks' codes and scales

extern "C" int ggml_quantize_q8(const float* x, int R, int64_t ldx, int K, int8_t* xq, float* dx, int16_t* bs,
                                float* xs);

namespace {

constexpr int XB = 256;  // activation columns per scale: one super-block
constexpr int NT = 16;   // weight rows per panel
constexpr int KCB = 4;   // super-blocks per panel: 16 KB of codes
constexpr int MC = 256;  // rows of x per pass over the weights (see ggml_gemm_k8)

struct Panel {
    uint32_t codes[KCB * 64 * NT];
    uint32_t sc[KCB * 16 * NT];
    uint32_t mn[KCB * 8 * NT];
    float d[KCB * NT], dm[KCB * NT];
};

inline uint32_t pair16(int lo, int hi) {
    return static_cast<uint16_t>(lo) | static_cast<uint32_t>(static_cast<uint16_t>(hi)) << 16;
}

// A K-quant type as the panel takes it: S columns per sub-block, QMAX its largest code, RUN
// the vpmaddubsw results one int16 lane may sum, and one super-block's scales and mins.
template <class B, int S_, int QMAX, int RUN_>
struct KType {
    static constexpr int BYTES = B::BYTES, S = S_, J = XB / S, KG = S / 4, RUN = RUN_;
    static_assert(2 * RUN * QMAX * 127 <= 32767 && KG % RUN == 0, "int16 sums must not saturate");
    // The block at blk into panel row i of block b.
    static void unpack(const uint8_t* blk, Panel& p, int b, int i) {
        typename B::IState st;  // unused by codes<G>: the codes are the stored bits
        uint8_t q[XB];
        unroll<0, 8>([&](auto gc) {
            constexpr int G = decltype(gc)::value;
            const v32b c = B::template codes<G>(blk, st);
            std::memcpy(q + 32 * G, &c, 32);
        });
        uint32_t* c = p.codes + b * 64 * NT + i;
        for (int g = 0; g < 64; ++g) std::memcpy(c + g * NT, q + 4 * g, 4);
        int sc[16], mn[16];
        if constexpr (B::MIN) {  // Q4_K, Q5_K: d, dmin, 12 bytes of 6-bit scales and mins
            uint8_t s8[8], m8[8];
            unpack_k4(blk + 4, s8, m8);
            for (int j = 0; j < 8; ++j) sc[j] = s8[j], mn[j] = m8[j];
            p.d[b * NT + i] = f16(blk);
            p.dm[b * NT + i] = f16(blk + 2);
        } else {  // Q6_K: int8 scales at 192, d at 208
            for (int j = 0; j < 16; ++j) sc[j] = static_cast<int8_t>(blk[192 + j]), mn[j] = 32 * sc[j];
            p.d[b * NT + i] = p.dm[b * NT + i] = f16(blk + 208);
        }
        for (int j = 0; j < J; ++j) p.sc[(b * 16 + j) * NT + i] = pair16(sc[j], sc[j]);
        for (int j = 0; j < J / 2; ++j) p.mn[(b * 8 + j) * NT + i] = pair16(mn[2 * j], mn[2 * j + 1]);
    }
};

using KQ4 = KType<QBlockQ4_K, 32, 15, 8>;
using KQ5 = KType<QBlockQ5_K, 32, 31, 4>;
using KQ6 = KType<QBlockQ6_K, 16, 63, 2>;

template <class F>
bool with_ktype(int type, F&& f) {
    switch (type) {
        case 12: f(KQ4{}); return true;
        case 13: f(KQ5{}); return true;
        case 14: f(KQ6{}); return true;
        default: return false;
    }
}

template <class T>
void fill(const uint8_t* w, int64_t ws, int rows, int nb, Panel& p) {
    if (rows < NT) std::memset(&p, 0, sizeof p);  // absent rows: zero codes and scales
    for (int i = 0; i < rows; ++i)
        for (int b = 0; b < nb; ++b) T::unpack(w + i * ws + b * T::BYTES, p, b, i);
}

// The activations as the tiles read them: int8 codes in groups of 4 rows, each group's column
// quads side by side (quad k / 4 of rows 4i..4i+3 in 16 bytes, so a tile's 4 broadcasts read one
// stream, not 4 rows K bytes apart), scales [R][K / 256], and the int16 sums of the codes per S
// columns [R][K / S].
struct XQ {
    const int8_t* q;
    const float* dx;
    const int16_t* sum;
    int64_t K;
    static constexpr int QUAD = 16;  // bytes from a row group's column quad to its next
    const int8_t* at(int64_t m, int64_t k) const { return q + ((m / 4) * (K / 4) + k / 4) * QUAD + (m % 4) * 4 + k % 4; }
};

inline int32_t word4(const void* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

#if defined(__AVX2__)
// One row of a quad: the row's 4 activations (X) broadcast, their pair sums with w0 and w1
// into D0 and D1, then ACC (adding them to the run sums; nothing in a run's first quad, whose
// products are the sums: that saves a run's first adds, 1 in 2 of Q6_K's).
#define K8_ROW(X, D0, D1, ACC)               \
    "vpbroadcastd %[" X "], %[t]\n\t"      \
    "vpmaddubsw %[t], %[w0], %[" D0 "]\n\t" \
    "vpmaddubsw %[t], %[w1], %[" D1 "]\n\t" ACC
// h[m][v] += (FIRST: =) the pair sums of wv's codes times the 4 activations at xp[m] (in every
// 32-bit lane), for M rows. Four rows are one asm block: with the intrinsics gcc kept the 8 sums
// in memory or copied each between two registers every quad (37 instructions a quad, not 22).
template <int M, bool FIRST>
inline void quads(__m256i (&h)[M][2], __m256i w0, __m256i w1, const int8_t* const (&xp)[M], int off) {
    if constexpr (M == 4 && FIRST) {
        __m256i t;
        asm(K8_ROW("x0", "a0", "a1", "") K8_ROW("x1", "b0", "b1", "") K8_ROW("x2", "c0", "c1", "")
            K8_ROW("x3", "d0", "d1", "")
            : [a0] "=&x"(h[0][0]), [a1] "=&x"(h[0][1]), [b0] "=&x"(h[1][0]), [b1] "=&x"(h[1][1]),
              [c0] "=&x"(h[2][0]), [c1] "=&x"(h[2][1]), [d0] "=&x"(h[3][0]), [d1] "=&x"(h[3][1]), [t] "=&x"(t)
            : [w0] "x"(w0), [w1] "x"(w1), [x0] "m"(*reinterpret_cast<const int32_t*>(xp[0] + off)),
              [x1] "m"(*reinterpret_cast<const int32_t*>(xp[1] + off)),
              [x2] "m"(*reinterpret_cast<const int32_t*>(xp[2] + off)),
              [x3] "m"(*reinterpret_cast<const int32_t*>(xp[3] + off)));
    } else if constexpr (M == 4) {
        __m256i t, p;
#define K8_ADD(A, B) "vpaddw %[p], %[" A "], %[" A "]\n\tvpaddw %[t], %[" B "], %[" B "]\n\t"
        asm(K8_ROW("x0", "p", "t", K8_ADD("a0", "a1")) K8_ROW("x1", "p", "t", K8_ADD("b0", "b1"))
            K8_ROW("x2", "p", "t", K8_ADD("c0", "c1")) K8_ROW("x3", "p", "t", K8_ADD("d0", "d1"))
            : [a0] "+x"(h[0][0]), [a1] "+x"(h[0][1]), [b0] "+x"(h[1][0]), [b1] "+x"(h[1][1]),
              [c0] "+x"(h[2][0]), [c1] "+x"(h[2][1]), [d0] "+x"(h[3][0]), [d1] "+x"(h[3][1]),
              [t] "=&x"(t), [p] "=&x"(p)
            : [w0] "x"(w0), [w1] "x"(w1), [x0] "m"(*reinterpret_cast<const int32_t*>(xp[0] + off)),
              [x1] "m"(*reinterpret_cast<const int32_t*>(xp[1] + off)),
              [x2] "m"(*reinterpret_cast<const int32_t*>(xp[2] + off)),
              [x3] "m"(*reinterpret_cast<const int32_t*>(xp[3] + off)));
#undef K8_ADD
    } else {
        for (int m = 0; m < M; ++m) {
            const __m256i xv = _mm256_set1_epi32(word4(xp[m] + off));
            const __m256i p0 = _mm256_maddubs_epi16(w0, xv), p1 = _mm256_maddubs_epi16(w1, xv);
            h[m][0] = FIRST ? p0 : _mm256_add_epi16(h[m][0], p0);
            h[m][1] = FIRST ? p1 : _mm256_add_epi16(h[m][1], p1);
        }
    }
}
#undef K8_ROW
#endif

// y rows [m0, m0 + M), columns [0, rows) += x times the panel's nb super-blocks from kb.
template <int M, class T>
void tile(const Panel& p, int nb, const XQ& x, int kb, int m0, float* y, int64_t ldy, int rows) {
    constexpr int J = T::J, KG = T::KG, RUN = T::RUN;
    (void)KG, (void)RUN;
    const int64_t nsub = x.K / T::S, nxb = x.K / XB;
    alignas(32) float tot[M][NT] = {};  // the panel's sums, added to y once
    for (int b = 0; b < nb; ++b) {
#if defined(__AVX2__)
        const int8_t* xb[M];
        for (int m = 0; m < M; ++m) xb[m] = x.at(m0 + m, (kb + b) * XB);
        // acc in memory (L1): touched once a run, so the registers hold M x 2 run sums
        alignas(32) int32_t acc[M][NT] = {};
        __m256i mac[M][2];
        for (int m = 0; m < M; ++m) mac[m][0] = mac[m][1] = _mm256_setzero_si256();
        const uint32_t* c = p.codes + b * 64 * NT;
        // One run of RUN column quads at a time, summed in int16, then widened by vpmaddwd
        // against the run's sub-block scale. Not unrolled: unrolled, gcc computed a whole
        // run's products first and spilled them to the stack (half the rate).
#pragma GCC unroll 1
        for (int g0 = 0; g0 < 64; g0 += RUN) {
            __m256i h[M][2];
            const auto w = [&](int g, int v) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + g * NT + 8 * v)); };
            quads<M, true>(h, w(g0, 0), w(g0, 1), xb, XQ::QUAD * g0);
#pragma GCC unroll 1
            for (int g = g0 + 1; g < g0 + RUN; ++g) quads<M, false>(h, w(g, 0), w(g, 1), xb, XQ::QUAD * g);
            const uint32_t* s = p.sc + (b * 16 + g0 / KG) * NT;
            const __m256i s0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s));
            const __m256i s1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 8));
            for (int m = 0; m < M; ++m) {
                __m256i* a = reinterpret_cast<__m256i*>(acc[m]);
                _mm256_store_si256(a, _mm256_add_epi32(_mm256_load_si256(a), _mm256_madd_epi16(h[m][0], s0)));
                _mm256_store_si256(a + 1, _mm256_add_epi32(_mm256_load_si256(a + 1), _mm256_madd_epi16(h[m][1], s1)));
            }
        }
        for (int j = 0; j < J / 2; ++j) {
            const uint32_t* mn = p.mn + (b * 8 + j) * NT;
            const __m256i n0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(mn));
            const __m256i n1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(mn + 8));
            for (int m = 0; m < M; ++m) {
                const __m256i xs = _mm256_set1_epi32(word4(x.sum + (m0 + m) * nsub + (kb + b) * J + 2 * j));
                mac[m][0] = _mm256_add_epi32(mac[m][0], _mm256_madd_epi16(n0, xs));
                mac[m][1] = _mm256_add_epi32(mac[m][1], _mm256_madd_epi16(n1, xs));
            }
        }
        const float* d = p.d + b * NT;
        const float* dm = p.dm + b * NT;
        for (int m = 0; m < M; ++m) {
            const __m256 dx = _mm256_set1_ps(x.dx[(m0 + m) * nxb + kb + b]);
            for (int v = 0; v < 2; ++v) {
                const __m256i av = _mm256_load_si256(reinterpret_cast<const __m256i*>(acc[m] + 8 * v));
                const __m256 a = _mm256_mul_ps(_mm256_cvtepi32_ps(av), _mm256_loadu_ps(d + 8 * v));
                const __m256 o = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(mac[m][v]), _mm256_loadu_ps(dm + 8 * v), a);
                _mm256_store_ps(tot[m] + 8 * v, _mm256_fmadd_ps(o, dx, _mm256_load_ps(tot[m] + 8 * v)));
            }
        }
#else
        const uint8_t* codes = reinterpret_cast<const uint8_t*>(p.codes + b * 64 * NT);
        for (int m = 0; m < M; ++m) {
            for (int n = 0; n < NT; ++n) {
                int32_t a = 0, mins = 0;
                for (int j = 0; j < J; ++j) {
                    int32_t s = 0;
                    for (int k = j * T::S; k < (j + 1) * T::S; ++k)
                        s += codes[(k / 4 * NT + n) * 4 + k % 4] * *x.at(m0 + m, (kb + b) * XB + k);
                    a += s * static_cast<int16_t>(p.sc[(b * 16 + j) * NT + n]);
                    const uint32_t w = p.mn[(b * 8 + j / 2) * NT + n];
                    mins += static_cast<int16_t>(j % 2 ? w >> 16 : w) * x.sum[(m0 + m) * nsub + (kb + b) * J + j];
                }
                tot[m][n] += (static_cast<float>(a) * p.d[b * NT + n] - static_cast<float>(mins) * p.dm[b * NT + n]) *
                             x.dx[(m0 + m) * nxb + kb + b];
            }
        }
#endif
    }
    for (int m = 0; m < M; ++m)
        for (int n = 0; n < rows; ++n) y[(m0 + m) * ldy + n] += tot[m][n];
}

// Rows of x per tile: 8 run sums, 2 weight vectors and 2 temporaries in AVX2's 16 registers,
// the int32 sums in L1. Measured with the intrinsics (before quads' asm): 4 rows 156 GFLOP/s
// on one thread against 3 rows with the int32 sums in registers 132, 5 rows 144, 6 rows 131
// (Q4_K, 8960 x 1536, 128 rows); 3 rows with the quads and the widening in asm, 0.87-0.95x of
// 4 (docs/benchmarks.md).
constexpr int MR = 4;

template <class T, int M = MR - 1>
void tail_rows(const Panel& p, int nb, const XQ& x, int kb, int m0, int left, float* y, int64_t ldy, int rows) {
    if constexpr (M > 0) {
        if (left == M) return tile<M, T>(p, nb, x, kb, m0, y, ldy, rows);
        tail_rows<T, M - 1>(p, nb, x, kb, m0, left, y, ldy, rows);
    }
}

template <class T>
void run_panel_rows(const Panel& p, int nb, const XQ& x, int kb, int R, float* y, int64_t ldy, int rows) {
    int m0 = 0;
    for (; m0 + MR <= R; m0 += MR) tile<MR, T>(p, nb, x, kb, m0, y, ldy, rows);
    tail_rows<T>(p, nb, x, kb, m0, R - m0, y, ldy, rows);
}

}  // namespace

extern "C" {

// ggml_gemm_q8's arguments and results (ggml_gemm_q8.cpp) for parts of Q4_K, Q5_K and Q6_K;
// -1 for a part of another type, -3 for K not a multiple of 256.
int ggml_gemm_k8(const float* x, int R, int64_t ldx, int K, int nparts, const int* types, const uint8_t* const* ws,
                 const int64_t* strides, const int* rows, const int* offs, const float* bias, float* y, int64_t ldy,
                 int threads) {
    if (R < 1) return -2;
    if (K % XB) return -3;
    std::vector<int> tiles;  // (part, first row) of every NT-row tile
    for (int p = 0; p < nparts; ++p) {
        if (!with_ktype(types[p], [](auto) {})) return -1;
        for (int n = 0; n < rows[p]; n += NT) tiles.insert(tiles.end(), {p, n});
    }
    const int nxb = K / XB;
    std::vector<int8_t> xq(static_cast<size_t>((R + 3) / 4 * 4) * K);  // XQ's layout; padding rows zero
    std::vector<int16_t> sum16(static_cast<size_t>(R) * (K / 16)), sum32(static_cast<size_t>(R) * (K / 32));
    std::vector<float> xf(static_cast<size_t>(R) * (nxb + K / 32));
    float* dx = xf.data();
    float* xs = dx + R * nxb;  // ggml_quantize_q8's dx-scaled 32-column sums (unused here)
    const int ntiles = static_cast<int>(tiles.size() / 2);
#pragma omp parallel num_threads(threads)
    {
        std::vector<int8_t> row(K);
        const XQ packed{xq.data(), nullptr, nullptr, K};
#pragma omp for schedule(static)
        for (int r = 0; r < R; ++r) {
            int16_t* s16 = sum16.data() + static_cast<int64_t>(r) * (K / 16);
            ggml_quantize_q8(x + r * ldx, 1, ldx, K, row.data(), dx + r * nxb, s16, xs + r * (K / 32));
            int8_t* dst = const_cast<int8_t*>(packed.at(r, 0));
            for (int g = 0; g < K / 4; ++g) std::memcpy(dst + XQ::QUAD * g, row.data() + 4 * g, 4);
            // |a 32-column sum| <= 32 * 127: int16
            for (int j = 0; j < K / 32; ++j) sum32[r * (K / 32) + j] = static_cast<int16_t>(s16[2 * j] + s16[2 * j + 1]);
        }
        Panel* panel = new Panel;
        // MC rows of x at a time, so that their codes stay in L2 while every panel passes over
        // them (2,048 rows, Q4_K 8960 x 1536: 259 GFLOP/s all at once, 269 by 256 and 264 by
        // 512); each chunk unpacks the weights again, a small cost at MC rows per code.
        for (int m0 = 0; m0 < R; m0 += MC) {
            const int mr = std::min(MC, R - m0);
#pragma omp for schedule(static)
            for (int t = 0; t < ntiles; ++t) {
                const int p = tiles[2 * t], n0 = tiles[2 * t + 1], nt = std::min(NT, rows[p] - n0);
                float* yt = y + offs[p] + n0 + m0 * ldy;
                for (int r = 0; r < mr; ++r)
                    for (int n = 0; n < nt; ++n) yt[r * ldy + n] = bias ? bias[offs[p] + n0 + n] : 0.0f;
                with_ktype(types[p], [&](auto u) {
                    using T = decltype(u);
                    const int64_t ns = K / T::S;
                    const XQ xv{xq.data() + m0 * static_cast<int64_t>(K), dx + m0 * nxb,
                                (T::S == 16 ? sum16.data() : sum32.data()) + m0 * ns, K};
                    for (int kb = 0; kb < nxb; kb += KCB) {
                        const int nb = std::min(KCB, nxb - kb);
                        fill<T>(ws[p] + n0 * strides[p] + static_cast<int64_t>(kb) * T::BYTES, strides[p], nt, nb, *panel);
                        run_panel_rows<T>(*panel, nb, xv, kb, mr, yt, ldy, nt);
                    }
                });
            }
        }
        delete panel;
    }
    return 0;
}

int ggml_gemm_k8_fast() {
#if defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

}  // extern "C"
