// Routed experts of a decode step (or a small batch: drafts being verified, a few streams)
// in one call (Qwen3-MoE, DeepSeek): for every expert with tokens, h = silu(x_e Wg_e^T) *
// (x_e Wu_e^T) and y[t] += w[t, e] * (h Wd_e^T), with the packed decode kernels for the
// products, 8 of an expert's rows per product: the int8 one (ggml_linear_q8) where asked and
// the product's types and K allow, as cpu_ggml.linear chooses for decode rows, else int16.
//
// Why: the Python loop over experts made 2 linear calls, a silu and the gathers per expert
// (a top-8 router: 24 calls and their tensor temporaries per layer and token). Here the
// experts are split across threads (one expert per thread at a time, each product on one
// thread): a decode step's experts stream the same bytes, so the split balances, and no
// parallel region opens per product.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include <omp.h>

extern "C" int ggml_linear_i16(const float* x, int R, int64_t ldx, int K, int nparts, const int* types,
                               const uint8_t* const* ws, const int64_t* strides, const int* rows,
                               const int* offs, const float* bias, float* y, int64_t ldy, int threads);

extern "C" int ggml_linear_q8(const float* x, int R, int64_t ldx, int K, int nparts, const int* types,
                              const uint8_t* const* ws, const int64_t* strides, const int* rows,
                              const int* offs, const float* bias, float* y, int64_t ldy, int threads);

namespace {

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

// One product: int8 activations when `q8` and ggml_linear_q8 takes the parts (-1: a type it
// has no kernel for, -3: K not whole 256-column blocks), else int16.
int product(bool q8, const float* x, int R, int K, int nparts, const int* types, const uint8_t* const* ws,
            const int64_t* strides, const int* rows, const int* offs, float* y, int64_t ldy) {
    if (q8) {
        const int rc = ggml_linear_q8(x, R, K, K, nparts, types, ws, strides, rows, offs, nullptr, y, ldy, 1);
        if (rc != -1 && rc != -3) return rc;
    }
    return ggml_linear_i16(x, R, K, K, nparts, types, ws, strides, rows, offs, nullptr, y, ldy, 1);
}

}  // namespace

extern "C" {

// x [T, K] fp32 (row stride ldx); ids/weights [T, topk]: each token's experts and their
// weights. Expert e's gate|up weight is two parts of F rows (types13[2e + p], ws13[2e + p],
// strides13[2e + p]) and its down weight one part of N rows with F columns (types2[e], ...).
// y [T, N] is overwritten. An expert picked by more than 8 tokens runs in groups of 8 rows
// (the decode kernels' most), each streaming its weights once. q8: 1 for int8 activations
// where a product's weights allow (see product()), 0 for int16 throughout.
// Returns 0; -1 for bad arguments; a kernel's negative code (minus 10) if a product fails.
int ggml_moe_i16(const float* x, int T, int64_t ldx, int K, int topk, const int32_t* ids, const float* weights,
                 int E, const int* types13, const uint8_t* const* ws13, const int64_t* strides13, int F,
                 const int* types2, const uint8_t* const* ws2, const int64_t* strides2, int N, float* y,
                 int q8, int threads) {
    if (T < 1 || topk < 1 || E < 1 || F < 1 || N < 1) return -1;
    // Tokens of each expert, in token order.
    std::vector<std::vector<int>> rows(E);
    for (int t = 0; t < T; ++t)
        for (int j = 0; j < topk; ++j) {
            const int e = ids[t * topk + j];
            if (e < 0 || e >= E) return -1;
            rows[e].push_back(t * topk + j);
        }
    std::vector<std::pair<int, int>> active;  // (expert, first of its <= 8 rows)
    for (int e = 0; e < E; ++e)
        for (size_t r0 = 0; r0 < rows[e].size(); r0 += 8) active.emplace_back(e, static_cast<int>(r0));
    const int A = static_cast<int>(active.size());
    std::vector<float> out(static_cast<size_t>(T) * topk * N);  // one row per (token, choice)
    int rc = 0;
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> xe(static_cast<size_t>(8) * K), h13(static_cast<size_t>(8) * 2 * F),
            h(static_cast<size_t>(8) * F), ye(static_cast<size_t>(8) * N);
#pragma omp for schedule(dynamic, 1)
        for (int a = 0; a < A; ++a) {
            const int e = active[a].first;
            const int* sel = rows[e].data() + active[a].second;
            const int R = std::min(8, static_cast<int>(rows[e].size()) - active[a].second);
            for (int r = 0; r < R; ++r)
                std::memcpy(&xe[static_cast<size_t>(r) * K], x + (sel[r] / topk) * ldx, sizeof(float) * K);
            const int rows13[2] = {F, F}, offs13[2] = {0, F};
            int code = product(q8, xe.data(), R, K, 2, types13 + 2 * e, ws13 + 2 * e, strides13 + 2 * e, rows13,
                               offs13, h13.data(), 2 * F);
            if (code == 0) {
                for (int r = 0; r < R; ++r) {
                    const float* g = &h13[static_cast<size_t>(r) * 2 * F];
                    float* hr = &h[static_cast<size_t>(r) * F];
                    for (int i = 0; i < F; ++i) hr[i] = silu(g[i]) * g[F + i];
                }
                const int rows2[1] = {N}, offs2[1] = {0};
                code = product(q8, h.data(), R, F, 1, types2 + e, ws2 + e, strides2 + e, rows2, offs2, ye.data(), N);
            }
            if (code != 0) {
#pragma omp critical
                rc = code - 10;
                continue;
            }
            for (int r = 0; r < R; ++r)
                std::memcpy(&out[static_cast<size_t>(sel[r]) * N], &ye[static_cast<size_t>(r) * N], sizeof(float) * N);
        }
    }
    if (rc != 0) return rc;
    // Sum each token's choices in router order (deterministic, whatever the thread split).
    for (int t = 0; t < T; ++t) {
        float* yt = y + static_cast<int64_t>(t) * N;
        std::memset(yt, 0, sizeof(float) * N);
        for (int j = 0; j < topk; ++j) {
            const float w = weights[t * topk + j];
            const float* o = &out[static_cast<size_t>(t * topk + j) * N];
            for (int i = 0; i < N; ++i) yt[i] += w * o[i];
        }
    }
    return 0;
}

}  // extern "C"
