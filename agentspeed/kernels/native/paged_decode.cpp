// Paged decode attention for CPUs: a few query tokens per sequence (one for plain decode, a
// handful when speculative drafts are verified) over its paged K/V cache, read in the
// cache's own storage type (fp32, bf16, fp16, fp8 e4m3 with per-token scales).
//
// Why native: at long context a decode step is bound by reading K/V. The torch path
// converts a 16-bit cache to fp32 per sequence before attending (read 2 bytes, write 4,
// read 4 again), so a bf16 cache saved memory but no time. Here each K/V row is converted
// in registers as it streams past, once per KV head for its whole GQA group.
//
// Work split: (sequence, KV head, span of SPLIT tokens) items, run by OpenMP threads; each
// item keeps a running max / sum / weighted V per query head of the group (flash-decoding),
// and the spans of one (sequence, KV head) are merged by log-sum-exp at the end. Built with
// -ffast-math for the vectorised exp; no infinities are used (initial max is -1e30).
//
// Several query tokens: the Q tokens of a sequence become Q x G rows of each KV head's group
// ("virtual heads", token-major), so every K/V row is still read once for all of them. Row
// (token i of Q) sees keys t < seq_len - (Q - 1 - i): the keys it must not see are always a
// suffix of a block, so causality is a per-row count, not a mask.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "kv_load.h"
#include "vec.h"
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

constexpr int BLOCK = 64;   // tokens scored together before the softmax update (64: 7% faster than 32)
constexpr int MAX_GROUP = 32;
constexpr int MAX_DIM = 256;
constexpr int MAX_HEADS = 64;  // vectorised path: every (virtual) head of a sequence in one item
constexpr int MAX_QUERY = 8;   // query tokens per sequence

float fp8_lut[256];

void init_fp8_lut() {
    // e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; S.1111.111 is NaN, no infinities.
    for (int b = 0; b < 256; ++b) {
        int sign = b >> 7, exp = (b >> 3) & 15, man = b & 7;
        float v;
        if (exp == 15 && man == 7) v = NAN;
        else if (exp == 0) v = std::ldexp(man / 8.0f, -6);
        else v = std::ldexp(1.0f + man / 8.0f, exp - 7);
        fp8_lut[b] = sign ? -v : v;
    }
}

// One row of `n` stored values -> fp32.
template <int DT>
inline void load_row(const void* base, int64_t elem, int n, float* __restrict out) {
    if constexpr (DT == F32) {
        std::memcpy(out, static_cast<const float*>(base) + elem, sizeof(float) * n);
    } else if constexpr (DT == BF16) {
        const uint16_t* p = static_cast<const uint16_t*>(base) + elem;
#pragma omp simd
        for (int i = 0; i < n; ++i) {
            uint32_t u = static_cast<uint32_t>(p[i]) << 16;
            float f;
            std::memcpy(&f, &u, 4);
            out[i] = f;
        }
    } else if constexpr (DT == F16) {
        const _Float16* p = static_cast<const _Float16*>(base) + elem;
#pragma omp simd
        for (int i = 0; i < n; ++i) out[i] = static_cast<float>(p[i]);
    } else {
        const uint8_t* p = static_cast<const uint8_t*>(base) + elem;
        for (int i = 0; i < n; ++i) out[i] = fp8_lut[p[i]];
    }
}

struct Args {
    const float* q;  // [T, H, D]; sequence b's rows are [qstart[b], qstart[b+1]) (one each if null)
    const int32_t* qstart;  // [B + 1] or null
    const void* k_cache;  // [pages, page_size, KVH, D]
    const void* v_cache;
    const float* k_scale;  // [pages, page_size] or null
    const float* v_scale;
    const int32_t* page_table;  // [B, pt_stride]
    int64_t pt_stride;
    const int32_t* seq_lens;  // [B]
    int B, H, KVH, D, page_size;
    float scale;
    float* out;  // [T, H, D]
    int window;  // > 0: each sequence's (single) query sees only its last `window` keys
    const float* sinks;  // [H] or null: a logit per head in the softmax's denominator, no value

    int first_row(int b) const { return qstart ? qstart[b] : b; }
    // The first key sequence b attends (its single query's window start).
    int first_key(int b) const { return window > 0 && seq_lens[b] > window ? seq_lens[b] - window : 0; }
    int num_queries(int b) const { return qstart ? qstart[b + 1] - qstart[b] : 1; }
};

