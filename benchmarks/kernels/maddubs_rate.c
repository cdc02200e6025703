// The AVX2 int8 multiply-add rates ggml_gemm_k8's tiles are bounded by, on this core (no
// memory traffic: every operand is in L1 or registers):
//   - vpmaddubsw alone, vpaddw alone, and the two as ggml_gemm_k8 pairs them;
//   - its quad step as kernels/native/ggml_gemm_k8.cpp issues it (two 8-row weight vectors,
//     4 rows of x broadcast from memory, 8 vpmaddubsw and 8 vpaddw), and the same with the
//     broadcasts replaced by a register copy.
// ns per instruction / per quad, and GMAC/s per core for the quad (256 u8 x s8 products).
//
//   gcc -O2 -mavx2 benchmarks/kernels/maddubs_rate.c -o /tmp/maddubs_rate && /tmp/maddubs_rate
//
// One thread; run it with nothing else on the machine.

#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define EIGHT(OP)                                                                                  \
    OP " %%ymm1,%%ymm0,%%ymm2\n" OP " %%ymm1,%%ymm0,%%ymm3\n" OP " %%ymm1,%%ymm0,%%ymm4\n" OP        \
       " %%ymm1,%%ymm0,%%ymm5\n" OP " %%ymm1,%%ymm0,%%ymm6\n" OP " %%ymm1,%%ymm0,%%ymm7\n" OP        \
       " %%ymm1,%%ymm0,%%ymm8\n" OP " %%ymm1,%%ymm0,%%ymm9\n"
#define PAIR(D, A) "vpmaddubsw %%ymm1,%%ymm0," D "\n vpaddw " D "," A "," A "\n"
// One row of a quad: broadcast (or copy) the row's 4 activations, two products, two adds.
#define ROW(LOAD, X, A, B) \
    LOAD(X) "vpmaddubsw %%ymm14,%%ymm12,%%ymm15\n vpmaddubsw %%ymm14,%%ymm13,%%ymm14\n" \
            "vpaddw %%ymm15," A "," A "\n vpaddw %%ymm14," B "," B "\n"
#define BCAST(X) "vpbroadcastd " X "(%[xp]),%%ymm14\n"
#define COPY(X) "vmovdqa %%ymm8,%%ymm14\n"
#define QUAD(LOAD, WO, XO)                                                                          \
    "vmovdqu " WO "(%[wp]),%%ymm12\n vmovdqu " WO "+32(%[wp]),%%ymm13\n" ROW(LOAD, XO "+0", "%%ymm0", \
    "%%ymm1") ROW(LOAD, XO "+4", "%%ymm2", "%%ymm3") ROW(LOAD, XO "+8", "%%ymm4", "%%ymm5")        \
        ROW(LOAD, XO "+12", "%%ymm6", "%%ymm7")
#define QUADS(LOAD)                                                                                \
    QUAD(LOAD, "0", "0") QUAD(LOAD, "64", "16") QUAD(LOAD, "128", "32") QUAD(LOAD, "192", "48")     \
        QUAD(LOAD, "256", "64") QUAD(LOAD, "320", "80") QUAD(LOAD, "384", "96") QUAD(LOAD, "448", "112")
#define CLOBBER "rcx", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", \
    "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15"
#define LOOP(BODY, N) \
    __asm__ volatile("vpxor %%ymm0,%%ymm0,%%ymm0\n vpxor %%ymm1,%%ymm1,%%ymm1\n mov %[n],%%rcx\n1:\n" BODY \
                     "dec %%rcx\n jnz 1b\n" ::[n] "r"(N), [wp] "r"(w), [xp] "r"(x) : CLOBBER)

int main(void) {
    static uint8_t w[512] __attribute__((aligned(64)));
    static int8_t x[128] __attribute__((aligned(64)));
    for (int i = 0; i < 512; i++) w[i] = i % 16;
    for (int i = 0; i < 128; i++) x[i] = (int8_t)((i * 7) % 200 - 100);
    const long n = 100000000, nq = 25000000;
    double t = now();
    LOOP(EIGHT("vpmaddubsw"), n);
    printf("vpmaddubsw: %.3f ns each (independent)\n", (now() - t) / n / 8 * 1e9);
    t = now();
    LOOP(EIGHT("vpaddw"), n);
    printf("vpaddw: %.3f ns each (independent)\n", (now() - t) / n / 8 * 1e9);
    t = now();
    LOOP(PAIR("%%ymm2", "%%ymm10") PAIR("%%ymm3", "%%ymm11") PAIR("%%ymm4", "%%ymm12") PAIR("%%ymm5", "%%ymm13"), n);
    printf("vpmaddubsw + vpaddw into a sum: %.3f ns a pair\n", (now() - t) / n / 4 * 1e9);
    t = now();
    LOOP(QUADS(BCAST), nq);
    double dt = now() - t;
    printf("ggml_gemm_k8 quad (4 rows broadcast from memory): %.3f ns, %.0f GMAC/s\n", dt / nq / 8 * 1e9,
           nq * 8 * 256.0 / dt / 1e9);
    t = now();
    LOOP(QUADS(COPY), nq);
    dt = now() - t;
    printf("the same quad, x copied from a register: %.3f ns, %.0f GMAC/s\n", dt / nq / 8 * 1e9,
           nq * 8 * 256.0 / dt / 1e9);
    return 0;
}
