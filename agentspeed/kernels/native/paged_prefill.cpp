// Paged prefill attention for CPUs: each sequence's new tokens (a fresh prompt, a prompt
// chunk, or a tool output appended to a long cached conversation) over its paged K/V cache,
// causal, in the cache's own storage type (fp32 read in place; bf16, fp16 and fp8 rows
// converted once per block of keys).
//
// Why native: agentic prefill is new tokens over a long cached prefix, and there attention,
// not the linears, is most of the FLOPs (SmolLM2 at 6K context: ~14 MFLOP per token and
// layer against 7 for the linears). torch's CPU flash kernel runs it at ~155 GFLOP/s here;
// this one is laid out to run at GEMM speed.
//
// Layout: query rows of one KV head's group are folded (row = token * G + g), and a block of
// MQ = 32 rows is held transposed, rows along the vector lanes: Q^T [D][MQ], scores
// S^T [NK][MQ], with K and V read in their natural [token][D] rows and broadcast one value at
// a time. So both matmuls are outer-product register tiles with no transposes of K or V, and
// the online softmax (max, exp, sum, rescale) is element-wise across the lanes. The output
// tile O [MQ][D] accumulates in memory and is touched once per block of NK keys. Scores are
// in base 2 (log2 e is folded into the query scale), so softmax uses exp2.
//
// Sliding windows (Gemma 3, GPT-OSS, Mistral): a row block's keys start at its first row's
// window, so pages before it are never read, and the rows' window edges are masked like the
// causal one. Sinks (GPT-OSS): one more logit per head in the denominator, added in the merge.
//
// Work split: items (sequence, KV head, block of MQ rows, span of keys), largest first,
// shared by OpenMP threads. A row block's key spans are merged by log-sum-exp; spans are cut
// only when there are too few blocks to keep every thread busy (a short tool output over a
// long context).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "kv_load.h"
#include "vec.h"