// Keys of block [start, start + n) that virtual row (token qi of Q) may see.
inline int visible(int start, int n, int seq_len, int Q, int qi) {
    const int lim = seq_len - (Q - 1 - qi) - start;
    return lim < 0 ? 0 : lim < n ? lim : n;
}

// Attend the Q x G virtual heads of KV head kh of sequence b over tokens [t0, t1) of its
// context. Writes m[QG], l[QG] (running max and sum of exp) and acc[QG*D] (unnormalised
// output), virtual head v = token v / G, query head kh * G + v % G.
template <int DT>
void attend_span(const Args& a, int b, int kh, int t0, int t1, float* m, float* l, float* acc) {
    const int G = a.H / a.KVH, D = a.D, Q = a.num_queries(b), QG = Q * G, L = a.seq_lens[b];
    const int64_t row = static_cast<int64_t>(a.KVH) * D;  // elements per token
    const int32_t* pages = a.page_table + b * a.pt_stride;
    std::vector<float> qs(static_cast<size_t>(QG) * D), sv(static_cast<size_t>(QG) * BLOCK);
    for (int v = 0; v < QG; ++v) {
        const float* qv = a.q + (static_cast<int64_t>(a.first_row(b) + v / G) * a.H + kh * G + v % G) * D;
        for (int i = 0; i < D; ++i) qs[v * D + i] = qv[i] * a.scale;
    }
    for (int h = 0; h < QG; ++h) { m[h] = -1e30f; l[h] = 0.0f; }
    std::memset(acc, 0, sizeof(float) * QG * D);

    float kv[BLOCK][MAX_DIM];
    auto s = [&](int h) { return &sv[static_cast<size_t>(h) * BLOCK]; };
    int64_t slot[BLOCK];
    for (int start = t0; start < t1; start += BLOCK) {
        const int n = start + BLOCK <= t1 ? BLOCK : t1 - start;
        for (int j = 0; j < n; ++j) {
            int t = start + j;
            slot[j] = static_cast<int64_t>(pages[t / a.page_size]) * a.page_size + t % a.page_size;
            load_row<DT>(a.k_cache, slot[j] * row + kh * D, D, kv[j]);
        }
        for (int h = 0; h < QG; ++h) {
            const float* qh = &qs[h * D];
            float* sh = s(h);
            for (int j = 0; j < n; ++j) {
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int d = 0; d < D; ++d) dot += qh[d] * kv[j][d];
                sh[j] = a.k_scale ? dot * a.k_scale[slot[j]] : dot;
            }
        }
        for (int h = 0; h < QG; ++h) {
            float* sh = s(h);
            const int nv = visible(start, n, L, Q, h / G);
            for (int j = nv; j < n; ++j) sh[j] = 0.0f;
            if (nv == 0) continue;
            float mb = m[h];
            for (int j = 0; j < nv; ++j) mb = sh[j] > mb ? sh[j] : mb;
            const float corr = std::exp(m[h] - mb);
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int j = 0; j < nv; ++j) {
                sh[j] = std::exp(sh[j] - mb);
                sum += sh[j];
            }
            l[h] = l[h] * corr + sum;
            m[h] = mb;
            if (corr != 1.0f) {
                float* ah = acc + h * D;
#pragma omp simd
                for (int d = 0; d < D; ++d) ah[d] *= corr;
            }
        }
        for (int j = 0; j < n; ++j) {
            load_row<DT>(a.v_cache, slot[j] * row + kh * D, D, kv[j]);
            const float vs = a.v_scale ? a.v_scale[slot[j]] : 1.0f;
            for (int h = 0; h < QG; ++h) {
                const float p = s(h)[j] * vs;
                float* ah = acc + h * D;
#pragma omp simd
                for (int d = 0; d < D; ++d) ah[d] += p * kv[j][d];
            }
        }
    }
}

// Vectorised span for head sizes 64 and 128 (vectors of W floats, vec.h). K and V rows of a block are converted into fp32 vectors
// once; each query head's output accumulates in registers across the block instead of in
// memory per token.
typedef float v8f __attribute__((vector_size(32)));

inline v8f fold8(vf v) {
#if defined(__AVX512F__)
    v8f lo = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
    v8f hi = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    return lo + hi;
#else
    return v;
#endif
}

