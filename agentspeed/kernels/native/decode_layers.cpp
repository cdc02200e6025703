// A decode step's run of Llama-family decoder layers in one call (kernels/cpu_decode.py):
// for each layer x += o(attn(rope(qkv(rms(x))))), then, where the layer has a dense MLP,
// x += down(silu_and_mul(gate_up(rms(x)))), every op the same native function, with the
// same arguments, that the layer's modules call one by one from Python, so the step's
// values are the same bit for bit. Where it has routed experts of the Qwen3-MoE kind
// (softmax over the router's logits, the top k, optionally renormalised), x += the
// ggml_moe call the SparseMoE module makes, after routing computed here: the same experts
// and weights up to float rounding of the router's product and softmax.
//
// Why: a decode step of a 1.5B model is ~28 layers x ~12 native calls; each call from
// Python costs 5-15 us of wrapper, view and ctypes work (rms_norm on 1,536 floats: 10.6 us
// through its wrapper, 4.2 us of it the ctypes call alone; the kernel itself well under 1),
// about 7 ms of a ~50 ms step on an AVX2 EPYC. Here the layers cost one ctypes call, and the
// step ran 1.26x faster (docs/benchmarks.md, "Decoder layers in one native call").
//
// Also here: store_kv_rows, the native KV-cache store of the cpu_native backend.

#include <cmath>
#include <cstdint>
#include <cstring>

#include "vec.h"

extern "C" {
#define GGML_PARTS_ARGS                                                                                    \
    const float *x, int R, int64_t ldx, int K, int nparts, const int *types, const uint8_t *const *ws, \
        const int64_t *strides, const int *rows, const int *offs, const float *bias, float *y, int64_t ldy, int threads
int ggml_linear_i16(GGML_PARTS_ARGS);
int ggml_linear_q8(GGML_PARTS_ARGS);
#undef GGML_PARTS_ARGS
int rms_norm(const float* x, int64_t x_stride, int64_t T, int64_t n, const float* weight, float eps, float* out,
             int threads);
int silu_and_mul(const float* x, int64_t x_stride, int64_t T, int64_t d, float* out, int64_t out_stride,
                 int threads);
int rope_neox(const float* q, int64_t q_stride, const float* k, int64_t k_stride, const float* cos_sin, int64_t T,
              int H, int KVH, int D, int rot, float* q_out, float* k_out, int threads);
int ggml_moe(const float* x, int T, int64_t ldx, int K, int topk, const int32_t* ids, const float* weights, int E,
             const int* types13, const uint8_t* const* ws13, const int64_t* strides13, int F, const int* types2,
             const uint8_t* const* ws2, const int64_t* strides2, int N, float* y, int many, int q8_rows,
             int64_t out_bytes, float* ws, const float* b13, const float* b2, float limit, float alpha, int threads);
int64_t ggml_moe_workspace(int T, int K, int topk, int F, int N, int64_t out_bytes, int threads);
int paged_decode_attention(const float* q, const int32_t* query_start, const void* k_cache, const void* v_cache,
                           const float* k_scale, const float* v_scale, int dtype, const int32_t* page_table,
                           int64_t pt_stride, const int32_t* seq_lens, int B, int H, int KVH, int D, int page_size,
                           float scale, float* out, int split, int threads, int window, const float* sinks);
}

