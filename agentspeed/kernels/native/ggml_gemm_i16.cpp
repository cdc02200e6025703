// The many-row product on packed ggml integer weights with int16 activations (prefill,
// batched decode): y[m, n] = sum_k xhat[m, k] * W[n, k] + bias[n], xhat the activations
// rounded as ggml_quantize_x rounds them (int16 per 256 columns) and W the stored weights.
//
// Blocking (GotoBLAS's order): x is rounded once into slabs of KC columns; for each MC rows
// of x and each slab (128 KB: L2), the threads share out the weight in panels of NC rows,
// each decoded into int16 (c = code * integer sub-block scale, ggml_iblocks.h; 12 KB: L1) and
// multiplied by every TM rows of the slab in TM x TN register tiles of int32 sums
// (vpmaddwd, or vpdpwssd with VNNI). A block's sums are folded into fp32 by one multiply by
// (weight block d) x (activation scale); minimums come from each group's sum of x, as in the
// decode kernel. x comes from memory once per call, the stored weights once per MC rows.
//
// Why, and where it stands: vpmaddwd does 16 multiply-adds per instruction against an FMA's
// 8, but on AVX2 it needs a vpaddd beside it (VNNI's vpdpwssd fuses the two). On this AVX2
// box (benchmarks/kernels/bench_ggml_linear.py, 2 threads) it beats the fp32 tiles only on
// wide K (1536 x 8960, 512 rows: Q4_K 53 / Q6_K 69 GMAC/s against 36 / 38) and trails
// torch's sgemm on decoded fp32 panels (60-73) at every many-row shape, so the default
// backend takes those and this kernel serves `cpu_native_int16` (int16 activations
// throughout, as llama.cpp keeps 8-bit ones). The error is the activations' rounding only,
// the bound of ggml_i16.cpp, held by tests/test_ggml.py.

#include <algorithm>
#include <cstring>
#include <cstdint>
#include <vector>

#include <omp.h>

#include "ggml_iblocks.h"

extern "C" int ggml_quantize_x(const float* x, int R, int64_t ldx, int K, int16_t* xq, float* dx, float* xg, float* xs);