// out[j] = sum of d[j]'s 8 lanes: an 8x8 transpose-add (7 horizontal adds and a lane blend
// instead of a full horizontal sum per token).
inline v8f hsum8(const v8f* d) {
#if defined(__AVX__)
    __m256 a = _mm256_hadd_ps(d[0], d[1]), b = _mm256_hadd_ps(d[2], d[3]);
    __m256 c = _mm256_hadd_ps(d[4], d[5]), e = _mm256_hadd_ps(d[6], d[7]);
    __m256 ab = _mm256_hadd_ps(a, b), ce = _mm256_hadd_ps(c, e);
    // ab = [t0 t1 t2 t3 | t0' t1' t2' t3'] (low and high 128-bit halves of tokens 0-3)
    __m256 lo = _mm256_permute2f128_ps(ab, ce, 0x20), hi = _mm256_permute2f128_ps(ab, ce, 0x31);
    return lo + hi;
#else
    v8f r;
    for (int j = 0; j < 8; ++j) {
        float t = 0.0f;
        for (int i = 0; i < 8; ++i) t += d[j][i];
        r[j] = t;
    }
    return r;
#endif
}

// Prefetch BYTES at offset off of the rows slot[j0..j1) (each `stride` bytes) of a cache.
template <int BYTES>
inline void prefetch_rows(const void* cache, const int64_t* slot, int64_t stride, int64_t off, int j0, int j1) {
    for (int j = j0; j < j1; ++j) {
        const char* p = static_cast<const char*>(cache) + slot[j] * stride + off;
        for (int c = 0; c < BYTES; c += 64) __builtin_prefetch(p + c);
    }
}

// Query heads are taken GC at a time (a "head chunk"): scores keep GC dot products in
// registers while each K row is converted once, and values keep GC x CV output vectors in
// registers while each V row is converted once per CV-vector column slice. The former layout
// (every row converted into an fp32 block buffer, re-read per head) spent a fifth of its time
// storing that buffer; this one reads the stored K/V directly (measured 1800-token context,
// 12 heads over 2 KV heads, D 128, fp16, AVX-512: 231 -> 155 us on one thread, 133 -> 85 us
// on two; AVX2 build 264 -> 213 us; see docs/benchmarks.md).
constexpr int MAX_GC = W == 16 ? 6 : 3;  // GC x CV accumulators + CV rows fit the register file
template <int DT>
constexpr int64_t ELEM_BYTES = DT == F32 ? 4 : DT == FP8_E4M3 ? 1 : 2;  // bytes per stored value

// s[g][j] = q[g] . K[slot[j]] for the GC heads of one chunk over the n <= BLOCK rows of a block.
template <int DT, int NV, int GC>
void chunk_scores(const void* kc, const int64_t* slot, int64_t row, int64_t off, int n, const vf (*q)[NV],
                  float (*s)[BLOCK], const int64_t* nslot, int nn) {
    for (int j0 = 0; j0 < n; j0 += 8) {
        if (nslot) prefetch_rows<NV * W * ELEM_BYTES<DT>>(kc, nslot, row * ELEM_BYTES<DT>, off * ELEM_BYTES<DT>, j0, std::min(j0 + 8, nn));
        v8f d[GC][8];
        for (int j = 0; j < 8; ++j) {
            if (j0 + j >= n) {
                for (int g = 0; g < GC; ++g) d[g][j] = v8f{};
                continue;
            }
            const int64_t e = slot[j0 + j] * row + off;
            vf t[GC];
            {
                const vf k = loadw<DT>(kc, e);
                for (int g = 0; g < GC; ++g) t[g] = q[g][0] * k;
            }
            for (int i = 1; i < NV; ++i) {
                const vf k = loadw<DT>(kc, e + i * W);
                for (int g = 0; g < GC; ++g) t[g] += q[g][i] * k;
            }
            for (int g = 0; g < GC; ++g) d[g][j] = fold8(t[g]);
        }
        for (int g = 0; g < GC; ++g) {
            const v8f r = hsum8(d[g]);
            std::memcpy(&s[g][j0], &r, 32);
        }
    }
}