namespace {

constexpr int NQ = 32 / W;  // vectors of query rows per block
constexpr int MQ = NQ * W;  // query rows per block (32)
constexpr int NK = 64;      // keys per softmax block
constexpr int JR = W == 16 ? 8 : 2;  // keys per register tile of the score product
constexpr int RR = W == 16 ? 4 : 2;  // rows per register tile of the value product
constexpr int CV = 4;                // output vectors per register tile of the value product
constexpr int MAX_GROUP = 32;
constexpr float LOG2E = 1.4426950408889634f;
// Finite stand-ins for -inf (-ffast-math assumes no infinities): the running max starts at
// NEG and a masked score is MASKED, below it, so a row that sees no key of a span ends it
// with l = 0 and m = NEG (weight 0 in the merge) rather than with exp2(0) = 1 per key.
constexpr float NEG = -1e30f;
constexpr float MASKED = -2e30f;

struct Args {
    const float* q;  // [T, H, D]
    const void* k_cache;  // [pages, page_size, KVH, D]
    const void* v_cache;
    const float* k_scale;  // [pages, page_size] or null
    const float* v_scale;
    const int32_t* page_table;  // [B, pt_stride]
    int64_t pt_stride;
    const int32_t* query_start;  // [B + 1]
    const int32_t* seq_lens;  // [B]
    int B, H, KVH, page_size;
    float scale;
    float* out;  // [T, H, D]
    int window;  // a row at position p sees keys in (p - window, p]; 0: no window
    const float* sinks;  // [H] sink logits, or null
};

struct Item {
    int b, kh, blk, k0, k1;  // rows blk*MQ.. of sequence b's KV head kh over keys [k0, k1)
    int part;  // index of this item's partial result
};

// Output of one item: unnormalised O [MQ][D], running max m (base 2) and sum l per row.
template <int D>
struct Partial {
    float o[MQ][D];
    float m[MQ], l[MQ];
};

template <int DT, int D>
void attend_block(const Args& a, const Item& it, Partial<D>& res) {
    constexpr int NV = D / W;
    const int G = a.H / a.KVH;
    const int q0 = a.query_start[it.b], qlen = a.query_start[it.b + 1] - q0;
    const int rows = qlen * G, P0 = a.seq_lens[it.b] - qlen;
    const int64_t row = static_cast<int64_t>(a.KVH) * D;  // stored elements per token
    const int32_t* pages = a.page_table + it.b * a.pt_stride;

    alignas(64) float qt[D][MQ];
    alignas(64) float s[NK][MQ];
    alignas(64) int32_t pos[MQ];
    const float qscale = a.scale * LOG2E;
    for (int r = 0; r < MQ; ++r) {
        const int gr = std::min(it.blk * MQ + r, rows - 1);  // padding rows repeat the last
        const int tok = gr / G, g = gr % G;
        pos[r] = P0 + tok;
        const float* qr = a.q + (static_cast<int64_t>(q0 + tok) * a.H + it.kh * G + g) * D;
        for (int d = 0; d < D; ++d) qt[d][r] = qr[d] * qscale;
    }
    const int minpos = pos[0], maxpos = pos[MQ - 1];
    const int wlen = a.window > 0 ? a.window : INT32_MAX;
    vf m[NQ], l[NQ];
    vi posv[NQ];
    for (int i = 0; i < NQ; ++i) {
        m[i] = vf{} + NEG;
        l[i] = vf{};
        std::memcpy(&posv[i], pos + i * W, sizeof(vi));
    }
    std::memset(res.o, 0, sizeof(res.o));

    alignas(64) static thread_local float kbuf[NK][D], vbuf[NK][D];
    alignas(64) static const float zero[D] = {};
    const float* krow[NK];
    const float* vrow[NK];
    for (int k0 = it.k0; k0 < it.k1; k0 += NK) {
        const int n = std::min(NK, it.k1 - k0);
        for (int j = 0; j < n; ++j) {
            const int t = k0 + j;
            const int64_t slot = static_cast<int64_t>(pages[t / a.page_size]) * a.page_size + t % a.page_size;
            const int64_t e = slot * row + it.kh * D;
            if constexpr (DT == F32) {
                krow[j] = static_cast<const float*>(a.k_cache) + e;
                vrow[j] = static_cast<const float*>(a.v_cache) + e;
            } else {
                const float ks = a.k_scale ? a.k_scale[slot] * FP8_VIA_F16 : 1.0f;
                const float vs = a.v_scale ? a.v_scale[slot] * FP8_VIA_F16 : 1.0f;
                for (int i = 0; i < NV; ++i) {
                    st(&kbuf[j][i * W], loadw<DT>(a.k_cache, e + i * W) * ks);
                    st(&vbuf[j][i * W], loadw<DT>(a.v_cache, e + i * W) * vs);
                }
                krow[j] = kbuf[j];
                vrow[j] = vbuf[j];
            }
        }
        const int np = (n + JR - 1) / JR * JR;
        for (int j = n; j < np; ++j) krow[j] = zero;

        // S^T = K Q^T: a JR x NQ tile of accumulators per step over d.
        for (int j0 = 0; j0 < np; j0 += JR) {
            vf acc[JR][NQ] = {};
            for (int d = 0; d < D; ++d) {
                vf qv[NQ];
                for (int i = 0; i < NQ; ++i) qv[i] = ld(&qt[d][i * W]);
                for (int jj = 0; jj < JR; ++jj) {
                    const vf kb = vf{} + krow[j0 + jj][d];
                    for (int i = 0; i < NQ; ++i) acc[jj][i] += kb * qv[i];
                }
            }
            for (int jj = 0; jj < JR; ++jj)
                for (int i = 0; i < NQ; ++i) st(&s[j0 + jj][i * W], acc[jj][i]);
        }
        // Some key lies after some row (causal mask), or before some row's window.
        if (k0 + n - 1 > minpos || (a.window > 0 && k0 <= maxpos - a.window))
            for (int j = 0; j < n; ++j)
                for (int i = 0; i < NQ; ++i) {
                    const vf v = ld(&s[j][i * W]);
                    const vi kk = vi{} + (k0 + j);
                    st(&s[j][i * W], ((posv[i] < kk) | (posv[i] - kk >= wlen)) ? vf{} + MASKED : v);
                }

        // Online softmax across the lanes: new max, rescale factor, probabilities, sums.
        vf corr[NQ];
        for (int i = 0; i < NQ; ++i) {
            vf mb = m[i];
            for (int j = 0; j < n; ++j) mb = vmax(mb, ld(&s[j][i * W]));
            corr[i] = vexp2(m[i] - mb);
            vf sum = vf{};
            for (int j = 0; j < n; ++j) {
                const vf p = vexp2(ld(&s[j][i * W]) - mb);
                st(&s[j][i * W], p);
                sum += p;
            }
            l[i] = l[i] * corr[i] + sum;
            m[i] = mb;
        }
        alignas(64) float cr[MQ];
        for (int i = 0; i < NQ; ++i) st(cr + i * W, corr[i]);

        // O = diag(corr) O + P V: an RR x CV tile, broadcasting P and reading V rows.
        for (int c0 = 0; c0 < NV; c0 += CV) {
            constexpr int C = NV < CV ? NV : CV;
            for (int r0 = 0; r0 < MQ; r0 += RR) {
                vf acc[RR][C];
                for (int rr = 0; rr < RR; ++rr)
                    for (int c = 0; c < C; ++c) acc[rr][c] = ld(&res.o[r0 + rr][(c0 + c) * W]) * cr[r0 + rr];
                for (int j = 0; j < n; ++j) {
                    vf vv[C];
                    for (int c = 0; c < C; ++c) vv[c] = ld(vrow[j] + (c0 + c) * W);
                    for (int rr = 0; rr < RR; ++rr) {
                        const vf p = vf{} + s[j][r0 + rr];
                        for (int c = 0; c < C; ++c) acc[rr][c] += p * vv[c];
                    }
                }
                for (int rr = 0; rr < RR; ++rr)
                    for (int c = 0; c < C; ++c) st(&res.o[r0 + rr][(c0 + c) * W], acc[rr][c]);
            }
        }
    }
    for (int i = 0; i < NQ; ++i) {
        st(res.m + i * W, m[i]);
        st(res.l + i * W, l[i]);
    }
}

template <int DT, int D>
void run(const Args& a, int threads) {
    const int G = a.H / a.KVH;
    // Row blocks, each over its causal key range [0, last row's position + 1).
    std::vector<Item> items;
    for (int b = 0; b < a.B; ++b) {
        const int qlen = a.query_start[b + 1] - a.query_start[b];
        const int P0 = a.seq_lens[b] - qlen;
        const int nblk = (qlen * G + MQ - 1) / MQ;
        for (int kh = 0; kh < a.KVH; ++kh)
            for (int blk = 0; blk < nblk; ++blk) {
                const int last = std::min(blk * MQ + MQ, qlen * G) - 1;
                const int lo = a.window > 0 ? std::max(0, P0 + blk * MQ / G - a.window + 1) : 0;
                items.push_back({b, kh, blk, lo, P0 + last / G + 1, 0});
            }
    }
    const int blocks = static_cast<int>(items.size());
    // Too few blocks for the threads: cut each one's keys into spans (whole NK blocks).
    int64_t keys = 0;
    for (const Item& it : items) keys += it.k1 - it.k0;
    const int64_t span = blocks >= 4 * threads ? INT32_MAX
        : std::max<int64_t>(4 * NK, (keys / (8 * threads) + NK - 1) / NK * NK);
    std::vector<int> first(blocks + 1, 0);  // block i's partials: [first[i], first[i + 1])
    std::vector<Item> work;
    for (int i = 0; i < blocks; ++i) {
        const Item& it = items[i];
        for (int64_t k0 = it.k0; k0 < it.k1; k0 += span) {
            const int k1 = static_cast<int>(std::min<int64_t>(it.k1, k0 + span));
            work.push_back({it.b, it.kh, it.blk, static_cast<int>(k0), k1, static_cast<int>(work.size())});
        }
        first[i + 1] = static_cast<int>(work.size());
    }
    // Largest first for the dynamic schedule, but a (sequence, KV head)'s items kept together
    // so the threads share its K/V rows in cache (interleaving sequences by size measured
    // 25% slower with 4 x 4K contexts, whose K/V outgrew the cache): groups by their total
    // keys, descending, and items within a group by their own, descending.
    std::vector<int64_t> group_keys(static_cast<size_t>(a.B) * a.KVH, 0);
    for (const Item& it : work) group_keys[it.b * a.KVH + it.kh] += it.k1 - it.k0;
    std::stable_sort(work.begin(), work.end(), [&](const Item& x, const Item& y) {
        const int gx = x.b * a.KVH + x.kh, gy = y.b * a.KVH + y.kh;
        if (gx != gy) return group_keys[gx] != group_keys[gy] ? group_keys[gx] > group_keys[gy] : gx < gy;
        return x.k1 - x.k0 > y.k1 - y.k0;
    });
    std::vector<Partial<D>> parts(work.size());
    const int nw = static_cast<int>(work.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int w = 0; w < nw; ++w) attend_block<DT, D>(a, work[w], parts[work[w].part]);

    // Merge each block's spans by log-sum-exp (base 2) and write its valid rows.
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int i = 0; i < blocks; ++i) {
        const Item& it = items[i];
        const int q0 = a.query_start[it.b], rows = (a.query_start[it.b + 1] - q0) * G;
        for (int r = 0; r < MQ && it.blk * MQ + r < rows; ++r) {
            const int gr = it.blk * MQ + r, tok = gr / G, g = gr % G;
            float mx = NEG;
            for (int p = first[i]; p < first[i + 1]; ++p) mx = std::max(mx, parts[p].m[r]);
            const float sink = a.sinks ? a.sinks[it.kh * G + g] * LOG2E : NEG;
            mx = std::max(mx, sink);
            float o[D] = {};
            float den = a.sinks ? std::exp2(sink - mx) : 0.0f;
            for (int p = first[i]; p < first[i + 1]; ++p) {
                const float w = std::exp2(parts[p].m[r] - mx);
                den += w * parts[p].l[r];
                for (int d = 0; d < D; ++d) o[d] += w * parts[p].o[r][d];
            }
            float* dst = a.out + (static_cast<int64_t>(q0 + tok) * a.H + it.kh * G + g) * D;
            const float inv = 1.0f / den;
            for (int d = 0; d < D; ++d) dst[d] = o[d] * inv;
        }
    }
}

