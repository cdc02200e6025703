// Routed experts of a step in one call (Qwen3-MoE, DeepSeek): for every expert with tokens,
// h = silu(x_e Wg_e^T) * (x_e Wu_e^T) and y[t] += w[t, e] * (h Wd_e^T), each product taking the
// kernel cpu_ggml.linear() takes for its row count (see product()), so a step of any size
// rounds its activations as the per-expert loop of linear() calls it replaces.
//
// Why: the Python loop over experts made 2 linear calls, a silu and the gathers per expert
// (a top-8 router: 24 calls and their tensor temporaries per layer and token), and for a
// prefill each expert's products split across the threads (a 768-row product on 2 threads).
// Here work items (an expert and up to CHUNK of its rows) are split across threads, each
// product on one thread, largest items first: a decode step's experts stream the same bytes,
// a prefill's experts are many GEMMs of tens to hundreds of rows, and no parallel region
// opens per product.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include <omp.h>

#define GGML_PARTS_ARGS                                                                                    \
    const float *x, int R, int64_t ldx, int K, int nparts, const int *types, const uint8_t *const *ws, \
        const int64_t *strides, const int *rows, const int *offs, const float *bias, float *y, int64_t ldy, int threads
extern "C" int ggml_linear_i16(GGML_PARTS_ARGS);
extern "C" int ggml_linear_q8(GGML_PARTS_ARGS);
extern "C" int ggml_gemm_i16(GGML_PARTS_ARGS);
extern "C" int ggml_gemm_q8(GGML_PARTS_ARGS);
extern "C" int ggml_gemm_k8(GGML_PARTS_ARGS);
#undef GGML_PARTS_ARGS
extern "C" int ggml_gemm(int type, const float* x, int M, int64_t ldx, int K, const uint8_t* w, int64_t ws, int N,
                         const float* bias, float* y, int64_t ldy, int threads);
extern "C" int ggml_has_q8(int type);
extern "C" int silu_and_mul(const float* x, int64_t x_stride, int64_t T, int64_t d, float* out, int64_t out_stride,
                            int threads);