// acc[g] += sum_j p[g][j] * V[slot[j]] for the GC heads of one chunk.
template <int DT, int NV, int GC>
void chunk_values(const void* vc, const int64_t* slot, int64_t row, int64_t off, int n, const float (*p)[BLOCK],
                  vf (*acc)[NV], const int64_t* nslot, int nn) {
    constexpr int CV = NV < 4 ? NV : 4;
    for (int c0 = 0; c0 < NV; c0 += CV) {
        vf r[GC][CV];
        for (int g = 0; g < GC; ++g)
            for (int i = 0; i < CV; ++i) r[g][i] = acc[g][c0 + i];
        for (int j = 0; j < n; ++j) {
            if (nslot && c0 == 0 && j < nn) prefetch_rows<NV * W * ELEM_BYTES<DT>>(vc, nslot, row * ELEM_BYTES<DT>, off * ELEM_BYTES<DT>, j, j + 1);
            const int64_t e = slot[j] * row + off + c0 * W;
            vf v[CV];
            for (int i = 0; i < CV; ++i) v[i] = loadw<DT>(vc, e + i * W);
            for (int g = 0; g < GC; ++g) {
                const float pg = p[g][j];
                for (int i = 0; i < CV; ++i) r[g][i] += pg * v[i];
            }
        }
        for (int g = 0; g < GC; ++g)
            for (int i = 0; i < CV; ++i) acc[g][c0 + i] = r[g][i];
    }
}

template <int DT, int NV, int GC = MAX_GC>
void chunk_dispatch(bool values, int gc, const void* cache, const int64_t* slot, int64_t row, int64_t off, int n,
                    const vf (*q)[NV], float (*s)[BLOCK], vf (*acc)[NV], const int64_t* nslot, int nn) {
    if constexpr (GC > 1) {
        if (gc < GC) return chunk_dispatch<DT, NV, GC - 1>(values, gc, cache, slot, row, off, n, q, s, acc, nslot, nn);
    }
    if (values) chunk_values<DT, NV, GC>(cache, slot, row, off, n, s, acc, nslot, nn);
    else chunk_scores<DT, NV, GC>(cache, slot, row, off, n, q, s, nslot, nn);
}

template <int DT, int NV>
void attend_span_vec(const Args& a, int b, int t0, int t1, float* m, float* l, float* accf) {
    // All KV heads per item: a token's K (then V) row is read whole and in order, instead of
    // a KV head's slice per item (which left the hardware prefetcher fetching the rest).
    constexpr int D = NV * W;
    // Virtual heads are KV-head-major here (v = kh * QG + token * G + g), so each KV head's
    // rows are contiguous; the caller's m/l/acc use the same order.
    const int G = a.H / a.KVH, Q = a.num_queries(b), QG = Q * G, L = a.seq_lens[b];
    const int64_t row = static_cast<int64_t>(a.KVH) * D;
    const int32_t* pages = a.page_table + b * a.pt_stride;
    // Head chunks of near-equal size, at most MAX_GC each (7 heads: 4 + 3, not 6 + 1).
    const int chunks = (QG + MAX_GC - 1) / MAX_GC, gc = (QG + chunks - 1) / chunks;
    vf qs[MAX_HEADS][NV];
    vf acc[MAX_HEADS][NV] = {};
    for (int v = 0; v < a.KVH * QG; ++v) {
        const int kh = v / QG, qi = (v % QG) / G, g = v % G;
        const float* qv = a.q + (static_cast<int64_t>(a.first_row(b) + qi) * a.H + kh * G + g) * D;
        for (int i = 0; i < NV; ++i) {
            std::memcpy(&qs[v][i], qv + i * W, sizeof(vf));
            qs[v][i] *= a.scale;
        }
        m[v] = -1e30f;
        l[v] = 0.0f;
    }
    float s[MAX_HEADS][BLOCK];
    int64_t slot[BLOCK], nslot[BLOCK];
    for (int start = t0; start < t1; start += BLOCK) {
        const int n = start + BLOCK <= t1 ? BLOCK : t1 - start;
        for (int j = 0; j < n; ++j) {
            const int t = start + j;
            slot[j] = static_cast<int64_t>(pages[t / a.page_size]) * a.page_size + t % a.page_size;
        }
        // The next block's rows are prefetched while this one computes, a few at a time
        // inside the score and value loops (one KV head's slice of 8 tokens, then of 1):
        // issued all at once at the top of the block they filled the core's miss buffers
        // and stalled it until most had landed (measured 11% slower in fp32, 23% in fp16).
        const int nn = start + BLOCK < t1 ? std::min(BLOCK, t1 - start - BLOCK) : 0;
        for (int j = 0; j < nn; ++j) {
            const int t = start + BLOCK + j;
            nslot[j] = static_cast<int64_t>(pages[t / a.page_size]) * a.page_size + t % a.page_size;
        }
        for (int kh = 0; kh < a.KVH; ++kh) {
            const int64_t off = kh * D;
            for (int h0 = 0; h0 < QG; h0 += gc)
                chunk_dispatch<DT, NV>(false, std::min(gc, QG - h0), a.k_cache, slot, row, off, n, qs + kh * QG + h0,
                                       s + h0, nullptr, h0 == 0 ? nslot : nullptr, nn);
            for (int g = 0; g < QG; ++g) {
                if (a.k_scale)
                    for (int j = 0; j < n; ++j) s[g][j] *= a.k_scale[slot[j]] * FP8_VIA_F16;
                const int h = kh * QG + g;
                const int nv = Q == 1 ? n : visible(start, n, L, Q, g / G);
                for (int j = nv; j < n; ++j) s[g][j] = 0.0f;
                float mb = m[h];
#pragma omp simd reduction(max : mb)
                for (int j = 0; j < nv; ++j) mb = s[g][j] > mb ? s[g][j] : mb;
                const float corr = std::exp(m[h] - mb);
                float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                for (int j = 0; j < nv; ++j) {
                    s[g][j] = std::exp(s[g][j] - mb);
                    sum += s[g][j];
                }
                l[h] = l[h] * corr + sum;
                m[h] = mb;
                if (corr != 1.0f)
                    for (int i = 0; i < NV; ++i) acc[h][i] *= corr;
                if (a.v_scale)
                    for (int j = 0; j < n; ++j) s[g][j] *= a.v_scale[slot[j]] * FP8_VIA_F16;
            }
            for (int h0 = 0; h0 < QG; h0 += gc)
                chunk_dispatch<DT, NV>(true, std::min(gc, QG - h0), a.v_cache, slot, row, off, n, nullptr, s + h0,
                                       acc + kh * QG + h0, h0 == 0 ? nslot : nullptr, nn);
        }
    }
    for (int h = 0; h < a.KVH * QG; ++h)
        for (int i = 0; i < NV; ++i) std::memcpy(accf + h * D + i * W, &acc[h][i], sizeof(vf));
}