namespace {

enum Store : int { F32 = 0, BF16 = 1, F16 = 2 };  // cpu_native._CODES (fp8 is not stored here)

// A packed projection as ggml_linear_q8 (q8 = 1) or ggml_linear_i16 (q8 = 0) take it: the
// arrays of cpu_ggml._i16_args, and the bias folded into the kernel as linear() passes it.
struct Lin {
    const int* types;
    const uint8_t* const* ws;
    const int64_t* strides;
    const int* rows;
    const int* offs;
    const float* bias;
    int nparts, n, k, q8;
};

// Routed experts as SparseMoE's fused call takes them (cpu_ggml.MoEPlan's arrays), and the
// Qwen3-MoE routing that chooses them.
struct Moe {
    const float* router;  // [E, hidden] fp32
    const int *types13, *types2;
    const uint8_t *const *ws13, *const *ws2;
    const int64_t *strides13, *strides2;
    int64_t out_bytes;
    float route_scale;
    int E, topk, renorm, F, mode, q8_rows;
};

// One decoder layer (kernels/cpu_decode.py's _Layer mirrors it field for field).
struct Layer {
    Lin qkv, o, gate_up, down;  // gate_up.n == 0: no dense MLP (moe.E > 0: routed experts)
    Moe moe;                    // moe.E == 0: none; neither: the caller runs the layer's MLP
    const float *attn_norm, *mlp_norm, *q_norm, *k_norm;  // q_norm null: no per-head q/k norm
    void *k_cache, *v_cache;
    float eps, qk_eps, scale;
    int cache_code, H, KVH, D;
};

// The step's inputs every layer shares: R token rows of B sequences, each sequence's last few
// tokens (one, or drafts being verified).
struct Step {
    const float* cos_sin;         // [R, rot]
    const int64_t* slots;         // [R] flat cache slots
    const int32_t* table;         // [B, table_stride] page table
    const int32_t* lens;          // [B] context lengths, the new tokens included
    const int32_t* query_start;   // [B + 1] each sequence's first row; null: one row each (R == B)
    int64_t table_stride, nslots;  // nslots: every layer's cache rows
    int R, B, rot, page_size, split, threads;
};

int linear(const Lin& l, const float* x, int R, int64_t ldx, float* y, int threads) {
    return (l.q8 ? ggml_linear_q8 : ggml_linear_i16)(x, R, ldx, l.k, l.nparts, l.types, l.ws, l.strides, l.rows,
                                                     l.offs, l.bias, y, l.n, threads);
}

// fp32 -> bf16, rounding to nearest even as torch's .to(torch.bfloat16) does (NaN kept a NaN).
inline uint16_t bf16_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
    return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Rows [T, n] (row stride ld) into the cache rows at `slots` (n values each), stored as `code`.
void store_rows(const float* x, int64_t ld, int T, int n, const int64_t* slots, void* cache, int code) {
    for (int t = 0; t < T; ++t) {
        const float* a = x + t * ld;
        const int64_t base = slots[t] * n;
        if (code == F32) {
            std::memcpy(static_cast<float*>(cache) + base, a, sizeof(float) * n);
        } else if (code == BF16) {
            uint16_t* o = static_cast<uint16_t*>(cache) + base;
            for (int i = 0; i < n; ++i) o[i] = bf16_bits(a[i]);
        } else {
            _Float16* o = static_cast<_Float16*>(cache) + base;  // round to nearest even, as torch
            for (int i = 0; i < n; ++i) o[i] = static_cast<_Float16>(a[i]);
        }
    }
}

// Router logits of h [R, hidden] (fp32 dot products), their softmax, the top k of each row
// (largest first; ties to the lower expert), renormalised to sum 1 if asked, times scale.
void route(const Moe& m, const float* h, int R, int hidden, float* logits, int32_t* ids, float* w, int threads) {
    const int E = m.E;
    const int nt = int64_t{E} * hidden * R >= (1 << 15) ? threads : 1;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int e = 0; e < E; ++e) {
        const float* a = m.router + int64_t{e} * hidden;
        for (int r = 0; r < R; ++r) {
            const float* b = h + int64_t{r} * hidden;
            vf acc = vf{};
            int i = 0;
            for (; i + W <= hidden; i += W) acc += ld(a + i) * ld(b + i);
            float sum = 0.0f;
            for (int j = 0; j < W; ++j) sum += acc[j];
            for (; i < hidden; ++i) sum += a[i] * b[i];
            logits[int64_t{r} * E + e] = sum;
        }
    }
    for (int r = 0; r < R; ++r) {
        float* p = logits + int64_t{r} * E;
        float top = p[0];
        for (int e = 1; e < E; ++e) top = p[e] > top ? p[e] : top;
        float z = 0.0f;
        for (int e = 0; e < E; ++e) z += (p[e] = std::exp(p[e] - top));
        for (int e = 0; e < E; ++e) p[e] /= z;
        int32_t* id = ids + int64_t{r} * m.topk;
        float* wr = w + int64_t{r} * m.topk;
        float kept = 0.0f;
        for (int j = 0; j < m.topk; ++j) {  // k passes: k is small (8 of 128)
            int best = -1;
            for (int e = 0; e < E; ++e) {
                bool taken = false;
                for (int i = 0; i < j; ++i) taken = taken || id[i] == e;
                if (!taken && (best < 0 || p[e] > p[best])) best = e;
            }
            id[j] = best;
            kept += (wr[j] = p[best]);
        }
        for (int j = 0; j < m.topk; ++j) wr[j] = (m.renorm ? wr[j] / (kept + 1e-20f) : wr[j]) * m.route_scale;
    }
}

}  // namespace