template <int DT>
int dispatch(const Args& a, int D, int threads) {
    switch (D) {
        case 64: run<DT, 64>(a, threads); return 0;
        case 128: run<DT, 128>(a, threads); return 0;
        default: return -5;
    }
}

}  // namespace

extern "C" {

// The head sizes paged_prefill_attention takes (a multiple of CV vectors: 64 and 128).
int paged_prefill_supports(int H, int KVH, int D) {
    return KVH > 0 && H % KVH == 0 && H / KVH <= MAX_GROUP && (D == 64 || D == 128) && D % (CV * W) == 0;
}

// Returns 0 on success, a negative code for arguments it cannot take (the Python wrapper
// checks paged_prefill_supports first; the codes are a second line of defence).
int paged_prefill_attention(const float* q, const void* k_cache, const void* v_cache,
                            const float* k_scale, const float* v_scale, int dtype,
                            const int32_t* page_table, int64_t pt_stride, const int32_t* query_start,
                            const int32_t* seq_lens, int B, int H, int KVH, int D, int page_size,
                            float scale, float* out, int threads, int window, const float* sinks) {
    if (!paged_prefill_supports(H, KVH, D)) return -1;
    for (int b = 0; b < B; ++b) {
        const int qlen = query_start[b + 1] - query_start[b];
        if (qlen < 0 || qlen > seq_lens[b]) return -2;
    }
    if (window < 0) return -2;
    Args a{q, k_cache, v_cache, k_scale, v_scale, page_table, pt_stride, query_start, seq_lens,
           B, H, KVH, page_size, scale, out, window, sinks};
    switch (dtype) {
        case F32: return dispatch<F32>(a, D, threads);
        case BF16: return dispatch<BF16>(a, D, threads);
        case F16: return dispatch<F16>(a, D, threads);
        case FP8_E4M3:
            if (!k_scale || !v_scale) return -3;
            return dispatch<FP8_E4M3>(a, D, threads);
        default: return -4;
    }
}

}  // extern "C"