// One item: every virtual head of sequence b over tokens [t0, t1); m, l [Q*H], acc [Q*H, D],
// KV-head-major (v = kh * Q * G + token * G + g).
template <int DT>
void attend(const Args& a, int b, int t0, int t1, float* m, float* l, float* acc) {
    if (a.H * a.num_queries(b) <= MAX_HEADS) {
        switch (a.D) {
            case 64: attend_span_vec<DT, 64 / W>(a, b, t0, t1, m, l, acc); return;
            case 128: attend_span_vec<DT, 128 / W>(a, b, t0, t1, m, l, acc); return;
            default: break;
        }
    }
    const int QG = a.num_queries(b) * (a.H / a.KVH);
    for (int kh = 0; kh < a.KVH; ++kh)
        attend_span<DT>(a, b, kh, t0, t1, m + kh * QG, l + kh * QG, acc + kh * QG * a.D);
}

template <int DT>
void run(const Args& a, int split, int threads) {
    const int D = a.D, G = a.H / a.KVH;
    int qmax = 1;
    for (int b = 0; b < a.B; ++b) qmax = std::max(qmax, a.num_queries(b));
    const int H = a.H * qmax;  // virtual heads per item (room for the most query tokens)
    // Items [first[b], first[b+1]) are sequence b's spans of span[b] <= split tokens, equal in
    // length. With fewer items than a few per thread, each sequence's count is rounded up to a
    // multiple of the threads so they finish together (one 1800-token sequence on 2 threads:
    // 4 spans of 450, not 512 + 512 + 512 + 264, whose 1024 : 776 split cost 12%).
    std::vector<int> first(a.B + 1, 0), span(a.B);
    int total = 0;
    for (int b = 0; b < a.B; ++b) total += (a.seq_lens[b] - a.first_key(b) + split - 1) / split;
    for (int b = 0; b < a.B; ++b) {
        const int len = a.seq_lens[b] - a.first_key(b);
        int n = (len + split - 1) / split;
        if (total < 4 * threads) n = std::min((n + threads - 1) / threads * threads, (len + 7) / 8);
        span[b] = (len + n - 1) / n;
        first[b + 1] = first[b] + (len + span[b] - 1) / span[b];
    }
    const int items = first[a.B];
    std::vector<float> m(static_cast<size_t>(items) * H), l(m.size()), acc(m.size() * D);
    // One parallel region for both loops (the for's barrier orders them): a second fork/join
    // cost a few microseconds per call, most of a short context's kernel time.
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(dynamic, 1)
    for (int it = 0; it < items; ++it) {
        int b = 0;
        while (first[b + 1] <= it) ++b;
        const int t0 = a.first_key(b) + (it - first[b]) * span[b];
        const int t1 = t0 + span[b] < a.seq_lens[b] ? t0 + span[b] : a.seq_lens[b];
        const size_t o = static_cast<size_t>(it) * H;
        attend<DT>(a, b, t0, t1, &m[o], &l[o], &acc[o * D]);
    }
    // Merge each (sequence, virtual head)'s spans by log-sum-exp.
#pragma omp for
    for (int bh = 0; bh < a.B * H; ++bh) {
        const int b = bh / H, h = bh % H, Q = a.num_queries(b), QG = Q * G;
        if (h >= a.H * Q) continue;
        const int kh = h / QG, qi = (h % QG) / G, g = h % G;
        float mx = -1e30f;
        for (int it = first[b]; it < first[b + 1]; ++it) mx = m[it * H + h] > mx ? m[it * H + h] : mx;
        float den = 0.0f;
        float* o = a.out + (static_cast<int64_t>(a.first_row(b) + qi) * a.H + kh * G + g) * D;
        std::memset(o, 0, sizeof(float) * D);
        for (int it = first[b]; it < first[b + 1]; ++it) {
            const size_t r = static_cast<size_t>(it) * H + h;
            const float w = std::exp(m[r] - mx);
            den += w * l[r];
            const float* ar = &acc[r * D];
#pragma omp simd
            for (int d = 0; d < D; ++d) o[d] += w * ar[d];
        }
        if (a.sinks) den += std::exp(a.sinks[kh * G + g] - mx);
        const float inv = 1.0f / den;
#pragma omp simd
        for (int d = 0; d < D; ++d) o[d] *= inv;
    }
    }
}

}  // namespace