extern "C" {

// k [T, n] and v (row strides k_ld, v_ld) into k_cache/v_cache rows at slots (each cache
// [nslots, n] contiguous, stored as code 0 fp32, 1 bf16, 2 fp16). Returns 0, -1 for bad
// arguments, -2 for a slot outside [0, nslots).
int store_kv_rows(const float* k, int64_t k_ld, const float* v, int64_t v_ld, int T, int n, const int64_t* slots,
                  int64_t nslots, void* k_cache, void* v_cache, int code) {
    if (T < 0 || n <= 0 || code < F32 || code > F16) return -1;
    for (int t = 0; t < T; ++t)
        if (slots[t] < 0 || slots[t] >= nslots) return -2;
    store_rows(k, k_ld, T, n, slots, k_cache, code);
    store_rows(v, v_ld, T, n, slots, v_cache, code);
    return 0;
}

// Qwen3-MoE routing of h [R, hidden] by router [E, hidden] as decode_layers routes: ids and
// weights [R, topk]; logits: R * E floats of scratch. (For tests: the same routing in the
// modules' path makes the two paths' steps equal bit for bit.)
int moe_route(const float* router, int E, int hidden, const float* h, int R, int topk, int renorm, float scale,
              float* logits, int32_t* ids, float* w, int threads) {
    if (E <= 0 || topk <= 0 || topk > E || R < 0 || hidden <= 0) return -1;
    Moe m{};
    m.router = router, m.E = E, m.topk = topk, m.renorm = renorm, m.route_scale = scale;
    route(m, h, R, hidden, logits, ids, w, threads);
    return 0;
}

// Floats of the workspace decode_layers needs for R rows of these layers.
int64_t decode_layers_workspace(const Layer* layers, int n, int R, int hidden, int threads) {
    int64_t most = 0;
    for (int i = 0; i < n; ++i) {
        const Layer& L = layers[i];
        const int64_t q = int64_t{L.H} * L.D, kv = int64_t{L.KVH} * L.D;
        // qkv | q/k normed | q/k rotated | attention out | normed x | o or down out | gate|up
        int64_t f = (L.qkv.n + 2 * (q + kv) + q + 2 * int64_t{hidden} + L.gate_up.n) * R;
        if (L.moe.E)  // | router logits, ids, weights | ggml_moe's workspace
            f += int64_t{R} * (L.moe.E + 2 * L.moe.topk) +
                 ggml_moe_workspace(R, hidden, L.moe.topk, L.moe.F, hidden, L.moe.out_bytes, threads);
        most = f > most ? f : most;
    }
    return most;
}

// x [R, hidden] (contiguous) through layers[0..n) in place; ws: decode_layers_workspace floats.
// Returns 0, -1 for a slot outside the caches, or -(100 * (layer + 1) + what) where a kernel
// refused its arguments.
int decode_layers(const Layer* layers, int n, const Step* s, float* x, int hidden, float* ws) {
    const int R = s->R, th = s->threads;
    for (int r = 0; r < R; ++r)
        if (s->slots[r] < 0 || s->slots[r] >= s->nslots) return -1;
    for (int i = 0; i < n; ++i) {
        const Layer& L = layers[i];
        const int H = L.H, KVH = L.KVH, D = L.D, q = H * D, kv = KVH * D;
        float* qkv = ws;
        float* qn = qkv + int64_t{R} * L.qkv.n;  // q then k, per-head normed
        float* kn = qn + int64_t{R} * q;
        float* qr = kn + int64_t{R} * kv;  // q then k, rotated
        float* kr = qr + int64_t{R} * q;
        float* att = kr + int64_t{R} * kv;
        float* h = att + int64_t{R} * q;
        float* y = h + int64_t{R} * hidden;
        float* gu = y + int64_t{R} * hidden;
        const int err = -100 * (i + 1);
        if (rms_norm(x, hidden, R, hidden, L.attn_norm, L.eps, h, th)) return err - 1;
        if (linear(L.qkv, h, R, hidden, qkv, th)) return err - 2;
        const float *qs = qkv, *ks = qkv + q;
        int64_t q_ld = L.qkv.n, k_ld = L.qkv.n;
        if (L.q_norm) {  // as rms_norm over each head's D values: rows of D at stride D
            for (int r = 0; r < R; ++r) {
                if (rms_norm(qkv + int64_t{r} * L.qkv.n, D, H, D, L.q_norm, L.qk_eps, qn + int64_t{r} * q, th) ||
                    rms_norm(qkv + int64_t{r} * L.qkv.n + q, D, KVH, D, L.k_norm, L.qk_eps, kn + int64_t{r} * kv, th))
                    return err - 3;
            }
            qs = qn, ks = kn, q_ld = q, k_ld = kv;
        }
        if (rope_neox(qs, q_ld, ks, k_ld, s->cos_sin, R, H, KVH, D, s->rot, qr, kr, th)) return err - 4;
        if (L.cache_code < F32 || L.cache_code > F16) return err - 5;
        store_rows(kr, kv, R, kv, s->slots, L.k_cache, L.cache_code);
        store_rows(qkv + q + kv, L.qkv.n, R, kv, s->slots, L.v_cache, L.cache_code);
        if (paged_decode_attention(qr, s->query_start, L.k_cache, L.v_cache, nullptr, nullptr, L.cache_code, s->table,
                                   s->table_stride, s->lens, s->B, H, KVH, D, s->page_size, L.scale, att, s->split,
                                   th, 0, nullptr))
            return err - 6;
        if (linear(L.o, att, R, q, y, th)) return err - 7;
        for (int64_t j = 0; j < int64_t{R} * hidden; ++j) x[j] = y[j] + x[j];
        if (L.moe.E) {
            const Moe& m = L.moe;
            if (rms_norm(x, hidden, R, hidden, L.mlp_norm, L.eps, h, th)) return err - 8;
            float* logits = gu;
            int32_t* ids = reinterpret_cast<int32_t*>(logits + int64_t{R} * m.E);
            float* w = logits + int64_t{R} * (m.E + m.topk);
            route(m, h, R, hidden, logits, ids, w, th);
            if (ggml_moe(h, R, hidden, hidden, m.topk, ids, w, m.E, m.types13, m.ws13, m.strides13, m.F, m.types2,
                         m.ws2, m.strides2, hidden, y, m.mode, m.q8_rows, m.out_bytes, w + int64_t{R} * m.topk,
                         nullptr, nullptr, 0.0f, 0.0f, th))
                return err - 12;
            for (int64_t j = 0; j < int64_t{R} * hidden; ++j) x[j] = y[j] + x[j];
            continue;
        }
        if (L.gate_up.n == 0) continue;
        const int F = L.gate_up.n / 2;
        if (rms_norm(x, hidden, R, hidden, L.mlp_norm, L.eps, h, th)) return err - 8;
        if (linear(L.gate_up, h, R, hidden, gu, th)) return err - 9;
        if (silu_and_mul(gu, 2 * F, R, F, gu, 2 * F, th)) return err - 10;  // over its gate half
        if (linear(L.down, gu, R, 2 * F, y, th)) return err - 11;
        for (int64_t j = 0; j < int64_t{R} * hidden; ++j) x[j] = y[j] + x[j];
    }
    return 0;
}

}  // extern "C"