namespace {

constexpr int DECODE_ROWS = 8;  // the most rows the decode kernels (ggml_linear_*) take: cpu_ggml.I16_ROWS
constexpr int CHUNK = 256;      // the most rows of one expert per work item (ggml_gemm_k8's MC)

// How the products round x, as cpu_ggml.linear() in the backend's mode: many: 0 (mode int16:
// int16 activations at every row count), 1 or 2 (mode auto, with ggml_gemm_q8's or
// ggml_gemm_k8's fast loop above q8_rows rows), 3 (mode auto on a build without either).
struct Mode {
    int many, q8_rows;
};

// y[:, offs[p]...] = x W^T for R rows on this thread, with the kernel cpu_ggml.linear() takes
// for R rows in `mode`: up to 8 rows the int8 decode kernel where the parts' types and K allow
// (mode auto), else int16; above 8 rows int16 in mode int16; in mode auto the many-row int8
// kernel for K-quant parts (8-row decode calls below q8_rows rows), else exact fp32 products
// (ggml_gemm per part: linear() takes those or its sgemm of decoded panels, both exact).
int product(const Mode& m, const float* x, int R, int K, int nparts, const int* types, const uint8_t* const* ws,
            const int64_t* strides, const int* rows, const int* offs, float* y, int64_t ldy) {
    bool q8 = K % 256 == 0;
    for (int p = 0; p < nparts; ++p) q8 = q8 && ggml_has_q8(types[p]);
    if (m.many == 0)
        return (R <= DECODE_ROWS ? ggml_linear_i16 : ggml_gemm_i16)(x, R, K, K, nparts, types, ws, strides, rows, offs,
                                                                  nullptr, y, ldy, 1);
    if (R <= DECODE_ROWS)
        return (q8 ? ggml_linear_q8 : ggml_linear_i16)(x, R, K, K, nparts, types, ws, strides, rows, offs, nullptr, y,
                                                      ldy, 1);
    if (q8 && m.many != 3) {
        if (R >= m.q8_rows)
            return (m.many == 1 ? ggml_gemm_q8 : ggml_gemm_k8)(x, R, K, K, nparts, types, ws, strides, rows, offs,
                                                              nullptr, y, ldy, 1);
        for (int r0 = 0; r0 < R; r0 += DECODE_ROWS) {
            const int rc = ggml_linear_q8(x + static_cast<int64_t>(r0) * K, std::min(DECODE_ROWS, R - r0), K, K, nparts,
                                          types, ws, strides, rows, offs, nullptr, y + r0 * ldy, ldy, 1);
            if (rc != 0) return rc;
        }
        return 0;
    }
    for (int p = 0; p < nparts; ++p) {
        const int rc = ggml_gemm(types[p], x, R, K, K, ws[p], strides[p], rows[p], nullptr, y + offs[p], ldy, 1);
        if (rc != 0) return rc;
    }
    return 0;
}

// y[r, :n] += b for n-wide rows.
void add_rows(float* y, int rows, int n, const float* b) {
    for (int r = 0; r < rows; ++r)
        for (int i = 0; i < n; ++i) y[int64_t{r} * n + i] += b[i];
}

// GPT-OSS's activation of gate|up rows [rows, 2F] into h [rows, F], as SparseMoE._act.
void clamped_swiglu(const float* g13, int rows, int F, float limit, float alpha, float* h) {
    for (int r = 0; r < rows; ++r)
        for (int i = 0; i < F; ++i) {
            const float g = std::min(g13[int64_t{r} * 2 * F + i], limit);
            const float u = std::clamp(g13[int64_t{r} * 2 * F + F + i], -limit, limit);
            // sigmoid(z) with e = exp(-|z|) <= 1: no inf (this file is built with -ffast-math)
            const float z = g * alpha, e = std::exp(-std::fabs(z));
            h[int64_t{r} * F + i] = (u + 1.0f) * g * ((z < 0.0f ? e : 1.0f) / (1.0f + e));
        }
}

// Tokens per block: out_bytes of per-(token, choice) outputs, at least 1, at most T.
int64_t token_block(int T, int topk, int N, int64_t out_bytes) {
    return std::min<int64_t>(T, std::max<int64_t>(1, out_bytes / (int64_t{topk} * N * 4)));
}

// One thread's rows of an item (an expert has at most one row per token of the block): x,
// gate|up, h and the down projection's output.
int64_t thread_floats(int64_t block, int K, int F, int N) { return std::min<int64_t>(CHUNK, block) * (K + 3 * F + N); }

}  // namespace