extern "C" {

int agentspeed_abi_version() { return 12; }

// Returns 0 on success, a negative code for arguments the kernel cannot take (the Python
// wrapper checks these first; the codes are a second line of defence, never a crash).
// query_start: [B + 1] row offsets of each sequence's query tokens (at most MAX_QUERY each,
// the last ones of its context), or null for one token per sequence. window > 0: a sliding
// window (one query per sequence, which reads only its last `window` keys' pages); sinks: null
// or [H] logits that join each head's softmax denominator (GPT-OSS).
int paged_decode_attention(const float* q, const int32_t* query_start, const void* k_cache,
                           const void* v_cache, const float* k_scale, const float* v_scale, int dtype,
                           const int32_t* page_table, int64_t pt_stride, const int32_t* seq_lens,
                           int B, int H, int KVH, int D, int page_size, float scale, float* out,
                           int split, int threads, int window, const float* sinks) {
    if (KVH <= 0 || H % KVH != 0 || H / KVH > MAX_GROUP || D > MAX_DIM || split <= 0 || window < 0) return -1;
    for (int b = 0; b < B; ++b) {
        const int nq = query_start ? query_start[b + 1] - query_start[b] : 1;
        if (seq_lens[b] <= 0 || nq < 1 || nq > MAX_QUERY || nq > seq_lens[b]) return -2;
        if (window > 0 && nq != 1) return -5;  // windows: one query per sequence
    }
    Args a{q, query_start, k_cache, v_cache, k_scale, v_scale, page_table, pt_stride, seq_lens,
           B, H, KVH, D, page_size, scale, out, window, sinks};
    switch (dtype) {
        case F32: run<F32>(a, split, threads); return 0;
        case BF16: run<BF16>(a, split, threads); return 0;
        case F16: run<F16>(a, split, threads); return 0;
        case FP8_E4M3:
            if (!k_scale || !v_scale) return -3;
            run<FP8_E4M3>(a, split, threads);
            return 0;
        default: return -4;
    }
}

}  // extern "C"

namespace {
struct Init {
    Init() { init_fp8_lut(); }
} init_once;
}  // namespace