namespace {

constexpr int XB = 256;  // activation columns per scale (ggml_quantize_x)
constexpr int KC = 512;  // panel columns: two super-blocks
constexpr int NC = 12;   // panel rows
constexpr int MC = 128;  // rows of x per pass over every panel
constexpr int TM = 2, TN = 6;  // 12 int32 sums, 2 x and 1 weight vector: 15 of AVX2's 16 registers

inline float hsum8(v8f v) {
    const v8f s = v + __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
    const v8f t = s + __builtin_shufflevector(s, s, 2, 3, 0, 1, 6, 7, 4, 5);
    return t[0] + t[1];
}

inline v8f splatf(float s) { return v8f{} + s; }

// Keeps a loaded vector in a register (see itile); a 256-bit vector has none without AVX.
inline void pin(v16s& v) {
#if defined(__AVX2__)
    asm("" : "+x"(v));
#else
    (void)v;
#endif
}

inline v8f tof8(v8i v) { return __builtin_convertvector(v, v8f); }

// The quantized activations in slabs of KC columns, each row's part of a slab contiguous:
// codes [K / KC][M][KC] and per slab and row SIDE floats, the scales of its two 256 columns,
// then each 16 and each 32 columns' sums (times the scale). A panel's pass streams one slab;
// with plain rows (18 KB apart at K = 8960) and row-major sums the tile ran at half its rate.
constexpr int SIDE = KC / XB + KC / 16 + KC / 32;

struct XQ {
    int16_t* q;
    float* side;
    int M, K;
    int16_t* row(int m, int k0) const { return q + static_cast<int64_t>(k0) * M + static_cast<int64_t>(m) * KC; }
    float* sums(int m, int k0) const { return side + (static_cast<int64_t>(k0 / KC) * M + m) * SIDE; }
};

// NC rows x KC columns of one weight, decoded: codes c, block scales d and minimums m.
struct Panel {
    alignas(64) int16_t c[NC * KC];
    float d[NC * (KC / 32)];
    float m[NC * (KC / 16)];
};

template <class B>
void decode_panel(const uint8_t* w, int64_t ws, int rows, int k0, int kc, Panel& p) {
    const int nbc = kc / B::QK;
    for (int r = 0; r < rows; ++r) {
        const uint8_t* row = w + r * ws + static_cast<int64_t>(k0 / B::QK) * B::BYTES;
        for (int b = 0; b < nbc; ++b) {
            const uint8_t* blk = row + static_cast<int64_t>(b) * B::BYTES;
            typename B::IState st;
            B::iprep(blk, st);
            int16_t* out = p.c + r * KC + b * B::QK;
            unroll<0, B::NG>([&](auto gc) {
                constexpr int G = decltype(gc)::value;
                const v16s c = B::template icode<G>(blk, st);
                std::memcpy(out + 16 * G, &c, sizeof c);
            });
            p.d[r * (KC / 32) + b] = st.d;
            if constexpr (B::MIN)
                for (int i = 0; i < B::NMIN; ++i) p.m[r * (KC / 16) + b * B::NMIN + i] = st.m[i];
        }
    }
}

// y[i, j0 + j] (+)= columns [k0, k0 + kc) of xhat row m0 + i times panel row j0 + j.
template <int MR, int NR, class B>
void itile(const XQ& x, int m0, int k0, int kc, const Panel& p, int j0, float* y, int64_t ldy, bool first) {
    v8f tot[MR][NR] = {};
    const int nbc = kc / B::QK;
    const int16_t* xr[MR];
    for (int i = 0; i < MR; ++i) xr[i] = x.row(m0 + i, k0);
    for (int b = 0; b < nbc; ++b) {
        v8i acc[MR][NR] = {};
        const int16_t* wc = p.c + j0 * KC + b * B::QK;
        // Not unrolled, and each loaded vector pinned to a register: otherwise gcc hoists the
        // loads of a whole block to the stack, or re-loads each weight vector per row of x (a
        // tile at 24 GMAC/s on one core instead of 45-57; benchmarks/kernels/bench_ggml_linear.py).
#pragma GCC unroll 1
        for (int g = 0; g < B::NG; ++g) {
            v16s xv[MR];
            for (int i = 0; i < MR; ++i) {
                xv[i] = ld16(xr[i] + b * B::QK + 16 * g);
                pin(xv[i]);
            }
            for (int j = 0; j < NR; ++j) {
                v16s wv = ld16(wc + j * KC + 16 * g);
                pin(wv);
                for (int i = 0; i < MR; ++i) acc[i][j] = dot_acc(acc[i][j], wv, xv[i]);
            }
        }
        const int xb = b * B::QK / XB;
        for (int i = 0; i < MR; ++i) {
            const float dxi = x.sums(m0 + i, k0)[xb];
            for (int j = 0; j < NR; ++j) tot[i][j] += tof8(acc[i][j]) * splatf(p.d[(j0 + j) * (KC / 32) + b] * dxi);
        }
    }
    if constexpr (B::MIN) {  // sum over groups of m * (x's sum over the group)
        constexpr int S = B::MSUB;
        const int ng = kc / S;
        for (int i = 0; i < MR; ++i) {
            const float* xi = x.sums(m0 + i, k0) + KC / XB + (S == 16 ? 0 : KC / 16);
            for (int j = 0; j < NR; ++j) {
                const float* mj = p.m + (j0 + j) * (KC / 16);
                int g = 0;
                for (; g + 8 <= ng; g += 8) tot[i][j] -= ld8(mj + g) * ld8(xi + g);
                for (; g < ng; ++g) tot[i][j][0] -= mj[g] * xi[g];
            }
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) {
            float& out = y[i * ldy + j0 + j];
            out = first ? hsum8(tot[i][j]) : out + hsum8(tot[i][j]);
        }
}

template <int MR, class B>
void itile_n(int nr, const XQ& x, int m0, int k0, int kc, const Panel& p, int j0, float* y, int64_t ldy, bool first) {
    switch (nr) {
        case 1: itile<MR, 1, B>(x, m0, k0, kc, p, j0, y, ldy, first); break;
        case 2: itile<MR, 2, B>(x, m0, k0, kc, p, j0, y, ldy, first); break;
        case 3: itile<MR, 3, B>(x, m0, k0, kc, p, j0, y, ldy, first); break;
        case 4: itile<MR, 4, B>(x, m0, k0, kc, p, j0, y, ldy, first); break;
        case 5: itile<MR, 5, B>(x, m0, k0, kc, p, j0, y, ldy, first); break;
        default: itile<MR, TN, B>(x, m0, k0, kc, p, j0, y, ldy, first); break;
    }
}

// Rows [m0, m1) of x, columns [k0, k0 + kc), against output rows [n0, n1) of one weight
// (at most NC): the panel decoded, then TM x TN tiles added into yb (row stride ldb).
template <class B>
void panel_pass(const XQ& x, int m0, int m1, int k0, int kc, const uint8_t* w, int64_t ws, int n0, int n1,
                float* yb, int64_t ldb, Panel& p) {
    const int rows = n1 - n0;
    decode_panel<B>(w + n0 * ws, ws, rows, k0, kc, p);
    for (int m = m0; m < m1; m += TM)
        for (int j0 = 0; j0 < rows; j0 += TN) {
            const int nr = std::min(TN, rows - j0);
            if (m1 - m >= TM)
                itile_n<TM, B>(nr, x, m, k0, kc, p, j0, yb + (m - m0) * ldb, ldb, k0 == 0);
            else
                itile_n<1, B>(nr, x, m, k0, kc, p, j0, yb + (m - m0) * ldb, ldb, k0 == 0);
        }
}

}  // namespace

extern "C" {

// y[:, offs[p] + n] = xhat @ W_p[n].T + bias for the parts p of a merged projection (as
// ggml_linear_i16 takes them) and any number M of rows of x, quantized here. Returns 0; -1
// for a part without an int16 decoder or K not whole blocks; -2 for M < 1; -3 for K not a
// multiple of 32.
int ggml_gemm_i16(const float* x, int M, int64_t ldx, int K, int nparts, const int* types,
                  const uint8_t* const* ws, const int64_t* strides, const int* rows, const int* offs,
                  const float* bias, float* y, int64_t ldy, int threads) {
    if (M < 1) return -2;
    if (K % 32) return -3;
    struct Job { int part, n0, n1; };
    std::vector<Job> jobs;
    for (int p = 0; p < nparts; ++p) {
        bool ok = false;
        with_iblock(types[p], [&](auto blk) { ok = K % decltype(blk)::QK == 0; });
        if (!ok) return -1;
        for (int n0 = 0; n0 < rows[p]; n0 += NC) jobs.push_back({p, n0, std::min(rows[p], n0 + NC)});
    }
    // 32-byte aligned (rows are too: KC * 2 bytes): a load across cache lines slows the tile
    const int64_t slabs = (K + KC - 1) / KC;
    std::vector<v16s> xbuf(static_cast<size_t>(slabs * M * KC / 16));
    std::vector<float> side(static_cast<size_t>(slabs * M * SIDE));
    const XQ xv{reinterpret_cast<int16_t*>(xbuf.data()), side.data(), M, K};
    const int njobs = static_cast<int>(jobs.size());
    std::vector<float> yb(static_cast<size_t>(njobs) * MC * NC);  // per panel, MC x NC sums
#pragma omp parallel num_threads(threads)
    {
        // Each thread rounds its share of the rows, one at a time, into the slabs.
        const int nxb = (K + XB - 1) / XB;
        static thread_local std::vector<int16_t> qrow;
        static thread_local std::vector<float> frow;
        qrow.resize(K);
        frow.resize(nxb + K / 16 + K / 32);
        const float *dx = frow.data(), *xg = dx + nxb, *xs = xg + K / 16;
#pragma omp for schedule(static)
        for (int r = 0; r < M; ++r) {
            ggml_quantize_x(x + r * ldx, 1, ldx, K, qrow.data(), frow.data(), frow.data() + nxb,
                            frow.data() + nxb + K / 16);
            for (int k0 = 0; k0 < K; k0 += KC) {
                const int kc = std::min(KC, K - k0);
                std::memcpy(xv.row(r, k0), qrow.data() + k0, sizeof(int16_t) * kc);
                float* out = xv.sums(r, k0);
                std::copy(dx + k0 / XB, dx + (k0 + kc + XB - 1) / XB, out);
                std::copy(xg + k0 / 16, xg + (k0 + kc) / 16, out + KC / XB);
                std::copy(xs + k0 / 32, xs + (k0 + kc) / 32, out + KC / XB + KC / 16);
            }
        }
        // GotoBLAS's order: MC rows of x times one slab (MC x KC int16, 128 KB: L2) against
        // every panel, so x comes from L3 once per call; each panel's sums go to its own
        // contiguous MC x NC block of yb, copied out per MC rows (added into y's rows, a
        // multiple of 1 KB apart, a column strip maps to a few L1 sets and evicts the panel:
        // 1.5x slower; into rows of all the outputs, each pass misses L2 on every tile).
        static thread_local Panel panel;
        for (int mb = 0; mb < M; mb += MC) {
            const int me = std::min(M, mb + MC);
            for (int k0 = 0; k0 < K; k0 += KC) {
#pragma omp for schedule(dynamic, 1)
                for (int t = 0; t < njobs; ++t) {
                    const Job& jb = jobs[t];
                    const int p = jb.part;
                    with_iblock(types[p], [&](auto blk) {
                        panel_pass<decltype(blk)>(xv, mb, me, k0, std::min(KC, K - k0), ws[p], strides[p], jb.n0,
                                                  jb.n1, yb.data() + static_cast<int64_t>(t) * MC * NC, NC, panel);
                    });
                }
            }
#pragma omp for schedule(static)
            for (int t = 0; t < njobs; ++t) {
                const Job& jb = jobs[t];
                const int c0 = offs[jb.part] + jb.n0;
                const float* src = yb.data() + static_cast<int64_t>(t) * MC * NC;
                for (int m = mb; m < me; ++m)
                    for (int j = 0; j < jb.n1 - jb.n0; ++j)
                        y[m * ldy + c0 + j] = src[(m - mb) * NC + j] + (bias ? bias[c0 + j] : 0.0f);
            }
        }
    }
    return 0;
}

}  // extern "C"