extern "C" {

// Floats of the workspace ggml_moe needs for these arguments (its caller allocates it, so a
// step's buffers come from torch's allocator, reused step after step, not mapped and zeroed
// afresh by each call: measured ~5% of a 1,024-token call's time).
int64_t ggml_moe_workspace(int T, int K, int topk, int F, int N, int64_t out_bytes, int threads) {
    const int64_t block = token_block(T, topk, N, out_bytes);
    return block * topk * N + threads * thread_floats(block, K, F, N);
}

// x [T, K] fp32 (row stride ldx); ids/weights [T, topk]: each token's experts and their
// weights. Expert e's gate|up weight is two parts of F rows (types13[2e + p], ws13[2e + p],
// strides13[2e + p]) and its down weight one part of N rows with F columns (types2[e], ...).
// y [T, N] is overwritten; each token's choices are summed in router order (the same result
// whatever the thread split). many, q8_rows: how products round x (Mode above). The
// per-choice outputs are held for out_bytes / (topk * N * 4) tokens at a time (at least 1);
// ws: ggml_moe_workspace(T, K, topk, F, N, out_bytes, threads) floats. GPT-OSS's experts:
// b13 [E, 2F] and b2 [E, N] biases (or null) added to each product, and with limit > 0 the
// clamped SwiGLU (clamp(up, +-limit) + 1) * g * sigmoid(alpha g), g = min(gate, limit), in
// place of silu(gate) * up.
// Returns 0; -1 for bad arguments; a kernel's negative code (minus 10) if a product fails.
int ggml_moe(const float* x, int T, int64_t ldx, int K, int topk, const int32_t* ids, const float* weights, int E,
             const int* types13, const uint8_t* const* ws13, const int64_t* strides13, int F, const int* types2,
             const uint8_t* const* ws2, const int64_t* strides2, int N, float* y, int many, int q8_rows,
             int64_t out_bytes, float* ws, const float* b13, const float* b2, float limit, float alpha,
             int threads) {
    if (T < 1 || topk < 1 || E < 1 || F < 1 || N < 1 || many < 0 || many > 3) return -1;
    for (int64_t i = 0; i < int64_t{T} * topk; ++i)
        if (ids[i] < 0 || ids[i] >= E) return -1;
    const Mode mode{many, q8_rows};
    const int block = static_cast<int>(token_block(T, topk, N, out_bytes));
    float* out = ws;  // a row per (token, choice) of the block
    std::vector<std::vector<int>> sel(E);  // each expert's (token, choice) slots in the block, in token order
    int rc = 0;
    for (int t0 = 0; t0 < T && rc == 0; t0 += block) {
        const int tn = std::min(block, T - t0);
        for (auto& s : sel) s.clear();
        for (int i = 0; i < tn * topk; ++i) sel[ids[int64_t{t0} * topk + i]].push_back(i);
        std::vector<std::tuple<int, int, int>> items;  // (rows, expert, first row), largest first
        for (int e = 0; e < E; ++e)
            for (int r0 = 0; r0 < static_cast<int>(sel[e].size()); r0 += CHUNK)
                items.emplace_back(std::min(CHUNK, static_cast<int>(sel[e].size()) - r0), e, r0);
        std::sort(items.begin(), items.end(), [](const auto& a, const auto& b) { return std::get<0>(a) > std::get<0>(b); });
        const int A = static_cast<int>(items.size()), most = A ? std::get<0>(items[0]) : 0;
#pragma omp parallel num_threads(threads)
        {
            float* xe = ws + int64_t{block} * topk * N + omp_get_thread_num() * thread_floats(block, K, F, N);
            float* h13 = xe + int64_t{most} * K;
            float* h = h13 + int64_t{most} * 2 * F;
            float* ye = h + int64_t{most} * F;
#pragma omp for schedule(dynamic, 1)
            for (int a = 0; a < A; ++a) {
                const auto [n, e, r0] = items[a];
                const int* slot = sel[e].data() + r0;
                for (int r = 0; r < n; ++r)
                    std::memcpy(xe + int64_t{r} * K, x + (t0 + slot[r] / topk) * ldx, sizeof(float) * K);
                const int rows13[2] = {F, F}, offs13[2] = {0, F};
                int code = product(mode, xe, n, K, 2, types13 + 2 * e, ws13 + 2 * e, strides13 + 2 * e, rows13,
                                   offs13, h13, 2 * F);
                if (code == 0) {
                    if (b13) add_rows(h13, n, 2 * F, b13 + int64_t{e} * 2 * F);
                    if (limit > 0.0f)
                        clamped_swiglu(h13, n, F, limit, alpha, h);
                    else
                        silu_and_mul(h13, 2 * F, n, F, h, F, 1);  // the dense MLP's, bit for bit
                    const int rows2[1] = {N}, offs2[1] = {0};
                    code = product(mode, h, n, F, 1, types2 + e, ws2 + e, strides2 + e, rows2, offs2, ye, N);
                    if (code == 0 && b2) add_rows(ye, n, N, b2 + int64_t{e} * N);
                }
                if (code != 0) {
#pragma omp critical
                    rc = code - 10;
                    continue;
                }
                for (int r = 0; r < n; ++r)
                    std::memcpy(out + int64_t{slot[r]} * N, ye + int64_t{r} * N, sizeof(float) * N);
            }
        }
        if (rc != 0) break;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int t = 0; t < tn; ++t) {
            float* yt = y + static_cast<int64_t>(t0 + t) * N;
            std::memset(yt, 0, sizeof(float) * N);
            for (int j = 0; j < topk; ++j) {
                const float w = weights[int64_t{t0 + t} * topk + j];
                const float* o = out + (int64_t{t} * topk + j) * N;
                for (int i = 0; i < N; ++i) yt[i] += w * o[i];
            }
        }
    }
    return rc;
}

}  // extern "C"
